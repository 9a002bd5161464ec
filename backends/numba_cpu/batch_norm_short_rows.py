"""Batch norm's channels-first loops on short rows (fewer than ``SHORT_ROW`` elements, e.g. 7x7),
on the dense array viewed as (outer, C * inner), in blocks of consecutive channels."""

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from accelbn.backends.numba_cpu.elements import (
    affine_params,
    masked_gradient_columns,
    part,
    register_stops,
    spread,
    write_affine,
    write_gradient,
    write_relu_gradient,
)
from accelbn.backends.numba_cpu.lines import store_fence
from accelbn.backends.numba_cpu.reductions import chan_merge, gradient_columns, shifted_columns, squared_deviation_columns, vector_sum
from accelbn.backends.numba_cpu.runtime import NESTED, kernel
from accelbn.backends.numba_cpu.scalars import as_element, backward_coefficients, channel_affine, gradient_factors, split_mean
from accelbn.backends.numba_cpu.tiling import PREFETCH_ROWS, STREAM_ROW_RUN, chunking, prefetch_run


# With rows of a few dozen elements (7x7 images), per-row work dominates: every row has its own
# unaligned ends, done element by element, and a channel's rows lie one per page. So short rows go
# in blocks of consecutive channels, whose part of an outer row is one contiguous run: the element
# passes write a run at a time, reading each element's parameters from tables that spread the
# block's per-channel values over the run. Statistics sum each chunk down its rows first, element
# by element across the run, then each channel's columns. A block only groups work: a channel's
# sums are the same operations whichever block it is in, so the fused and the chunked kernels give
# the same bits, and the block size may depend on the thread count.


@njit(**NESTED)
def _block_moments(x, inner, c0, c1, r0, r1, mean, m2):
    """Moments of rows [r0, r1) of channels [c0, c1) into mean and m2 (indexed from c0); returns the
    count. A shifted two-pass as in :func:`_chunk_moments`, but summed down the rows first, column
    by column across the block's run (whole lines in registers however short a row is), then across
    each channel's ``inner`` column sums."""
    j0 = c0 * inner
    width = (c1 - c0) * inner
    column = np.zeros(width)
    shift = np.empty(width)
    for c in range(c1 - c0):
        for j in range(c * inner, (c + 1) * inner):
            shift[j] = np.float64(x[r0, j0 + c * inner])
    for q in range(r0, r1, STREAM_ROW_RUN):
        q1 = min(q + STREAM_ROW_RUN, r1)
        for r in range(q1, q1 + STREAM_ROW_RUN):
            prefetch_run(x, r, r1, j0, width)
        shifted_columns((column,), (x,), j0, q, q1, width, (shift,))
    n = np.float64((r1 - r0) * inner)
    for c in range(c1 - c0):
        mean[c] = shift[c * inner] + vector_sum(column[c * inner : (c + 1) * inner]) / n
        for j in range(c * inner, (c + 1) * inner):
            shift[j] = mean[c]
            column[j] = 0.0
    squared_deviation_columns((column,), (x,), j0, r0, r1, width, (shift, np.zeros(width)))  # a float64 mean: no remainder
    for c in range(c1 - c0):
        m2[c] = vector_sum(column[c * inner : (c + 1) * inner])
    return n


@njit(**NESTED)
def _block_gradient_sums(dy, x, inner, c0, c1, r0, r1, mean, sum_dy, sum_dy_xmu, stops=None):
    """Sums of dy and dy * (x - mean) over rows [r0, r1) of channels [c0, c1), indexed from c0; down
    the rows first, as :func:`_block_moments`. With ``stops`` (the run tables of
    :func:`.elements.relu_stops`), of dy masked by the forward's ReLU, in registers."""
    j0 = c0 * inner
    width = (c1 - c0) * inner
    column_dy = np.zeros(width)
    column_dy_xmu = np.zeros(width)
    center = np.empty(width)
    for c in range(c0, c1):
        for j in range((c - c0) * inner, (c - c0 + 1) * inner):
            center[j] = mean[c]
    for q in range(r0, r1, STREAM_ROW_RUN):
        q1 = min(q + STREAM_ROW_RUN, r1)
        for r in range(q1, q1 + STREAM_ROW_RUN):
            prefetch_run(dy, r, r1, j0, width)
            prefetch_run(x, r, r1, j0, width)
        if stops is None:
            gradient_columns((column_dy, column_dy_xmu), (dy, x), j0, q, q1, width, (center,))
        else:
            masked_gradient_columns((column_dy, column_dy_xmu), (dy, x), j0, q, q1, width, (center, stops[0], stops[1]))
    for c in range(c1 - c0):
        sum_dy[c] = vector_sum(column_dy[c * inner : (c + 1) * inner])
        sum_dy_xmu[c] = vector_sum(column_dy_xmu[c * inner : (c + 1) * inner])


@kernel
def _forward_train_by_block(x, inner, block, weight, bias, eps, renorm, y, z, fused_relu, mean, var, stream):
    """:func:`_forward_train_by_channel` for short rows, one task per block of channels."""
    outer = x.shape[0]
    channels = x.shape[1] // inner
    rows = chunking(outer, inner)[0]
    for b in prange((channels + block - 1) // block):
        c0 = b * block
        c1 = min(c0 + block, channels)
        chunk_mean = np.empty(c1 - c0)
        chunk_m2 = np.empty(c1 - c0)
        m = np.zeros(c1 - c0)
        m2 = np.zeros(c1 - c0)
        n = 0.0
        for r0 in range(0, outer, rows):
            n_k = _block_moments(x, inner, c0, c1, r0, min(r0 + rows, outer), chunk_mean, chunk_m2)
            for c in range(c1 - c0):
                _, m[c], m2[c] = chan_merge(n, m[c], m2[c], n_k, chunk_mean[c], chunk_m2[c])
            n += n_k
        hi = np.empty(c1 - c0, y.dtype)
        lo = np.empty(c1 - c0, y.dtype)
        scale = np.empty(c1 - c0, y.dtype)
        shift = np.empty(c1 - c0, y.dtype)
        for c in range(c0, c1):
            mean[c] = m[c - c0]
            var[c] = m2[c - c0] / n
            hi[c - c0], lo[c - c0] = split_mean(y, mean[c])
            scale_c, shift_c = channel_affine(c, mean[c], var[c], weight, bias, eps, renorm)
            scale[c - c0] = as_element(y, scale_c)
            shift[c - c0] = as_element(y, shift_c)
        tables = (spread(hi, inner), spread(lo, inner), spread(scale, inner), spread(shift, inner))
        j0 = c0 * inner
        j1 = c1 * inner
        for r in range(outer - 1, -1, -1):
            write_affine(x[r, j0:j1], 0, j1 - j0, tables, j1 - j0, y[r, j0:j1], stream, part(z, r, j0, j1), fused_relu)
        if stream:
            store_fence()


@njit(**NESTED)
def _relu_gradient_block(dy, x, inner, c0, c1, r0, r1, mean, relu, out):
    """Rows [r0, r1) of channels [c0, c1) of the masked gradient into ``out``'s rows (the block's
    columns), ``relu`` = (z, g, scale, shift), as :func:`.batch_norm_channels_first._relu_gradient_chunk`."""
    z, _, scale, shift = relu
    params = affine_params(out, mean[c0:c1], scale[c0:c1], shift[c0:c1])
    tables = _block_tables(params, 0, c1 - c0, inner)
    j0 = c0 * inner
    j1 = c1 * inner
    for r in range(r0, r1):
        write_relu_gradient(dy[r, j0:j1], x[r, j0:j1], part(z, r, j0, j1), 0, j1 - j0, tables, j1 - j0, out[r])


@njit(**NESTED)
def _block_scratch(g, j0, j1, like):
    """Where a block's masked gradient goes: its columns of g (the residual's gradient), or with no g
    a scratch of the block's own, which stays in cache."""
    if g is None:
        return np.empty((like.shape[0], j1 - j0), like.dtype)
    return g[:, j0:j1]


@kernel
def _backward_by_block(dy, x, inner, block, mean, invstd, weight, training, dx, sum_dy, sum_dy_xmu, relu, stream):
    """:func:`_backward_by_channel` for short rows, one task per block of channels, on the block's
    columns of dy and x: with ``relu``, of dy masked in registers (training, no residual), or of its
    masked gradient written to scratch or g."""
    outer = x.shape[0]
    channels = x.shape[1] // inner
    rows = chunking(outer, inner)[0]
    stops = register_stops(x, mean, relu)
    registers = training and stops is not None
    for b in prange((channels + block - 1) // block):
        c0 = b * block
        c1 = min(c0 + block, channels)
        j0 = c0 * inner
        j1 = c1 * inner
        src = dy[:, j0:j1]
        if relu is not None:
            if not registers:
                src = _block_scratch(relu[1], j0, j1, x)
        block_stops = _block_stops(stops, c0, c1, inner)
        xs = x[:, j0:j1]
        chunk_dy = np.empty(c1 - c0)
        chunk_dy_xmu = np.empty(c1 - c0)
        total_dy = np.zeros(c1 - c0)
        total_dy_xmu = np.zeros(c1 - c0)
        for r0 in range(0, outer, rows):
            r1 = min(r0 + rows, outer)
            if registers:
                _block_gradient_sums(src, xs, inner, 0, c1 - c0, r0, r1, mean[c0:c1], chunk_dy, chunk_dy_xmu, block_stops)
            else:
                if relu is not None:
                    _relu_gradient_block(dy, x, inner, c0, c1, r0, r1, mean, relu, src)
                _block_gradient_sums(src, xs, inner, 0, c1 - c0, r0, r1, mean[c0:c1], chunk_dy, chunk_dy_xmu)
            for c in range(c1 - c0):
                total_dy[c] += chunk_dy[c]
                total_dy_xmu[c] += chunk_dy_xmu[c]
        for c in range(c0, c1):
            sum_dy[c] = total_dy[c - c0]
            sum_dy_xmu[c] = total_dy_xmu[c - c0]
        if training:
            mean_dy = np.empty(c1 - c0)
            k = np.empty(c1 - c0)
            scale = np.empty(c1 - c0)
            for c in range(c0, c1):
                mean_dy[c - c0], k[c - c0], scale[c - c0] = backward_coefficients(
                    total_dy[c - c0], total_dy_xmu[c - c0], invstd[c], weight[c], np.float64(outer * inner)
                )
            fa, fb, fc = gradient_factors(mean_dy, k, scale)
            params = (spread(mean[c0:c1], inner), spread(fa, inner), spread(fb, inner), spread(fc, inner))
            for r in range(outer - 1, -1, -1):
                write_gradient(src[r], xs[r], 0, j1 - j0, params, j1 - j0, dx[r, j0:j1], stream, block_stops)
        else:  # frozen statistics: dx = dy * weight * invstd, whatever x holds
            zero = as_element(dx, 0.0)
            frozen_scale = np.empty(c1 - c0, dx.dtype)
            for c in range(c0, c1):
                frozen_scale[c - c0] = as_element(dx, weight[c] * invstd[c])
            frozen = (zero, zero, spread(frozen_scale, inner), zero)
            for r in range(outer - 1, -1, -1):
                write_affine(src[r], 0, j1 - j0, frozen, j1 - j0, dx[r, j0:j1], stream)
        if stream:
            store_fence()


def _block_stops(stops, c0, c1, inner):
    """The run tables (first, last) of channels [c0, c1) of :func:`.elements.relu_stops`; None
    without ``stops``."""


@overload(_block_stops, inline="always")
def _block_stops_overload(stops, c0, c1, inner):
    if isinstance(stops, types.NoneType):
        return lambda stops, c0, c1, inner: None
    return lambda stops, c0, c1, inner: (spread(stops[0, c0:c1], inner), spread(stops[1, c0:c1], inner))


@kernel
def _block_moments_all(x, inner, block, count, part_mean, part_m2):
    """:func:`_chunk_moments_all` for short rows: one task per chunk of a block of channels."""
    outer = x.shape[0]
    channels = x.shape[1] // inner
    rows = chunking(outer, inner)[0]
    blocks = (channels + block - 1) // block
    for t in prange(count.shape[0] * blocks):
        k = t // blocks
        c0 = (t - k * blocks) * block
        c1 = min(c0 + block, channels)
        r0 = k * rows
        count[k] = _block_moments(x, inner, c0, c1, r0, min(r0 + rows, outer), part_mean[k, c0:c1], part_m2[k, c0:c1])


@kernel
def _block_gradient_sums_all(dy, x, inner, block, mean, part_dy, part_dy_xmu, relu):
    outer = x.shape[0]
    channels = x.shape[1] // inner
    rows = chunking(outer, inner)[0]
    blocks = (channels + block - 1) // block
    if relu is None:
        grad = dy
    else:
        grad = relu[1]
    for t in prange(part_dy.shape[0] * blocks):
        k = t // blocks
        c0 = (t - k * blocks) * block
        c1 = min(c0 + block, channels)
        r0 = k * rows
        if relu is not None:
            _relu_gradient_block(dy, x, inner, c0, c1, r0, min(r0 + rows, outer), mean, relu, grad[:, c0 * inner:c1 * inner])
        _block_gradient_sums(
            grad, x, inner, c0, c1, r0, min(r0 + rows, outer), mean, part_dy[k, c0:c1], part_dy_xmu[k, c0:c1]
        )


# The parallel element passes for short rows: one task per block of channels and group of rows.


@njit(**NESTED)
def _block_task(x, inner, block, groups, t):
    """Channels [c0, c1) and rows [r0, r1) of task t."""
    channels = x.shape[1] // inner
    b = t // groups
    g = t - b * groups
    c0 = b * block
    return c0, min(c0 + block, channels), g * x.shape[0] // groups, (g + 1) * x.shape[0] // groups


@njit(**NESTED)
def _block_tables(params, c0, c1, inner):
    """The run tables of channels [c0, c1) from the four rows of per-channel ``params``."""
    return (
        spread(params[0][c0:c1], inner),
        spread(params[1][c0:c1], inner),
        spread(params[2][c0:c1], inner),
        spread(params[3][c0:c1], inner),
    )


@kernel
def _normalize_blocks(x, inner, block, groups, mean, scale, shift, y, z, fused_relu, stream):
    """y = (x - mean) * scale + shift (then the residual and ReLU, if fused)."""
    params = affine_params(y, mean, scale, shift)
    blocks = (x.shape[1] // inner + block - 1) // block
    for t in prange(blocks * groups):
        c0, c1, r0, r1 = _block_task(x, inner, block, groups, t)
        tables = _block_tables(params, c0, c1, inner)
        j0 = c0 * inner
        j1 = c1 * inner
        for r in range(r0, r1):
            prefetch_run(x, r + PREFETCH_ROWS, r1, j0, j1 - j0)
            write_affine(x[r, j0:j1], 0, j1 - j0, tables, j1 - j0, y[r, j0:j1], stream, part(z, r, j0, j1), fused_relu)
        if stream:
            store_fence()


@kernel
def _gradient_blocks(dy, x, inner, block, groups, params, dx, stream):
    blocks = (x.shape[1] // inner + block - 1) // block
    for t in prange(blocks * groups):
        c0, c1, r0, r1 = _block_task(x, inner, block, groups, t)
        tables = _block_tables(params, c0, c1, inner)
        j0 = c0 * inner
        j1 = c1 * inner
        for r in range(r0, r1):
            prefetch_run(dy, r + PREFETCH_ROWS, r1, j0, j1 - j0)
            prefetch_run(x, r + PREFETCH_ROWS, r1, j0, j1 - j0)
            write_gradient(dy[r, j0:j1], x[r, j0:j1], 0, j1 - j0, tables, j1 - j0, dx[r, j0:j1], stream)
        if stream:
            store_fence()
