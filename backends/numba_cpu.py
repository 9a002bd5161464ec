"""Numba CPU kernels for batch normalization.

Kernels take arrays in the front's canonical view ``(outer, C, inner)`` and per-channel float64
vectors; they never validate and never touch running statistics.

Two loop families, picked by ``inner``:

* channels-first (``inner > 1``: NCHW, NCL, NCDHW). Each channel's data is cut into fixed chunks
  (a few whole rows, or one segment of a long row). When there are enough channels to share among
  the threads and a channel's slice fits in L2, one task does one channel: statistics, then the
  normalize pass over the same slice while it is still in cache, so a train forward reads x from
  memory once. Otherwise (few channels, e.g. C=3 images, or slices too large to keep) chunk
  statistics, the normalize pass and the gradient pass each run in parallel over all chunks.
  Short rows (fewer than ``SHORT_ROW`` elements, e.g. 7x7) go the same two ways in blocks of
  consecutive channels instead of single channels, so that element passes write long runs.
* channels-last (``inner == 1``: NHWC and (N, C)): the flat array in fixed blocks of rows, each
  producing per-channel partials that are merged in block order.

Statistics are computed per chunk with a shifted two-pass (sum of x - x0, then sum of squared
deviations, both while the chunk is in cache) and merged with Chan's formula in chunk order. Chunks
and blocks depend only on the shape, never on the thread count or the path taken, so results are
bitwise identical run to run and for any number of threads.

Only the reduction helpers are compiled with ``reassoc``: it lets LLVM vectorize a sum (about 4x on
this machine) in an order fixed at compile time. Everything else is strict IEEE arithmetic.

Element passes (normalize, gradient) compute a cache line at a time with SIMD (:mod:`._lines`), and
outputs of ``STREAM_MIN_BYTES`` or more are written with streaming stores, so writing y costs one
pass over memory instead of two.
"""

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from accelbn._formulas import backward_coefficients, gradient_factors, inverse_std
from accelbn.backends import _numba_runtime
from accelbn.backends._lines import LINE_BYTES, column_sweep, fma, line_kernel, prefetch, store_fence, unit_stride
from accelbn.backends._numba_runtime import (
    OPTIONS as _OPTIONS,
    kernel as _kernel,
    kernels as _kernels,
    parallel_entry as _parallel_entry,
    tasks as _tasks,
)

# The dtypes the kernels read and write directly (Numba has no float16 on the CPU); the front
# converts anything else to float32.
STORAGE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_REDUCTION = dict(_OPTIONS, fastmath={"reassoc"})
# Helpers that only kernels call go without the wrappers that let Python and C call a function:
# Numba would compile both for every helper, a share of a cold first call (benchmarks/RESULTS.md).
_NESTED = dict(_OPTIONS, no_cpython_wrapper=True, no_cfunc_wrapper=True)
_NESTED_REDUCTION = dict(_REDUCTION, no_cpython_wrapper=True, no_cfunc_wrapper=True)

# Elements in a statistics chunk: its second pass runs from L1/L2.
STATS_CHUNK = 4096
# Elements in a channels-last row block: the unit of parallel work and of partial sums.
ROW_BLOCK = 65536
# Elements of a row segment, the unit of the parallel channels-first element passes.
ROW_SEGMENT = 65536
# A channel slice this small stays in L2 between the statistics and the normalize pass.
CACHED_SLICE_BYTES = 1 << 20
# Channels-first rows shorter than this (elements) are processed in blocks of channels whose runs in
# an outer row have at least BLOCK_RUN elements; must not exceed STATS_CHUNK. Measured here: blocks
# win for 7x7 and 14x14, single channels for 28x28 (784).
SHORT_ROW = 256
BLOCK_RUN = 1024
# Rows ahead that the short-row element passes prefetch (their statistics prefetch a sweep ahead).
PREFETCH_ROWS = 2
# Outputs at least this large are streamed: they would not stay in cache for a next reader anyway.
STREAM_MIN_BYTES = 8 << 20

_inverse_std = njit(inline="always", error_model="numpy")(inverse_std)
_backward_coefficients = njit(inline="always", error_model="numpy")(backward_coefficients)
_gradient_factors = njit(inline="always", error_model="numpy")(gradient_factors)


@njit(**_OPTIONS)
def _scale(var, weight, eps):
    """weight / sqrt(var + eps) per channel, in one compiled call: on a small input, the four NumPy
    operations it replaces cost more than the whole element pass."""
    scale = np.empty_like(var)
    for c in range(var.shape[0]):
        scale[c] = weight[c] * _inverse_std(var[c], eps)
    return scale


# Array loops written out rather than as NumPy expressions (``a[:] = 0.0``, ``np.isfinite(a).all()``,
# slice assignments): each NumPy feature compiles Numba's generic implementation on first use, with its
# error-message formatting, which cost seconds of a cold first call.


@njit(inline="always", error_model="numpy")
def _zero(a):
    for i in range(a.shape[0]):
        a[i] = 0.0


@njit(inline="always", error_model="numpy")
def _all_finite(a):
    for i in range(a.shape[0]):
        if not np.isfinite(a[i]):
            return False
    return True


# --- scalars in the element dtype ---------------------------------------------------------------


def _at(p, c):
    """A parameter of channel c: a scalar as it is, a table's entry c."""


@overload(_at, inline="always")
def _at_overload(p, c):
    if isinstance(p, types.Array):
        return lambda p, c: p[c]
    return lambda p, c: p


def _as_element(a, v):
    """v converted to the dtype of array a."""


@overload(_as_element, inline="always")
def _as_element_overload(a, v):
    element = a.dtype
    return lambda a, v: element(v)


@njit(**_NESTED)
def _split(a, v):
    """v as a high part in a's dtype and the low remainder, for x - v to keep its accuracy."""
    hi = _as_element(a, v)
    return hi, _as_element(a, v - np.float64(hi))


# --- reductions ----------------------------------------------------------------------------------


@njit(**_NESTED_REDUCTION)
def _sum(v):
    s = 0.0
    for i in range(v.shape[0]):
        s += v[i]
    return s


# The moment reductions add SUM_RUN elements at a time in the element dtype (float32 for float32 x),
# which LLVM spreads over vector lanes and accumulators, so a run's total is nearly a pairwise sum;
# the runs' totals are added in float64. Converting every element to float64 instead cost half of a
# train forward's statistics time here. A float32 run can overflow where float64 would not (values
# near 3e38, squares beyond 1.8e19): a row whose sum is not finite is summed again in float64, so
# only rows holding inf or NaN pay twice. Runs start at fixed offsets of the row: the order is fixed
# by the shape alone.
SUM_RUN = 256


@njit(inline="always", **_REDUCTION)
def _runs_shifted(v, shift, zero):
    """Sum of v - shift, in runs computed in the type of ``zero`` and ``shift``."""
    n = v.shape[0]
    e = n - n % SUM_RUN
    s = 0.0
    for i0 in range(0, e, SUM_RUN):
        t = zero
        for i in range(i0, i0 + SUM_RUN):
            t += v[i] - shift
        s += np.float64(t)
    t = zero
    for i in range(e, n):
        t += v[i] - shift
    return s + np.float64(t)


@njit(inline="always", **_REDUCTION)
def _runs_squared_deviations(v, mean_hi, mean_lo, zero):
    n = v.shape[0]
    e = n - n % SUM_RUN
    s = 0.0
    for i0 in range(0, e, SUM_RUN):
        t = zero
        for i in range(i0, i0 + SUM_RUN):
            d = (v[i] - mean_hi) - mean_lo
            t += d * d
        s += np.float64(t)
    t = zero
    for i in range(e, n):
        d = (v[i] - mean_hi) - mean_lo
        t += d * d
    return s + np.float64(t)


@njit(**_NESTED_REDUCTION)
def _sum_shifted(v, shift):
    """Sum of v - shift, for a shift that is exact in v's dtype (an element of v)."""
    s = _runs_shifted(v, _as_element(v, shift), _as_element(v, 0.0))
    if not np.isfinite(s):
        s = _runs_shifted(v, shift, 0.0)
    return s


@njit(**_NESTED_REDUCTION)
def _sum_squared_deviations(v, mean):
    hi, lo = _split(v, mean)
    s = _runs_squared_deviations(v, hi, lo, _as_element(v, 0.0))
    if not np.isfinite(s):
        s = _runs_squared_deviations(v, mean, 0.0, 0.0)
    return s


# Contracted: the product and its sum in one fused multiply-add, one rounding fewer and 1.4 ms less
# on NCHW 64x256x56x56 (20.3 against 21.7 ms for its sums pass, measured side by side).
@njit(**dict(_REDUCTION, fastmath={"reassoc", "contract"}))
def _gradient_sums(dy, x, mean):
    """Sums of dy and of dy * (x - mean), in float64 throughout: a product of two float32 numbers is
    exact in float64, and the gradient needs the second sum exactly where dx cancels to far below dy
    (dy nearly a linear function of x)."""
    sum_dy = 0.0
    sum_dy_xmu = 0.0
    for i in range(dy.shape[0]):
        g = np.float64(dy[i])
        sum_dy += g
        sum_dy_xmu += g * (np.float64(x[i]) - mean)
    return sum_dy, sum_dy_xmu


@njit(**_NESTED)
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, sum of squared deviations) triples (Chan et al., 1979)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


# --- element-wise passes -------------------------------------------------------------------------
# The normalize pass computes in x's dtype, as PyTorch does. The mean is split into a high part (the
# mean rounded to that dtype) and the low remainder, so x - mean keeps its accuracy however large the
# mean is next to the spread: x - mean_hi is exact when x is near the mean (Sterbenz). The gradient
# computes in float64, as a * dy + b * (x - mean) + c with two fused multiply-adds (:func:`gradient_factors`):
# its terms can cancel to far below either of them, and float64 keeps dx's digits where they do.


def _affine(x, mean_hi, mean_lo, scale, shift):
    return ((x - mean_hi) - mean_lo) * scale + shift


def _gradient(dy, x, mean, a, b, c):
    return fma(x - mean, b, fma(dy, a, c))


_affine_element = njit(inline="always", error_model="numpy")(_affine)
_gradient_element = njit(inline="always", error_model="numpy")(_gradient)
_affine_line = line_kernel(_affine, nontemporal=False)
_affine_line_streamed = line_kernel(_affine, nontemporal=True)
_gradient_line = line_kernel(_gradient, nontemporal=False, wide=True)
_gradient_line_streamed = line_kernel(_gradient, nontemporal=True, wide=True)


@njit(**_NESTED)
def _line_span(y, f0, f1, stream):
    """The part [a, e) of y[f0:f1] done by whole lines; streamed lines must start line-aligned."""
    line = LINE_BYTES // y.itemsize
    a = f0
    if stream:
        address = y.ctypes.data + f0 * y.itemsize
        a = f1 if address % y.itemsize else min(f1, f0 + (-address % LINE_BYTES) // y.itemsize)
    return a, a + (f1 - a) // line * line


# Each writer sets out[f0:f1] of unit-stride arrays: a line at a time where it can, element by element
# at the ends. ``params`` are per-channel scalars (period 1) or tables, where element f reads entry
# f % period and a line starting at f reads the ``W`` entries from there (so a table has period + W
# entries, or period entries when f0 = 0 and f1 <= period). The entry is carried from element to
# element and from line to line: no division per element.


@njit(**_NESTED)
def _affine_elements(x, f0, f1, params, period, y):
    c = f0 % period
    for f in range(f0, f1):
        y[f] = _affine_element(x[f], _at(params[0], c), _at(params[1], c), _at(params[2], c), _at(params[3], c))
        c += 1
        if c == period:
            c = 0


@njit(**_NESTED)
def _gradient_elements(dy, x, f0, f1, params, period, dx):
    c = f0 % period
    for f in range(f0, f1):
        dx[f] = _gradient_element(
            np.float64(dy[f]),
            np.float64(x[f]),
            _at(params[0], c),
            _at(params[1], c),
            _at(params[2], c),
            _at(params[3], c),
        )
        c += 1
        if c == period:
            c = 0


@njit(**_NESTED)
def _write_affine(x, f0, f1, params, period, y, stream):
    a, e = _line_span(y, f0, f1, stream)
    _affine_elements(x, f0, a, params, period, y)
    line = LINE_BYTES // y.itemsize
    step = line % period
    c = a % period
    for f in range(a, e, line):
        if stream:
            _affine_line_streamed(y, f, (x,), params, c)
        else:
            _affine_line(y, f, (x,), params, c)
        c += step
        if c >= period:
            c -= period
    _affine_elements(x, e, f1, params, period, y)


@njit(**_NESTED)
def _write_gradient(dy, x, f0, f1, params, period, dx, stream):
    a, e = _line_span(dx, f0, f1, stream)
    _gradient_elements(dy, x, f0, a, params, period, dx)
    line = LINE_BYTES // dx.itemsize
    step = line % period
    c = a % period
    for f in range(a, e, line):
        if stream:
            _gradient_line_streamed(dx, f, (dy, x), params, c)
        else:
            _gradient_line(dx, f, (dy, x), params, c)
        c += step
        if c >= period:
            c -= period
    _gradient_elements(dy, x, e, f1, params, period, dx)


# --- channels-first: (outer, C, inner) ------------------------------------------------------------


@njit(**_OPTIONS)
def _chunking(outer, inner):
    """(rows per chunk, segments per row, chunks per channel) of the statistics chunks."""
    if inner >= STATS_CHUNK:
        segments = (inner + STATS_CHUNK - 1) // STATS_CHUNK
        return 1, segments, outer * segments
    rows = STATS_CHUNK // inner
    return rows, 1, (outer + rows - 1) // rows


@njit(**_NESTED)
def _chunk_bounds(x, k, rows, segments):
    g = k // segments
    s = k - g * segments
    i0 = s * STATS_CHUNK
    return g * rows, min(g * rows + rows, x.shape[0]), i0, min(i0 + STATS_CHUNK, x.shape[2])


@njit(**_NESTED)
def _chunk_moments(x, c, k, rows, segments):
    """(count, mean, sum of squared deviations) of chunk k of channel c, by a shifted two-pass."""
    r0, r1, i0, i1 = _chunk_bounds(x, k, rows, segments)
    shift = np.float64(x[r0, c, i0])
    s = 0.0
    for r in range(r0, r1):
        s += _sum_shifted(unit_stride(x[r, c, i0:i1]), shift)
    n = np.float64((r1 - r0) * (i1 - i0))
    mean = shift + s / n
    q = 0.0
    for r in range(r0, r1):
        q += _sum_squared_deviations(unit_stride(x[r, c, i0:i1]), mean)
    return n, mean, q


# The fused backward prefetches a channel's next chunk of dy and x while it sums the current one when
# the two take at most this many bytes (64x256x56x56 float32, 25 KB: 1.95-2.03 times a copy without,
# 1.80-1.87 with; 32x64x56x56 float64, 50 KB: 0.78-0.81 without, 0.84 with). The fused train, which
# reads x alone, gains nothing from it (64x256x56x56: 1.07-1.08 with, 1.07-1.11 without).
PREFETCH_CHUNK_BYTES = 32 << 10


@njit(**_NESTED)
def _prefetch_run(x, r, r1, j0, width):
    """Prefetch row r's run x[r, j0:j0 + width] if r < r1: a block's (or a channel's) runs lie one
    per outer row, too far apart for the hardware prefetchers to follow from memory."""
    if r < r1:
        row = x[r]
        for j in range(j0, j0 + width, LINE_BYTES // x.itemsize):
            prefetch(row, j)
        prefetch(row, j0 + width - 1)


@njit(**_NESTED)
def _prefetch_chunk(a, c, k, rows, segments):
    """Prefetch chunk k of channel c of ``a``, if there is one. A channel's chunks lie one outer row
    apart, and the hardware prefetchers start over at each."""
    r0, r1, i0, i1 = _chunk_bounds(a, k, rows, segments)
    for r in range(r0, r1):
        _prefetch_run(a[:, c], r, r1, i0, i1 - i0)


@njit(**_NESTED)
def _chunk_gradient_sums(dy, x, c, mean, k, rows, segments):
    r0, r1, i0, i1 = _chunk_bounds(x, k, rows, segments)
    a, b = 0.0, 0.0
    for r in range(r0, r1):
        ra, rb = _gradient_sums(unit_stride(dy[r, c, i0:i1]), unit_stride(x[r, c, i0:i1]), mean)
        a += ra
        b += rb
    return a, b


# The fused kernels (one task per channel or block of channels) write their element pass from the
# last row to the first: their sums pass has just read the rows first to last, so the rows it read
# last are the ones still in cache (256x2048x7x7 backward, in either order of the A/B calls: 1.64-1.70
# times a copy forwards, 1.54-1.60 backwards; neutral on 56x56 and 14x14 rows and on train).
# The order of the writes changes no bits. Overlapping the two passes instead (a task per run of
# channels, summing channel c + 1 while it writes channel c, so that reads and streamed writes go
# together; same bits) did not pay, timed on NCHW 64x256x56x56 with the calls in shuffled order:
# backward 1.60-1.75 times a copy against 1.50-1.66 (a channel and the next no longer fit in L2);
# train 1.01-1.22 against 1.06-1.14 over five runs (float64 32x64x56x56: 0.62-0.77 against 0.62-0.77).


@_kernel
def _forward_train_by_channel(x, weight, bias, eps, y, mean, var, stream):
    outer, channels, inner = x.shape
    rows, segments, chunks = _chunking(outer, inner)
    for c in prange(channels):
        n, m, m2 = 0.0, 0.0, 0.0
        for k in range(chunks):
            n_k, m_k, q_k = _chunk_moments(x, c, k, rows, segments)
            n, m, m2 = _chan_merge(n, m, m2, n_k, m_k, q_k)
        mean[c] = m
        var[c] = m2 / n
        hi, lo = _split(y, m)
        params = (hi, lo, _as_element(y, weight[c] * _inverse_std(var[c], eps)), _as_element(y, bias[c]))
        for r in range(outer - 1, -1, -1):
            _write_affine(x[r, c], 0, inner, params, 1, y[r, c], stream)
        if stream:
            store_fence()


@_kernel
def _backward_by_channel(dy, x, mean, invstd, weight, training, dx, sum_dy, sum_dy_xmu, stream):
    outer, channels, inner = x.shape
    rows, segments, chunks = _chunking(outer, inner)
    prefetching = 2 * rows * min(inner, STATS_CHUNK) * x.itemsize <= PREFETCH_CHUNK_BYTES
    for c in prange(channels):
        a, b = 0.0, 0.0
        for k in range(chunks):
            if prefetching:
                _prefetch_chunk(dy, c, k + 1, rows, segments)
                _prefetch_chunk(x, c, k + 1, rows, segments)
            a_k, b_k = _chunk_gradient_sums(dy, x, c, mean[c], k, rows, segments)
            a += a_k
            b += b_k
        sum_dy[c] = a
        sum_dy_xmu[c] = b
        if training:
            mean_dy, k_c, scale = _backward_coefficients(a, b, invstd[c], weight[c], np.float64(outer * inner))
            fa, fb, fc = _gradient_factors(mean_dy, k_c, scale)
            params = (mean[c], fa, fb, fc)
            for r in range(outer - 1, -1, -1):
                _write_gradient(dy[r, c], x[r, c], 0, inner, params, 1, dx[r, c], stream)
        else:  # frozen statistics: dx = dy * weight * invstd, whatever x holds
            zero = _as_element(dx, 0.0)
            frozen = (zero, zero, _as_element(dx, weight[c] * invstd[c]), zero)
            for r in range(outer - 1, -1, -1):
                _write_affine(dy[r, c], 0, inner, frozen, 1, dx[r, c], stream)
        if stream:
            store_fence()


@_kernel
def _chunk_moments_all(x, count, part_mean, part_m2):
    """Moments of every chunk of every channel, into (chunks, C) arrays."""
    outer, channels, inner = x.shape
    rows, segments, chunks = _chunking(outer, inner)
    for j in prange(chunks * channels):
        k = j // channels
        c = j - k * channels
        count[k], part_mean[k, c], part_m2[k, c] = _chunk_moments(x, c, k, rows, segments)


@_kernel
def _chunk_gradient_sums_all(dy, x, mean, part_dy, part_dy_xmu):
    outer, channels, inner = x.shape
    rows, segments, chunks = _chunking(outer, inner)
    for j in prange(chunks * channels):
        k = j // channels
        c = j - k * channels
        part_dy[k, c], part_dy_xmu[k, c] = _chunk_gradient_sums(dy, x, c, mean[c], k, rows, segments)


# The parallel element passes split the rows into segments of at most ROW_SEGMENT elements and give
# each of ``tasks`` tasks a contiguous run of them, so a task fences its streaming stores once.


@njit(**_OPTIONS)
def _segments_per_row(x):
    return (x.shape[2] + ROW_SEGMENT - 1) // ROW_SEGMENT


@njit(**_NESTED)
def _task_segments(x, t, tasks):
    """The range of row segments task t of ``tasks`` does."""
    units = x.shape[0] * x.shape[1] * _segments_per_row(x)
    return range(t * units // tasks, (t + 1) * units // tasks)


@njit(**_NESTED)
def _segment(x, u):
    """Row r, channel c and element range [f0, f1) of row segment u."""
    segments = _segments_per_row(x)
    rc = u // segments
    r = rc // x.shape[1]
    f0 = (u - rc * segments) * ROW_SEGMENT
    return r, rc - r * x.shape[1], f0, min(f0 + ROW_SEGMENT, x.shape[2])


@_kernel
def _normalize_channels_first(x, mean, scale, shift, y, tasks, stream):
    """y = (x - mean) * scale + shift over the row segments."""
    params = _affine_params(y, mean, scale, shift)
    for t in prange(tasks):
        for u in _task_segments(x, t, tasks):
            r, c, f0, f1 = _segment(x, u)
            p = (params[0][c], params[1][c], params[2][c], params[3][c])
            _write_affine(x[r, c], f0, f1, p, 1, y[r, c], stream)
        if stream:
            store_fence()


@_kernel
def _gradient_channels_first(dy, x, params, dx, tasks, stream):
    for t in prange(tasks):
        for u in _task_segments(x, t, tasks):
            r, c, f0, f1 = _segment(x, u)
            p = (params[0][c], params[1][c], params[2][c], params[3][c])
            _write_gradient(dy[r, c], x[r, c], f0, f1, p, 1, dx[r, c], stream)
        if stream:
            store_fence()


# --- channels-first with short rows: (outer, C * inner) in blocks of channels -----------------------
# With rows of a few dozen elements (7x7 images), per-row work dominates: every row has its own
# unaligned ends, done element by element, and a channel's rows lie one per page. So short rows go
# in blocks of consecutive channels, whose part of an outer row is one contiguous run: the element
# passes write a run at a time, reading each element's parameters from tables that spread the
# block's per-channel values over the run. Statistics sum each chunk down its rows first, element
# by element across the run, then each channel's columns. A block only groups work: a channel's
# sums are the same operations whichever block it is in, so the fused and the chunked kernels give
# the same bits, and the block size may depend on the thread count.


@njit(**_NESTED)
def _spread(values, inner):
    """The table of a block's run: ``inner`` copies of each per-channel value, in channel order."""
    table = np.empty(values.shape[0] * inner, values.dtype)
    for c in range(values.shape[0]):
        for j in range(c * inner, (c + 1) * inner):
            table[j] = values[c]
    return table


# --- column sums: down the rows first, in registers ----------------------------------------------


def _shifted(x, shift):
    return x - shift


def _squared_deviation(x, mean_hi, mean_lo):
    d = (x - mean_hi) - mean_lo
    return d * d


def _gradient_terms(dy, x, mean):
    return dy, dy * (x - mean)


# Column sums with the sums held in registers (column_sweep), in strips of four cache lines, or of
# two for the gradient's two float64 sums per column.
_shifted_columns = column_sweep(_shifted, 4)
_squared_deviation_columns = column_sweep(_squared_deviation, 4)
_gradient_columns = column_sweep(_gradient_terms, 2)
# Rows per sweep of the gradient sums and the short-row statistics, which read rows from memory:
# few enough that the rows stream in order (NHWC 64x56x56x256 backward: sweeps of 2, 4, 8 and 16
# rows took 2.30, 1.96, 2.35 and 2.5 times a copy). The channels-last statistics keep sweeps of
# ROW_RUN rows: four-row sweeps made 65536x64 train slower (1.32 against 0.95 times a copy).
STREAM_ROW_RUN = 4


@njit(**_NESTED)
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
            _prefetch_run(x, r, r1, j0, width)
        _shifted_columns((column,), (x,), j0, q, q1, width, (shift,))
    n = np.float64((r1 - r0) * inner)
    for c in range(c1 - c0):
        mean[c] = shift[c * inner] + _sum(column[c * inner : (c + 1) * inner]) / n
        for j in range(c * inner, (c + 1) * inner):
            shift[j] = mean[c]
            column[j] = 0.0
    _squared_deviation_columns((column,), (x,), j0, r0, r1, width, (shift, np.zeros(width)))  # a float64 mean: no remainder
    for c in range(c1 - c0):
        m2[c] = _sum(column[c * inner : (c + 1) * inner])
    return n


@njit(**_NESTED)
def _block_gradient_sums(dy, x, inner, c0, c1, r0, r1, mean, sum_dy, sum_dy_xmu):
    """Sums of dy and dy * (x - mean) over rows [r0, r1) of channels [c0, c1), indexed from c0; down
    the rows first, as :func:`_block_moments`."""
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
            _prefetch_run(dy, r, r1, j0, width)
            _prefetch_run(x, r, r1, j0, width)
        _gradient_columns((column_dy, column_dy_xmu), (dy, x), j0, q, q1, width, (center,))
    for c in range(c1 - c0):
        sum_dy[c] = _sum(column_dy[c * inner : (c + 1) * inner])
        sum_dy_xmu[c] = _sum(column_dy_xmu[c * inner : (c + 1) * inner])


@_kernel
def _forward_train_by_block(x, inner, block, weight, bias, eps, y, mean, var, stream):
    """:func:`_forward_train_by_channel` for short rows, one task per block of channels."""
    outer = x.shape[0]
    channels = x.shape[1] // inner
    rows = _chunking(outer, inner)[0]
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
                _, m[c], m2[c] = _chan_merge(n, m[c], m2[c], n_k, chunk_mean[c], chunk_m2[c])
            n += n_k
        hi = np.empty(c1 - c0, y.dtype)
        lo = np.empty(c1 - c0, y.dtype)
        scale = np.empty(c1 - c0, y.dtype)
        shift = np.empty(c1 - c0, y.dtype)
        for c in range(c0, c1):
            mean[c] = m[c - c0]
            var[c] = m2[c - c0] / n
            hi[c - c0], lo[c - c0] = _split(y, mean[c])
            scale[c - c0] = _as_element(y, weight[c] * _inverse_std(var[c], eps))
            shift[c - c0] = _as_element(y, bias[c])
        tables = (_spread(hi, inner), _spread(lo, inner), _spread(scale, inner), _spread(shift, inner))
        j0 = c0 * inner
        j1 = c1 * inner
        for r in range(outer - 1, -1, -1):
            _write_affine(x[r, j0:j1], 0, j1 - j0, tables, j1 - j0, y[r, j0:j1], stream)
        if stream:
            store_fence()


@_kernel
def _backward_by_block(dy, x, inner, block, mean, invstd, weight, training, dx, sum_dy, sum_dy_xmu, stream):
    """:func:`_backward_by_channel` for short rows, one task per block of channels."""
    outer = x.shape[0]
    channels = x.shape[1] // inner
    rows = _chunking(outer, inner)[0]
    for b in prange((channels + block - 1) // block):
        c0 = b * block
        c1 = min(c0 + block, channels)
        chunk_dy = np.empty(c1 - c0)
        chunk_dy_xmu = np.empty(c1 - c0)
        total_dy = np.zeros(c1 - c0)
        total_dy_xmu = np.zeros(c1 - c0)
        for r0 in range(0, outer, rows):
            _block_gradient_sums(dy, x, inner, c0, c1, r0, min(r0 + rows, outer), mean, chunk_dy, chunk_dy_xmu)
            for c in range(c1 - c0):
                total_dy[c] += chunk_dy[c]
                total_dy_xmu[c] += chunk_dy_xmu[c]
        for c in range(c0, c1):
            sum_dy[c] = total_dy[c - c0]
            sum_dy_xmu[c] = total_dy_xmu[c - c0]
        j0 = c0 * inner
        j1 = c1 * inner
        if training:
            mean_dy = np.empty(c1 - c0)
            k = np.empty(c1 - c0)
            scale = np.empty(c1 - c0)
            for c in range(c0, c1):
                mean_dy[c - c0], k[c - c0], scale[c - c0] = _backward_coefficients(
                    total_dy[c - c0], total_dy_xmu[c - c0], invstd[c], weight[c], np.float64(outer * inner)
                )
            fa, fb, fc = _gradient_factors(mean_dy, k, scale)
            params = (_spread(mean[c0:c1], inner), _spread(fa, inner), _spread(fb, inner), _spread(fc, inner))
            for r in range(outer - 1, -1, -1):
                _write_gradient(dy[r, j0:j1], x[r, j0:j1], 0, j1 - j0, params, j1 - j0, dx[r, j0:j1], stream)
        else:  # frozen statistics: dx = dy * weight * invstd, whatever x holds
            zero = _as_element(dx, 0.0)
            frozen_scale = np.empty(c1 - c0, dx.dtype)
            for c in range(c0, c1):
                frozen_scale[c - c0] = _as_element(dx, weight[c] * invstd[c])
            frozen = (zero, zero, _spread(frozen_scale, inner), zero)
            for r in range(outer - 1, -1, -1):
                _write_affine(dy[r, j0:j1], 0, j1 - j0, frozen, j1 - j0, dx[r, j0:j1], stream)
        if stream:
            store_fence()


@_kernel
def _block_moments_all(x, inner, block, count, part_mean, part_m2):
    """:func:`_chunk_moments_all` for short rows: one task per chunk of a block of channels."""
    outer = x.shape[0]
    channels = x.shape[1] // inner
    rows = _chunking(outer, inner)[0]
    blocks = (channels + block - 1) // block
    for t in prange(count.shape[0] * blocks):
        k = t // blocks
        c0 = (t - k * blocks) * block
        c1 = min(c0 + block, channels)
        r0 = k * rows
        count[k] = _block_moments(x, inner, c0, c1, r0, min(r0 + rows, outer), part_mean[k, c0:c1], part_m2[k, c0:c1])


@_kernel
def _block_gradient_sums_all(dy, x, inner, block, mean, part_dy, part_dy_xmu):
    outer = x.shape[0]
    channels = x.shape[1] // inner
    rows = _chunking(outer, inner)[0]
    blocks = (channels + block - 1) // block
    for t in prange(part_dy.shape[0] * blocks):
        k = t // blocks
        c0 = (t - k * blocks) * block
        c1 = min(c0 + block, channels)
        r0 = k * rows
        _block_gradient_sums(
            dy, x, inner, c0, c1, r0, min(r0 + rows, outer), mean, part_dy[k, c0:c1], part_dy_xmu[k, c0:c1]
        )


# The parallel element passes for short rows: one task per block of channels and group of rows.


@njit(**_NESTED)
def _block_task(x, inner, block, groups, t):
    """Channels [c0, c1) and rows [r0, r1) of task t."""
    channels = x.shape[1] // inner
    b = t // groups
    g = t - b * groups
    c0 = b * block
    return c0, min(c0 + block, channels), g * x.shape[0] // groups, (g + 1) * x.shape[0] // groups


@njit(**_NESTED)
def _block_tables(params, c0, c1, inner):
    """The run tables of channels [c0, c1) from the four rows of per-channel ``params``."""
    return (
        _spread(params[0][c0:c1], inner),
        _spread(params[1][c0:c1], inner),
        _spread(params[2][c0:c1], inner),
        _spread(params[3][c0:c1], inner),
    )


@_kernel
def _normalize_blocks(x, inner, block, groups, mean, scale, shift, y, stream):
    """y = (x - mean) * scale + shift."""
    params = _affine_params(y, mean, scale, shift)
    blocks = (x.shape[1] // inner + block - 1) // block
    for t in prange(blocks * groups):
        c0, c1, r0, r1 = _block_task(x, inner, block, groups, t)
        tables = _block_tables(params, c0, c1, inner)
        j0 = c0 * inner
        j1 = c1 * inner
        for r in range(r0, r1):
            _prefetch_run(x, r + PREFETCH_ROWS, r1, j0, j1 - j0)
            _write_affine(x[r, j0:j1], 0, j1 - j0, tables, j1 - j0, y[r, j0:j1], stream)
        if stream:
            store_fence()


@_kernel
def _gradient_blocks(dy, x, inner, block, groups, params, dx, stream):
    blocks = (x.shape[1] // inner + block - 1) // block
    for t in prange(blocks * groups):
        c0, c1, r0, r1 = _block_task(x, inner, block, groups, t)
        tables = _block_tables(params, c0, c1, inner)
        j0 = c0 * inner
        j1 = c1 * inner
        for r in range(r0, r1):
            _prefetch_run(dy, r + PREFETCH_ROWS, r1, j0, j1 - j0)
            _prefetch_run(x, r + PREFETCH_ROWS, r1, j0, j1 - j0)
            _write_gradient(dy[r, j0:j1], x[r, j0:j1], 0, j1 - j0, tables, j1 - j0, dx[r, j0:j1], stream)
        if stream:
            store_fence()


# --- channels-last: the C-contiguous (rows, C) array in fixed row blocks ---------------------------


# A block sums its columns ROW_RUN rows at a time in the element dtype, each run then added into the
# float64 partials: SUM_RUN's trade for rows, with the same float64 redo when a float32 run overflows.
# Shorter runs than SUM_RUN, as a column adds its rows one after another, not across vector lanes.
ROW_RUN = 16


@njit(**_NESTED)
def _block_rows(channels):
    """Rows per block of the channels-last kernels: about ROW_BLOCK elements."""
    # At least 64 rows, so that the float64 partials stay small next to x however wide a row is.
    return max(64, ROW_BLOCK // max(channels, 1))


@njit(**_OPTIONS)
def _columns_shifted(x, r0, r1, shift, run, total):
    """total[c] = sum of x[r, c] - shift[c] over rows [r0, r1), in runs accumulated in run's dtype."""
    _zero(total)
    for q in range(r0, r1, ROW_RUN):
        _zero(run)
        _shifted_columns((run,), (x,), 0, q, min(q + ROW_RUN, r1), x.shape[1], (shift,))
        for c in range(x.shape[1]):
            total[c] += np.float64(run[c])


@njit(**_OPTIONS)
def _columns_squared_deviations(x, r0, r1, mean_hi, mean_lo, run, total):
    _zero(total)
    for q in range(r0, r1, ROW_RUN):
        _zero(run)
        _squared_deviation_columns((run,), (x,), 0, q, min(q + ROW_RUN, r1), x.shape[1], (mean_hi, mean_lo))
        for c in range(x.shape[1]):
            total[c] += np.float64(run[c])


@njit(**_NESTED)
def _row_block_moments(x, r0, r1, mean, m2):
    """Moments of rows [r0, r1) of the (rows, C) x into mean and m2: shifted by the block's first
    row, then squared deviations from the block's mean, each in ROW_RUN runs."""
    # The second pass reads the block from L2. Reading it once instead (sums of d = x - shift and of
    # d * d, shifted by the first run's mean, redone two-pass where m2 cancels) made the statistics
    # alone faster but NHWC 64x56x56x256 train no faster (1.58-1.64 times a copy either way), and
    # 8192x1024 slower. Prefetching the next run saved 0.05 on NHWC and cost up to 0.07 with C = 32
    # and 128.
    channels = x.shape[1]
    shift = x[r0].copy()
    run = np.empty(channels, x.dtype)
    _columns_shifted(x, r0, r1, shift, run, mean)
    if not _all_finite(mean):
        _columns_shifted(x, r0, r1, shift.astype(np.float64), np.empty(channels), mean)
    hi = np.empty(channels, x.dtype)
    lo = np.empty(channels, x.dtype)
    for c in range(channels):
        mean[c] = np.float64(shift[c]) + mean[c] / (r1 - r0)
        hi[c], lo[c] = _split(x, mean[c])
    _columns_squared_deviations(x, r0, r1, hi, lo, run, m2)
    if not _all_finite(m2):
        _columns_squared_deviations(x, r0, r1, mean, np.zeros(channels), np.empty(channels), m2)


@njit(**_OPTIONS)
def _row_block_gradient_sums(dy, x, mean, r0, r1, sum_dy, sum_dy_xmu):
    """Sums of dy and dy * (x - mean) over rows [r0, r1) of the (rows, C) dy and x, in float64
    throughout, as :func:`_gradient_sums`; STREAM_ROW_RUN rows at a time, each over all columns."""
    _zero(sum_dy)
    _zero(sum_dy_xmu)
    for q in range(r0, r1, STREAM_ROW_RUN):
        _gradient_columns((sum_dy, sum_dy_xmu), (dy, x), 0, q, min(q + STREAM_ROW_RUN, r1), x.shape[1], (mean,))


@njit(**_NESTED)
def _affine_params(y, mean, scale, shift):
    """The per-channel float64 vectors as the element parameters, rows (mean_hi, mean_lo, scale,
    shift) in y's dtype: the mean split into its rounded value and the remainder (:func:`_split`)."""
    params = np.empty((4, mean.shape[0]), y.dtype)
    for c in range(mean.shape[0]):
        params[0, c], params[1, c] = _split(y, mean[c])
        params[2, c] = _as_element(y, scale[c])
        params[3, c] = _as_element(y, shift[c])
    return params


@njit(**_NESTED)
def _affine_tables(y, mean, scale, shift):
    """:func:`_affine_params` as :func:`_cyclic` tables."""
    return _line_tables(_affine_params(y, mean, scale, shift), y)


@njit(**_NESTED)
def _line_tables(params, out):
    """The four rows of ``params`` as :func:`_cyclic` tables for the lines of ``out``."""
    tables = _cyclic(params, LINE_BYTES // out.itemsize)
    return tables[0], tables[1], tables[2], tables[3]


# The channels-last entry points are one kernel call each, statistics, merge and element pass
# together: at a few thousand elements, each further call from Python costs as much as the work.
# They take the canonical (rows, C, 1) arrays, C-contiguous, and view them as (rows, C) or flat.


@_kernel
def _forward_train_channels_last(x3, weight, bias, eps, y3, mean, var, stream):
    rows, channels, _ = x3.shape
    x = x3.reshape(rows, channels)
    y = y3.reshape(-1)
    block_rows = _block_rows(channels)
    blocks = (rows + block_rows - 1) // block_rows
    count = np.empty(blocks)
    part_mean = np.empty((blocks, channels))
    part_m2 = np.empty((blocks, channels))
    for b in prange(blocks):
        r0 = b * block_rows
        r1 = min(r0 + block_rows, rows)
        count[b] = r1 - r0
        _row_block_moments(x, r0, r1, part_mean[b], part_m2[b])
    _merge_moments(count, part_mean, part_m2, mean, var)
    tables = _affine_tables(y, mean, _scale(var, weight, eps), bias)
    flat = x.reshape(-1)
    block = block_rows * channels
    for b in prange(blocks):
        _write_affine(flat, b * block, min(b * block + block, flat.shape[0]), tables, channels, y, stream)
        if stream:
            store_fence()


@_kernel
def _normalize_channels_last(x3, mean, scale, shift, y3, stream):
    channels = mean.shape[0]
    block_rows = _block_rows(channels)
    y = y3.reshape(-1)
    tables = _affine_tables(y, mean, scale, shift)
    flat = x3.reshape(-1)
    block = block_rows * channels
    for b in prange((flat.shape[0] + block - 1) // block):
        _write_affine(flat, b * block, min(b * block + block, flat.shape[0]), tables, channels, y, stream)
        if stream:
            store_fence()


@_kernel
def _backward_channels_last(dy3, x3, mean, invstd, weight, training, dx3, sum_dy, sum_dy_xmu, stream):
    rows, channels, _ = x3.shape
    dy = dy3.reshape(rows, channels)
    x = x3.reshape(rows, channels)
    dx = dx3.reshape(-1)
    block_rows = _block_rows(channels)
    blocks = (rows + block_rows - 1) // block_rows
    part_dy = np.empty((blocks, channels))
    part_dy_xmu = np.empty((blocks, channels))
    for b in prange(blocks):
        r0 = b * block_rows
        _row_block_gradient_sums(dy, x, mean, r0, min(r0 + block_rows, rows), part_dy[b], part_dy_xmu[b])
    _sum_parts(part_dy, sum_dy)
    _sum_parts(part_dy_xmu, sum_dy_xmu)
    flat_dy = dy.reshape(-1)
    block = block_rows * channels
    if training:
        params = np.empty((4, channels))  # the gradient computes in float64
        for c in range(channels):
            mean_dy, k, scale = _backward_coefficients(sum_dy[c], sum_dy_xmu[c], invstd[c], weight[c], np.float64(rows))
            params[0, c] = mean[c]
            params[1, c], params[2, c], params[3, c] = _gradient_factors(mean_dy, k, scale)
        tables = _line_tables(params, dx)
        flat_x = x.reshape(-1)
        for b in prange(blocks):
            _write_gradient(flat_dy, flat_x, b * block, min(b * block + block, flat_dy.shape[0]), tables, channels, dx, stream)
            if stream:
                store_fence()
    else:  # frozen statistics: dx = dy * weight * invstd, whatever x holds
        zeros = np.zeros(channels)
        tables = _affine_tables(dx, zeros, weight * invstd, zeros)
        for b in prange(blocks):
            _write_affine(flat_dy, b * block, min(b * block + block, flat_dy.shape[0]), tables, channels, dx, stream)
            if stream:
                store_fence()


# --- merges of partials, in part order ------------------------------------------------------------


@njit(**_OPTIONS)
def _merge_moments(count, part_mean, part_m2, mean, var):
    """Merge the parts in part order into each channel's mean and biased variance. Parts go in the
    outer loop, so the loop over channels vectorizes (thousands of row blocks for channels-last)."""
    m2 = np.zeros(mean.shape[0])
    _zero(mean)
    n = 0.0
    for p in range(part_mean.shape[0]):
        for c in range(mean.shape[0]):
            _, mean[c], m2[c] = _chan_merge(n, mean[c], m2[c], count[p], part_mean[p, c], part_m2[p, c])
        n += count[p]
    for c in range(mean.shape[0]):
        var[c] = m2[c] / n


@njit(**_OPTIONS)
def _sum_parts(parts, total):
    _zero(total)
    for p in range(parts.shape[0]):
        for c in range(parts.shape[1]):
            total[c] += parts[p, c]


# --- entry points: the backend interface the front calls -----------------------------------------


def _streams(y):
    return y.nbytes >= STREAM_MIN_BYTES


def _by_channel(x):
    """Whether channels-first work goes one task per channel, statistics and normalize fused."""
    outer, channels, inner = x.shape
    return channels >= _tasks(x, 4) and outer * inner * x.itemsize <= CACHED_SLICE_BYTES


def _short_rows(x):
    return 1 < x.shape[2] < SHORT_ROW


def _channel_block(x, fused):
    """Channels per block for short rows: runs of at least BLOCK_RUN elements; fused, a block's slice
    stays in cache and there are blocks enough to balance the threads."""
    outer, channels, inner = x.shape
    block = -(-BLOCK_RUN // inner)
    if fused:
        block = min(block, CACHED_SLICE_BYTES // (outer * inner * x.itemsize), channels // _tasks(x, 4))
    return max(1, min(block, channels))


def _row_groups(x, block):
    """Row groups per block for the short-row element passes: tasks enough to balance the threads."""
    blocks = -(-x.shape[1] // block)
    return max(1, min(x.shape[0], -(-_tasks(x, 8) // blocks)))


@njit(**_OPTIONS)
def _cyclic(params, width):
    """The rows of ``params`` repeated cyclically to C + ``width`` entries."""
    channels = params.shape[1]
    table = np.empty((params.shape[0], channels + width), params.dtype)
    for r in range(params.shape[0]):
        for j in range(channels + width):
            table[r, j] = params[r, j % channels]
    return table


def _dense(a):
    """``a`` (outer, C, inner) with unit-stride rows, copied only when they are not; with short rows,
    with each outer row's channels also adjacent, as :func:`_planes` needs."""
    outer, channels, inner = a.shape
    if inner == 1 or (a.strides[2] == a.itemsize and (not _short_rows(a) or channels == 1 or a.strides[1] == inner * a.itemsize)):
        return a
    return np.ascontiguousarray(a)


def _planes(a):
    """A :func:`_dense` short-row ``a`` as (outer, C * inner): one unit-stride row per outer index."""
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2])


def _contiguous(a):
    """Channels-last ``a`` (rows, C, 1), C-contiguous as the channels-last kernels take it."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


class _Target:
    """Where a pass writes: ``y`` itself when its layout suits the kernels (:func:`_dense`'s), else a
    dense scratch array copied into ``y`` by ``finish()``."""

    __slots__ = ("y", "array")

    def __init__(self, y):
        self.y = y
        suits = y.flags.c_contiguous if y.shape[2] == 1 else _dense(y) is y
        self.array = y if suits else np.empty(y.shape, y.dtype)

    def planes(self):
        return _planes(self.array)

    def finish(self):
        if self.array is not self.y:
            np.copyto(self.y, self.array)


def _segment_tasks(x):
    """Tasks for the channels-first element passes: enough to balance the threads, at most one per segment."""
    units = x.shape[0] * x.shape[1] * _segments_per_row(x)
    return max(1, min(units, _tasks(x, 8)))


@_parallel_entry
def forward_train(x, weight, bias, eps, y):
    """Normalize ``x`` with its own statistics into ``y``; return the per-channel mean and biased var."""
    outer, channels, inner = x.shape
    kernels = _kernels(x)
    mean = np.empty(channels)
    var = np.empty(channels)
    if inner > 1 and _by_channel(x):
        target = _Target(y)
        x, stream = _dense(x), _streams(y)
        if _short_rows(x):
            block = _channel_block(x, fused=True)
            kernels.forward_train_by_block(_planes(x), inner, block, weight, bias, float(eps), target.planes(), mean, var, stream)
        else:
            kernels.forward_train_by_channel(x, weight, bias, float(eps), target.array, mean, var, stream)
        target.finish()
        return mean, var
    if inner == 1:
        target = _Target(y)
        stream = _streams(y)
        kernels.forward_train_channels_last(_contiguous(x), weight, bias, float(eps), target.array, mean, var, stream)
        target.finish()
        return mean, var
    x = _dense(x)
    chunks = _chunking(outer, inner)[2]
    count = np.empty(chunks)
    part_mean = np.empty((chunks, channels))
    part_m2 = np.empty((chunks, channels))
    if _short_rows(x):
        kernels.block_moments_all(_planes(x), inner, _channel_block(x, fused=False), count, part_mean, part_m2)
    else:
        kernels.chunk_moments_all(x, count, part_mean, part_m2)
    _merge_moments(count, part_mean, part_m2, mean, var)
    _normalize(x, mean, _scale(var, weight, float(eps)), bias, y)
    return mean, var


def _normalize(x, mean, scale, shift, y):
    inner = x.shape[2]
    target = _Target(y)
    kernels = _kernels(x)
    stream = _streams(y)
    if inner == 1:
        kernels.normalize_channels_last(_contiguous(x), mean, scale, shift, target.array, stream)
    else:
        x = _dense(x)
        if _short_rows(x):
            block = _channel_block(x, fused=False)
            kernels.normalize_blocks(_planes(x), inner, block, _row_groups(x, block), mean, scale, shift, target.planes(), stream)
        else:
            kernels.normalize_channels_first(x, mean, scale, shift, target.array, _segment_tasks(x), stream)
    target.finish()


@_parallel_entry
def normalize(x, mean, var, weight, bias, eps, y):
    """y = (x - mean) * weight / sqrt(var + eps) + bias per channel: the eval forward."""
    _normalize(x, mean, _scale(var, weight, float(eps)), bias, y)


@_parallel_entry
def backward(dy, x, mean, invstd, weight, training, dx):
    """Write dx; return the per-channel sums of dy and of dy * (x - mean)."""
    outer, channels, inner = x.shape
    kernels = _kernels(x)
    sum_dy = np.empty(channels)
    sum_dy_xmu = np.empty(channels)
    stream, training = _streams(dx), bool(training)
    if inner == 1:
        target = _Target(dx)
        kernels.backward_channels_last(
            _contiguous(dy), _contiguous(x), mean, invstd, weight, training, target.array, sum_dy, sum_dy_xmu, stream
        )
        target.finish()
        return sum_dy, sum_dy_xmu
    dy, x = _dense(dy), _dense(x)
    if _by_channel(x):
        target = _Target(dx)
        if _short_rows(x):
            block = _channel_block(x, fused=True)
            kernels.backward_by_block(
                _planes(dy), _planes(x), inner, block, mean, invstd, weight, training, target.planes(), sum_dy, sum_dy_xmu, stream
            )
        else:
            kernels.backward_by_channel(dy, x, mean, invstd, weight, training, target.array, sum_dy, sum_dy_xmu, stream)
        target.finish()
        return sum_dy, sum_dy_xmu
    chunks = _chunking(outer, inner)[2]
    part_dy = np.empty((chunks, channels))
    part_dy_xmu = np.empty((chunks, channels))
    if _short_rows(x):
        block = _channel_block(x, fused=False)
        kernels.block_gradient_sums_all(_planes(dy), _planes(x), inner, block, mean, part_dy, part_dy_xmu)
    else:
        kernels.chunk_gradient_sums_all(dy, x, mean, part_dy, part_dy_xmu)
    _sum_parts(part_dy, sum_dy)
    _sum_parts(part_dy_xmu, sum_dy_xmu)
    if not training:  # frozen statistics: dx = dy * weight * invstd, whatever x holds
        zeros = np.zeros(channels)
        _normalize(dy, zeros, weight * invstd, zeros, dx)
        return sum_dy, sum_dy_xmu
    factors = gradient_factors(*backward_coefficients(sum_dy, sum_dy_xmu, invstd, weight, outer * inner))
    params = np.array((mean, *factors))  # the gradient computes in float64
    target = _Target(dx)
    if _short_rows(x):
        block = _channel_block(x, fused=False)
        kernels.gradient_blocks(_planes(dy), _planes(x), inner, block, _row_groups(x, block), params, target.planes(), stream)
    else:
        kernels.gradient_channels_first(dy, x, params, target.array, _segment_tasks(x), stream)
    target.finish()
    return sum_dy, sum_dy_xmu


# --- ahead-of-time compilation --------------------------------------------------------------------


def precompile(dtype, serial):
    """Compile, or load from Numba's cache, every kernel that the entry points can call on C-ordered
    ``dtype`` arrays: each layout family (long rows, short rows, channels-last), each path (fused
    per channel or block, and chunked), train, eval and both backwards, with the serial or the
    parallel kernels. Views in other memory orders compile their own variants on first use.

    The path thresholds are changed for the length of the call, so it is for a process of its own
    (``python -m accelbn compile``), not one that is running accelbn meanwhile."""
    global CACHED_SLICE_BYTES
    saved_slice, saved_serial = CACHED_SLICE_BYTES, _numba_runtime.SERIAL_MAX_ELEMENTS
    _numba_runtime.SERIAL_MAX_ELEMENTS = (1 << 62) if serial else 0
    channels = 4 * numba.get_num_threads()  # enough for the fused paths
    weight, zero = np.ones(channels), np.zeros(channels)
    try:
        for cached_slice in (saved_slice, 0):  # fused where slices fit, then chunked
            CACHED_SLICE_BYTES = cached_slice
            for inner in (SHORT_ROW, SHORT_ROW - 1, 1):
                x = np.ones((2, channels, inner), dtype)
                x[1] = 2.0
                out = np.empty_like(x)
                mean, var = forward_train(x, weight, zero, 1e-5, out)
                normalize(x, mean, var, weight, zero, 1e-5, out)
                for training in (True, False):
                    backward(x, x, mean, weight, weight, training, out)
    finally:
        CACHED_SLICE_BYTES, _numba_runtime.SERIAL_MAX_ELEMENTS = saved_slice, saved_serial
