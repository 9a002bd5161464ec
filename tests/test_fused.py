"""Batch norm fused with ReLU, and with a residual add and ReLU (``batch_norm_relu``), on every
backend: bit for bit the unfused chain on the same backend (batch_norm, add, ReLU; the backward of
batch norm on the masked dy), against PyTorch's autograd in float64, in every dtype, through every
layout, and with clear errors. The CUDA kernels run on the harness with tiny blocks too."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import LAYOUTS, ArraysOn, assert_matches_reference, channel_params, random_array

import accelbn as abn

RESIDUAL = [pytest.param(False, id="relu"), pytest.param(True, id="add-relu")]


def _case(make, axis, dtype=np.float32):
    x = make().astype(dtype)
    z = random_array(x.shape, dtype, seed=11)
    dy = random_array(x.shape, dtype, seed=12)
    return x, z, dy, channel_params(x.shape[axis], dtype)


def _unfused(on, x, z, dy, p, training, axis, backend):
    """The chain the fused op must equal: batch_norm, + z, ReLU; then batch_norm_backward of dy where
    the ReLU passed, at the fused forward's float64 statistics."""
    rm, rv = on.put(p["running_mean"].copy()), on.put(p["running_var"].copy())
    w, b = on.put(p["weight"]), on.put(p["bias"])
    y = on.get(abn.batch_norm(on.put(x), rm, rv, w, b, training, axis=axis, backend=backend))
    pre = y if z is None else (y + z).astype(x.dtype)
    return np.maximum(pre, 0).astype(x.dtype), np.where(pre <= 0, 0, dy).astype(x.dtype), on.get(rm), on.get(rv)


@pytest.mark.parametrize("residual", RESIDUAL)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_is_the_unfused_chain_bit_for_bit(on, any_backend, layout, dtype, training, residual):
    make, axis = LAYOUTS[layout]
    x, z, dy, p = _case(make, axis, dtype)
    z = z if residual else None
    want_y, masked_dy, want_rm, want_rv = _unfused(on, x, z, dy, p, training, axis, any_backend)
    rm, rv = on.put(p["running_mean"].copy()), on.put(p["running_var"].copy())
    w, b = on.put(p["weight"]), on.put(p["bias"])
    y, stats = abn.batch_norm_relu(on.put(x), rm, rv, w, b, training, residual=on.put(z), axis=axis,
                                   return_stats=True, backend=any_backend)
    np.testing.assert_array_equal(on.get(y), want_y)
    np.testing.assert_array_equal(on.get(rm), want_rm)
    np.testing.assert_array_equal(on.get(rv), want_rv)
    assert stats.mean.dtype == stats.invstd.dtype == np.float64
    grads = abn.batch_norm_relu_backward(on.put(dy), on.put(x), stats, w, b, residual=on.put(z), training=training,
                                         axis=axis, backend=any_backend)
    want = abn.batch_norm_backward(on.put(masked_dy), on.put(x), stats, w, training=training, axis=axis,
                                   backend=any_backend)
    assert len(grads) == (4 if residual else 3)
    if residual:
        np.testing.assert_array_equal(on.get(grads[1]), masked_dy)
    for got, expected in zip((grads[0], *grads[-2:]), want):
        if any_backend == "numpy":  # NumPy's sums follow the arrays' strides, which differ between the two
            np.testing.assert_allclose(on.get(got), on.get(expected), rtol=1e-12 if dtype == np.float64 else 1e-5, atol=1e-12)
        else:
            np.testing.assert_array_equal(on.get(got), on.get(expected))
    assert on.get(grads[0]).dtype == x.dtype and on.get(grads[-1]).dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NCHW-chunks", "NHWC-axis-1", "NC-many-rows", "NCDHW"])
def test_the_backward_mask_holds_where_the_relu_input_is_zero(on, any_backend, layout, dtype):
    """Inputs on the ReLU's edge: integer x with a zero mean per channel (so many inputs of the ReLU
    are exactly 0 and stop the gradient), negative, zero and positive weights, zero and nonzero biases:
    the fused backward (which finds where the ReLU stopped x once per channel) is still the unfused chain."""
    make, axis = LAYOUTS[layout]
    half = np.rint(make() * 2)
    x = np.concatenate([half, -half]).astype(dtype)  # each value and its negation: the means are 0
    dy = random_array(x.shape, dtype, seed=12)
    channels = x.shape[axis]
    p = {
        "running_mean": np.zeros(channels, dtype),
        "running_var": np.ones(channels, dtype),
        "weight": np.resize(np.array([1.25, -0.75, 0.0, 0.0, -2.0], dtype), channels),
        "bias": np.resize(np.array([0.0, 0.0, -0.5, 0.5, 0.25], dtype), channels),
    }
    _, masked_dy, _, _ = _unfused(on, x, None, dy, p, True, axis, any_backend)
    assert 0 < np.count_nonzero(masked_dy == 0) - np.count_nonzero(dy == 0) < x.size
    w, b = on.put(p["weight"]), on.put(p["bias"])
    _, stats = abn.batch_norm_relu(on.put(x), None, None, w, b, True, axis=axis, return_stats=True, backend=any_backend)
    grads = abn.batch_norm_relu_backward(on.put(dy), on.put(x), stats, w, b, axis=axis, backend=any_backend)
    want = abn.batch_norm_backward(on.put(masked_dy), on.put(x), stats, w, axis=axis, backend=any_backend)
    for got, expected in zip(grads, want):
        if any_backend == "numpy":
            np.testing.assert_allclose(on.get(got), on.get(expected), rtol=1e-12 if dtype == np.float64 else 1e-5, atol=1e-12)
        else:
            np.testing.assert_array_equal(on.get(got), on.get(expected))


def test_relu_stops_are_exactly_where_the_formula_stops():
    """The stopped interval per channel (``elements.relu_stops``) against the forward's formula in
    the dtype's own arithmetic, at its edges to a few ulps, at special values and at random values,
    for ordinary channels and degenerate ones (scale 0 or infinite, shift infinite or NaN, a mean far
    from the data)."""
    from numba import njit

    from accelbn.backends.numba_cpu.elements import relu_stops

    stops_of = njit(lambda like, mean, scale, shift: relu_stops(like, mean, scale, shift))
    rng = np.random.default_rng(3)
    mean = np.concatenate([rng.standard_normal(40) * 10, [0.0, 1e30, -3.0, 0.5, 2.0, 1.0, 0.1, 0.0, 1.0, -1e-3]])
    scale = np.concatenate([rng.uniform(-2, 2, 40), [0.0, 1.0, np.inf, 0.0, -np.inf, 1e-30, 0.0, 1.0, np.nan, -1e30]])
    shift = np.concatenate([rng.standard_normal(40), [-1.0, 0.0, 1.0, 0.0, 0.5, -np.inf, np.inf, np.nan, 0.0, 1.0]])
    for dtype in (np.float32, np.float64):
        info = np.finfo(dtype)
        stops = stops_of(np.zeros(1, dtype), mean, scale, shift)
        assert stops.dtype == dtype
        special = np.array([-np.inf, np.inf, np.nan, 0.0, -0.0, info.max, -info.max, info.tiny, -info.tiny,
                            info.smallest_subnormal, -info.smallest_subnormal, 1.0, -1.0], dtype)
        for c in range(mean.size):
            hi = dtype(mean[c])
            lo = dtype(mean[c] - np.float64(hi))
            s, b = dtype(scale[c]), dtype(shift[c])
            edges = [v for v in stops[:, c] if np.isfinite(v)] + [hi]
            with np.errstate(over="ignore"):
                near = [v for e in edges for v in _ulps_around(e, 4)]
            x = np.concatenate([special, np.array(near, dtype), rng.standard_normal(200).astype(dtype) * 10, [hi]])
            with np.errstate(all="ignore"):
                formula = ((x - hi) - lo) * s + b <= 0
            np.testing.assert_array_equal((x >= stops[0, c]) & (x <= stops[1, c]), formula,
                                          err_msg=f"{np.dtype(dtype)} channel {c}: {stops[:, c]}")


def _ulps_around(v, n):
    below, above = [v], [v]
    for _ in range(n):
        below.append(np.nextafter(below[-1], -np.inf))
        above.append(np.nextafter(above[-1], np.inf))
    return below[1:] + above


@pytest.mark.parametrize("residual", RESIDUAL)
@pytest.mark.parametrize("layout", ["NCHW-chunks", "NHWC-axis-1", "NC-many-rows"])
def test_matches_torch_autograd(on, any_backend, layout, residual):
    """relu(bn(x) [+ z]) and its gradients in x, weight, bias and z, against autograd in float64."""
    make, axis = LAYOUTS[layout]
    x, z, dy, p = _case(make, axis, np.float64)
    move = lambda a: np.moveaxis(a, axis, 1)  # noqa: E731
    t = {k: torch.from_numpy(v.copy()) for k, v in p.items()}  # torch updates its running statistics in place
    tx, tz = (torch.from_numpy(np.ascontiguousarray(move(a))).requires_grad_() for a in (x, z))
    tw, tb = t["weight"].requires_grad_(), t["bias"].requires_grad_()
    ty = F.batch_norm(tx, t["running_mean"], t["running_var"], tw, tb, True)
    ty = torch.relu(ty + tz if residual else ty)
    ty.backward(torch.from_numpy(np.ascontiguousarray(move(dy))))
    rm, rv = on.put(p["running_mean"].copy()), on.put(p["running_var"].copy())
    zz = on.put(z) if residual else None
    y, stats = abn.batch_norm_relu(on.put(x), rm, rv, on.put(p["weight"]), on.put(p["bias"]), True, residual=zz,
                                   axis=axis, return_stats=True, backend=any_backend)
    grads = [on.get(g) for g in abn.batch_norm_relu_backward(on.put(dy), on.put(x), stats, on.put(p["weight"]),
                                                             on.put(p["bias"]), residual=zz, axis=axis,
                                                             backend=any_backend)]
    pairs = [(move(on.get(y)), ty), (on.get(rm), t["running_mean"]), (on.get(rv), t["running_var"]),
             (move(grads[0]), tx.grad), (grads[-2], tw.grad), (grads[-1], tb.grad)]
    if residual:
        pairs.append((move(grads[1]), tz.grad))
    for got, want in pairs:
        assert_matches_reference(got, want.detach().numpy())


@pytest.mark.parametrize("residual", RESIDUAL)
@pytest.mark.parametrize("dtype", [np.float16, "bfloat16", np.float32])
def test_every_dtype_within_its_tolerance(on, any_backend, dtype, residual):
    """Against float64 on the same (rounded) values; the backward's reference masks dy where this
    dtype's output is zero, which is where its own ReLU stopped the gradient."""
    import ml_dtypes

    dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    x, z, dy, p = _case(LAYOUTS["NCHW-chunks"][0], 1, dtype)
    x64, z64, dy64 = (a.astype(np.float64) for a in (x, z, dy))
    p = {k: v.astype(np.float32) for k, v in p.items()}
    w64, b64 = (p[k].astype(np.float64) for k in ("weight", "bias"))
    zz = on.put(z) if residual else None
    y, stats = abn.batch_norm_relu(on.put(x), None, None, on.put(p["weight"]), on.put(p["bias"]), True, residual=zz,
                                   return_stats=True, backend=any_backend)
    grads = [on.get(g) for g in abn.batch_norm_relu_backward(on.put(dy), on.put(x), stats, on.put(p["weight"]),
                                                             on.put(p["bias"]), residual=zz, backend=any_backend)]
    y = on.get(y)
    want_y, stats64 = abn.batch_norm_relu(x64, None, None, w64, b64, True, residual=z64 if residual else None,
                                          return_stats=True, backend="numpy")
    masked = np.where(y.astype(np.float64) > 0, dy64, 0.0)
    want = abn.batch_norm_backward(masked, x64, stats64, w64, backend="numpy")
    assert y.dtype == grads[0].dtype == dtype
    assert_matches_reference(y, want_y)
    assert_matches_reference(grads[0], want[0])
    if residual:
        np.testing.assert_array_equal(grads[1], masked.astype(dtype))
    for got, expected in zip(grads[-2:], want[1:]):
        assert_matches_reference(got, expected)


def test_out_may_be_the_residual_itself(on, any_backend):
    x, z, _, p = _case(LAYOUTS["NCHW"][0], 1)
    want = abn.batch_norm_relu(on.put(x), None, None, on.put(p["weight"]), on.put(p["bias"]), True,
                               residual=on.put(z), backend=any_backend)
    zz = on.put(z.copy())
    y = abn.batch_norm_relu(on.put(x), None, None, on.put(p["weight"]), on.put(p["bias"]), True, residual=zz, out=zz,
                            backend=any_backend)
    assert y is zz
    np.testing.assert_array_equal(on.get(zz), on.get(want))


def test_nan_passes_the_relu_and_its_gradient_as_torch_does(backend):
    x = random_array((4, 3, 5))
    x[1, 2, 3] = np.nan
    y, stats = abn.batch_norm_relu(x, np.zeros(3, np.float32), np.ones(3, np.float32), return_stats=True,
                                   backend=backend)
    tx = torch.from_numpy(x).requires_grad_()
    ty = torch.relu(F.batch_norm(tx, torch.zeros(3), torch.ones(3), training=False))
    dy = np.ones_like(x)
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-6, equal_nan=True)
    dx = abn.batch_norm_relu_backward(dy, x, stats, training=False, backend=backend)[0]
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-6, equal_nan=True)


def test_errors_name_the_argument_and_change_nothing(backend):
    x, z, dy, p = _case(LAYOUTS["NCHW"][0], 1)
    rm, rv = p["running_mean"].copy(), p["running_var"].copy()
    shared = np.zeros(x.size + 1, x.dtype)
    for kwargs, error, words in [
        ({"residual": z[:, :2]}, ValueError, "residual must have the shape"),
        ({"residual": z.astype(np.float64)}, TypeError, "residual must have the dtype"),
        ({"residual": [1.0]}, TypeError, "residual must be a numpy.ndarray"),
        ({"out": shared[1:].reshape(x.shape), "residual": shared[:-1].reshape(x.shape)}, ValueError, "out overlaps residual"),
    ]:
        with pytest.raises(error, match=words):
            abn.batch_norm_relu(x, rm, rv, p["weight"], p["bias"], True, backend=backend, **kwargs)
        np.testing.assert_array_equal(rm, p["running_mean"])
        np.testing.assert_array_equal(rv, p["running_var"])
    y, stats = abn.batch_norm(x, None, None, training=True, return_stats=True, backend=backend)
    with pytest.raises(TypeError, match="stats.mean must be float64"):
        abn.batch_norm_relu_backward(dy, x, stats, backend=backend)
    _, stats = abn.batch_norm_relu(x, None, None, training=True, return_stats=True, backend=backend)
    with pytest.raises(ValueError, match="bias must have shape"):
        abn.batch_norm_relu_backward(dy, x, stats, None, np.zeros(2, np.float32), backend=backend)
    with pytest.raises(ValueError, match="residual must have the shape"):
        abn.batch_norm_relu_backward(dy, x, stats, residual=z[:1], backend=backend)


@pytest.mark.parametrize("residual", RESIDUAL)
@pytest.mark.parametrize("shape, axis", [((5, 6, 9, 7), 1), ((40, 37), 1), ((3, 4, 5, 8), -1)])
def test_cuda_tiny_blocks_match_the_numba_backend_bit_for_bit_in_float64(tiny_blocks, shape, axis, residual):
    """With 32-thread blocks and many items each kernel's every path runs; float64 makes the two
    backends' element formulas round alike, so CUDA's bits must be numba's."""
    on = ArraysOn("cupy")
    x = random_array(shape, np.float64, loc=2.0)
    z = random_array(shape, np.float64, seed=5) if residual else None
    dy = random_array(shape, np.float64, seed=6)
    p = channel_params(shape[axis], np.float64)
    for training in (True, False):
        results = []
        for where, backend in ((on, "cupy"), (ArraysOn("numba"), "numba")):
            y, stats = abn.batch_norm_relu(where.put(x), where.put(p["running_mean"].copy()),
                                           where.put(p["running_var"].copy()), where.put(p["weight"]),
                                           where.put(p["bias"]), training, residual=where.put(z), axis=axis,
                                           return_stats=True, backend=backend)
            grads = abn.batch_norm_relu_backward(where.put(dy), where.put(x), stats, where.put(p["weight"]),
                                                 where.put(p["bias"]), residual=where.put(z), training=training,
                                                 axis=axis, backend=backend)
            results.append([where.get(a) for a in (y, *grads)])
        for got, want in zip(*results):
            assert_matches_reference(got, want)
        # the mask is where the forward's output is zero, on each backend
        np.testing.assert_array_equal(results[0][0] > 0, results[1][0] > 0)
