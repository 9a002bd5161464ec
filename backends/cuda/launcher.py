"""Compiling and launching the CUDA backend's kernels, for every operation.

A source is compiled by NVRTC through ``cupy.RawModule`` the first time one of its name expressions
is asked for on a device, never at import; CuPy keeps the binary in its on-disk kernel cache, keyed
by the source text (``common.cuh`` is inlined where a source includes it, so an edit to it
recompiles). Every launch goes to CuPy's current stream and nothing here waits for the device.

Work is cut into items whose bounds depend only on the shape and the constants below, not on the
device, and partial results are merged in item order, so results are bitwise identical run to run
and across devices with the same compiler.
"""

import functools
import math
import pathlib

import cupy
import numpy as np

HEADER = pathlib.Path(__file__).with_name("common.cuh")
_INCLUDE = '#include "common.cuh"\n'
OPTIONS = ("-std=c++17",)

# Threads per block: a multiple of 32, at most 256 (MAX_BLOCK in common.cuh). Tests shrink it so
# that small arrays span many blocks.
BLOCK = 256
# A channels-first tile holds at least this many vectors per thread of a block.
TILE_VECTORS_PER_THREAD = 8
# A channels-last row tile holds at least this many rows per thread row of a block.
TILE_ROWS_PER_THREAD = 8
# Work items to aim for: enough to fill any current GPU several times over.
TARGET_ITEMS = 2048
# Blocks launched at most; blocks loop over the remaining items.
MAX_BLOCKS = 65536
# Bytes of a vector access.
VECTOR_BYTES = 16
# Shared memory of the channels-last reductions: BLOCK entries of the largest partial (24 bytes).
_ROW_SCRATCH_BYTES_PER_THREAD = 24


def _bfloat16():
    try:
        from ml_dtypes import bfloat16
    except ImportError:
        return None
    return np.dtype(bfloat16)


CTYPES = {np.dtype(np.float16): "__half", np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
if _bfloat16() is not None:
    CTYPES[_bfloat16()] = "__nv_bfloat16"

# The dtypes the kernels read and write directly; the front converts anything else.
STORAGE_DTYPES = tuple(CTYPES)


def source(path):
    """The text NVRTC compiles for the source at ``path``: ``common.cuh`` inlined at its include,
    with ``#line`` marks so that messages name the original files and lines."""
    text = path.read_text()
    if text.count(_INCLUDE) != 1:
        raise ValueError(f"{path.name} must include common.cuh exactly once")
    before, after = text.split(_INCLUDE)
    resume = before.count("\n") + 2
    return (f'#line 1 "{path.name}"\n{before}#line 1 "{HEADER.name}"\n{HEADER.read_text()}'
            f'#line {resume} "{path.name}"\n{after}')


@functools.cache
def _module(device_id, path, name_expressions):
    return cupy.RawModule(code=source(path), options=OPTIONS, name_expressions=name_expressions)


def function(path, name_expressions, expression):
    """The kernel ``expression`` of the module that compiles ``name_expressions`` of the source at
    ``path``, on the current device."""
    return _module(cupy.cuda.Device().id, path, name_expressions).get_function(expression)


def launch(kernel, items, args, shared_mem=0):
    """``items`` work items on blocks of BLOCK threads, at most MAX_BLOCKS blocks looping over them."""
    if items:
        kernel((min(items, MAX_BLOCKS),), (BLOCK,), args, shared_mem=shared_mem)


def launch_per_channel(kernel, channels, args):
    """A kernel with one thread per channel."""
    blocks = min(math.ceil(channels / BLOCK), MAX_BLOCKS)
    if blocks:
        kernel((blocks,), (BLOCK,), args)


def i64(n):
    """A size as the kernels' 64-bit ``index_t`` (a Python int would go as whatever CuPy picks)."""
    return np.int64(n)


def strides(a):
    """Element strides of a canonical view, as kernel arguments."""
    return [i64(s // a.itemsize) for s in a.strides]


def _vectorizable(arrays, axis):
    """16-byte accesses along ``axis`` (2 for channels-first, 1 for channels-last) are possible
    when that axis is contiguous, its length and the other strides are multiples of the vector,
    and every base address is 16-byte aligned."""
    width = VECTOR_BYTES // arrays[0].itemsize
    for a in arrays:
        element_strides = [s // a.itemsize for s in a.strides]
        if a.shape[axis] % width or (element_strides[axis] != 1 and a.shape[axis] > 1) or a.data.ptr % VECTOR_BYTES:
            return 1
        if any(s % width for i, s in enumerate(element_strides) if i != axis and a.shape[i] > 1):
            return 1
    return width


class ChannelPlan:
    """How canonical ``(outer, C, inner)`` arrays of one shape are cut into per-channel work items
    (the tiles of ``common.cuh``), and at which vector width: the kernels' shape arguments, the
    family's kernel-name prefix (``cf_`` or ``cl_``) and the partial buffers of their reductions."""

    def __init__(self, arrays):
        outer, channels, inner = arrays[0].shape
        self.channels = channels
        if inner > 1:
            self.prefix = "cf_"
            self.width = _vectorizable(arrays, 2)
            vectors = outer * (inner // self.width)
            most = max(1, math.ceil(vectors / (BLOCK * TILE_VECTORS_PER_THREAD)))
            self.tiles = min(most, max(1, math.ceil(TARGET_ITEMS / channels)))
            self.tile_vectors = math.ceil(vectors / self.tiles)
            self.tiles = math.ceil(vectors / self.tile_vectors) if vectors else 1
            self.items = channels * self.tiles
            self.shape_args = [i64(outer), i64(channels), i64(inner), i64(self.tiles), i64(self.tile_vectors)]
            self.reduction_shared_mem = 0
        else:
            self.prefix = "cl_"
            self.width = _vectorizable(arrays, 1)
            vectors = math.ceil(channels / self.width)
            lanes = min(32, 1 << max(0, (vectors - 1).bit_length()), BLOCK)
            channel_blocks = math.ceil(vectors / lanes)
            row_step = BLOCK // lanes
            most = max(1, math.ceil(outer / (row_step * TILE_ROWS_PER_THREAD)))
            row_tiles = min(most, max(1, math.ceil(TARGET_ITEMS / channel_blocks)))
            tile_rows = math.ceil(outer / row_tiles)
            self.tiles = math.ceil(outer / tile_rows) if outer else 1
            self.items = channel_blocks * self.tiles
            self.shape_args = [i64(outer), i64(channels), np.int32(lanes), i64(tile_rows), i64(self.tiles)]
            self.reduction_shared_mem = BLOCK * _ROW_SCRATCH_BYTES_PER_THREAD

    def partials(self, count, dtype=np.float64):
        """``count`` buffers of one partial result per channel and tile, in channel-major order."""
        return [cupy.empty(self.channels * self.tiles, dtype=dtype) for _ in range(count)]


def channel_vectors(channels, count):
    """``count`` new float64 vectors of one entry per channel."""
    return [cupy.empty(channels, dtype=np.float64) for _ in range(count)]
