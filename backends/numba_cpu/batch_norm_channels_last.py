"""Batch norm's channels-last loops (``inner`` == 1: NHWC and (N, C)): the C-contiguous (rows, C)
array in fixed blocks of rows, each producing per-channel partials that are merged in block order.

The entry points are one kernel call each, statistics, merge and element pass together: at a few
thousand elements, each further call from Python costs as much as the work. They take the canonical
(rows, C, 1) arrays, C-contiguous, and view them as (rows, C) or flat.
"""

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from accelbn.backends.numba_cpu.elements import (
    affine_tables,
    flat,
    line_tables,
    masked_gradient_columns,
    masks_in_registers,
    span,
    stop_tables,
    write_affine,
    write_gradient,
    write_relu_gradient,
)
from accelbn.backends.numba_cpu.lines import store_fence
from accelbn.backends.numba_cpu.reductions import gradient_columns, merge_moments, shifted_columns, squared_deviation_columns, sum_parts
from accelbn.backends.numba_cpu.runtime import NESTED, OPTIONS, kernel
from accelbn.backends.numba_cpu.scalars import all_finite, backward_coefficients, channel_affines, fill_zero, gradient_factors, split_mean
from accelbn.backends.numba_cpu.tiling import STREAM_ROW_RUN, rows_per_block


# A block sums its columns ROW_RUN rows at a time in the element dtype, each run then added into the
# float64 partials: SUM_RUN's trade for rows, with the same float64 redo when a float32 run overflows.
# Shorter runs than SUM_RUN, as a column adds its rows one after another, not across vector lanes.
ROW_RUN = 16


@njit(**OPTIONS)
def _columns_shifted(x, r0, r1, shift, run, total):
    """total[c] = sum of x[r, c] - shift[c] over rows [r0, r1), in runs accumulated in run's dtype."""
    fill_zero(total)
    for q in range(r0, r1, ROW_RUN):
        fill_zero(run)
        shifted_columns((run,), (x,), 0, q, min(q + ROW_RUN, r1), x.shape[1], (shift,))
        for c in range(x.shape[1]):
            total[c] += np.float64(run[c])


@njit(**OPTIONS)
def _columns_squared_deviations(x, r0, r1, mean_hi, mean_lo, run, total):
    fill_zero(total)
    for q in range(r0, r1, ROW_RUN):
        fill_zero(run)
        squared_deviation_columns((run,), (x,), 0, q, min(q + ROW_RUN, r1), x.shape[1], (mean_hi, mean_lo))
        for c in range(x.shape[1]):
            total[c] += np.float64(run[c])


@njit(**NESTED)
def _row_block_moments(x, r0, r1, mean, m2):
    """Moments of rows [r0, r1) of the (rows, C) x into mean and m2: shifted by the block's first
    row, then squared deviations from the block's mean, each in ROW_RUN runs."""
    # The second pass reads the block from L2; one pass with a two-pass redo where m2 cancels was no
    # faster (benchmarks/RESULTS.md).
    channels = x.shape[1]
    shift = x[r0].copy()
    run = np.empty(channels, x.dtype)
    _columns_shifted(x, r0, r1, shift, run, mean)
    if not all_finite(mean):
        _columns_shifted(x, r0, r1, shift.astype(np.float64), np.empty(channels), mean)
    hi = np.empty(channels, x.dtype)
    lo = np.empty(channels, x.dtype)
    for c in range(channels):
        mean[c] = np.float64(shift[c]) + mean[c] / (r1 - r0)
        hi[c], lo[c] = split_mean(x, mean[c])
    _columns_squared_deviations(x, r0, r1, hi, lo, run, m2)
    if not all_finite(m2):
        _columns_squared_deviations(x, r0, r1, mean, np.zeros(channels), np.empty(channels), m2)


@njit(**OPTIONS)
def _row_block_gradient_sums(dy, x, mean, r0, r1, sum_dy, sum_dy_xmu, stops=None):
    """Sums of dy and dy * (x - mean) over rows [r0, r1) of the (rows, C) dy and x, in float64
    throughout, as :func:`gradient_sums`; STREAM_ROW_RUN rows at a time, each over all columns. With
    ``stops`` (:func:`_stop_tables`), of dy masked by the forward's ReLU, in registers."""
    fill_zero(sum_dy)
    fill_zero(sum_dy_xmu)
    for q in range(r0, r1, STREAM_ROW_RUN):
        q1 = min(q + STREAM_ROW_RUN, r1)
        if stops is None:
            gradient_columns((sum_dy, sum_dy_xmu), (dy, x), 0, q, q1, x.shape[1], (mean,))
        else:
            masked_gradient_columns((sum_dy, sum_dy_xmu), (dy, x), 0, q, q1, x.shape[1], (mean, stops[0], stops[1]))


@kernel
def _forward_train_channels_last(x3, weight, bias, eps, renorm, y3, z3, fused_relu, mean, var, stream):
    rows, channels, _ = x3.shape
    x = x3.reshape(rows, channels)
    y = y3.reshape(-1)
    block_rows = rows_per_block(channels)
    blocks = (rows + block_rows - 1) // block_rows
    count = np.empty(blocks)
    part_mean = np.empty((blocks, channels))
    part_m2 = np.empty((blocks, channels))
    for b in prange(blocks):
        r0 = b * block_rows
        r1 = min(r0 + block_rows, rows)
        count[b] = r1 - r0
        _row_block_moments(x, r0, r1, part_mean[b], part_m2[b])
    merge_moments(count, part_mean, part_m2, mean, var)
    scale, shift = channel_affines(mean, var, weight, bias, eps, renorm)
    tables = affine_tables(y, mean, scale, shift)
    flat_x = x.reshape(-1)
    z = flat(z3)
    block = block_rows * channels
    for b in prange(blocks):
        write_affine(flat_x, b * block, min(b * block + block, flat_x.shape[0]), tables, channels, y, stream, z, fused_relu)
        if stream:
            store_fence()


@kernel
def _normalize_channels_last(x3, mean, scale, shift, y3, z3, fused_relu, stream):
    channels = mean.shape[0]
    block_rows = rows_per_block(channels)
    y = y3.reshape(-1)
    tables = affine_tables(y, mean, scale, shift)
    flat_x = x3.reshape(-1)
    z = flat(z3)
    block = block_rows * channels
    for b in prange((flat_x.shape[0] + block - 1) // block):
        write_affine(flat_x, b * block, min(b * block + block, flat_x.shape[0]), tables, channels, y, stream, z, fused_relu)
        if stream:
            store_fence()


@njit(**NESTED)
def _masked_span(dy, x, z, g, f0, f1, tables, channels, again):
    """Elements [f0, f1) (whole rows) of the fused ReLU's masked gradient: written into g, the
    residual's gradient, when there is one (and read back from it ``again``), else into a scratch
    of the block's own, recomputed when asked ``again``: no full-size array but the caller's."""
    if g is None:
        out = np.empty(f1 - f0, dy.dtype)
    else:
        out = g[f0:f1]
        if again:
            return out
    write_relu_gradient(dy[f0:f1], x[f0:f1], span(z, f0, f1), 0, f1 - f0, tables, channels, out)
    return out


@kernel
def _backward_channels_last(dy3, x3, mean, invstd, weight, training, dx3, sum_dy, sum_dy_xmu, relu, stream):
    """With ``relu`` = (z, g, scale, shift), the fused ReLU's backward: without g (no residual), the
    sums and the training element pass recompute the mask in registers as they read dy and x;
    with g, each row block first writes its rows of the masked gradient into g (:func:`_masked_span`)
    and sums them from cache, and the element pass reads g. The frozen element pass masks its
    block into scratch again."""
    rows, channels, _ = x3.shape
    dy = dy3.reshape(rows, channels)
    x = x3.reshape(rows, channels)
    dx = dx3.reshape(-1)
    flat_dy = dy3.reshape(-1)
    flat_x = x3.reshape(-1)
    block_rows = rows_per_block(channels)
    block = block_rows * channels
    blocks = (rows + block_rows - 1) // block_rows
    part_dy = np.empty((blocks, channels))
    part_dy_xmu = np.empty((blocks, channels))
    masks = _mask_tables(dx, mean, relu)
    stops = _stop_tables(dx, mean, relu)
    for b in prange(blocks):
        r0 = b * block_rows
        r1 = min(r0 + block_rows, rows)
        if relu is None:
            _row_block_gradient_sums(dy, x, mean, r0, r1, part_dy[b], part_dy_xmu[b])
        else:
            _masked_block_sums(dy, x, mean, relu, flat(relu[1]), masks, stops, r0, r1, part_dy[b], part_dy_xmu[b])
    sum_parts(part_dy, sum_dy)
    sum_parts(part_dy_xmu, sum_dy_xmu)
    if training:
        params = np.empty((4, channels))  # the gradient computes in float64
        for c in range(channels):
            mean_dy, k, scale_c = backward_coefficients(sum_dy[c], sum_dy_xmu[c], invstd[c], weight[c], np.float64(rows))
            params[0, c] = mean[c]
            params[1, c], params[2, c], params[3, c] = gradient_factors(mean_dy, k, scale_c)
        tables = line_tables(params, dx)
        for b in prange(blocks):
            f0, f1 = b * block, min(b * block + block, flat_dy.shape[0])
            _gradient_span(flat_dy, flat_x, f0, f1, _masked_gradient(relu), stops, tables, channels, dx, stream)
            if stream:
                store_fence()
    else:  # frozen statistics: dx = dy * weight * invstd, whatever x holds
        zeros = np.zeros(channels)
        tables = affine_tables(dx, zeros, weight * invstd, zeros)
        for b in prange(blocks):
            f0, f1 = b * block, min(b * block + block, flat_dy.shape[0])
            source = _source_span(flat_dy, flat_x, f0, f1, relu, masks, channels)
            write_affine(source, 0, f1 - f0, tables, channels, dx[f0:f1], stream)
            if stream:
                store_fence()


@kernel
def _moments_channels_last(x3, mean, var):
    """The statistics of :func:`_forward_train_channels_last` alone, nothing written: a worker's
    share of a synchronized batch."""
    rows, channels, _ = x3.shape
    x = x3.reshape(rows, channels)
    block_rows = rows_per_block(channels)
    blocks = (rows + block_rows - 1) // block_rows
    count = np.empty(blocks)
    part_mean = np.empty((blocks, channels))
    part_m2 = np.empty((blocks, channels))
    for b in prange(blocks):
        r0 = b * block_rows
        r1 = min(r0 + block_rows, rows)
        count[b] = r1 - r0
        _row_block_moments(x, r0, r1, part_mean[b], part_m2[b])
    merge_moments(count, part_mean, part_m2, mean, var)


@kernel
def _gradient_sums_channels_last(dy3, x3, mean, sum_dy, sum_dy_xmu):
    """The sums of :func:`_backward_channels_last` alone, nothing written."""
    rows, channels, _ = x3.shape
    dy = dy3.reshape(rows, channels)
    x = x3.reshape(rows, channels)
    block_rows = rows_per_block(channels)
    blocks = (rows + block_rows - 1) // block_rows
    part_dy = np.empty((blocks, channels))
    part_dy_xmu = np.empty((blocks, channels))
    for b in prange(blocks):
        r0 = b * block_rows
        _row_block_gradient_sums(dy, x, mean, r0, min(r0 + block_rows, rows), part_dy[b], part_dy_xmu[b])
    sum_parts(part_dy, sum_dy)
    sum_parts(part_dy_xmu, sum_dy_xmu)


@kernel
def _gradient_channels_last(dy3, x3, params, dx3, stream):
    """The training gradient's element pass from given ``params`` (mean and the factors of
    :func:`.scalars.gradient_factors`, as rows), as :func:`_backward_channels_last` writes it."""
    channels = params.shape[1]
    flat_dy = dy3.reshape(-1)
    flat_x = x3.reshape(-1)
    dx = dx3.reshape(-1)
    tables = line_tables(params, dx)
    block = rows_per_block(channels) * channels
    for b in prange((flat_dy.shape[0] + block - 1) // block):
        f0, f1 = b * block, min(b * block + block, flat_dy.shape[0])
        write_gradient(flat_dy[f0:f1], flat_x[f0:f1], 0, f1 - f0, tables, channels, dx[f0:f1], stream)
        if stream:
            store_fence()


@njit(**NESTED)
def _masked_block_sums(dy, x, mean, relu, g, masks, stops, r0, r1, sum_dy, sum_dy_xmu):
    """The fused ReLU's gradient sums over rows [r0, r1): the mask in registers (``stops``), or,
    where the masked gradient g is wanted too (the residual's gradient), written into g (``masks``)
    and summed from it."""
    if g is None:
        _row_block_gradient_sums(dy, x, mean, r0, r1, sum_dy, sum_dy_xmu, stops)
    else:
        channels = x.shape[1]
        masked = _masked_span(dy.reshape(-1), x.reshape(-1), flat(relu[0]), g, r0 * channels, r1 * channels, masks,
                              channels, False)
        _row_block_gradient_sums(masked.reshape(r1 - r0, channels), x[r0:r1], mean, 0, r1 - r0, sum_dy, sum_dy_xmu)


@njit(**NESTED)
def _gradient_span(dy, x, f0, f1, g, stops, tables, channels, dx, stream):
    """The training gradient over elements [f0, f1) (whole rows): of dy, of dy masked in registers
    (``stops`` without g), or of the masked gradient g."""
    if g is not None:
        write_gradient(g[f0:f1], x[f0:f1], 0, f1 - f0, tables, channels, dx[f0:f1], stream)
    else:
        write_gradient(dy[f0:f1], x[f0:f1], 0, f1 - f0, tables, channels, dx[f0:f1], stream, stops)


def _masked_gradient(relu):
    """The flat masked gradient g of ``relu`` (None without one, or without ``relu``): exactly typed,
    not an Optional array: Numba passed one wrongly into a prange body (wrong dx on 3 threads and more)."""


@overload(_masked_gradient, inline="always")
def _masked_gradient_overload(relu):
    if isinstance(relu, types.NoneType):
        return lambda relu: None
    return lambda relu: flat(relu[1])


def _mask_tables(like, mean, relu):
    """The tables that write the masked gradient (:func:`.elements.affine_tables`), once per call;
    None without ``relu``."""


@overload(_mask_tables, inline="always")
def _mask_tables_overload(like, mean, relu):
    if isinstance(relu, types.NoneType):
        return lambda like, mean, relu: None
    return lambda like, mean, relu: affine_tables(like, mean, relu[2], relu[3])


def _stop_tables(like, mean, relu):
    """The tables that mask in registers (:func:`.elements.stop_tables`), once per call; None without
    ``relu``, or where the masked gradient is written to g."""


@overload(_stop_tables, inline="always")
def _stop_tables_overload(like, mean, relu):
    if masks_in_registers(relu):
        return lambda like, mean, relu: stop_tables(like, mean, relu[2], relu[3])
    return lambda like, mean, relu: None


@njit(**NESTED)
def _source_span(dy, x, f0, f1, relu, masks, channels):
    """What the element pass reads for dy over elements [f0, f1) (whole rows): dy itself, or with
    ``relu`` the masked gradient (:func:`_masked_span`, again)."""
    if relu is None:
        return dy[f0:f1]
    return _masked_span(dy, x, flat(relu[0]), flat(relu[1]), f0, f1, masks, channels, True)
