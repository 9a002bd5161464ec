"""Numba CPU kernels for batch normalization.

Kernels take arrays in the front's canonical view ``(outer, C, inner)`` and per-channel float64
vectors; they never validate and never touch running statistics.

Two loop families, picked by ``inner``:

* channels-first (``inner > 1``: NCHW, NCL, NCDHW): one task per channel. A task computes its channel's
  statistics and then normalizes the same slice while it is still in cache, so a train forward reads
  x from DRAM once for statistics and the normalize pass mostly hits L2.
* channels-last (``inner == 1``: NHWC and (N, C)): fixed blocks of rows, each producing per-channel
  partials that are merged in block order.

Statistics are computed per chunk with a shifted two-pass (sum of x - x0, then sum of squared
deviations, both while the chunk is in cache) and chunks are merged with Chan's formula in a fixed
order. The chunking depends only on the shape, never on the thread count, so results are bitwise
identical run to run and for any number of threads.

Only the reduction helpers are compiled with ``reassoc``: it lets LLVM vectorize a sum (about 4x on
this machine) in an order fixed at compile time. Everything else is strict IEEE arithmetic.
"""

import numpy as np
from numba import njit, prange

from accelbn._formulas import backward_coefficients, inverse_std

# On-disk cache: compiling the kernels costs seconds per dtype, loading them tens of milliseconds.
_OPTIONS = dict(error_model="numpy", cache=True, nogil=True)
_REDUCTION = dict(_OPTIONS, fastmath={"reassoc"})

# Elements in a statistics chunk: its second pass runs from L1/L2.
STATS_CHUNK = 4096
# Elements in a channels-last row block: the unit of parallel work and of partial sums.
ROW_BLOCK = 65536

_inverse_std = njit(inline="always", error_model="numpy")(inverse_std)
_backward_coefficients = njit(inline="always", error_model="numpy")(backward_coefficients)


@njit(**_REDUCTION)
def _sum_shifted(v, shift):
    s = 0.0
    for i in range(v.shape[0]):
        s += np.float64(v[i]) - shift
    return s


@njit(**_REDUCTION)
def _sum_squared_deviations(v, mean):
    s = 0.0
    for i in range(v.shape[0]):
        d = np.float64(v[i]) - mean
        s += d * d
    return s


@njit(**_REDUCTION)
def _gradient_sums(dy, x, mean):
    sum_dy = 0.0
    sum_dy_xmu = 0.0
    for i in range(dy.shape[0]):
        g = np.float64(dy[i])
        sum_dy += g
        sum_dy_xmu += g * (np.float64(x[i]) - mean)
    return sum_dy, sum_dy_xmu


@njit(**_OPTIONS)
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, sum of squared deviations) triples (Chan et al., 1979)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


@njit(**_OPTIONS)
def _affine_row(x, mean, scale, shift, y):
    for i in range(x.shape[0]):
        y[i] = (np.float64(x[i]) - mean) * scale + shift


@njit(**_OPTIONS)
def _backward_row(dy, x, mean, mean_dy, k, scale, dx):
    for i in range(dy.shape[0]):
        dx[i] = (np.float64(dy[i]) - mean_dy - (np.float64(x[i]) - mean) * k) * scale


# --- channels-first: (outer, C, inner), one task per channel -------------------------------------


@njit(parallel=True, **_OPTIONS)
def _forward_train_channels_first(x, weight, bias, eps, y, mean, var):
    outer, channels, inner = x.shape
    rows_per_chunk = max(1, STATS_CHUNK // inner)
    for c in prange(channels):
        n, m, m2 = 0.0, 0.0, 0.0
        for r0 in range(0, outer, rows_per_chunk):
            r1 = min(r0 + rows_per_chunk, outer)
            shift = np.float64(x[r0, c, 0])
            s = 0.0
            for r in range(r0, r1):
                s += _sum_shifted(x[r, c], shift)
            n_chunk = np.float64((r1 - r0) * inner)
            m_chunk = shift + s / n_chunk
            q = 0.0
            for r in range(r0, r1):
                q += _sum_squared_deviations(x[r, c], m_chunk)
            n, m, m2 = _chan_merge(n, m, m2, n_chunk, m_chunk, q)
        mean[c] = m
        var[c] = m2 / n
        scale = weight[c] * _inverse_std(var[c], eps)
        for r in range(outer):
            _affine_row(x[r, c], m, scale, bias[c], y[r, c])


@njit(parallel=True, **_OPTIONS)
def _normalize_channels_first(x, mean, scale, shift, y):
    outer, channels, inner = x.shape
    for j in prange(outer * channels):
        r = j // channels
        c = j - r * channels
        _affine_row(x[r, c], mean[c], scale[c], shift[c], y[r, c])


@njit(parallel=True, **_OPTIONS)
def _backward_channels_first(dy, x, mean, invstd, weight, training, dx, sum_dy, sum_dy_xmu):
    outer, channels, inner = x.shape
    count = np.float64(outer * inner)
    for c in prange(channels):
        a, b = 0.0, 0.0
        for r in range(outer):
            ra, rb = _gradient_sums(dy[r, c], x[r, c], mean[c])
            a += ra
            b += rb
        sum_dy[c] = a
        sum_dy_xmu[c] = b
        if training:
            mean_dy, k, scale = _backward_coefficients(a, b, invstd[c], weight[c], count)
            for r in range(outer):
                _backward_row(dy[r, c], x[r, c], mean[c], mean_dy, k, scale, dx[r, c])
        else:  # frozen statistics: dx = dy * weight * invstd, whatever x holds
            for r in range(outer):
                _affine_row(dy[r, c], 0.0, weight[c] * invstd[c], 0.0, dx[r, c])


# --- channels-last: (rows, C), fixed row blocks ---------------------------------------------------


@njit(parallel=True, **_OPTIONS)
def _block_moments_channels_last(x, block_rows, block_mean, block_m2):
    rows, channels = x.shape
    for b in prange(block_mean.shape[0]):
        r0 = b * block_rows
        r1 = min(r0 + block_rows, rows)
        bm = block_mean[b]
        bq = block_m2[b]
        bm[:] = 0.0
        bq[:] = 0.0
        for r in range(r0, r1):
            for c in range(channels):
                bm[c] += np.float64(x[r, c]) - np.float64(x[r0, c])
        for c in range(channels):
            bm[c] = np.float64(x[r0, c]) + bm[c] / (r1 - r0)
        for r in range(r0, r1):
            for c in range(channels):
                d = np.float64(x[r, c]) - bm[c]
                bq[c] += d * d


@njit(**_OPTIONS)
def _merge_block_moments(rows, block_rows, block_mean, block_m2, mean, var):
    for c in range(block_mean.shape[1]):
        n, m, m2 = 0.0, 0.0, 0.0
        for b in range(block_mean.shape[0]):
            n_block = np.float64(min(block_rows, rows - b * block_rows))
            n, m, m2 = _chan_merge(n, m, m2, n_block, block_mean[b, c], block_m2[b, c])
        mean[c] = m
        var[c] = m2 / n


@njit(parallel=True, **_OPTIONS)
def _normalize_channels_last(x, block_rows, mean, scale, shift, y):
    rows, channels = x.shape
    for b in prange((rows + block_rows - 1) // block_rows):
        for r in range(b * block_rows, min((b + 1) * block_rows, rows)):
            for c in range(channels):
                y[r, c] = (np.float64(x[r, c]) - mean[c]) * scale[c] + shift[c]


@njit(parallel=True, **_OPTIONS)
def _block_gradient_sums_channels_last(dy, x, mean, block_rows, block_dy, block_dy_xmu):
    rows, channels = x.shape
    for b in prange(block_dy.shape[0]):
        sa = block_dy[b]
        sb = block_dy_xmu[b]
        sa[:] = 0.0
        sb[:] = 0.0
        for r in range(b * block_rows, min((b + 1) * block_rows, rows)):
            for c in range(channels):
                g = np.float64(dy[r, c])
                sa[c] += g
                sb[c] += g * (np.float64(x[r, c]) - mean[c])


@njit(parallel=True, **_OPTIONS)
def _backward_apply_channels_last(dy, x, block_rows, mean, mean_dy, k, scale, dx):
    rows, channels = x.shape
    for b in prange((rows + block_rows - 1) // block_rows):
        for r in range(b * block_rows, min((b + 1) * block_rows, rows)):
            for c in range(channels):
                dx[r, c] = (np.float64(dy[r, c]) - mean_dy[c] - (np.float64(x[r, c]) - mean[c]) * k[c]) * scale[c]


def _block_rows(channels):
    # At least 64 rows, so that the float64 partials stay small next to x however wide a row is.
    return max(64, ROW_BLOCK // max(channels, 1))


def _block_count(rows, block_rows):
    return (rows + block_rows - 1) // block_rows


# --- entry points: the backend interface the front calls -----------------------------------------


def forward_train(x, weight, bias, eps, y):
    """Normalize ``x`` with its own statistics into ``y``; return the per-channel mean and biased var."""
    channels = x.shape[1]
    mean = np.empty(channels)
    var = np.empty(channels)
    if x.shape[2] > 1:
        _forward_train_channels_first(x, weight, bias, float(eps), y, mean, var)
        return mean, var
    x2, y2 = x[:, :, 0], y[:, :, 0]
    block_rows = _block_rows(channels)
    blocks = _block_count(x2.shape[0], block_rows)
    block_mean = np.empty((blocks, channels))
    block_m2 = np.empty((blocks, channels))
    _block_moments_channels_last(x2, block_rows, block_mean, block_m2)
    _merge_block_moments(x2.shape[0], block_rows, block_mean, block_m2, mean, var)
    _normalize_channels_last(x2, block_rows, mean, weight * inverse_std(var, eps), bias, y2)
    return mean, var


def normalize(x, mean, scale, shift, y):
    """y = (x - mean) * scale + shift per channel: the eval forward."""
    if x.shape[2] > 1:
        _normalize_channels_first(x, mean, scale, shift, y)
    else:
        _normalize_channels_last(x[:, :, 0], _block_rows(x.shape[1]), mean, scale, shift, y[:, :, 0])


def backward(dy, x, mean, invstd, weight, training, dx):
    """Write dx; return the per-channel sums of dy and of dy * (x - mean)."""
    channels = x.shape[1]
    if x.shape[2] > 1:
        sum_dy = np.empty(channels)
        sum_dy_xmu = np.empty(channels)
        _backward_channels_first(dy, x, mean, invstd, weight, bool(training), dx, sum_dy, sum_dy_xmu)
        return sum_dy, sum_dy_xmu
    dy2, x2, dx2 = dy[:, :, 0], x[:, :, 0], dx[:, :, 0]
    block_rows = _block_rows(channels)
    blocks = _block_count(x2.shape[0], block_rows)
    block_dy = np.empty((blocks, channels))
    block_dy_xmu = np.empty((blocks, channels))
    _block_gradient_sums_channels_last(dy2, x2, mean, block_rows, block_dy, block_dy_xmu)
    sum_dy = block_dy.sum(axis=0)  # row by row, in block order
    sum_dy_xmu = block_dy_xmu.sum(axis=0)
    if training:
        mean_dy, k, scale = backward_coefficients(sum_dy, sum_dy_xmu, invstd, weight, x2.shape[0])
        _backward_apply_channels_last(dy2, x2, block_rows, mean, mean_dy, k, scale, dx2)
    else:  # frozen statistics: dx = dy * weight * invstd, whatever x holds
        zeros = np.zeros(channels)
        _normalize_channels_last(dy2, block_rows, zeros, weight * invstd, zeros, dx2)
    return sum_dy, sum_dy_xmu

