"""Every backend, GPU included, through one table of layouts and modes, against the float64 NumPy reference."""

import ml_dtypes
import numpy as np
import pytest
from support import LAYOUTS, channel_params, random_array, reference_backward, reference_forward, rel_error, tolerance

import accelbn as abn


@pytest.fixture(params=list(LAYOUTS))
def layout(request):
    make, axis = LAYOUTS[request.param]
    return make(), axis


@pytest.fixture(params=[np.float32, np.float64])
def dtype(request):
    return request.param


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_matches_reference(any_backend, on, layout, dtype, training):
    x, axis = layout
    x = x.astype(dtype)
    p = channel_params(x.shape[axis], dtype)
    expected, expected_stats, expected_rm, expected_rv = reference_forward(x, **p, training=training, axis=axis)
    p_on = on.puts(p)
    y, stats = abn.batch_norm(on.put(x), **p_on, training=training, axis=axis, return_stats=True, backend=any_backend)
    y, stats = on.get(y), abn.BatchStats(on.get(stats.mean), on.get(stats.invstd))
    p = {k: on.get(v) for k, v in p_on.items()}
    assert y.shape == x.shape and y.dtype == x.dtype
    tol = tolerance(dtype)
    assert rel_error(y, expected) < tol
    assert stats.mean.dtype == stats.invstd.dtype == (np.float64 if dtype == np.float64 else np.float32)
    assert rel_error(stats.mean, expected_stats.mean) < tol
    assert rel_error(stats.invstd, expected_stats.invstd) < tol
    assert rel_error(p["running_mean"], expected_rm) < tol
    assert rel_error(p["running_var"], expected_rv) < tol


@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_backward_matches_reference(any_backend, on, layout, dtype, training):
    x, axis = layout
    x = x.astype(dtype)
    p = channel_params(x.shape[axis], dtype)
    dy = random_array(x.shape, dtype, seed=11)
    _, stats = abn.batch_norm(x, None, None, p["weight"], p["bias"], True, axis=axis, return_stats=True)
    expected = reference_backward(dy, x, stats, p["weight"], training, axis=axis)
    stats_on = abn.BatchStats(on.put(stats.mean), on.put(stats.invstd))
    grads = abn.batch_norm_backward(
        on.put(dy), on.put(x), stats_on, on.put(p["weight"]), training=training, axis=axis, backend=any_backend
    )
    dx, dweight, dbias = map(on.get, grads)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert dweight.dtype == dbias.dtype == dtype
    tol = tolerance(dtype)
    for got, want in zip((dx, dweight, dbias), expected):
        assert rel_error(got, want) < tol


@pytest.mark.parametrize("half", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_half_input_with_float32_parameters(any_backend, on, half, layout):
    axis = 1 if layout == "NCHW" else -1
    x = random_array((8, 3, 6, 6) if axis == 1 else (8, 6, 6, 3)).astype(half)
    p = channel_params(3, np.float32)
    expected, _, expected_rm, expected_rv = reference_forward(x, **p, training=True, axis=axis)
    p_on = on.puts(p)
    y, stats = abn.batch_norm(on.put(x), **p_on, training=True, axis=axis, return_stats=True, backend=any_backend)
    stats = abn.BatchStats(on.get(stats.mean), on.get(stats.invstd))
    y = on.get(y)
    assert y.dtype == half and stats.mean.dtype == np.float32
    assert rel_error(y, expected) < tolerance(half)
    # statistics are accumulated in float32 or better
    assert rel_error(on.get(p_on["running_var"]), expected_rv) < 1e-6
    dy = random_array(x.shape, seed=5).astype(half)
    stats_on = abn.BatchStats(on.put(stats.mean), on.put(stats.invstd))
    dx, dweight, _ = abn.batch_norm_backward(on.put(dy), on.put(x), stats_on, p_on["weight"], axis=axis, backend=any_backend)
    dx, dweight = on.get(dx), on.get(dweight)
    assert dx.dtype == half and dweight.dtype == np.float32
    assert rel_error(dx, reference_backward(dy, x, stats, p["weight"], True, axis=axis)[0]) < tolerance(half)


def test_without_weight_bias_or_running_stats(any_backend, on):
    x = random_array((6, 4, 3, 3))
    expected, _, _, _ = reference_forward(x, None, None, None, None, training=True)
    assert rel_error(on.get(abn.batch_norm(on.put(x), None, None, training=True, backend=any_backend)), expected) < 2e-5


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_out_receives_the_result(any_backend, on, dtype, training):
    x = on.put(random_array((4, 3, 5, 5), dtype))
    expected = abn.batch_norm(x, **on.puts(channel_params(3, dtype)), training=training, backend=any_backend)
    out = on.put(np.empty(x.shape, dtype))
    assert abn.batch_norm(x, **on.puts(channel_params(3, dtype)), training=training, out=out, backend=any_backend) is out
    np.testing.assert_array_equal(on.get(out), on.get(expected))


@pytest.mark.parametrize(
    "make_out",
    [lambda x: np.empty(x.shape[::-1], x.dtype).T, lambda x: np.empty(x.shape + (2,), x.dtype)[..., 1]],
    ids=["transposed", "strided"],
)
def test_out_with_another_memory_layout(any_backend, on, make_out):
    x = random_array((4, 3, 5, 5))
    out = on.put(make_out(x))
    abn.batch_norm(on.put(x), None, None, training=True, out=out, backend=any_backend)
    expected = on.get(abn.batch_norm(on.put(x), None, None, training=True, backend=any_backend))
    np.testing.assert_allclose(on.get(out), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_in_place_forward(any_backend, on, training):
    x = on.put(random_array((4, 3, 5, 5)))
    stats = lambda: (on.put(np.zeros(3, np.float32)), on.put(np.ones(3, np.float32)))  # noqa: E731
    expected = on.get(abn.batch_norm(x, *stats(), training=training, backend=any_backend))
    y = abn.batch_norm(x, *stats(), training=training, out=x, backend=any_backend)
    assert y is x
    np.testing.assert_array_equal(on.get(x), expected)


@pytest.mark.parametrize("alias", ["dy", "x"])
def test_in_place_backward(any_backend, on, alias):
    x = on.put(random_array((4, 3, 5, 5)))
    dy = on.put(random_array(x.shape, seed=1))
    _, stats = abn.batch_norm(x, None, None, training=True, return_stats=True, backend=any_backend)
    expected = [on.get(a) for a in abn.batch_norm_backward(dy, x, stats, backend=any_backend)]
    target = dy if alias == "dy" else x
    dx, dweight, dbias = abn.batch_norm_backward(dy, x, stats, out=target, backend=any_backend)
    assert dx is target
    np.testing.assert_array_equal(on.get(dx), expected[0])
    np.testing.assert_array_equal(on.get(dweight), expected[1])
    np.testing.assert_array_equal(on.get(dbias), expected[2])


def test_big_endian_input(backend):
    x = random_array((4, 3, 5, 5), np.float64)
    swapped = x.astype(x.dtype.newbyteorder(">"))
    y = abn.batch_norm(swapped, None, None, training=True, backend=backend)
    assert y.dtype == swapped.dtype
    np.testing.assert_array_equal(y, abn.batch_norm(x, None, None, training=True, backend=backend))


def test_empty_batch_in_training_leaves_running_stats(any_backend, on):
    x = on.put(np.empty((0, 3, 4), np.float32))
    rm, rv = on.put(np.zeros(3, np.float32)), on.put(np.ones(3, np.float32))
    y = abn.batch_norm(x, rm, rv, training=True, backend=any_backend)
    assert y.shape == x.shape
    np.testing.assert_array_equal(on.get(rm), 0)
    np.testing.assert_array_equal(on.get(rv), 1)


def test_eval_of_empty_batch(any_backend, on):
    x = on.put(np.empty((0, 3), np.float32))
    rm, rv = on.put(np.zeros(3, np.float32)), on.put(np.ones(3, np.float32))
    assert abn.batch_norm(x, rm, rv, backend=any_backend).shape == (0, 3)
