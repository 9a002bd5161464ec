"""Batch norm's channels-first loops (``inner`` > 1: NCHW, NCL, NCDHW) on rows of at least
``SHORT_ROW`` elements. Each channel's data is cut into statistics chunks (a few whole rows, or one
segment of a long row). With channels enough to share among the threads and a channel's slice
small enough to stay in L2, one task does one channel: statistics, then the element pass over the
same slice while it is still in cache, so a train forward reads x from memory once. Otherwise chunk
statistics and the element passes each run in parallel over all chunks or row segments."""

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from accelbn.backends.numba_cpu.elements import affine_params, row, span, write_affine, write_gradient, write_relu_gradient
from accelbn.backends.numba_cpu.lines import store_fence, unit_stride
from accelbn.backends.numba_cpu.reductions import chan_merge, gradient_sums, sum_shifted, sum_squared_deviations
from accelbn.backends.numba_cpu.runtime import NESTED, kernel
from accelbn.backends.numba_cpu.scalars import as_element, backward_coefficients, channel_affine, gradient_factors, split_mean
from accelbn.backends.numba_cpu.tiling import PREFETCH_CHUNK_BYTES, STATS_CHUNK, chunk_bounds, chunking, prefetch_chunk, segment, task_segments


@njit(**NESTED)
def _chunk_moments(x, c, k, rows, segments):
    """(count, mean, sum of squared deviations) of chunk k of channel c, by a shifted two-pass."""
    r0, r1, i0, i1 = chunk_bounds(x, k, rows, segments)
    shift = np.float64(x[r0, c, i0])
    s = 0.0
    for r in range(r0, r1):
        s += sum_shifted(unit_stride(x[r, c, i0:i1]), shift)
    n = np.float64((r1 - r0) * (i1 - i0))
    mean = shift + s / n
    q = 0.0
    for r in range(r0, r1):
        q += sum_squared_deviations(unit_stride(x[r, c, i0:i1]), mean)
    return n, mean, q


@njit(**NESTED)
def _chunk_gradient_sums(dy, cd, x, c, mean, k, rows, segments):
    """Sums over chunk k of channel c of x and channel ``cd`` of dy (c, or 0 in a channel's scratch)."""
    r0, r1, i0, i1 = chunk_bounds(x, k, rows, segments)
    a, b = 0.0, 0.0
    for r in range(r0, r1):
        ra, rb = gradient_sums(unit_stride(dy[r, cd, i0:i1]), unit_stride(x[r, c, i0:i1]), mean)
        a += ra
        b += rb
    return a, b


# The fused kernels (one task per channel or block of channels) write their element pass from the
# last row to the first: their sums pass has just read the rows first to last, so the rows it read
# last are the ones still in cache. The order of the writes changes no bits. (benchmarks/RESULTS.md
# has the measurements, and why the two passes are not overlapped across channels.)


@kernel
def _forward_train_by_channel(x, weight, bias, eps, renorm, y, z, fused_relu, mean, var, stream):
    outer, channels, inner = x.shape
    rows, segments, chunks = chunking(outer, inner)
    for c in prange(channels):
        n, m, m2 = 0.0, 0.0, 0.0
        for k in range(chunks):
            n_k, m_k, q_k = _chunk_moments(x, c, k, rows, segments)
            n, m, m2 = chan_merge(n, m, m2, n_k, m_k, q_k)
        mean[c] = m
        var[c] = m2 / n
        hi, lo = split_mean(y, m)
        scale, shift = channel_affine(c, m, var[c], weight, bias, eps, renorm)
        params = (hi, lo, as_element(y, scale), as_element(y, shift))
        for r in range(outer - 1, -1, -1):
            write_affine(x[r, c], 0, inner, params, 1, y[r, c], stream, row(z, r, c), fused_relu)
        if stream:
            store_fence()


@njit(**NESTED)
def _relu_gradient_chunk(dy, x, c, k, rows, segments, mean, relu, g, cg):
    """Chunk k of channel c of the masked gradient into channel ``cg`` of g (c, or 0 in a channel's
    scratch), ``relu`` = (z, _, scale, shift): g = dy where the forward's ReLU passed
    (:func:`.elements.write_relu_gradient`)."""
    z, _, scale, shift = relu
    hi, lo = split_mean(g, mean[c])
    p = (hi, lo, as_element(g, scale[c]), as_element(g, shift[c]))
    r0, r1, i0, i1 = chunk_bounds(x, k, rows, segments)
    for r in range(r0, r1):
        write_relu_gradient(dy[r, c], x[r, c], row(z, r, c), i0, i1, p, 1, g[r, cg])


# The fused ReLU's backward (``relu`` = (z, g, scale, shift)): the kernels first write the masked
# gradient over the part they are about to sum, a chunk at a time, then read it where they would read
# dy. One task per channel writes it to a scratch slice of its own, which stays in cache for the sums
# and the element pass (and is streamed to g, the residual's gradient, when there is one): the mask
# then costs nothing in memory traffic. The chunked kernels write it to g, which the element pass
# reads.


@njit(**NESTED)
def _channel_backward(src, cs, x, c, mean, invstd, weight, training, dx, sum_dy, sum_dy_xmu, stream, masking):
    """One channel's backward, reading dy from channel ``cs`` of ``src``; with ``masking`` = (dy,
    relu), each chunk of src is first written as the masked dy."""
    outer, _, inner = x.shape
    rows, segments, chunks = chunking(outer, inner)
    prefetching = 2 * rows * min(inner, STATS_CHUNK) * x.itemsize <= PREFETCH_CHUNK_BYTES
    a, b = 0.0, 0.0
    for k in range(chunks):
        if masking is not None:
            if prefetching:
                prefetch_chunk(masking[0], c, k + 1, rows, segments)
                prefetch_chunk(x, c, k + 1, rows, segments)
            _relu_gradient_chunk(masking[0], x, c, k, rows, segments, mean, masking[1], src, cs)
        elif prefetching:
            prefetch_chunk(src, c, k + 1, rows, segments)
            prefetch_chunk(x, c, k + 1, rows, segments)
        a_k, b_k = _chunk_gradient_sums(src, cs, x, c, mean[c], k, rows, segments)
        a += a_k
        b += b_k
    sum_dy[c] = a
    sum_dy_xmu[c] = b
    if training:
        mean_dy, k_c, scale = backward_coefficients(a, b, invstd[c], weight[c], np.float64(outer * inner))
        fa, fb, fc = gradient_factors(mean_dy, k_c, scale)
        params = (mean[c], fa, fb, fc)
        for r in range(outer - 1, -1, -1):
            write_gradient(src[r, cs], x[r, c], 0, inner, params, 1, dx[r, c], stream)
    else:  # frozen statistics: dx = dy * weight * invstd, whatever x holds
        zero = as_element(dx, 0.0)
        frozen = (zero, zero, as_element(dx, weight[c] * invstd[c]), zero)
        for r in range(outer - 1, -1, -1):
            write_affine(src[r, cs], 0, inner, frozen, 1, dx[r, c], stream)


@kernel
def _backward_by_channel(dy, x, mean, invstd, weight, training, dx, sum_dy, sum_dy_xmu, relu, stream):
    outer, channels, inner = x.shape
    for c in prange(channels):
        if relu is None:
            _channel_backward(dy, c, x, c, mean, invstd, weight, training, dx, sum_dy, sum_dy_xmu, stream, None)
        else:
            scratch = np.empty((outer, 1, inner), dx.dtype)
            _channel_backward(scratch, 0, x, c, mean, invstd, weight, training, dx, sum_dy, sum_dy_xmu, stream, (dy, relu))
            _store_channel(scratch, relu[1], c, stream)
        if stream:
            store_fence()


@njit(**NESTED)
def _store_channel(scratch, g, c, stream):
    """The residual's gradient, channel c of g, from its scratch (nothing when g is None)."""
    if g is not None:
        zero = as_element(g, 0.0)
        identity = (zero, zero, as_element(g, 1.0), zero)
        for r in range(scratch.shape[0]):
            write_affine(scratch[r, 0], 0, scratch.shape[2], identity, 1, g[r, c], stream)


@kernel
def _chunk_moments_all(x, count, part_mean, part_m2):
    """Moments of every chunk of every channel, into (chunks, C) arrays."""
    outer, channels, inner = x.shape
    rows, segments, chunks = chunking(outer, inner)
    for j in prange(chunks * channels):
        k = j // channels
        c = j - k * channels
        count[k], part_mean[k, c], part_m2[k, c] = _chunk_moments(x, c, k, rows, segments)


@njit(**NESTED)
def _masked_row(dy, x, z, f0, f1, mean, scale, shift, buffer):
    """dy's row span [f0, f1) masked by the forward's ReLU into the start of ``buffer``; returns it."""
    hi, lo = split_mean(buffer, mean)
    p = (hi, lo, as_element(buffer, scale), as_element(buffer, shift))
    write_relu_gradient(dy[f0:f1], x[f0:f1], span(z, f0, f1), 0, f1 - f0, p, 1, buffer)
    return buffer[: f1 - f0]


@njit(**NESTED)
def _chunk_sums_masked(dy, x, c, mean, k, rows, segments, relu, g):
    """:func:`_chunk_gradient_sums` of the masked gradient: into g when there is one (the residual's
    gradient, which the element pass reads), else a row at a time into a chunk-sized buffer, summed
    from there (the element pass masks again: no full-size array)."""
    if g is not None:
        _relu_gradient_chunk(dy, x, c, k, rows, segments, mean, relu, g, c)
        return _chunk_gradient_sums(g, c, x, c, mean[c], k, rows, segments)
    z, _, scale, shift = relu
    r0, r1, i0, i1 = chunk_bounds(x, k, rows, segments)
    buffer = np.empty(i1 - i0, x.dtype)
    a, b = 0.0, 0.0
    for r in range(r0, r1):
        masked = _masked_row(dy[r, c], x[r, c], row(z, r, c), i0, i1, mean[c], scale[c], shift[c], buffer)
        ra, rb = gradient_sums(unit_stride(masked), unit_stride(x[r, c, i0:i1]), mean[c])
        a += ra
        b += rb
    return a, b


@kernel
def _chunk_gradient_sums_all(dy, x, mean, part_dy, part_dy_xmu, relu):
    outer, channels, inner = x.shape
    rows, segments, chunks = chunking(outer, inner)
    for j in prange(chunks * channels):
        k = j // channels
        c = j - k * channels
        if relu is None:
            part_dy[k, c], part_dy_xmu[k, c] = _chunk_gradient_sums(dy, c, x, c, mean[c], k, rows, segments)
        else:
            part_dy[k, c], part_dy_xmu[k, c] = _chunk_sums_masked(dy, x, c, mean, k, rows, segments, relu, relu[1])


@kernel
def _normalize_channels_first(x, mean, scale, shift, y, z, fused_relu, tasks, stream):
    """y = (x - mean) * scale + shift over the row segments (then the residual and ReLU, if fused)."""
    params = affine_params(y, mean, scale, shift)
    for t in prange(tasks):
        for u in task_segments(x, t, tasks):
            r, c, f0, f1 = segment(x, u)
            p = (params[0][c], params[1][c], params[2][c], params[3][c])
            write_affine(x[r, c], f0, f1, p, 1, y[r, c], stream, row(z, r, c), fused_relu)
        if stream:
            store_fence()


@kernel
def _gradient_channels_first(dy, x, params, dx, tasks, relu, stream):
    """The training gradient over the row segments; with ``relu`` = (None, None, scale, shift), of dy
    masked by the forward's ReLU in registers (no residual: its gradient would be g)."""
    for t in prange(tasks):
        for u in task_segments(x, t, tasks):
            r, c, f0, f1 = segment(x, u)
            p = (params[0][c], params[1][c], params[2][c], params[3][c])
            write_gradient(dy[r, c], x[r, c], f0, f1, p, 1, dx[r, c], stream, _row_masks(dx, params[0][c], relu, c))
        if stream:
            store_fence()


def _row_masks(like, mean, relu, c):
    """Channel c's parameters of the forward's ReLU input in ``like``'s dtype (hi, lo, scale, shift),
    for :func:`.elements.write_gradient`; None without ``relu``."""


@overload(_row_masks, inline="always")
def _row_masks_overload(like, mean, relu, c):
    if isinstance(relu, types.NoneType):
        return lambda like, mean, relu, c: None

    def masks(like, mean, relu, c):
        hi, lo = split_mean(like, mean)
        return hi, lo, as_element(like, relu[2][c]), as_element(like, relu[3][c])

    return masks
