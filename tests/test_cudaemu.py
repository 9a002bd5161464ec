"""The CUDA-on-CPU harness (tests/cudaemu) is a test, not a toy: it catches what a GPU would punish
or hide (divergent barriers, shuffles with wrong masks, out-of-bounds accesses, misaligned vector
accesses, arguments of the wrong width), its schedules expose missing barriers, it launches every
kernel instantiation the backend has, and bugs planted in batch_norm.cu fail the tests.

It runs without a GPU and is skipped only where a host compiler or the CUDA headers are missing
(`.ci/run` makes that an error)."""


import ml_dtypes
import numpy as np
import pytest
from support import EMULATOR_MISSING, ArraysOn, channel_params, random_array, reference_backward, reference_forward, rel_error

import accelbn as abn

pytestmark = pytest.mark.skipif(bool(EMULATOR_MISSING), reason=f"the CUDA-on-CPU harness cannot run: {EMULATOR_MISSING}")

on = ArraysOn("cupy")

# Kernels that break CUDA's rules, one rule each. `// line:NAME` marks the line a report must name.
SELFTEST = r"""
#include <cuda_fp16.h>

__global__ void divergent_barrier(float* out) {
    if (threadIdx.x < 16) __syncthreads();  // line:divergent
    out[threadIdx.x] = 1;
}

__global__ void barrier_after_return(float* out) {
    if (threadIdx.x >= 16) return;
    __syncthreads();  // line:after-return
    out[threadIdx.x] = 1;
}

__global__ void mask_without_caller(float* out) {
    out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1.0f, 1);  // line:mask
}

__global__ void shuffle_missing_lanes(float* out) {
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);  // line:missing-lanes
}

__global__ void write_past_end(float* out, long long n) {
    out[n + threadIdx.x] = 1;  // line:past-end
}

__global__ void read_before_start(const float* x, float* out) {
    out[threadIdx.x] = x[static_cast<int>(threadIdx.x) - 1];  // line:before-start
}

__global__ void write_dynamic_shared_past_end(float* out, int n) {
    extern __shared__ float dynamic[];
    dynamic[n] = 1;  // line:shared-past-end
    out[threadIdx.x] = dynamic[0];
}

struct alignas(16) Four {
    float v[4];
};
__global__ void misaligned_vector(const float* x, float* out) {
    const Four f = *reinterpret_cast<const Four*>(x + 1);  // line:misaligned
    out[threadIdx.x] = f.v[0];
}

// Each block's thread 0 reads the static and the dynamic shared value before anyone writes it,
// then writes its own: the next block must see poison again, not this block's values.
__global__ void shared_poisoned_per_block(unsigned* out) {
    __shared__ unsigned s;
    extern __shared__ unsigned d[];
    if (threadIdx.x == 0) {
        out[2 * blockIdx.x] = s;
        out[2 * blockIdx.x + 1] = d[0];
        s = blockIdx.x;
        d[0] = blockIdx.x;
    }
    __syncthreads();
}

// Thread 0 sums what the others wrote to shared memory, with the barrier between write and read
// present or not: without it, the sum depends on which threads happened to run first.
__global__ void block_sum(const float* x, float* out, int with_barrier) {
    __shared__ float s[64];
    s[threadIdx.x] = x[threadIdx.x];
    if (with_barrier) __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0;
        for (int i = 0; i < 64; ++i) total += s[i] == s[i] ? s[i] : 1000.0f;  // poison counts as 1000
        out[0] = total;
    }
    __syncthreads();
}

__global__ void takes_int_and_double(int n, double scale, double* out) { out[threadIdx.x] = n * scale; }
"""

_NAMES = ["divergent_barrier", "barrier_after_return", "mask_without_caller", "shuffle_missing_lanes",
          "write_past_end", "read_before_start", "write_dynamic_shared_past_end", "misaligned_vector",
          "shared_poisoned_per_block", "block_sum", "takes_int_and_double"]


def _line(tag):
    """The line of ``SELFTEST`` marked ``// line:tag``."""
    return next(i for i, text in enumerate(SELFTEST.split("\n"), start=1) if f"// line:{tag}" in text)


@pytest.fixture(scope="module")
def selftest():
    from cudaemu import runtime

    module = runtime.Module(SELFTEST, _NAMES, filename="selftest.cu")
    return module.get_function


@pytest.fixture
def cupy(emulated_cupy):
    """The stand-in, even where a GPU is present: these tests are about the harness."""
    return emulated_cupy


@pytest.mark.parametrize(
    "kernel, tag, rule",
    [
        ("divergent_barrier", "divergent", "threads of one block wait at different __syncthreads|never reach"),
        ("barrier_after_return", "after-return", "never reach"),
        ("mask_without_caller", "mask", "a shuffle's mask must name the calling lane"),
        ("shuffle_missing_lanes", "missing-lanes", "a lane named in a shuffle's mask does not reach it"),
    ],
)
def test_broken_synchronization_is_an_error_naming_block_thread_and_line(selftest, cupy, kernel, tag, rule):
    from cudaemu import KernelError

    out = cupy.zeros(32, np.float32)
    with pytest.raises(KernelError, match=rule) as e:
        selftest(kernel)((2,), (32,), (out,))
    message = str(e.value)
    assert message.startswith(kernel) and "block (" in message and "thread (" in message
    assert f"selftest.cu:{_line(tag)}" in message


@pytest.mark.parametrize(
    "kernel, make_args, shared, tag, where",
    [
        ("write_past_end", lambda cp: (cp.zeros(32, np.float32), np.int64(32)), 0, "past-end",
         r"\d+ bytes past the end of a float32 array of shape \(32,\)"),
        ("write_dynamic_shared_past_end", lambda cp: (cp.zeros(32, np.float32), np.int32(8)), 32, "shared-past-end",
         "invalid memory access"),
        ("misaligned_vector", lambda cp: (cp.zeros(32, np.float32), cp.zeros(32, np.float32)), 0, "misaligned",
         "misaligned|undefined behaviour"),
    ],
)
def test_faults_are_errors_naming_the_allocation_and_line(selftest, cupy, kernel, make_args, shared, tag, where):
    from cudaemu import KernelError

    with pytest.raises(KernelError, match=where) as e:
        selftest(kernel)((1,), (32,), make_args(cupy), shared_mem=shared)
    message = str(e.value)
    assert "block (0,0,0) thread (" in message
    if "invalid memory access" in message or "undefined" in message:
        assert f"selftest.cu:{_line(tag)}" in message


def test_a_read_before_the_start_of_an_array_faults(selftest, cupy):
    # The array sits at the end of its pages, so x[-1] is a readable canary byte, not a guard page:
    # what faults is reading the page before an array that fills its pages exactly.
    from cudaemu import KernelError

    x = cupy.zeros(1024, np.float32)  # 4096 bytes: one whole page
    with pytest.raises(KernelError, match="bytes before the start of a float32 array"):
        selftest("read_before_start")((1,), (32,), (x, cupy.zeros(32, np.float32)))


def test_shared_memory_is_poisoned_before_every_block(selftest, cupy):
    out = cupy.zeros(8, np.uint32)
    selftest("shared_poisoned_per_block")((4,), (32,), (out,), shared_mem=4)
    assert (out.get() == 0xFFFFFFFF).all()


def test_too_much_shared_memory_is_refused(selftest, cupy):
    from cudaemu import KernelError

    with pytest.raises(KernelError, match="more than 49152 without an opt-in"):
        selftest("shared_poisoned_per_block")((1,), (32,), (cupy.zeros(2, np.uint32),), shared_mem=48 * 1024 + 4)


def test_a_missing_barrier_changes_results_with_the_schedule(selftest, cupy):
    from cudaemu import schedule

    x = cupy.asarray(np.arange(64, dtype=np.float32))
    sums = {}
    for with_barrier in (1, 0):
        for name in ("forward", "reverse", "random", "warp-ahead-high", "warp-ahead-low"):
            out = cupy.zeros(1, np.float32)
            with schedule(name, seed=3):
                selftest("block_sum")((1,), (64,), (x, out, np.int32(with_barrier)))
            sums[with_barrier, name] = float(out.get()[0])
    assert {v for (b, _), v in sums.items() if b} == {float(np.arange(64).sum())}
    assert len({v for (b, _), v in sums.items() if not b}) > 1


def test_launch_arguments_must_have_the_kernels_types(selftest, cupy):
    f = selftest("takes_int_and_double")
    out = cupy.zeros(32, np.float64)
    with pytest.raises(TypeError, match=r"argument 0 is a int64 \(8 bytes\) but the kernel takes a int32 \(4 bytes\)"):
        f((1,), (32,), (5, 2.0, out))  # a Python int goes as 64 bits
    with pytest.raises(TypeError, match=r"argument 1 is a float32 .* takes a float64"):
        f((1,), (32,), (np.int32(5), np.float32(2.0), out))
    with pytest.raises(TypeError, match="argument 2 must be a float64 array, got float32"):
        f((1,), (32,), (np.int32(5), 2.0, cupy.zeros(32, np.float32)))
    with pytest.raises(TypeError, match="argument 2 must be a device array"):
        f((1,), (32,), (np.int32(5), 2.0, np.zeros(32)))
    f((1,), (32,), (np.int32(5), 2.0, out))
    assert (out.get() == 10.0).all()


# --- the project's kernels ------------------------------------------------------------------------------


# One case per loop family and vector width: (shape, axis), each spanning several tiles at 32 and 64
# threads per block. Rows of a multiple of every vector width take the vector kernels, odd ones the
# scalar kernels.
_FAMILIES = [((9, 8, 4, 8), 1), ((5, 5, 3, 7), 1), ((3, 4, 5, 16), -1), ((37, 9), 1)]


def _run(x, axis, training):
    """Forward (train or eval) and backward (trained or frozen statistics) on the device; host results:
    batch norm's (9 arrays), then the fused ReLU's, the fused residual-and-ReLU's (with its residual's
    gradient) and Batch Renormalization's forward."""
    params = channel_params(x.shape[axis], np.float32)
    p = on.puts(params)
    dy = random_array(x.shape, seed=5).astype(x.dtype)
    y, stats = abn.batch_norm(on.put(x), **p, training=training, axis=axis, return_stats=True)
    grads = abn.batch_norm_backward(on.put(dy), on.put(x), stats, p["weight"], training=training, axis=axis)
    outputs = [y, stats.mean, stats.invstd, *grads, p["running_mean"], p["running_var"]]
    return params, dy, [on.get(a) for a in outputs + _fused(x, dy, axis, training, params, on)]


def _fused(x, dy, axis, training, params, where, backend=None):
    """The fused ops' outputs on ``where``'s arrays: relu(bn(x)), its dx; relu(bn(x) + z), its dx and
    dz; and batch_renorm(x)."""
    p = where.puts(params)
    z = where.put(random_array(x.shape, seed=6).astype(x.dtype))
    results = []
    for residual in (None, z):
        y, stats = abn.batch_norm_relu(where.put(x), p["running_mean"].copy(), p["running_var"].copy(), p["weight"],
                                       p["bias"], training, residual=residual, axis=axis, return_stats=True,
                                       backend=backend)
        grads = abn.batch_norm_relu_backward(where.put(dy), where.put(x), stats, p["weight"], p["bias"],
                                             residual=residual, training=training, axis=axis, backend=backend)
        results += [y, *grads[:-2]]
    renorm = [p["running_mean"].copy(), p["running_var"].copy(), p["running_var"].copy(), p["running_mean"].copy(),
              p["running_var"].copy()]
    results.append(abn.batch_renorm(where.put(x), *renorm, p["weight"], p["bias"], training, rmax=1.2, dmax=0.1,
                                    axis=axis, backend=backend))
    return results


def test_every_kernel_instantiation_is_launched(cupy, tiny_blocks):
    from cudaemu import runtime

    runtime.launched.clear()
    for dtype in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
        for shape, axis in _FAMILIES:
            for training in (True, False):
                _run(random_array(shape, seed=1).astype(dtype), axis, training)
    expected = {name for names in tiny_blocks.batch_norm.compile_units().values() for name in names}
    assert sorted(expected - runtime.launched) == []


@pytest.mark.parametrize("shape, axis", [((5, 8, 6, 8), 1), ((7, 3, 4, 24), -1), ((41, 9), 1)], ids=["NCHW", "NHWC", "NC"])
def test_results_are_bitwise_identical_under_every_schedule(cupy, tiny_blocks, shape, axis):
    from cudaemu import runtime, schedule

    x = random_array(shape, seed=2, loc=2.0)
    results = {}
    for name, seed in [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2), ("warp-ahead-high", 0),
                       ("warp-ahead-low", 0)]:
        with schedule(name, seed):
            results[name, seed] = _run(x, axis, True)[2]
    first = results["forward", 0]
    for key, outputs in results.items():
        for a, b in zip(first, outputs):
            np.testing.assert_array_equal(a, b, err_msg=f"schedule {key}")
    assert runtime.settings.schedule == "random"  # restored to the fixture's


# --- planted bugs -----------------------------------------------------------------------------------------

# (name, text in batch_norm.cu or common.cuh, its replacement): each must make a test below fail.
MUTANTS = [
    ("block_reduce without its first barrier", "    if (lane == 0) scratch[warp] = value;\n    __syncthreads();",
     "    if (lane == 0) scratch[warp] = value;"),
    ("reduce_rows without its second barrier",
     "        if (row < half) value = combine(value, scratch[row * lanes + lane]);\n        __syncthreads();",
     "        if (row < half) value = combine(value, scratch[row * lanes + lane]);"),
    ("a shuffle mask of half a warp", "constexpr unsigned FULL_MASK = 0xffffffffu;",
     "constexpr unsigned FULL_MASK = 0x0000ffffu;"),
    ("a shuffle offset that skips a level", "for (int offset = 16; offset > 0; offset /= 2) value = combine(value, shuffle_down(value, offset));\n    if (lane == 0)",
     "for (int offset = 8; offset > 0; offset /= 2) value = combine(value, shuffle_down(value, offset));\n    if (lane == 0)"),
    ("a channels-first tile one vector too long", "end(min(begin + tile_vectors, vectors))",
     "end(min(begin + tile_vectors + 1, vectors))"),
    ("the residual dropped from the ReLU's input", "if constexpr (RESIDUAL) v = from_compute<T>(to_compute(v) + to_compute(z));",
     "if constexpr (false) v = from_compute<T>(to_compute(v) + to_compute(z));"),
    ("the fused epilogue without its ReLU", "if constexpr (E != PLAIN) return to_compute(v) < A(0) ? from_compute<T>(A(0)) : v;",
     "if constexpr (E == ADD_RELU) return to_compute(v) < A(0) ? from_compute<T>(A(0)) : v;"),
    ("channels-last rows up to and including the tile's end", "for (index_t r = tile.row_begin + row0; r < tile.row_end; r += row_step) {\n                const Pack<T, V> p = load<T, V>(x + xs.at(r, c, 0));",
     "for (index_t r = tile.row_begin + row0; r <= tile.row_end; r += row_step) {\n                const Pack<T, V> p = load<T, V>(x + xs.at(r, c, 0));"),
]


def _mutant_outcome(cuda, monkeypatch, tmp_path, original, replacement):
    """What the planted bug does to forward and backward on every loop family, under four schedules:
    an error, or results that differ from the reference (None when nothing notices)."""
    from cudaemu import KernelError, schedule

    sources = {path: path.read_text() for path in (cuda.batch_norm.SOURCE, cuda.launcher.HEADER)}
    [(path, text)] = [(path, text) for path, text in sources.items() if original in text]
    assert text.count(original) == 1, f"the mutation no longer matches {path.name}"
    mutated = tmp_path / path.name
    mutated.write_text(text.replace(original, replacement))
    monkeypatch.setattr(*((cuda.batch_norm, "SOURCE") if path == cuda.batch_norm.SOURCE else (cuda.launcher, "HEADER")), mutated)
    monkeypatch.setattr(cuda.launcher, "BLOCK", 64)  # two warps, so that block_reduce's warps meet in shared memory
    cuda.launcher._module.cache_clear()
    try:
        for shape, axis in _FAMILIES:
            x = random_array(shape, seed=1, loc=1.0)
            for name in ("forward", "reverse", "warp-ahead-low", "warp-ahead-high"):
                try:
                    with schedule(name):
                        params, dy, got = _run(x, axis, True)
                except KernelError as e:
                    return f"KernelError: {e}"
                want_y, stats, _, _ = reference_forward(x, **{**params, "running_mean": None, "running_var": None},
                                                        training=True, axis=axis)
                want_dx = reference_backward(dy, x, stats, params["weight"], True, axis=axis)[0]
                want_fused = [a for a in _fused(x, dy, axis, True, params, ArraysOn("numpy"), "numpy")]
                error = max(rel_error(got[0], want_y), rel_error(got[3], want_dx),
                            *(rel_error(a, b) for a, b in zip(got[9:], want_fused)))
                if not error < 2e-5:
                    return f"{shape} axis {axis}, schedule {name}: relative error {error:.1e}"
        return None
    finally:
        cuda.launcher._module.cache_clear()


@pytest.mark.parametrize("name, original, replacement", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_a_planted_bug_in_the_kernels_is_caught(cupy, tiny_blocks, monkeypatch, tmp_path, name, original, replacement):
    outcome = _mutant_outcome(tiny_blocks, monkeypatch, tmp_path, original, replacement)
    assert outcome is not None, f"{name}: no test noticed"
    print(f"{name}: {outcome}")
