"""The row normalizations (layer, RMS, group and instance norm) on the Numba CPU backend.

The front hands C-contiguous ``(R, K, S)`` rows (see :mod:`accelbn.backends.reference.row_norm`):
R = N * G rows of K channels by S elements, row r in group r % G, affine parameters per (group,
channel). Each row is independent: statistics by a shifted two-pass over the row (in runs of the
element dtype added in float64, as batch norm's), then the element pass while the row is in cache;
one task per row, so the bits do not depend on the thread count. The backward sums dy * x_hat and
dy per (group, channel) into per-block partials, blocks of rows fixed by the shape, merged in
block order.
"""

import numpy as np
from numba import njit, prange

from accelbn.backends.numba_cpu import runtime
from accelbn.backends.numba_cpu.elements import line_tables, write_affine
from accelbn.backends.numba_cpu.lines import store_fence
from accelbn.backends.numba_cpu.reductions import sum_parts, sum_shifted, sum_squared_deviations
from accelbn.backends.numba_cpu.runtime import NESTED, NESTED_REDUCTION, kernel
from accelbn.backends.numba_cpu.scalars import as_element, inverse_std, split_mean
from accelbn.backends.numba_cpu.tiling import streams

STORAGE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Elements of a block of rows in the backward, the unit of its partial sums.
ROW_BLOCK = 65536


@njit(**NESTED)
def _normalize_row(x, y, channels, inner, mean, rstd, weight, bias, stream):
    """y = (x - mean) * rstd * weight + bias over one row of ``channels`` runs of ``inner`` elements,
    computed in y's dtype with the mean split (as batch norm's normalize); ``weight`` and ``bias``
    sliced to the row's group. Runs are written a cache line at a time, streamed when ``stream``."""
    hi, lo = split_mean(y, mean)
    if inner == 1:
        for c in range(channels):
            y[c] = ((x[c] - hi) - lo) * as_element(y, rstd * weight[c]) + as_element(y, bias[c])
        return
    for c in range(channels):
        params = (hi, lo, as_element(y, rstd * weight[c]), as_element(y, bias[c]))
        write_affine(x[c * inner : (c + 1) * inner], 0, inner, params, 1, y[c * inner : (c + 1) * inner], stream)


@kernel
def _row_norm_forward(x, groups, weight, bias, eps, centered, y, mean, var, stream):
    rows, channels, inner = x.shape
    n = channels * inner
    flat_x = x.reshape(rows, n)
    flat_y = y.reshape(rows, n)
    for r in prange(rows):
        v = flat_x[r]
        m = 0.0
        if centered:
            shift = np.float64(v[0])
            m = shift + sum_shifted(v, shift) / n
        q = sum_squared_deviations(v, m) / n
        mean[r] = m
        var[r] = q
        g0 = (r % groups) * channels
        _normalize_row(v, flat_y[r], channels, inner, m, inverse_std(q, eps), weight[g0 : g0 + channels], bias[g0 : g0 + channels], stream)
        if stream:
            store_fence()


@njit(**NESTED_REDUCTION)
def _weighted_sums(dy, x, mean, rstd, weight):
    """For a row of single elements (inner 1): the sums of weight * dy and of weight * dy * x_hat."""
    sum_g = 0.0
    sum_gx = 0.0
    for c in range(dy.shape[0]):
        g = weight[c] * np.float64(dy[c])
        sum_g += g
        sum_gx += g * ((np.float64(x[c]) - mean) * rstd)
    return sum_g, sum_gx


@njit(**NESTED)
def _element_gradient(dy, x, dx, mean, rstd, weight, a, p, part_dweight, part_dbias):
    """For a row of single elements: dx as :func:`_row_gradient`, and dy * x_hat and dy added to
    each element's partials. (Parameters and partials come sliced to the row's group: an offset
    index keeps LLVM from vectorizing the loop.)"""
    for c in range(dy.shape[0]):
        d = np.float64(dy[c])
        x_hat = (np.float64(x[c]) - mean) * rstd
        dx[c] = as_element(dx, (weight[c] * d - a - x_hat * p) * rstd)
        part_dweight[c] += d * x_hat
        part_dbias[c] += d


@njit(**NESTED_REDUCTION)
def _run_sums(dy, x, mean, rstd):
    """Sums of dy * x_hat and dy over one channel's run of a row."""
    dw = 0.0
    db = 0.0
    for i in range(dy.shape[0]):
        d = np.float64(dy[i])
        dw += d * ((np.float64(x[i]) - mean) * rstd)
        db += d
    return dw, db


@njit(**NESTED)
def _row_gradient(dy, x, dx, channels, inner, mean, rstd, weight, g0, a, p):
    """dx = (weight * dy - a - x_hat * p) * rstd in float64 over one row."""
    for c in range(channels):
        w = weight[g0 + c]
        for i in range(c * inner, (c + 1) * inner):
            x_hat = (np.float64(x[i]) - mean) * rstd
            dx[i] = as_element(dx, (w * np.float64(dy[i]) - a - x_hat * p) * rstd)


@kernel
def _row_norm_backward(dy, x, groups, mean, rstd, weight, centered, trained, dx, part_dweight, part_dbias, block_rows):
    rows, channels, inner = x.shape
    n = channels * inner
    flat_dy = dy.reshape(rows, n)
    flat_x = x.reshape(rows, n)
    flat_dx = dx.reshape(rows, n)
    for b in prange(part_dweight.shape[0]):
        pdw = part_dweight[b]
        pdb = part_dbias[b]
        for j in range(pdw.shape[0]):
            pdw[j] = 0.0
            pdb[j] = 0.0
        for r in range(b * block_rows, min(b * block_rows + block_rows, rows)):
            g0 = (r % groups) * channels
            m = mean[r]
            s = rstd[r]
            if inner == 1:
                w = weight[g0 : g0 + channels]
                sum_g, sum_gx = _weighted_sums(flat_dy[r], flat_x[r], m, s, w)
                a = sum_g / n if centered and trained else 0.0
                p = sum_gx / n if trained else 0.0
                _element_gradient(flat_dy[r], flat_x[r], flat_dx[r], m, s, w, a, p, pdw[g0 : g0 + channels], pdb[g0 : g0 + channels])
                continue
            else:
                sum_g = 0.0
                sum_gx = 0.0
                for c in range(channels):
                    dw, db = _run_sums(flat_dy[r, c * inner : (c + 1) * inner], flat_x[r, c * inner : (c + 1) * inner], m, s)
                    pdw[g0 + c] += dw
                    pdb[g0 + c] += db
                    sum_g += weight[g0 + c] * db
                    sum_gx += weight[g0 + c] * dw
            a = sum_g / n if centered and trained else 0.0
            p = sum_gx / n if trained else 0.0
            _row_gradient(flat_dy[r], flat_x[r], flat_dx[r], channels, inner, m, s, weight, g0, a, p)


def _block_rows(x):
    return max(1, ROW_BLOCK // max(1, x.shape[1] * x.shape[2]))


@runtime.entry
def forward(kernels, x, groups, weight, bias, eps, centered, y):
    """Normalize each row of x into y; return each row's mean (zeros when not centered) and its mean
    squared deviation from it."""
    mean = np.empty(x.shape[0])
    var = np.empty(x.shape[0])
    kernels.row_norm_forward(x, groups, weight, bias, float(eps), bool(centered), y, mean, var, x.shape[2] > 1 and streams(y))
    return mean, var


@runtime.entry
def backward(kernels, dy, x, groups, mean, rstd, weight, centered, trained, dx):
    """Write dx (through the statistics when ``trained``, else with them as constants: dx = dy *
    weight * rstd); return the sums of dy * x_hat and of dy per (group, channel)."""
    block_rows = _block_rows(x)
    blocks = -(-x.shape[0] // block_rows)
    part_dweight = np.empty((blocks, weight.shape[0]))
    part_dbias = np.empty((blocks, weight.shape[0]))
    kernels.row_norm_backward(dy, x, groups, mean, rstd, weight, bool(centered), bool(trained), dx, part_dweight, part_dbias, block_rows)
    dweight = np.empty(weight.shape[0])
    dbias = np.empty(weight.shape[0])
    sum_parts(part_dweight, dweight)
    sum_parts(part_dbias, dbias)
    return dweight, dbias


# --- channels-last: (N, S, C) samples, groups of K adjacent channels in every row -------------------


@njit(**NESTED)
def _sample_moments(x, groups, centered, mean, var, column):
    """Mean and mean squared deviation of each group of sample x (S, C), summed down the rows into
    the float64 ``column`` sums, shifted by the group's first value."""
    rows, channels = x.shape
    k = channels // groups
    n = rows * k
    centre = np.empty(channels)
    for g in range(groups):
        mean[g] = np.float64(x[0, g * k]) if centered else 0.0
    for c in range(channels):
        column[c] = 0.0
        centre[c] = mean[c // k]
    if centered:
        for s in range(rows):
            for c in range(channels):
                column[c] += np.float64(x[s, c]) - centre[c]
        for g in range(groups):
            total = 0.0
            for c in range(g * k, (g + 1) * k):
                total += column[c]
                column[c] = 0.0
            mean[g] += total / n
            for c in range(g * k, (g + 1) * k):
                centre[c] = mean[g]
    for s in range(rows):
        for c in range(channels):
            d = np.float64(x[s, c]) - centre[c]
            column[c] += d * d
    for g in range(groups):
        total = 0.0
        for c in range(g * k, (g + 1) * k):
            total += column[c]
        var[g] = total / n


@kernel
def _row_norm_forward_channels_last(x, groups, weight, bias, eps, centered, y, mean, var, stream):
    samples, rows, channels = x.shape
    k = channels // groups
    for i in prange(samples):
        column = np.empty(channels)
        _sample_moments(x[i], groups, centered, mean[i * groups : (i + 1) * groups], var[i * groups : (i + 1) * groups], column)
        params = np.empty((4, channels), y.dtype)  # per channel: mean_hi, mean_lo, scale, shift
        for c in range(channels):
            g = i * groups + c // k
            params[0, c], params[1, c] = split_mean(y, mean[g])
            params[2, c] = as_element(y, inverse_std(var[g], eps) * weight[c])
            params[3, c] = as_element(y, bias[c])
        flat_y = y[i].reshape(-1)
        write_affine(x[i].reshape(-1), 0, rows * channels, line_tables(params, flat_y), channels, flat_y, stream)
        if stream:
            store_fence()


@kernel
def _row_norm_backward_channels_last(dy, x, groups, mean, rstd, weight, centered, trained, dx, part_dweight, part_dbias):
    samples, rows, channels = x.shape
    k = channels // groups
    n = rows * k
    for i in prange(samples):
        sum_dy = part_dbias[i]
        sum_dy_xhat = part_dweight[i]
        m = np.empty(channels)
        r = np.empty(channels)
        for c in range(channels):
            m[c] = mean[i * groups + c // k]
            r[c] = rstd[i * groups + c // k]
            sum_dy[c] = 0.0
            sum_dy_xhat[c] = 0.0
        dyi = dy[i]
        xi = x[i]
        for s in range(rows):
            for c in range(channels):
                d = np.float64(dyi[s, c])
                sum_dy[c] += d
                sum_dy_xhat[c] += d * ((np.float64(xi[s, c]) - m[c]) * r[c])
        # dx = a * dy + b * x + c per channel, in float64 (a, b, c from the group's sums)
        a = np.empty(channels)
        b = np.empty(channels)
        c0 = np.empty(channels)
        for g in range(groups):
            sum_g = 0.0
            sum_gx = 0.0
            for c in range(g * k, (g + 1) * k):
                sum_g += weight[c] * sum_dy[c]
                sum_gx += weight[c] * sum_dy_xhat[c]
            mean_g = sum_g / n if centered and trained else 0.0
            proj = sum_gx / n if trained else 0.0
            for c in range(g * k, (g + 1) * k):
                a[c] = weight[c] * r[c]
                b[c] = -proj * r[c] * r[c]
                c0[c] = (m[c] * proj * r[c] - mean_g) * r[c]
        dxi = dx[i]
        for s in range(rows):
            for c in range(channels):
                dxi[s, c] = as_element(dxi, a[c] * np.float64(dyi[s, c]) + b[c] * np.float64(xi[s, c]) + c0[c])


@runtime.entry
def forward_channels_last(kernels, x, groups, weight, bias, eps, centered, y):
    """:func:`forward` on samples (N, S, C) whose rows hold all C = G * K channels."""
    mean = np.empty(x.shape[0] * groups)
    var = np.empty(x.shape[0] * groups)
    kernels.row_norm_forward_channels_last(x, groups, weight, bias, float(eps), bool(centered), y, mean, var, streams(y))
    return mean, var


@runtime.entry
def backward_channels_last(kernels, dy, x, groups, mean, rstd, weight, centered, trained, dx):
    """:func:`backward` on samples (N, S, C); the partial sums are per sample, merged in order."""
    part_dweight = np.empty((x.shape[0], x.shape[2]))
    part_dbias = np.empty((x.shape[0], x.shape[2]))
    kernels.row_norm_backward_channels_last(dy, x, groups, mean, rstd, weight, bool(centered), bool(trained), dx, part_dweight, part_dbias)
    dweight = np.empty(x.shape[2])
    dbias = np.empty(x.shape[2])
    sum_parts(part_dweight, dweight)
    sum_parts(part_dbias, dbias)
    return dweight, dbias



def precompile(dtype, serial):
    """Compile, or load from Numba's cache, every kernel of the entry points above on C-ordered
    ``dtype`` arrays (rows of single elements and of runs, channels-last samples; forward and both
    backwards), serial or parallel. For a process of its own (``python -m accelbn compile``): the
    serial threshold is changed for the length of the call."""
    saved = runtime.SERIAL_MAX_ELEMENTS
    runtime.SERIAL_MAX_ELEMENTS = (1 << 62) if serial else 0
    try:
        for entries, shape, groups in (((forward, backward), (4, 8, 1), 1), ((forward, backward), (4, 2, 3), 2),
                                       ((forward_channels_last, backward_channels_last), (2, 3, 4), 2)):
            x = np.ones(shape, dtype)
            x[:, 0] = 2.0
            out = np.empty_like(x)
            ones = np.ones(groups * shape[1] if entries[0] is forward else shape[2])
            for centered in (True, False):
                mean, var = entries[0](x, groups, ones, ones, 1e-5, centered, out)
                for trained in (True, False):
                    entries[1](x, x, groups, mean, var, ones, centered, trained, out)
    finally:
        runtime.SERIAL_MAX_ELEMENTS = saved
