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
from accelbn.backends.formulas import backward_coefficients, inverse_std, renorm_affine, renorm_correction

SOURCE = pathlib.Path(__file__).with_name("batch_norm.cu")
STORAGE_DTYPES = launcher.STORAGE_DTYPES

_ELEMENT_KERNELS = ("cf_moments", "cf_gradient_sums", "cl_moments", "cl_gradient_sums")
_NORMALIZE_KERNELS = ("cf_normalize", "cl_normalize")  # and the epilogue: plain, ReLU, residual and ReLU
_EPILOGUES = (0, 1, 2)
_GRADIENT_KERNELS = ("cf_gradient", "cl_gradient")  # and whether the statistics are trained or frozen
_RELU_GRADIENT_KERNELS = ("cf_relu_gradient", "cl_relu_gradient")  # and whether there is a residual
_FINISH_KERNELS = ("finish_moments", "finish_gradient_sums")


@functools.cache
def compile_units():
    """``{storage dtype: name expressions}``: one module per storage dtype, each element kernel at
    vector widths 1 and 16 bytes (normalize with each epilogue), and the per-channel finishing kernels."""
    units = {}
    for dtype, ctype in CTYPES.items():
        widths = (1, launcher.VECTOR_BYTES // dtype.itemsize)
        names = [f"abn::{k}<{ctype}, {v}>" for k in _ELEMENT_KERNELS for v in widths]
        names += [f"abn::{k}<{ctype}, {v}, {e}>" for k in _NORMALIZE_KERNELS for v in widths for e in _EPILOGUES]
        flags = ("true", "false")
        names += [f"abn::{k}<{ctype}, {v}, {t}>" for k in (*_GRADIENT_KERNELS, *_RELU_GRADIENT_KERNELS) for v in widths for t in flags]
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


def _epilogue(residual, relu):
    return 2 if residual is not None else int(bool(relu))


def _moments(plan, x, weight, eps):
    """The per-channel mean, biased variance and weight / sqrt(var + eps) of x."""
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
    return mean, var, scale


def moments(x):
    """The per-channel mean and biased variance of x, nothing written: a worker's share of a
    synchronized batch's statistics."""
    ones = channel_vectors(x.shape[1], 1)[0]
    ones.fill(1.0)
    return _moments(ChannelPlan([x]), x, ones, 1.0)[:2]


def forward_train(x, weight, bias, eps, y, renorm=None, residual=None, relu=False):
    plan = ChannelPlan([x, y] if residual is None else [x, residual, y])
    mean, var, scale = _moments(plan, x, weight, eps)
    shift = bias
    if renorm is not None:  # per-channel vector arithmetic, in the same double formulas as the CPU's
        scale, shift = renorm_affine(mean, var, eps, weight, bias, *renorm_correction(mean, var, eps, *renorm))
    _normalize(plan, x, mean, scale, shift, y, residual, relu)
    return mean, var


def _normalize(plan, x, mean, scale, shift, y, residual=None, relu=False):
    z = x if residual is None else residual  # read only with a residual
    launcher.launch(
        _element_kernel(plan, x.dtype, "normalize", _epilogue(residual, relu)),
        plan.items,
        (x, *strides(x), z, *strides(z), y, *strides(y), *plan.shape_args, mean, scale, shift),
    )


def normalize(x, mean, var, weight, bias, eps, y, residual=None, relu=False):
    plan = ChannelPlan([x, y] if residual is None else [x, residual, y])
    _normalize(plan, x, mean, weight * inverse_std(var, eps), bias, y, residual, relu)


def _relu_gradient(dy, x, mean, scale, shift, residual, g):
    arrays = [dy, x, g] if residual is None else [dy, x, residual, g]
    plan = ChannelPlan(arrays)
    z = x if residual is None else residual
    launcher.launch(
        _element_kernel(plan, x.dtype, "relu_gradient", "false" if residual is None else "true"),
        plan.items,
        (dy, *strides(dy), x, *strides(x), z, *strides(z), g, *strides(g), *plan.shape_args, mean, scale, shift),
    )


def backward(dy, x, mean, invstd, weight, training, dx, relu=None):
    if relu is not None:  # the fused ReLU's backward: dy masked into g first (dx itself, or the residual's gradient)
        scale, shift, residual, g = relu
        _relu_gradient(dy, x, mean, scale, shift, residual, g)
        dy = g
    plan = ChannelPlan([dy, x, dx])
    sum_dy, sum_dy_xmu, mean_dy, k, scale = _gradient_sums(plan, dy, x, mean, invstd, weight, np.float64(x.shape[0] * x.shape[2]))
    _gradient(plan, dy, x, mean, mean_dy, k, scale, dx, training)
    return sum_dy, sum_dy_xmu


def _gradient_sums(plan, dy, x, mean, invstd, weight, count):
    """The per-channel sums of dy and dy * (x - mean), and the gradient's coefficients over ``count``."""
    part_dy, part_dy_xmu = plan.partials(2)
    launcher.launch(
        _element_kernel(plan, x.dtype, "gradient_sums"),
        plan.items,
        (dy, *strides(dy), x, *strides(x), *plan.shape_args, mean, part_dy, part_dy_xmu),
        plan.reduction_shared_mem,
    )
    vectors = channel_vectors(plan.channels, 5)
    launcher.launch_per_channel(
        _kernel(x.dtype, "finish_gradient_sums"),
        plan.channels,
        (part_dy, part_dy_xmu, i64(plan.channels), i64(plan.tiles), invstd, weight, count, *vectors),
    )
    return vectors


def _gradient(plan, dy, x, mean, mean_dy, k, scale, dx, training=True):
    launcher.launch(
        _element_kernel(plan, x.dtype, "gradient", "true" if training else "false"),
        plan.items,
        (dy, *strides(dy), x, *strides(x), dx, *strides(dx), *plan.shape_args, mean, mean_dy, k, scale),
    )


def gradient_sums(dy, x, mean):
    """The per-channel sums of dy and of dy * (x - mean), nothing written: a worker's share of a
    synchronized batch's gradient sums."""
    ones = channel_vectors(x.shape[1], 1)[0]
    ones.fill(1.0)
    return _gradient_sums(ChannelPlan([dy, x]), dy, x, mean, ones, ones, np.float64(1.0))[:2]


def gradient(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, dx):
    """The training gradient into dx from given channel sums over ``count`` elements: a synchronized
    batch's, of which dy and x are a worker's part."""
    mean_dy, k, scale = backward_coefficients(sum_dy, sum_dy_xmu, invstd, weight, float(count))
    _gradient(ChannelPlan([dy, x, dx]), dy, x, mean, mean_dy, k, scale, dx)
