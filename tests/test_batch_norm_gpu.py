"""What only the GPU backend has: work cut into many tiny blocks, vector widths, CuPy streams, no
host synchronization, the layer on the device. The conformance table (test_conformance.py) runs on
the GPU too; these tests add the device-specific cases. They run on a CUDA device when CuPy sees
one and otherwise on the CUDA-on-CPU harness (tests/cudaemu), except the few marked as needing
real hardware (streams, graph capture)."""

import ml_dtypes
import numpy as np
import pytest
from support import LAYOUTS, GPU_DEVICE, ArraysOn, channel_params, random_array, reference_backward, reference_forward, rel_error, tolerance

import accelbn as abn

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu")]
needs_device = pytest.mark.skipif(
    not GPU_DEVICE, reason="needs a CUDA device: the harness has no streams, graphs or host synchronization"
)

on = ArraysOn("cupy")


def _train_and_backward(x, axis, dtype, training=True):
    p = channel_params(x.shape[axis], np.float32 if dtype != np.float64 else dtype)
    dy = random_array(x.shape, seed=11).astype(dtype)
    p_on = on.puts(p)
    y, stats = abn.batch_norm(on.put(x), **p_on, training=training, axis=axis, return_stats=True)
    grads = abn.batch_norm_backward(on.put(dy), on.put(x), stats, p_on["weight"], training=training, axis=axis)
    return p, dy, on.get(y), stats, [on.get(g) for g in grads], {k: on.get(v) for k, v in p_on.items()}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_tiny_blocks_match_the_reference(tiny_blocks, name, dtype, training):
    make, axis = LAYOUTS[name]
    x = make().astype(dtype)
    p, dy, y, stats, (dx, dweight, dbias), updated = _train_and_backward(x, axis, dtype, training)
    expected_y, _, expected_rm, expected_rv = reference_forward(x, **p, training=training, axis=axis)
    host_stats = abn.BatchStats(on.get(stats.mean), on.get(stats.invstd))
    expected_grads = reference_backward(dy, x, host_stats, p["weight"], training, axis=axis)
    tol = tolerance(dtype)
    assert rel_error(y, expected_y) < tol
    if training:
        assert rel_error(updated["running_mean"], expected_rm) < max(tol, 1e-6)
        assert rel_error(updated["running_var"], expected_rv) < max(tol, 1e-6)
    for got, want in zip((dx, dweight, dbias), expected_grads):
        assert rel_error(got, want) < tol


@pytest.mark.parametrize("shape_axis", [((70000, 3), 1), ((3, 70001), 0), ((65537, 2, 3), 1), ((2, 3, 70000, 2), 1)])
def test_more_rows_than_a_grid_dimension_allows(shape_axis):
    shape, axis = shape_axis
    x = random_array(shape, seed=4)
    p, dy, y, stats, grads, _ = _train_and_backward(x, axis, np.float32)
    assert rel_error(y, reference_forward(x, **p, training=True, axis=axis)[0]) < tolerance(np.float32)
    host_stats = abn.BatchStats(on.get(stats.mean), on.get(stats.invstd))
    for got, want in zip(grads, reference_backward(dy, x, host_stats, p["weight"], True, axis=axis)):
        assert rel_error(got, want) < tolerance(np.float32)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_results_are_bitwise_identical_run_to_run(layout):
    x = random_array((16, 32, 9, 9) if layout == "NCHW" else (16, 9, 9, 32), seed=8)
    axis = 1 if layout == "NCHW" else -1
    first = _train_and_backward(x, axis, np.float32)
    second = _train_and_backward(x, axis, np.float32)
    np.testing.assert_array_equal(first[2], second[2])
    for a, b in zip(first[4], second[4]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_unaligned_views_take_the_scalar_kernels_and_agree(cuda, monkeypatch, layout):
    widths = []
    kernel = cuda.batch_norm._kernel
    monkeypatch.setattr(cuda.batch_norm, "_kernel", lambda dtype, name, *args: widths.append(args[:1]) or kernel(dtype, name, *args))
    base = random_array((16 * 32 * 8 * 8 + 1,), seed=9)
    shape = (16, 32, 8, 8) if layout == "NCHW" else (16, 8, 8, 32)
    axis = 1 if layout == "NCHW" else -1
    aligned = on.put(base[1:].reshape(shape))  # a device copy of the same values, 16-byte aligned
    unaligned = on.put(base)[1:].reshape(shape)  # 4 bytes off a 16-byte boundary
    assert aligned.data.ptr % 16 == 0
    assert unaligned.data.ptr % 16 == 4
    got = on.get(abn.batch_norm(unaligned, None, None, training=True, axis=axis))
    assert set(widths) == {(1,), ()}  # element kernels at width 1, finishing kernels
    widths.clear()
    want = on.get(abn.batch_norm(aligned, None, None, training=True, axis=axis))
    assert set(widths) == {(4,), ()}
    assert rel_error(got, want) < 1e-6


@needs_device
def test_runs_on_the_current_stream():
    import cupy

    x = on.put(random_array((8, 16, 12, 12), seed=2))
    expected = on.get(abn.batch_norm(x, None, None, training=True))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        y = abn.batch_norm(x, None, None, training=True)
    stream.synchronize()
    np.testing.assert_array_equal(on.get(y), expected)


@needs_device
def test_a_call_never_synchronizes_with_the_host():
    # Stream capture fails on any synchronizing call (a device-to-host copy, a sync, a blocking
    # allocation). Warm up first so kernels are compiled and the memory pool holds free blocks.
    import cupy

    x = on.put(random_array((8, 16, 10, 10), seed=3))
    dy = on.put(random_array((8, 16, 10, 10), seed=4))
    rm, rv = on.put(np.zeros(16, np.float32)), on.put(np.ones(16, np.float32))

    def step():
        _, stats = abn.batch_norm(x, rm, rv, training=True, return_stats=True)
        abn.batch_norm_backward(dy, x, stats)
        abn.batch_norm(x, rm, rv, training=False)

    step()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        step()
        stream.begin_capture()
        step()
        graph = stream.end_capture()
    assert graph is not None


def test_layer_on_the_device_matches_the_cpu_layer():
    import cupy

    x = random_array((8, 5, 6, 6), seed=6)
    dy = random_array(x.shape, seed=7)
    cpu, gpu = abn.BatchNorm(5), abn.BatchNorm(5).to("cupy")
    assert gpu.library == "cupy" and isinstance(gpu.running_mean, cupy.ndarray)
    for _ in range(3):
        np.testing.assert_allclose(on.get(gpu(on.put(x))), cpu(x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(on.get(gpu.backward(on.put(dy))), cpu.backward(dy), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(on.get(gpu.running_var), cpu.running_var, rtol=1e-6)
    assert int(gpu.num_batches_tracked) == 3
    with pytest.raises(TypeError, match=r"x is a numpy array but this layer's parameters are cupy arrays"):
        gpu(x)
    gpu.to("numpy")
    np.testing.assert_allclose(gpu.running_mean, cpu.running_mean, rtol=1e-6, atol=1e-7)


def test_errors_name_the_argument_on_the_gpu():
    x = on.put(random_array((4, 3, 5)))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        abn.batch_norm(x, None, None, on.put(np.ones(4, np.float32)), training=True)
    with pytest.raises(TypeError, match="weight is a numpy array but x is a cupy array"):
        abn.batch_norm(x, None, None, np.ones(3, np.float32), training=True)
    with pytest.raises(ValueError, match="out overlaps x without being x itself"):
        abn.batch_norm(x[:, :, 1:], None, None, training=True, out=x[:, :, :-1])
