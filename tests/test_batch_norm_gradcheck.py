"""Finite-difference check of the backward pass in float64, independent of PyTorch."""

import numpy as np
import pytest
from support import random_array

import accelbn as abn


def _loss(x, weight, bias, dy, training, running):
    rm, rv = running
    y = abn.batch_norm(x, rm.copy(), rv.copy(), weight, bias, training, backend="numpy")
    return float(np.sum(y * dy))


def _numeric_gradient(f, a, h=1e-6):
    grad = np.empty_like(a)
    for i in np.ndindex(a.shape):
        saved = a[i]
        a[i] = saved + h
        up = f()
        a[i] = saved - h
        down = f()
        a[i] = saved
        grad[i] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("shape, axis", [((5, 3), 1), ((3, 2, 4), 1), ((2, 3, 2, 2), -1)], ids=["NC", "NCL", "NHWC"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_backward_equals_central_differences(backend, shape, axis, training):
    c = shape[axis]
    x = random_array(shape, np.float64, loc=0.5, scale=2.0)
    dy = random_array(shape, np.float64, seed=1)
    weight, bias = random_array(c, np.float64, seed=2), random_array(c, np.float64, seed=3)
    running = (random_array(c, np.float64, seed=4), np.abs(random_array(c, np.float64, seed=5)) + 0.5)
    f = lambda: _loss(x, weight, bias, dy, training, running)
    if training:
        _, stats = abn.batch_norm(x, None, None, weight, bias, True, axis=axis, return_stats=True, backend=backend)
    else:
        _, stats = abn.batch_norm(x, *running, weight, bias, False, axis=axis, return_stats=True, backend=backend)
    dx, dweight, dbias = abn.batch_norm_backward(dy, x, stats, weight, training=training, axis=axis, backend=backend)
    f = lambda: float(np.sum(abn.batch_norm(x, *(r.copy() for r in running), weight, bias, training, axis=axis) * dy))
    np.testing.assert_allclose(dx, _numeric_gradient(f, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dweight, _numeric_gradient(f, weight), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dbias, _numeric_gradient(f, bias), rtol=1e-6, atol=1e-8)
