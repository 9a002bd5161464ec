"""The row normalizations (layer, RMS, group and instance norm) on the CUDA backend: the launch side
of ``row_norm.cu``, with the interface of :mod:`accelbn.backends.numba_cpu.row_norm`: C-contiguous
rows (R, K, S), or channels-last samples (N, S, C), both described to the kernels by strides."""

import functools
import pathlib

import numpy as np

from accelbn.backends.cuda import launcher
from accelbn.backends.cuda.launcher import CTYPES, channel_vectors, i64

SOURCE = pathlib.Path(__file__).with_name("row_norm.cu")
STORAGE_DTYPES = launcher.STORAGE_DTYPES

# Rows of at most this many elements go a warp each, longer ones a block each.
WARP_ROW_MAX = 1024


@functools.cache
def compile_units():
    """``{storage dtype: name expressions}``: one module per storage dtype."""
    return {
        dtype: tuple(
            f"abn::{kernel}<{ctype}{flag}>"
            for kernel, flags in [("rn_forward", [""]), ("rn_forward_warp", [""]), ("rn_backward", [", true", ", false"]),
                                  ("rn_backward_warp", [", true", ", false"]), ("rn_parameter_sums", [""])]
            for flag in flags
        )
        for dtype, ctype in CTYPES.items()
    }


def _kernel(dtype, name, *template_args):
    expression = f"abn::{name}<{', '.join([CTYPES[dtype], *template_args])}>"
    return launcher.function(SOURCE, compile_units()[dtype], expression)


def _row_strides(a, groups, channels_last):
    """Element strides (sample, group, channel, inner) of rows (R, K, S) or samples (N, S, C)."""
    s0, s1, s2 = (i // a.itemsize for i in a.strides)
    if channels_last:
        k = a.shape[2] // groups
        return [i64(s0), i64(k * s2), i64(s2), i64(s1)]
    return [i64(groups * s0), i64(s0), i64(s1), i64(s2)]


def _shape(a, groups, channels_last):
    """(samples, groups, channels per group, inner) as kernel arguments."""
    if channels_last:
        samples, inner, channels = a.shape
        return [i64(samples), i64(groups), i64(channels // groups), i64(inner)]
    rows, channels, inner = a.shape
    return [i64(rows // groups), i64(groups), i64(channels), i64(inner)]


def _rows(a, groups, channels_last):
    return a.shape[0] * groups if channels_last else a.shape[0]


def _row_launch(name, x, groups, channels_last, args, *template_args):
    """A row kernel: a warp per row for short rows, else a block per row."""
    rows = _rows(x, groups, channels_last)
    if x.size // rows <= WARP_ROW_MAX:
        warps = launcher.BLOCK // 32
        launcher.launch(_kernel(x.dtype, f"{name}_warp", *template_args), -(-rows // warps), args)
    else:
        launcher.launch(_kernel(x.dtype, name, *template_args), rows, args)


def _forward(x, groups, weight, bias, eps, centered, y, channels_last):
    rows = _rows(x, groups, channels_last)
    mean, var = channel_vectors(rows, 2)
    _row_launch(
        "rn_forward", x, groups, channels_last,
        (x, *_row_strides(x, groups, channels_last), y, *_row_strides(y, groups, channels_last),
         *_shape(x, groups, channels_last), weight, bias, np.float64(eps), np.int32(centered), mean, var),
    )
    return mean, var


def _backward(dy, x, groups, mean, rstd, weight, centered, trained, dx, channels_last):
    strides = [*_row_strides(dy, groups, channels_last), x, *_row_strides(x, groups, channels_last)]
    shape = _shape(x, groups, channels_last)
    _row_launch(
        "rn_backward", x, groups, channels_last,
        (dy, *strides, dx, *_row_strides(dx, groups, channels_last), *shape, mean, rstd, weight, np.int32(centered)),
        "true" if trained else "false",
    )
    dweight, dbias = channel_vectors(weight.shape[0], 2)
    launcher.launch_per_channel(
        _kernel(x.dtype, "rn_parameter_sums"), weight.shape[0], (dy, *strides, *shape, mean, rstd, dweight, dbias)
    )
    return dweight, dbias


def forward(x, groups, weight, bias, eps, centered, y):
    return _forward(x, groups, weight, bias, eps, centered, y, False)


def backward(dy, x, groups, mean, rstd, weight, centered, trained, dx):
    return _backward(dy, x, groups, mean, rstd, weight, centered, trained, dx, False)


def forward_channels_last(x, groups, weight, bias, eps, centered, y):
    return _forward(x, groups, weight, bias, eps, centered, y, True)


def backward_channels_last(dy, x, groups, mean, rstd, weight, centered, trained, dx):
    return _backward(dy, x, groups, mean, rstd, weight, centered, trained, dx, True)
