"""Element passes of the Numba kernels: ``y = ((x - mean_hi) - mean_lo) * scale + shift`` (the
affine pass of a normalize) and ``dx = a * dy + b * (x - mean) + c`` (the training gradient), written
over a span of unit-stride arrays a cache line at a time with SIMD (:mod:`.lines`), optionally with
streaming stores, and the per-channel parameter tables they read."""

import numpy as np
from numba import njit

from accelbn.backends.numba_cpu.lines import LINE_BYTES, fma, line_kernel
from accelbn.backends.numba_cpu.runtime import NESTED, OPTIONS
from accelbn.backends.numba_cpu.scalars import as_element, at, split_mean


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


@njit(**NESTED)
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


@njit(**NESTED)
def _affine_elements(x, f0, f1, params, period, y):
    c = f0 % period
    for f in range(f0, f1):
        y[f] = _affine_element(x[f], at(params[0], c), at(params[1], c), at(params[2], c), at(params[3], c))
        c += 1
        if c == period:
            c = 0


@njit(**NESTED)
def _gradient_elements(dy, x, f0, f1, params, period, dx):
    c = f0 % period
    for f in range(f0, f1):
        dx[f] = _gradient_element(
            np.float64(dy[f]),
            np.float64(x[f]),
            at(params[0], c),
            at(params[1], c),
            at(params[2], c),
            at(params[3], c),
        )
        c += 1
        if c == period:
            c = 0


@njit(**NESTED)
def write_affine(x, f0, f1, params, period, y, stream):
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


@njit(**NESTED)
def write_gradient(dy, x, f0, f1, params, period, dx, stream):
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


@njit(**NESTED)
def affine_params(y, mean, scale, shift):
    """The per-channel float64 vectors as the element parameters, rows (mean_hi, mean_lo, scale,
    shift) in y's dtype: the mean split into its rounded value and the remainder (:func:`split_mean`)."""
    params = np.empty((4, mean.shape[0]), y.dtype)
    for c in range(mean.shape[0]):
        params[0, c], params[1, c] = split_mean(y, mean[c])
        params[2, c] = as_element(y, scale[c])
        params[3, c] = as_element(y, shift[c])
    return params


@njit(**NESTED)
def affine_tables(y, mean, scale, shift):
    """:func:`affine_params` as :func:`_cyclic` tables."""
    return line_tables(affine_params(y, mean, scale, shift), y)


@njit(**NESTED)
def line_tables(params, out):
    """The four rows of ``params`` as :func:`_cyclic` tables for the lines of ``out``."""
    tables = _cyclic(params, LINE_BYTES // out.itemsize)
    return tables[0], tables[1], tables[2], tables[3]


@njit(**OPTIONS)
def _cyclic(params, width):
    """The rows of ``params`` repeated cyclically to C + ``width`` entries."""
    channels = params.shape[1]
    table = np.empty((params.shape[0], channels + width), params.dtype)
    for r in range(params.shape[0]):
        for j in range(channels + width):
            table[r, j] = params[r, j % channels]
    return table


@njit(**NESTED)
def spread(values, inner):
    """The table of a block's run: ``inner`` copies of each per-channel value, in channel order."""
    table = np.empty(values.shape[0] * inner, values.dtype)
    for c in range(values.shape[0]):
        for j in range(c * inner, (c + 1) * inner):
            table[j] = values[c]
    return table
