"""The test oracle: batch normalization from its definition, in float64 NumPy, sharing nothing with
accelbn (no import of it, none of its formulas), so that a formula wrong in the library cannot be
wrong here in the same way. Slow and obvious on purpose; the formulas are PyTorch's documented ones.

Arrays are taken as the caller's (any dtype, layout and channel axis); results are float64.
"""

from typing import NamedTuple

import numpy as np


class Forward(NamedTuple):
    y: np.ndarray
    mean: np.ndarray  # the statistics y was normalized with (batch or running)
    invstd: np.ndarray  # 1 / sqrt(var + eps)
    running_mean: np.ndarray | None  # after the update (training), else as given
    running_var: np.ndarray | None


def _rows(a, axis):
    """``a`` as float64 (values, C): one column per channel."""
    a = np.asarray(a, dtype=np.float64)
    return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])


def _back(rows, like, axis):
    moved = np.moveaxis(np.empty(like.shape), axis, -1)
    return np.moveaxis(rows.reshape(moved.shape), -1, axis)


def _vector(v, channels, fill):
    return np.full(channels, fill) if v is None else np.asarray(v, dtype=np.float64).copy()


def batch_norm(x, running_mean, running_var, weight, bias, training, momentum=0.1, eps=1e-5, axis=1):
    """``torch.nn.functional.batch_norm``: y = (x - mean) / sqrt(var + eps) * weight + bias, with the
    batch mean and biased batch variance in training (the running statistics then move towards the
    batch mean and the unbiased variance by ``momentum``), the running statistics in eval."""
    rows = _rows(x, axis)
    n, channels = rows.shape
    rm = None if running_mean is None else _vector(running_mean, channels, 0.0)
    rv = None if running_var is None else _vector(running_var, channels, 1.0)
    if training:
        mean = rows.sum(axis=0) / n
        deviations = rows - mean
        var = (deviations * deviations).sum(axis=0) / n
        if rm is not None:
            rm = (1 - momentum) * rm + momentum * mean
            rv = (1 - momentum) * rv + momentum * var * n / (n - 1)
    else:
        mean, var = rm, rv
    invstd = 1 / np.sqrt(var + eps)
    y = (rows - mean) * invstd * _vector(weight, channels, 1.0) + _vector(bias, channels, 0.0)
    return Forward(_back(y, np.asarray(x), axis), mean, invstd, rm, rv)


def batch_norm_backward(dy, x, mean, invstd, weight, training=True, axis=1):
    """Gradients of :func:`batch_norm` at the saved statistics: with ``training`` the statistics are
    functions of x (dx = weight * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))), otherwise
    constants (dx = dy * weight * invstd). dweight = sum(dy * x_hat), dbias = sum(dy)."""
    g = _rows(dy, axis)
    rows = _rows(x, axis)
    n, channels = rows.shape
    mean, invstd = np.asarray(mean, np.float64), np.asarray(invstd, np.float64)
    w = _vector(weight, channels, 1.0)
    x_hat = (rows - mean) * invstd
    dbias = g.sum(axis=0)
    dweight = (g * x_hat).sum(axis=0)
    if training:
        dx = w * invstd * (g - dbias / n - x_hat * dweight / n)
    else:
        dx = g * w * invstd
    return _back(dx, np.asarray(x), axis), dweight, dbias
