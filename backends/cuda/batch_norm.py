"""Batch normalization on the CUDA backend: the launch side of ``batch_norm.cu``.

The entry points take arrays in the front's canonical view ``(outer, C, inner)`` (any strides) and
per-channel float64 CuPy vectors; they never validate and never touch running statistics.
:func:`compile_units` lists exactly what can be launched, so a test compiles the same set without
a GPU.
"""

import functools
import pathlib

import numpy as np

from accelbn.backends.cuda import launcher
from accelbn.backends.cuda.launcher import CTYPES, ChannelPlan, channel_vectors, i64, strides
from accelbn.backends.formulas import inverse_std

SOURCE = pathlib.Path(__file__).with_name("batch_norm.cu")
STORAGE_DTYPES = launcher.STORAGE_DTYPES

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


@functools.cache
def compile_units():
    """``{storage dtype: name expressions}``: one module per storage dtype, each element kernel at
    vector widths 1 and 16 bytes, and the per-channel finishing kernels."""
    units = {}
    for dtype, ctype in CTYPES.items():
        widths = (1, launcher.VECTOR_BYTES // dtype.itemsize)
        names = [f"abn::{k}<{ctype}, {v}>" for k in _ELEMENT_KERNELS for v in widths]
        names += [f"abn::{k}<{ctype}, {v}, {t}>" for k in _GRADIENT_KERNELS for v in widths for t in ("true", "false")]
        names += [f"abn::{k}" for k in _FINISH_KERNELS]
        units[dtype] = tuple(names)
    return units


def _kernel(dtype, name, *template_args):
    """A compiled kernel: element kernels take (vector width, ...), finishing kernels nothing."""
    expression = f"abn::{name}"
    if template_args:
        expression += f"<{', '.join([CTYPES[dtype], *map(str, template_args)])}>"
    return launcher.function(SOURCE, compile_units()[dtype], expression)


def _element_kernel(plan, dtype, name, *template_args):
    return _kernel(dtype, plan.prefix + name, plan.width, *template_args)


def forward_train(x, weight, bias, eps, y):
    plan = ChannelPlan([x, y])
    part_mean, part_m2 = plan.partials(2)
    (part_n,) = plan.partials(1, np.int64)
    launcher.launch(
        _element_kernel(plan, x.dtype, "moments"),
        plan.items,
        (x, *strides(x), *plan.shape_args, part_mean, part_m2, part_n),
        plan.reduction_shared_mem,
    )
    mean, var, scale = channel_vectors(plan.channels, 3)
    launcher.launch_per_channel(
        _kernel(x.dtype, "finish_moments"),
        plan.channels,
        (part_mean, part_m2, part_n, i64(plan.channels), i64(plan.tiles), weight, np.float64(eps), mean, var, scale),
    )
    _normalize(plan, x, mean, scale, bias, y)
    return mean, var


def _normalize(plan, x, mean, scale, bias, y):
    launcher.launch(
        _element_kernel(plan, x.dtype, "normalize"),
        plan.items,
        (x, *strides(x), y, *strides(y), *plan.shape_args, mean, scale, bias),
    )


def normalize(x, mean, var, weight, bias, eps, y):
    _normalize(ChannelPlan([x, y]), x, mean, weight * inverse_std(var, eps), bias, y)


def backward(dy, x, mean, invstd, weight, training, dx):
    plan = ChannelPlan([dy, x, dx])
    part_dy, part_dy_xmu = plan.partials(2)
    launcher.launch(
        _element_kernel(plan, x.dtype, "gradient_sums"),
        plan.items,
        (dy, *strides(dy), x, *strides(x), *plan.shape_args, mean, part_dy, part_dy_xmu),
        plan.reduction_shared_mem,
    )
    sum_dy, sum_dy_xmu, mean_dy, k, scale = channel_vectors(plan.channels, 5)
    count = np.float64(x.shape[0] * x.shape[2])
    launcher.launch_per_channel(
        _kernel(x.dtype, "finish_gradient_sums"),
        plan.channels,
        (part_dy, part_dy_xmu, i64(plan.channels), i64(plan.tiles), invstd, weight, count,
         sum_dy, sum_dy_xmu, mean_dy, k, scale),
    )
    launcher.launch(
        _element_kernel(plan, x.dtype, "gradient", "true" if training else "false"),
        plan.items,
        (dy, *strides(dy), x, *strides(x), dx, *strides(dx), *plan.shape_args, mean, mean_dy, k, scale),
    )
    return sum_dy, sum_dy_xmu
