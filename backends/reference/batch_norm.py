"""The NumPy backend: batch normalization written for clarity, in float64.

It follows the same interface as the fast backends, on the canonical view ``(outer, C, inner)``, but
makes no attempt at speed. It is tested like them, against the tests' oracle (tests/oracle.py),
which shares no code with accelbn.
"""

import numpy as np

from accelbn.backends.formulas import backward_coefficients, inverse_std, renorm_affine, renorm_correction

# The dtypes the kernels read and write directly; the front converts anything else to float32.
STORAGE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_CHANNEL_SUM_AXES = (0, 2)


def _per_channel(v):
    """Broadcast a per-channel vector against (outer, C, inner)."""
    return np.asarray(v, dtype=np.float64)[None, :, None]


def _channel_mean(x64):
    # Shifting by one sample per channel makes a constant channel's mean exact.
    shift = x64[:1, :, :1]
    return (shift + (x64 - shift).mean(axis=_CHANNEL_SUM_AXES, keepdims=True))[0, :, 0]


def _write(y, value, residual, relu):
    """y = value (+ residual, rounded as the fast backends round it), then the ReLU, if asked."""
    if residual is not None:
        value = value.astype(y.dtype) + residual
    y[...] = np.where(value < 0, 0.0, value) if relu else value


def moments(x):
    """The per-channel mean and biased variance of x, nothing written: a worker's share of a
    synchronized batch's statistics."""
    x64 = x.astype(np.float64)
    mean = _channel_mean(x64)
    xmu = x64 - _per_channel(mean)
    return mean, (xmu * xmu).mean(axis=_CHANNEL_SUM_AXES)


def forward_train(x, weight, bias, eps, y, renorm=None, residual=None, relu=False):
    mean, var = moments(x)
    xmu = x.astype(np.float64) - _per_channel(mean)
    scale, shift = weight * inverse_std(var, eps), bias
    if renorm is not None:
        scale, shift = renorm_affine(mean, var, eps, weight, bias, *renorm_correction(mean, var, eps, *renorm))
    _write(y, xmu * _per_channel(scale) + _per_channel(shift), residual, relu)
    return mean, var


def normalize(x, mean, var, weight, bias, eps, y, residual=None, relu=False):
    scale = weight * inverse_std(var, eps)
    _write(y, (x.astype(np.float64) - _per_channel(mean)) * _per_channel(scale) + _per_channel(bias), residual, relu)


def _relu_gradient(dy, x, mean, scale, shift, residual, g):
    """g = dy where the forward's ReLU passed its input (not <= 0), 0 elsewhere: the input
    recomputed from x (and the residual) with the forward's per-channel ``scale`` and ``shift``."""
    pre = (x.astype(np.float64) - _per_channel(mean)) * _per_channel(scale) + _per_channel(shift)
    if residual is not None:
        pre = pre.astype(x.dtype) + residual
    g[...] = np.where(pre <= 0, 0.0, dy)


def gradient_sums(dy, x, mean):
    """The per-channel sums of dy and of dy * (x - mean), nothing written."""
    dy64 = dy.astype(np.float64)
    return dy64.sum(axis=_CHANNEL_SUM_AXES), (dy64 * (x.astype(np.float64) - _per_channel(mean))).sum(axis=_CHANNEL_SUM_AXES)


def gradient(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, dx):
    """The training gradient into dx from given channel sums over ``count`` elements (a whole
    synchronized batch's, of which dy and x are a part)."""
    mean_dy, k, scale = backward_coefficients(sum_dy, sum_dy_xmu, invstd, weight, count)
    xmu = x.astype(np.float64) - _per_channel(mean)
    dx[...] = (dy.astype(np.float64) - _per_channel(mean_dy) - xmu * _per_channel(k)) * _per_channel(scale)


def backward(dy, x, mean, invstd, weight, training, dx, relu=None):
    if relu is not None:  # the fused ReLU's backward: dy masked into g first
        scale, shift, residual, g = relu
        _relu_gradient(dy, x, mean, scale, shift, residual, g)
        dy = g
    sum_dy, sum_dy_xmu = gradient_sums(dy, x, mean)
    if training:
        gradient(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, x.shape[0] * x.shape[2], dx)
    else:  # frozen statistics: dx = dy * weight * invstd, whatever x holds
        dx[...] = dy.astype(np.float64) * _per_channel(weight * invstd)
    return sum_dy, sum_dy_xmu
