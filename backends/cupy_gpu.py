"""CuPy GPU kernels for batch normalization: the launch side of ``batch_norm.cu``.

Kernels take arrays in the front's canonical view ``(outer, C, inner)`` (any strides) and
per-channel float64 CuPy vectors; they never validate and never touch running statistics. Every
launch goes to CuPy's current stream and nothing here waits for the device.

The CUDA source is compiled by NVRTC through ``cupy.RawModule`` the first time a storage dtype is
used on a device, never at import; CuPy keeps the binary in its on-disk kernel cache.
:func:`compile_units` lists exactly what can be launched, so a test compiles the same set without
a GPU.

Work is cut into items whose bounds depend only on the shape and the constants below, not on the
device, and partial results are merged in item order, so results are bitwise identical run to
run and across devices with the same compiler.
"""

import functools
import math
import pathlib

import cupy
import numpy as np

from accelbn._formulas import inverse_std

SOURCE = pathlib.Path(__file__).with_name("batch_norm.cu")
OPTIONS = ("-std=c++17",)

# Threads per block: a multiple of 32, at most 256 (MAX_BLOCK in batch_norm.cu). Tests shrink it so
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

_ELEMENT_KERNELS = (
    "cf_moments",
    "cf_normalize",
    "cf_gradient_sums",
    "cl_moments",
    "cl_normalize",
    "cl_gradient_sums",
)
_GRADIENT_KERNELS = ("cf_gradient", "cl_gradient")  # and whether the statistics are trained or frozen
_FINISH_KERNELS = ("finish_moments", "finish_gradient_sums")
_VECTOR_BYTES = 16
# Shared memory of the channels-last reductions: BLOCK entries of the largest partial (24 bytes).
_ROW_SCRATCH_BYTES_PER_THREAD = 24


def _bfloat16():
    try:
        from ml_dtypes import bfloat16
    except ImportError:
        return None
    return np.dtype(bfloat16)


_CTYPES = {np.dtype(np.float16): "__half", np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
if _bfloat16() is not None:
    _CTYPES[_bfloat16()] = "__nv_bfloat16"

# The dtypes the kernels read and write directly; the front converts anything else.
STORAGE_DTYPES = tuple(_CTYPES)


def compile_units():
    """``{storage dtype: name expressions}``: one RawModule per storage dtype, each element kernel
    at vector widths 1 and 16 bytes, and the per-channel finishing kernels."""
    units = {}
    for dtype, ctype in _CTYPES.items():
        widths = (1, _VECTOR_BYTES // dtype.itemsize)
        names = [f"abn::{k}<{ctype}, {v}>" for k in _ELEMENT_KERNELS for v in widths]
        names += [f"abn::{k}<{ctype}, {v}, {t}>" for k in _GRADIENT_KERNELS for v in widths for t in ("true", "false")]
        names += [f"abn::{k}" for k in _FINISH_KERNELS]
        units[dtype] = tuple(names)
    return units


@functools.cache
def _module(device_id, dtype):
    return cupy.RawModule(code=SOURCE.read_text(), options=OPTIONS, name_expressions=compile_units()[dtype])


def _kernel(dtype, name, *template_args):
    """A compiled kernel: element kernels take (vector width, ...), finishing kernels nothing."""
    expression = f"abn::{name}"
    if template_args:
        expression += f"<{', '.join([_CTYPES[dtype], *map(str, template_args)])}>"
    return _module(cupy.cuda.Device().id, dtype).get_function(expression)


def _launch(kernel, items, args, shared_mem=0):
    if items:
        kernel((min(items, MAX_BLOCKS),), (BLOCK,), args, shared_mem=shared_mem)


def _i64(n):
    return np.int64(n)


def _strides(a):
    """Element strides of a canonical view, as kernel arguments."""
    return [_i64(s // a.itemsize) for s in a.strides]


def _vectorizable(arrays, axis):
    """16-byte accesses along ``axis`` (2 for channels-first, 1 for channels-last) are possible
    when that axis is contiguous, its length and the other strides are multiples of the vector,
    and every base address is 16-byte aligned."""
    width = _VECTOR_BYTES // arrays[0].itemsize
    for a in arrays:
        strides = [s // a.itemsize for s in a.strides]
        if a.shape[axis] % width or (strides[axis] != 1 and a.shape[axis] > 1) or a.data.ptr % _VECTOR_BYTES:
            return 1
        if any(s % width for i, s in enumerate(strides) if i != axis and a.shape[i] > 1):
            return 1
    return width


class _Plan:
    """How a canonical shape is cut into work items, and at which vector width."""

    def __init__(self, arrays):
        outer, channels, inner = arrays[0].shape
        self.channels = channels
        self.channels_first = inner > 1
        if self.channels_first:
            self.width = _vectorizable(arrays, 2)
            vectors = outer * (inner // self.width)
            most = max(1, math.ceil(vectors / (BLOCK * TILE_VECTORS_PER_THREAD)))
            self.tiles = min(most, max(1, math.ceil(TARGET_ITEMS / channels)))
            self.tile_vectors = math.ceil(vectors / self.tiles)
            self.tiles = math.ceil(vectors / self.tile_vectors) if vectors else 1
            self.items = channels * self.tiles
            self.shape_args = [_i64(outer), _i64(channels), _i64(inner), _i64(self.tiles), _i64(self.tile_vectors)]
        else:
            self.width = _vectorizable(arrays, 1)
            vectors = math.ceil(channels / self.width)
            self.lanes = min(32, 1 << max(0, (vectors - 1).bit_length()), BLOCK)
            channel_blocks = math.ceil(vectors / self.lanes)
            row_step = BLOCK // self.lanes
            most = max(1, math.ceil(outer / (row_step * TILE_ROWS_PER_THREAD)))
            row_tiles = min(most, max(1, math.ceil(TARGET_ITEMS / channel_blocks)))
            tile_rows = math.ceil(outer / row_tiles)
            self.tiles = math.ceil(outer / tile_rows) if outer else 1
            self.items = channel_blocks * self.tiles
            self.shape_args = [_i64(outer), _i64(channels), np.int32(self.lanes), _i64(tile_rows), _i64(self.tiles)]

    def partials(self, count, dtype=np.float64):
        """``count`` buffers of one partial result per channel and tile, in channel-major order."""
        return [cupy.empty(self.channels * self.tiles, dtype=dtype) for _ in range(count)]

    def kernel(self, dtype, name, *template_args):
        return _kernel(dtype, ("cf_" if self.channels_first else "cl_") + name, self.width, *template_args)

    def reduction_shared_mem(self):
        return 0 if self.channels_first else BLOCK * _ROW_SCRATCH_BYTES_PER_THREAD


def _finish(dtype, name, channels, args):
    blocks = min(math.ceil(channels / BLOCK), MAX_BLOCKS)
    if blocks:
        _kernel(dtype, name)((blocks,), (BLOCK,), args)


def _channel_vectors(channels, count):
    return [cupy.empty(channels, dtype=np.float64) for _ in range(count)]


def forward_train(x, weight, bias, eps, y):
    plan = _Plan([x, y])
    part_mean, part_m2 = plan.partials(2)
    (part_n,) = plan.partials(1, np.int64)
    _launch(
        plan.kernel(x.dtype, "moments"),
        plan.items,
        (x, *_strides(x), *plan.shape_args, part_mean, part_m2, part_n),
        plan.reduction_shared_mem(),
    )
    mean, var, scale = _channel_vectors(plan.channels, 3)
    _finish(
        x.dtype,
        "finish_moments",
        plan.channels,
        (
            part_mean,
            part_m2,
            part_n,
            _i64(plan.channels),
            _i64(plan.tiles),
            weight,
            np.float64(eps),
            mean,
            var,
            scale,
        ),
    )
    _normalize(plan, x, mean, scale, bias, y)
    return mean, var


def _normalize(plan, x, mean, scale, bias, y):
    _launch(
        plan.kernel(x.dtype, "normalize"),
        plan.items,
        (x, *_strides(x), y, *_strides(y), *plan.shape_args, mean, scale, bias),
    )


def normalize(x, mean, var, weight, bias, eps, y):
    _normalize(_Plan([x, y]), x, mean, weight * inverse_std(var, eps), bias, y)


def backward(dy, x, mean, invstd, weight, training, dx):
    plan = _Plan([dy, x, dx])
    part_dy, part_dy_xmu = plan.partials(2)
    _launch(
        plan.kernel(x.dtype, "gradient_sums"),
        plan.items,
        (dy, *_strides(dy), x, *_strides(x), *plan.shape_args, mean, part_dy, part_dy_xmu),
        plan.reduction_shared_mem(),
    )
    sum_dy, sum_dy_xmu, mean_dy, k, scale = _channel_vectors(plan.channels, 5)
    count = x.shape[0] * x.shape[2]
    _finish(
        x.dtype,
        "finish_gradient_sums",
        plan.channels,
        (
            part_dy,
            part_dy_xmu,
            _i64(plan.channels),
            _i64(plan.tiles),
            invstd,
            weight,
            np.float64(count),
            sum_dy,
            sum_dy_xmu,
            mean_dy,
            k,
            scale,
        ),
    )
    _launch(
        plan.kernel(x.dtype, "gradient", "true" if training else "false"),
        plan.items,
        (dy, *_strides(dy), x, *_strides(x), dx, *_strides(dx), *plan.shape_args, mean, mean_dy, k, scale),
    )
    return sum_dy, sum_dy_xmu
