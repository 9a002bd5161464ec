"""Scalar helpers of the Numba kernels: the per-channel formulas (:mod:`accelbn.backends.formulas`)
compiled for use inside kernels, conversions to an array's element dtype, and small array loops."""

import numpy as np
from numba import njit, types
from numba.extending import overload

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
