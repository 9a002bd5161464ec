"""How the Numba kernels cut their work: statistics chunks, row segments, blocks of channels, row
blocks, the prefetches that follow them, and the Python-side choices of a path (fused per channel or
block, or chunk-parallel; direct or streaming stores) and of the dense arrays the kernels take.

Every cut depends on the shape and the constants below, never on the thread count, except where the
result cannot change with it (a block only groups channels whose sums are the same operations
whichever block they are in): results are bitwise identical for any number of threads.
"""

import numpy as np
from numba import njit

from accelbn.backends.numba_cpu.lines import LINE_BYTES, prefetch
from accelbn.backends.numba_cpu.runtime import NESTED, OPTIONS

# Elements in a statistics chunk: its second pass runs from L1/L2.
STATS_CHUNK = 4096
# Elements in a channels-last row block: the unit of parallel work and of partial sums.
ROW_BLOCK = 65536
# Elements of a row segment, the unit of the parallel channels-first element passes.
ROW_SEGMENT = 65536
# A channel slice this small stays in L2 between the statistics and the normalize pass.
CACHED_SLICE_BYTES = 1 << 20
# Channels-first rows shorter than this (elements) are processed in blocks of channels whose runs in
# an outer row have at least BLOCK_RUN elements; must not exceed STATS_CHUNK (benchmarks/RESULTS.md:
# blocks win for 7x7 and 14x14 rows, single channels for 28x28).
SHORT_ROW = 256
BLOCK_RUN = 1024
# Rows ahead that the short-row element passes prefetch (their statistics prefetch a sweep ahead).
PREFETCH_ROWS = 2
# Outputs at least this large are streamed: they would not stay in cache for a next reader anyway.
STREAM_MIN_BYTES = 8 << 20


# --- channels-first: (outer, C, inner) ------------------------------------------------------------


@njit(**OPTIONS)
def chunking(outer, inner):
    """(rows per chunk, segments per row, chunks per channel) of the statistics chunks."""
    if inner >= STATS_CHUNK:
        segments = (inner + STATS_CHUNK - 1) // STATS_CHUNK
        return 1, segments, outer * segments
    rows = STATS_CHUNK // inner
    return rows, 1, (outer + rows - 1) // rows


@njit(**NESTED)
def chunk_bounds(x, k, rows, segments):
    g = k // segments
    s = k - g * segments
    i0 = s * STATS_CHUNK
    return g * rows, min(g * rows + rows, x.shape[0]), i0, min(i0 + STATS_CHUNK, x.shape[2])



# The fused backward prefetches a channel's next chunk of dy and x while it sums the current one when
# the two take at most this many bytes: a channel's chunks lie an outer row apart, and the hardware
# prefetchers start over at each. Larger chunks gain nothing, nor does the fused train, which reads x
# alone (benchmarks/RESULTS.md).
PREFETCH_CHUNK_BYTES = 32 << 10


@njit(**NESTED)
def prefetch_run(x, r, r1, j0, width):
    """Prefetch row r's run x[r, j0:j0 + width] if r < r1: a block's (or a channel's) runs lie one
    per outer row, too far apart for the hardware prefetchers to follow from memory."""
    if r < r1:
        row = x[r]
        for j in range(j0, j0 + width, LINE_BYTES // x.itemsize):
            prefetch(row, j)
        prefetch(row, j0 + width - 1)


@njit(**NESTED)
def prefetch_chunk(a, c, k, rows, segments):
    """Prefetch chunk k of channel c of ``a``, if there is one. A channel's chunks lie one outer row
    apart, and the hardware prefetchers start over at each."""
    r0, r1, i0, i1 = chunk_bounds(a, k, rows, segments)
    for r in range(r0, r1):
        prefetch_run(a[:, c], r, r1, i0, i1 - i0)


# The parallel element passes split the rows into segments of at most ROW_SEGMENT elements and give
# each of ``tasks`` tasks a contiguous run of them, so a task fences its streaming stores once.


@njit(**OPTIONS)
def segments_per_row(x):
    return (x.shape[2] + ROW_SEGMENT - 1) // ROW_SEGMENT


@njit(**NESTED)
def task_segments(x, t, tasks):
    """The range of row segments task t of ``tasks`` does."""
    units = x.shape[0] * x.shape[1] * segments_per_row(x)
    return range(t * units // tasks, (t + 1) * units // tasks)


@njit(**NESTED)
def segment(x, u):
    """Row r, channel c and element range [f0, f1) of row segment u."""
    segments = segments_per_row(x)
    rc = u // segments
    r = rc // x.shape[1]
    f0 = (u - rc * segments) * ROW_SEGMENT
    return r, rc - r * x.shape[1], f0, min(f0 + ROW_SEGMENT, x.shape[2])


# Rows per sweep of the gradient sums and the short-row statistics, which read rows from memory:
# few enough that the rows stream in order. The channels-last statistics, which read each block
# twice from L2, keep sweeps of ROW_RUN rows (benchmarks/RESULTS.md has both measurements).
STREAM_ROW_RUN = 4


@njit(**NESTED)
def rows_per_block(channels):
    """Rows per block of the channels-last kernels: about ROW_BLOCK elements."""
    # At least 64 rows, so that the float64 partials stay small next to x however wide a row is.
    return max(64, ROW_BLOCK // max(channels, 1))


# --- the path of a call, decided in Python ----------------------------------------------------------


def streams(y):
    return y.nbytes >= STREAM_MIN_BYTES


def by_channel(x, kernels):
    """Whether channels-first work goes one task per channel, statistics and normalize fused."""
    outer, channels, inner = x.shape
    return channels >= kernels.tasks(4) and outer * inner * x.itemsize <= CACHED_SLICE_BYTES


def short_rows(x):
    return 1 < x.shape[2] < SHORT_ROW


def channel_block(x, fused, kernels):
    """Channels per block for short rows: runs of at least BLOCK_RUN elements; fused, a block's slice
    stays in cache and there are blocks enough to balance the threads."""
    outer, channels, inner = x.shape
    block = -(-BLOCK_RUN // inner)
    if fused:
        block = min(block, CACHED_SLICE_BYTES // (outer * inner * x.itemsize), channels // kernels.tasks(4))
    return max(1, min(block, channels))


def row_groups(x, block, kernels):
    """Row groups per block for the short-row element passes: tasks enough to balance the threads."""
    blocks = -(-x.shape[1] // block)
    return max(1, min(x.shape[0], -(-kernels.tasks(8) // blocks)))



def dense(a):
    """``a`` (outer, C, inner) with unit-stride rows, copied only when they are not; with short rows,
    with each outer row's channels also adjacent, as :func:`planes` needs."""
    outer, channels, inner = a.shape
    if inner == 1 or (a.strides[2] == a.itemsize and (not short_rows(a) or channels == 1 or a.strides[1] == inner * a.itemsize)):
        return a
    return np.ascontiguousarray(a)


def planes(a):
    """A :func:`dense` short-row ``a`` as (outer, C * inner): one unit-stride row per outer index."""
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2])


def contiguous(a):
    """Channels-last ``a`` (rows, C, 1), C-contiguous as the channels-last kernels take it."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


class Target:
    """Where a pass writes: ``y`` itself when its layout suits the kernels (:func:`dense`'s), else a
    dense scratch array copied into ``y`` by ``finish()``."""

    __slots__ = ("y", "array")

    def __init__(self, y):
        self.y = y
        suits = y.flags.c_contiguous if y.shape[2] == 1 else dense(y) is y
        self.array = y if suits else np.empty(y.shape, y.dtype)

    def planes(self):
        return planes(self.array)

    def finish(self):
        if self.array is not self.y:
            np.copyto(self.y, self.array)


def segment_tasks(x, kernels):
    """Tasks for the channels-first element passes: enough to balance the threads, at most one per segment."""
    units = x.shape[0] * x.shape[1] * segments_per_row(x)
    return max(1, min(units, kernels.tasks(8)))
