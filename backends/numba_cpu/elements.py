"""Element passes of the Numba kernels: ``y = ((x - mean_hi) - mean_lo) * scale + shift`` (the
affine pass of a normalize, optionally followed by a ReLU, or by adding a residual z and a ReLU) and
``dx = a * dy + b * (x - mean) + c`` (the training gradient), written over a span of unit-stride
arrays a cache line at a time with SIMD (:mod:`.lines`), optionally with streaming stores, and the
per-channel parameter tables they read."""

import numpy as np
from numba import njit, types
from numba.extending import overload

from accelbn.backends.numba_cpu.lines import LINE_BYTES, column_sweep, fma, line_kernel, passed, relu
from accelbn.backends.numba_cpu.runtime import NESTED, OPTIONS
from accelbn.backends.numba_cpu.scalars import as_element, at, split_mean


# The normalize pass computes in x's dtype, as PyTorch does. The mean is split into a high part (the
# mean rounded to that dtype) and the low remainder, so x - mean keeps its accuracy however large the
# mean is next to the spread: x - mean_hi is exact when x is near the mean (Sterbenz). The gradient
# computes in float64, as a * dy + b * (x - mean) + c with two fused multiply-adds (:func:`gradient_factors`):
# its terms can cancel to far below either of them, and float64 keeps dx's digits where they do.


def _affine(x, mean_hi, mean_lo, scale, shift):
    return ((x - mean_hi) - mean_lo) * scale + shift


def _affine_relu(x, mean_hi, mean_lo, scale, shift):
    return relu(_affine(x, mean_hi, mean_lo, scale, shift))


def _affine_add_relu(x, z, mean_hi, mean_lo, scale, shift):
    return relu(_affine(x, mean_hi, mean_lo, scale, shift) + z)


def _relu_gradient(dy, x, mean_hi, mean_lo, scale, shift):
    return passed(_affine(x, mean_hi, mean_lo, scale, shift), dy)


def _add_relu_gradient(dy, x, z, mean_hi, mean_lo, scale, shift):
    return passed(_affine(x, mean_hi, mean_lo, scale, shift) + z, dy)


def _gradient(dy, x, mean, a, b, c):
    return fma(x - mean, b, fma(dy, a, c))


def _masked_gradient(dy, x, mean_hi, mean_lo, scale, shift, mean, a, b, c):
    """The training gradient of dy masked by the forward's ReLU (the ReLU's input recomputed in x's
    dtype, as :func:`_relu_gradient`), in float64 as :func:`_gradient`: for the exact line kernels."""
    return _gradient(passed(_affine(x, mean_hi, mean_lo, scale, shift), dy).widen(), x.widen(), mean, a, b, c)


def _masked_gradient_terms(dy, x, mean, mean_hi, mean_lo, scale, shift):
    """The gradient sums' terms of dy masked by the forward's ReLU, in float64: for the exact column
    kernels."""
    g = passed(_affine(x, mean_hi, mean_lo, scale, shift), dy).widen()
    return g, g * (x.widen() - mean)


_affine_element = njit(inline="always", error_model="numpy")(_affine)
_gradient_element = njit(inline="always", error_model="numpy")(_gradient)
_affine_line = line_kernel(_affine, nontemporal=False)
_affine_line_streamed = line_kernel(_affine, nontemporal=True)
_affine_relu_line = line_kernel(_affine_relu, nontemporal=False)
_affine_relu_line_streamed = line_kernel(_affine_relu, nontemporal=True)
_affine_add_relu_line = line_kernel(_affine_add_relu, nontemporal=False)
_affine_add_relu_line_streamed = line_kernel(_affine_add_relu, nontemporal=True)
_relu_gradient_line = line_kernel(_relu_gradient, nontemporal=False)
_add_relu_gradient_line = line_kernel(_add_relu_gradient, nontemporal=False)
_gradient_line = line_kernel(_gradient, nontemporal=False, wide=True)
_gradient_line_streamed = line_kernel(_gradient, nontemporal=True, wide=True)
_masked_gradient_line = line_kernel(_masked_gradient, nontemporal=False, exact=True)
_masked_gradient_line_streamed = line_kernel(_masked_gradient, nontemporal=True, exact=True)
# The channels-last gradient sums of a ReLU-masked dy, the mask computed in registers.
masked_gradient_columns = column_sweep(_masked_gradient_terms, 2, exact=True)


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
def _affine_elements(x, z, f0, f1, params, period, y, fused_relu):
    c = f0 % period
    for f in range(f0, f1):
        v = _affine_element(x[f], at(params[0], c), at(params[1], c), at(params[2], c), at(params[3], c))
        if z is not None:
            v = relu(v + z[f])
        elif fused_relu:
            v = relu(v)
        y[f] = v
        c += 1
        if c == period:
            c = 0


@njit(**NESTED)
def _affine_line_at(y, f, x, z, params, c, stream, fused_relu):
    """One line of :func:`write_affine`: the plain, ReLU or residual-and-ReLU formula."""
    if z is not None:
        if stream:
            _affine_add_relu_line_streamed(y, f, (x, z), params, c)
        else:
            _affine_add_relu_line(y, f, (x, z), params, c)
    elif fused_relu:
        if stream:
            _affine_relu_line_streamed(y, f, (x,), params, c)
        else:
            _affine_relu_line(y, f, (x,), params, c)
    elif stream:
        _affine_line_streamed(y, f, (x,), params, c)
    else:
        _affine_line(y, f, (x,), params, c)


@njit(**NESTED)
def _gradient_elements(dy, x, f0, f1, params, period, dx, masks):
    c = f0 % period
    for f in range(f0, f1):
        g = dy[f]
        if masks is not None:
            g = passed(_affine_element(x[f], at(masks[0], c), at(masks[1], c), at(masks[2], c), at(masks[3], c)), g)
        dx[f] = _gradient_element(
            np.float64(g),
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
def write_affine(x, f0, f1, params, period, y, stream, z=None, fused_relu=False):
    """y[f0:f1] = the affine pass of x; then relu(y + z) where a residual ``z`` is given (an array
    like x, or None), or relu(y) with ``fused_relu``."""
    a, e = _line_span(y, f0, f1, stream)
    _affine_elements(x, z, f0, a, params, period, y, fused_relu)
    line = LINE_BYTES // y.itemsize
    step = line % period
    c = a % period
    for f in range(a, e, line):
        _affine_line_at(y, f, x, z, params, c, stream, fused_relu)
        c += step
        if c >= period:
            c -= period
    _affine_elements(x, z, e, f1, params, period, y, fused_relu)


@njit(**NESTED)
def _relu_gradient_elements(dy, x, z, f0, f1, params, period, g):
    c = f0 % period
    for f in range(f0, f1):
        v = _affine_element(x[f], at(params[0], c), at(params[1], c), at(params[2], c), at(params[3], c))
        if z is not None:
            v = v + z[f]
        g[f] = passed(v, dy[f])
        c += 1
        if c == period:
            c = 0


@njit(**NESTED)
def write_relu_gradient(dy, x, z, f0, f1, params, period, g):
    """g[f0:f1] = dy where the forward's ReLU passed its input, 0 where that input was <= 0 (as
    torch's ``threshold_backward`` on the ReLU's output): the input recomputed from x (and the
    residual z) by the forward's own formula and parameters, so bit for bit the forward's."""
    a, e = _line_span(g, f0, f1, False)
    _relu_gradient_elements(dy, x, z, f0, a, params, period, g)
    line = LINE_BYTES // g.itemsize
    step = line % period
    c = a % period
    for f in range(a, e, line):
        if z is None:
            _relu_gradient_line(g, f, (dy, x), params, c)
        else:
            _add_relu_gradient_line(g, f, (dy, x, z), params, c)
        c += step
        if c >= period:
            c -= period
    _relu_gradient_elements(dy, x, z, e, f1, params, period, g)


def part(a, i, j0, j1):
    """``a[i, j0:j1]``, or None where ``a`` is None (an absent residual)."""


@overload(part, inline="always")
def _part_overload(a, i, j0, j1):
    if isinstance(a, types.NoneType):
        return lambda a, i, j0, j1: None
    return lambda a, i, j0, j1: a[i, j0:j1]


def row(a, r, c):
    """``a[r, c]``, or None where ``a`` is None."""


@overload(row, inline="always")
def _row_overload(a, r, c):
    if isinstance(a, types.NoneType):
        return lambda a, r, c: None
    return lambda a, r, c: a[r, c]


def span(a, f0, f1):
    """``a[f0:f1]``, or None where ``a`` is None."""


@overload(span, inline="always")
def _span_overload(a, f0, f1):
    if isinstance(a, types.NoneType):
        return lambda a, f0, f1: None
    return lambda a, f0, f1: a[f0:f1]


def flat(a):
    """``a.reshape(-1)``, or None where ``a`` is None."""


@overload(flat, inline="always")
def _flat_overload(a):
    if isinstance(a, types.NoneType):
        return lambda a: None
    return lambda a: a.reshape(-1)


@njit(**NESTED)
def write_gradient(dy, x, f0, f1, params, period, dx, stream, masks=None):
    """dx[f0:f1] = the training gradient; with ``masks`` (the tables of :func:`affine_tables` for the
    forward's ReLU), of dy masked where that ReLU stopped its input, recomputed in registers."""
    a, e = _line_span(dx, f0, f1, stream)
    _gradient_elements(dy, x, f0, a, params, period, dx, masks)
    line = LINE_BYTES // dx.itemsize
    step = line % period
    c = a % period
    for f in range(a, e, line):
        _gradient_line_at(dx, f, dy, x, params, c, stream, masks)
        c += step
        if c >= period:
            c -= period
    _gradient_elements(dy, x, e, f1, params, period, dx, masks)


@njit(**NESTED)
def _gradient_line_at(dx, f, dy, x, params, c, stream, masks):
    """One line of :func:`write_gradient`: plain, or masked by the forward's ReLU."""
    if masks is None:
        if stream:
            _gradient_line_streamed(dx, f, (dy, x), params, c)
        else:
            _gradient_line(dx, f, (dy, x), params, c)
    else:
        both = (masks[0], masks[1], masks[2], masks[3], params[0], params[1], params[2], params[3])
        if stream:
            _masked_gradient_line_streamed(dx, f, (dy, x), both, c)
        else:
            _masked_gradient_line(dx, f, (dy, x), both, c)


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
