"""Batch norm's channels-first loops (``inner`` > 1: NCHW, NCL, NCDHW) on rows of at least
``SHORT_ROW`` elements. Each channel's data is cut into statistics chunks (a few whole rows, or one
segment of a long row). With channels enough to share among the threads and a channel's slice
small enough to stay in L2, one task does one channel: statistics, then the element pass over the
same slice while it is still in cache, so a train forward reads x from memory once. Otherwise chunk
statistics and the element passes each run in parallel over all chunks or row segments."""

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from accelbn.backends.numba_cpu.elements import (
    affine_params,
    channel_stops,
    no_stops,
    or_no_stops,
    register_stops,
    row,
    write_affine,
    write_gradient,
    write_relu_gradient,
)
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
def _chunk_gradient_sums(dy, cd, x, c, mean, k, rows, segments, first, last):
    """Sums over chunk k of channel c of x and channel ``cd`` of dy (c, or 0 in a channel's scratch),
    dy masked where first <= x <= last (:func:`.reductions.gradient_sums`)."""
    r0, r1, i0, i1 = chunk_bounds(x, k, rows, segments)
    a, b = 0.0, 0.0
    for r in range(r0, r1):
        ra, rb = gradient_sums(unit_stride(dy[r, cd, i0:i1]), unit_stride(x[r, c, i0:i1]), mean, first, last)
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


# The fused ReLU's backward (``relu`` = (z, g, scale, shift)). Without a residual, the kernels mask
# dy in registers as they read it (the training passes: :func:`.elements.relu_stops`). With one, or
# for frozen statistics, they first write the masked gradient over the part they are about to sum, a
# chunk at a time, then read it where they would read dy. One task per channel writes it to a
# scratch slice of its own, which stays in cache for the sums and the element pass (and is streamed
# to g, the residual's gradient, when there is one). The chunked kernels write it to g, which the
# element pass reads.


@njit(**NESTED)
def _channel_backward(src, cs, x, c, mean, invstd, weight, training, dx, sum_dy, sum_dy_xmu, stream, masking, stops):
    """One channel's backward, reading dy from channel ``cs`` of ``src``: masked where ``stops`` =
    (first, last) holds x, or, with ``masking`` = (dy, relu), with each chunk of src first written as
    the masked dy."""
    outer, _, inner = x.shape
    rows, segments, chunks = chunking(outer, inner)
    prefetching = 2 * rows * min(inner, STATS_CHUNK) * x.itemsize <= PREFETCH_CHUNK_BYTES
    first, last = or_no_stops(stops, x)
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
        a_k, b_k = _chunk_gradient_sums(src, cs, x, c, mean[c], k, rows, segments, first, last)
        a += a_k
        b += b_k
    sum_dy[c] = a
    sum_dy_xmu[c] = b
    if training:
        mean_dy, k_c, scale = backward_coefficients(a, b, invstd[c], weight[c], np.float64(outer * inner))
        fa, fb, fc = gradient_factors(mean_dy, k_c, scale)
        params = (mean[c], fa, fb, fc)
        for r in range(outer - 1, -1, -1):
            write_gradient(src[r, cs], x[r, c], 0, inner, params, 1, dx[r, c], stream, stops)
    else:  # frozen statistics: dx = dy * weight * invstd, whatever x holds
        zero = as_element(dx, 0.0)
        frozen = (zero, zero, as_element(dx, weight[c] * invstd[c]), zero)
        for r in range(outer - 1, -1, -1):
            write_affine(src[r, cs], 0, inner, frozen, 1, dx[r, c], stream)


@kernel
def _backward_by_channel(dy, x, mean, invstd, weight, training, dx, sum_dy, sum_dy_xmu, relu, stream):
    outer, channels, inner = x.shape
    stops = register_stops(dx, mean, relu)
    for c in prange(channels):
        if relu is None:
            _channel_backward(dy, c, x, c, mean, invstd, weight, training, dx, sum_dy, sum_dy_xmu, stream, None, None)
        elif training and stops is not None:
            _channel_backward(dy, c, x, c, mean, invstd, weight, training, dx, sum_dy, sum_dy_xmu, stream, None,
                              channel_stops(stops, c))
        else:
            scratch = np.empty((outer, 1, inner), dx.dtype)
            _channel_backward(scratch, 0, x, c, mean, invstd, weight, training, dx, sum_dy, sum_dy_xmu, stream, (dy, relu), None)
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


@kernel
def _chunk_gradient_sums_all(dy, x, mean, part_dy, part_dy_xmu, relu):
    """The gradient sums of every chunk of every channel, into (chunks, C) arrays."""
    outer, channels, inner = x.shape
    rows, segments, chunks = chunking(outer, inner)
    stops = register_stops(x, mean, relu)
    for j in prange(chunks * channels):
        k = j // channels
        c = j - k * channels
        part_dy[k, c], part_dy_xmu[k, c] = _any_chunk_sums(dy, x, c, mean, k, rows, segments, relu, stops)


def _any_chunk_sums(dy, x, c, mean, k, rows, segments, relu, stops):
    """:func:`_chunk_gradient_sums` of chunk k of channel c: of dy; with ``relu`` and no residual, of
    dy masked in registers (``stops``: :func:`.elements.register_stops`); with g, of the masked
    gradient written into g."""


@overload(_any_chunk_sums, inline="always")
def _any_chunk_sums_overload(dy, x, c, mean, k, rows, segments, relu, stops):
    if isinstance(relu, types.NoneType) or not isinstance(stops, types.NoneType):

        def in_registers(dy, x, c, mean, k, rows, segments, relu, stops):
            first, last = or_no_stops(channel_stops(stops, c), x)
            return _chunk_gradient_sums(dy, c, x, c, mean[c], k, rows, segments, first, last)

        return in_registers

    def written(dy, x, c, mean, k, rows, segments, relu, stops):
        _relu_gradient_chunk(dy, x, c, k, rows, segments, mean, relu, relu[1], c)
        first, last = no_stops(x)
        return _chunk_gradient_sums(relu[1], c, x, c, mean[c], k, rows, segments, first, last)

    return written


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
    stops = register_stops(dx, params[0], relu)
    for t in prange(tasks):
        for u in task_segments(x, t, tasks):
            r, c, f0, f1 = segment(x, u)
            p = (params[0][c], params[1][c], params[2][c], params[3][c])
            write_gradient(dy[r, c], x[r, c], f0, f1, p, 1, dx[r, c], stream, channel_stops(stops, c))
        if stream:
            store_fence()
