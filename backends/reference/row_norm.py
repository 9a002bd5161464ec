"""The NumPy reference of the row normalizations (layer, RMS, group and instance norm), in float64.

The front views x as ``(R, K, S)`` rows, C-contiguous: R = N * G rows (a sample's group), each of K
channels by S elements; the affine parameters have one entry per (group, channel), G * K in all, and
row r takes group r % G. Layer and RMS norm are G = 1, K = the normalized size, S = 1; instance
norm is K = 1. Statistics are per row over its K * S elements.
"""

import numpy as np

from accelbn.backends.formulas import inverse_std

STORAGE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _per_element(v, rows, groups):
    """A (G * K,) vector against (R, K, S) rows: row r takes group r % G."""
    k = v.shape[0] // groups
    return np.tile(np.asarray(v, np.float64).reshape(groups, k), (rows // groups, 1))[:, :, None]


def forward(x, groups, weight, bias, eps, centered, y):
    x64 = x.astype(np.float64)
    if centered:
        shift = x64[:, :1, :1]
        mean = (shift + (x64 - shift).mean(axis=(1, 2), keepdims=True))[:, 0, 0]
        centred = x64 - mean[:, None, None]
    else:
        mean = np.zeros(x.shape[0])
        centred = x64
    var = (centred * centred).mean(axis=(1, 2))
    rows = x.shape[0]
    xhat = centred * inverse_std(var, eps)[:, None, None]
    y[...] = xhat * _per_element(weight, rows, groups) + _per_element(bias, rows, groups)
    return mean, var


def backward(dy, x, groups, mean, invstd, weight, centered, trained, dx):
    rows, k, s = x.shape
    dy64 = dy.astype(np.float64)
    xhat = (x.astype(np.float64) - mean[:, None, None]) * invstd[:, None, None]
    g = dy64 * _per_element(weight, rows, groups)
    count = k * s
    projection = (g * xhat).sum(axis=(1, 2), keepdims=True) / count
    if not trained:  # statistics as constants
        dx[...] = g * invstd[:, None, None]
    elif centered:
        dx[...] = (g - g.sum(axis=(1, 2), keepdims=True) / count - xhat * projection) * invstd[:, None, None]
    else:
        dx[...] = (g - xhat * projection) * invstd[:, None, None]
    by_group = (rows // groups, groups, k)
    dweight = (dy64 * xhat).sum(axis=2).reshape(by_group).sum(axis=0).ravel()
    dbias = dy64.sum(axis=2).reshape(by_group).sum(axis=0).ravel()
    return dweight, dbias


def _as_rows(a, groups):
    """Samples (N, S, C) as rows (N * G, K, S)."""
    samples, inner, channels = a.shape
    return np.ascontiguousarray(a.reshape(samples, inner, groups, channels // groups).transpose(0, 2, 3, 1)).reshape(
        samples * groups, channels // groups, inner)


def forward_channels_last(x, groups, weight, bias, eps, centered, y):
    rows = np.empty(_as_rows(x, groups).shape, np.float64)
    mean, var = forward(_as_rows(x, groups), groups, weight, bias, eps, centered, rows)
    samples, inner, channels = x.shape
    y[...] = rows.reshape(samples, channels, inner).transpose(0, 2, 1)
    return mean, var


def backward_channels_last(dy, x, groups, mean, invstd, weight, centered, trained, dx):
    rows = np.empty(_as_rows(x, groups).shape, np.float64)
    sums = backward(_as_rows(dy, groups), _as_rows(x, groups), groups, mean, invstd, weight, centered, trained, rows)
    samples, inner, channels = x.shape
    dx[...] = rows.reshape(samples, channels, inner).transpose(0, 2, 1)
    return sums
