"""Shared fixtures: the backend table every conformance test runs through, and the float64 oracle
(tests/oracle.py, which shares no code with accelbn)."""

import ctypes
import hashlib
import os
import pathlib
import sys
import tempfile
import zlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import settings

# Numba invalidates a cached kernel when its own file changes, not when a function it inlines from
# another file does (accelbn/_formulas.py). Tests compile into a cache keyed by those sources, so an
# edited formula can never be tested through a stale kernel. Set before Numba is first imported.
_ROOT = pathlib.Path(__file__).resolve().parent.parent
_KERNEL_SOURCES = [_ROOT / "backends" / f for f in ("numba_cpu.py", "_lines.py")] + [_ROOT / "accelbn" / "_formulas.py"]
_DIGEST = hashlib.sha256(b"".join(p.read_bytes() for p in _KERNEL_SOURCES)).hexdigest()[:16]
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "accelbn-numba-cache", _DIGEST))

import oracle

import accelbn as abn

settings.register_profile("default", max_examples=40, deadline=None, print_blob=True)
settings.load_profile("default")

# Every backend that can run here goes through the same tests; the NumPy reference is the oracle.
# `any_backend` includes "cupy", whose cases carry the "gpu" mark (`pytest -m gpu` runs just those);
# its tests move arrays with `on`. `backend` is the CPU backends, for tests written on NumPy arrays.
BACKENDS = abn.available_backends()
CPU_BACKENDS = [b for b in BACKENDS if b != "cupy"]

# The cupy backend runs on a CUDA device when CuPy sees one, and otherwise on the CUDA-on-CPU
# harness (tests/cudaemu) with the stand-in cupy; ACCELBN_CUDA_TESTS=emulator picks the harness
# even on a GPU. ACCELBN_CUDA_TESTS=required (CI) makes a missing harness an error, not a skip.
_CUDA_TESTS = os.environ.get("ACCELBN_CUDA_TESTS", "")
GPU_DEVICE = "cupy" in BACKENDS and _CUDA_TESTS != "emulator"


def _emulator_missing():
    from cudaemu.build import BuildUnavailable, compiler, cuda_include

    try:
        compiler()
        cuda_include()
    except BuildUnavailable as e:
        return str(e)
    return None


EMULATOR_MISSING = _emulator_missing()
if EMULATOR_MISSING and _CUDA_TESTS == "required":
    raise pytest.UsageError(f"ACCELBN_CUDA_TESTS=required, but the CUDA-on-CPU harness cannot run: {EMULATOR_MISSING}")


@pytest.fixture
def emulated_cupy(monkeypatch, request):
    """The stand-in cupy in ``sys.modules`` for one test, the backend bound to it, and a seeded
    random fiber schedule that differs from test to test; everything is restored afterwards."""
    from cudaemu import runtime, standin_cupy

    from accelbn import _backends

    cupy = standin_cupy.MODULE
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    from accelbn.backends import cupy_gpu

    monkeypatch.setattr(cupy_gpu, "cupy", cupy)
    monkeypatch.setattr(_backends._GpuBackend, "_device_seen", False)
    monkeypatch.setattr(runtime.settings, "after_launch", standin_cupy.after_launch)
    monkeypatch.setattr(runtime.settings, "schedule", "random")
    monkeypatch.setattr(runtime.settings, "seed", zlib.crc32(request.node.nodeid.encode()))
    return cupy


@pytest.fixture
def gpu(request):
    """CuPy, real on a device or the stand-in on the harness, for a test of the cupy backend."""
    if GPU_DEVICE:
        import cupy

        return cupy
    if EMULATOR_MISSING:
        pytest.skip(f"no CUDA device, and the CUDA-on-CPU harness cannot run: {EMULATOR_MISSING}")
    return request.getfixturevalue("emulated_cupy")


@pytest.fixture
def cupy_gpu(gpu):
    """The GPU backend's module (bound to the stand-in cupy on the harness)."""
    from accelbn.backends import cupy_gpu

    return cupy_gpu


@pytest.fixture
def tiny_blocks(cupy_gpu, monkeypatch):
    """32-thread blocks, one vector or row per thread per item, and fewer blocks than items, so
    even small arrays span many work items, blocks loop over items, and every merge is exercised."""
    for name, value in [("BLOCK", 32), ("TILE_VECTORS_PER_THREAD", 1), ("TILE_ROWS_PER_THREAD", 1),
                        ("TARGET_ITEMS", 1 << 20), ("MAX_BLOCKS", 7)]:
        monkeypatch.setattr(cupy_gpu, name, value)
    return cupy_gpu


@pytest.fixture(params=CPU_BACKENDS + [pytest.param("cupy", marks=pytest.mark.gpu)])
def any_backend(request):
    if request.param == "cupy":
        request.getfixturevalue("gpu")
    return request.param


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def _to_device(a):
    """A CuPy array with ``a``'s shape, dtype, strides and offset: a view into a device copy of the
    whole host buffer ``a`` spans, so strided and negative-stride layouts reach the kernels as they are."""
    import cupy

    if a.size == 0:
        return cupy.empty(a.shape, a.dtype)
    low, high = np.lib.array_utils.byte_bounds(a)
    span = cupy.asarray(np.frombuffer((ctypes.c_char * (high - low)).from_address(low), np.uint8))
    start = a.__array_interface__["data"][0] - low
    return cupy.ndarray(a.shape, a.dtype, memptr=span.data + start, strides=a.strides)


class ArraysOn:
    """Test arrays on the backend's array library: ``put`` moves NumPy inputs there (layout kept),
    ``get`` brings results back to NumPy. Both are the identity for the CPU backends."""

    def __init__(self, backend):
        self.gpu = backend == "cupy"

    def put(self, a):
        return _to_device(a) if self.gpu and a is not None else a

    def puts(self, params):
        return {k: self.put(v) for k, v in params.items()}

    def get(self, a):
        return a.get() if self.gpu and a is not None else a


@pytest.fixture
def on(any_backend):
    return ArraysOn(any_backend)


def rel_error(actual, expected):
    """Norm-wise relative error, the measure the tolerances are stated in."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = np.linalg.norm(expected.ravel())
    return np.linalg.norm((actual - expected).ravel()) / (scale if scale else 1.0)


# float32 within 2e-5 (norm-wise) of a float64 reference; float64 within 1e-10; float16 and bfloat16
# at their precision (unit roundoff 2**-11 and 2**-8).
TOLERANCE = {np.float16: 2e-3, ml_dtypes.bfloat16: 1e-2, np.float32: 2e-5, np.float64: 1e-10}


def tolerance(dtype):
    return TOLERANCE[np.dtype(dtype).type]


def assert_matches_reference(got, want):
    """``got`` within its dtype's tolerance of the float64 ``want``, plus the error that rounding
    ``want`` itself to that dtype costs (it dominates only for results near the dtype's underflow)."""
    representable = rel_error(np.asarray(want).astype(got.dtype), want)
    assert rel_error(got, want) <= tolerance(got.dtype) + 2 * representable


def reference_forward(x, running_mean, running_var, weight, bias, training, momentum=0.1, eps=1e-5, axis=1):
    """The oracle's forward (tests/oracle.py, independent of accelbn): ``(y, stats, running_mean,
    running_var)`` in float64, the running statistics as updated (new arrays; the inputs are unchanged)."""
    r = oracle.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, axis)
    return r.y, abn.BatchStats(r.mean, r.invstd), r.running_mean, r.running_var


def reference_backward(dy, x, stats, weight, training, axis=1):
    """The oracle's ``(dx, dweight, dbias)`` at the saved statistics ``stats``, in float64."""
    return oracle.batch_norm_backward(dy, x, stats.mean, stats.invstd, weight, training, axis)


def channel_params(channels, dtype, seed=7):
    """Running statistics, weight and bias of ``channels`` channels, away from 0 and 1 so that a
    value in the wrong slot shows."""
    rng = np.random.default_rng(seed)
    return {
        "running_mean": rng.standard_normal(channels).astype(dtype),
        "running_var": rng.uniform(0.5, 2.0, channels).astype(dtype),
        "weight": rng.uniform(0.5, 1.5, channels).astype(dtype),
        "bias": rng.standard_normal(channels).astype(dtype),
    }


def numba_outputs(x, dy, axis, out=None):
    """Every output of the numba backend on ``x``: train forward (into ``out`` when given), its saved
    and updated running statistics, eval with them, and the trained and frozen backward."""
    p = channel_params(x.shape[axis], x.dtype)
    y, stats = abn.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], True, 0.1, 1e-5,
                              axis=axis, out=out, return_stats=True, backend="numba")
    evaluated = abn.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], axis=axis, backend="numba")
    trained = abn.batch_norm_backward(dy, x, stats, p["weight"], axis=axis, backend="numba")
    frozen = abn.batch_norm_backward(dy, x, stats, p["weight"], training=False, axis=axis, backend="numba")
    return [y.copy(), *stats, p["running_mean"], p["running_var"], evaluated, *trained, *frozen]


def random_array(shape, dtype=np.float32, seed=0, loc=0.0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + loc).astype(dtype)


def pytest_terminal_summary(terminalreporter, config):
    """The CUDA kernels' register counts, under ``-v`` or when something failed: a quiet run is short."""
    if config.option.verbose <= 0 and not terminalreporter.stats.get("failed"):
        return
    from test_gpu_compile import registers_report

    for line in registers_report(config):
        terminalreporter.write_line(line)
