"""Scalar helpers of the Numba kernels: the per-channel formulas (:mod:`accelbn.backends.formulas`)
compiled for use inside kernels, conversions to an array's element dtype, and small array loops."""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from accelbn.backends import formulas
from accelbn.backends.numba_cpu.runtime import NESTED, OPTIONS


inverse_std = njit(inline="always", error_model="numpy")(formulas.inverse_std)
backward_coefficients = njit(inline="always", error_model="numpy")(formulas.backward_coefficients)
gradient_factors = njit(inline="always", error_model="numpy")(formulas.gradient_factors)
renorm_correction = njit(inline="always", error_model="numpy")(formulas.renorm_correction)
renorm_affine = njit(inline="always", error_model="numpy")(formulas.renorm_affine)


@njit(inline="always", error_model="numpy")
def channel_affine(c, mean, var, weight, bias, eps, renorm):
    """Channel c's (scale, shift), from its batch ``mean`` and ``var``: weight / sqrt(var + eps) and
    bias, or Batch Renormalization's where ``renorm`` is (renorm_mean, renorm_std, rmin, rmax, dmax)."""
    if renorm is None:
        return weight[c] * inverse_std(var, eps), bias[c]
    renorm_mean, renorm_std, rmin, rmax, dmax = renorm
    r, d = renorm_correction(mean, var, eps, renorm_mean[c], renorm_std[c], rmin, rmax, dmax)
    return renorm_affine(mean, var, eps, weight[c], bias[c], r, d)


@njit(**OPTIONS)
def channel_affines(mean, var, weight, bias, eps, renorm):
    """:func:`channel_affine` for every channel: the (scale, shift) vectors."""
    scale = np.empty_like(var)
    shift = np.empty_like(var)
    for c in range(var.shape[0]):
        scale[c], shift[c] = channel_affine(c, mean[c], var[c], weight, bias, eps, renorm)
    return scale, shift


@njit(**OPTIONS)
def channel_scale(var, weight, eps):
    """weight / sqrt(var + eps) per channel, in one compiled call: on a small input, the four NumPy
    operations it replaces cost more than the whole element pass."""
    scale = np.empty_like(var)
    for c in range(var.shape[0]):
        scale[c] = weight[c] * inverse_std(var[c], eps)
    return scale


# Array loops written out rather than as NumPy expressions (``a[:] = 0.0``, ``np.isfinite(a).all()``,
# slice assignments): each NumPy feature compiles Numba's generic implementation on first use, with its
# error-message formatting, which cost seconds of a cold first call.


@njit(inline="always", error_model="numpy")
def fill_zero(a):
    for i in range(a.shape[0]):
        a[i] = 0.0


@njit(inline="always", error_model="numpy")
def all_finite(a):
    for i in range(a.shape[0]):
        if not np.isfinite(a[i]):
            return False
    return True



def at(p, c):
    """A parameter of channel c: a scalar as it is, a table's entry c."""


@overload(at, inline="always")
def _at_overload(p, c):
    if isinstance(p, types.Array):
        return lambda p, c: p[c]
    return lambda p, c: p


def as_element(a, v):
    """v converted to the dtype of array a."""


@overload(as_element, inline="always")
def _as_element_overload(a, v):
    element = a.dtype
    return lambda a, v: element(v)


@njit(**NESTED)
def split_mean(a, v):
    """v as a high part in a's dtype and the low remainder, for x - v to keep its accuracy."""
    hi = as_element(a, v)
    return hi, as_element(a, v - np.float64(hi))


# Floats in order as integers, for searches over every value of a dtype: the bits of a float, with
# the negatives' magnitudes negated, order the non-NaN floats as their values do (-0.0 and 0.0 both
# map to 0), and adjacent floats map to adjacent integers.


@intrinsic
def ordered_key(typingctx, v):
    """The int64 whose order among keys is float v's among floats (v not NaN)."""
    if not isinstance(v, types.Float):
        return None

    def codegen(context, builder, signature, args):
        width = v.bitwidth
        bits = builder.bitcast(args[0], ir.IntType(width))
        if width < 64:
            bits = builder.sext(bits, ir.IntType(64))
        magnitude = builder.and_(bits, ir.Constant(ir.IntType(64), (1 << (width - 1)) - 1))
        negative = builder.icmp_signed("<", bits, ir.Constant(ir.IntType(64), 0))
        return builder.select(negative, builder.neg(magnitude), bits)

    return types.int64(v), codegen


@intrinsic
def from_ordered_key(typingctx, key, like):
    """The float of array ``like``'s dtype whose :func:`ordered_key` is ``key``."""
    if not (isinstance(key, types.Integer) and isinstance(like, types.Array) and isinstance(like.dtype, types.Float)):
        return None
    element = like.dtype

    def codegen(context, builder, signature, args):
        width = element.bitwidth
        key64 = context.cast(builder, args[0], key, types.int64)
        negative = builder.icmp_signed("<", key64, ir.Constant(ir.IntType(64), 0))
        magnitude = builder.select(negative, builder.neg(key64), key64)
        sign = ir.Constant(ir.IntType(64), -(1 << 63) if width == 64 else 1 << (width - 1))
        bits = builder.select(negative, builder.or_(magnitude, sign), magnitude)
        if width < 64:
            bits = builder.trunc(bits, ir.IntType(width))
        return builder.bitcast(bits, context.get_data_type(element))

    return element(key, like), codegen
