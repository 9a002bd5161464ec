"""Element passes of the Numba kernels: ``y = ((x - mean_hi) - mean_lo) * scale + shift`` (the
affine pass of a normalize, optionally followed by a ReLU, or by adding a residual z and a ReLU) and
``dx = a * dy + b * (x - mean) + c`` (the training gradient), written over a span of unit-stride
arrays a cache line at a time with SIMD (:mod:`.lines`), optionally with streaming stores, and the
per-channel parameter tables they read."""

import numpy as np
from numba import njit, types
from numba.extending import overload

from accelbn.backends.numba_cpu.lines import LINE_BYTES, column_sweep, fma, line_kernel, passed, passed_outside, relu
from accelbn.backends.numba_cpu.runtime import NESTED, OPTIONS
from accelbn.backends.numba_cpu.scalars import as_element, at, from_ordered_key, ordered_key, split_mean


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


def _masked_gradient(dy, x, first, last, mean, a, b, c):
    """The training gradient of dy masked by the forward's ReLU (stopped where x is in [first, last]:
    :func:`relu_stops`), in float64 as :func:`_gradient`: for the exact line kernels."""
    return _gradient(passed_outside(x, first, last, dy).widen(), x.widen(), mean, a, b, c)


def _masked_gradient_terms(dy, x, mean, first, last):
    """The gradient sums' terms of dy masked by the forward's ReLU, in float64: for the exact column
    kernels."""
    g = passed_outside(x, first, last, dy).widen()
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
def _gradient_elements(dy, x, f0, f1, params, period, dx, stops):
    c = f0 % period
    for f in range(f0, f1):
        g = dy[f]
        if stops is not None:
            g = passed_outside(x[f], at(stops[0], c), at(stops[1], c), g)
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
def write_gradient(dy, x, f0, f1, params, period, dx, stream, stops=None):
    """dx[f0:f1] = the training gradient; with ``stops`` (first, last: scalars or tables of
    :func:`relu_stops`), of dy masked where the forward's ReLU stopped its input."""
    a, e = _line_span(dx, f0, f1, stream)
    _gradient_elements(dy, x, f0, a, params, period, dx, stops)
    line = LINE_BYTES // dx.itemsize
    step = line % period
    c = a % period
    for f in range(a, e, line):
        _gradient_line_at(dx, f, dy, x, params, c, stream, stops)
        c += step
        if c >= period:
            c -= period
    _gradient_elements(dy, x, e, f1, params, period, dx, stops)


@njit(**NESTED)
def _gradient_line_at(dx, f, dy, x, params, c, stream, stops):
    """One line of :func:`write_gradient`: plain, or masked by the forward's ReLU."""
    if stops is None:
        if stream:
            _gradient_line_streamed(dx, f, (dy, x), params, c)
        else:
            _gradient_line(dx, f, (dy, x), params, c)
    else:
        both = (stops[0], stops[1], params[0], params[1], params[2], params[3])
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


# The fused ReLU's backward masks dy where the forward's ReLU stopped its input, relu(((x - mean_hi) -
# mean_lo) * scale + shift) in x's dtype. Every step of that formula is a rounded monotone function of
# x, so the x it stopped (its input <= 0) form an interval of each channel's values, whatever scale and
# shift are (an empty interval, or all finite x where scale is 0 and shift <= 0, included). Found once
# per channel by searching the floats in order, it makes the mask two comparisons instead of the
# formula's arithmetic, with the same bits.


@njit(**NESTED)
def _stopped(like, key, p):
    return _affine_element(from_ordered_key(key, like), p[0], p[1], p[2], p[3]) <= 0


@njit(inline="always")
def _beyond(a, b, n):
    """Whether b is more than n keys from a (no overflow for keys of ±inf)."""
    return b > a + n if b > a else a > b + n


@njit(**NESTED)
def _edge(like, p, inside, end, guess):
    """The stopped key farthest from the stopped key ``inside`` towards ``end``, where the stopped
    keys between them are one run from ``inside``: galloping from ``guess`` (where it lies between
    them), then bisecting."""
    if _stopped(like, end, p):
        return end
    outside = end
    toward = 1 if end > inside else -1
    if (guess - inside) * toward > 0 and (end - guess) * toward > 0:
        step = 1
        if _stopped(like, guess, p):
            inside = guess
            while step < 1 << 60 and _beyond(inside, outside, step):
                if not _stopped(like, inside + toward * step, p):
                    outside = inside + toward * step
                    break
                inside += toward * step
                step *= 2
        else:
            outside = guess
            while step < 1 << 60 and _beyond(inside, outside, step):
                if _stopped(like, outside - toward * step, p):
                    inside = outside - toward * step
                    break
                outside -= toward * step
                step *= 2
    while _beyond(inside, outside, 1):
        middle = inside // 2 + outside // 2 + (inside % 2 + outside % 2) // 2
        if _stopped(like, middle, p):
            inside = middle
        else:
            outside = middle
    return inside


@njit(**NESTED)
def relu_stops(like, mean, scale, shift):
    """Rows (first, last) in ``like``'s dtype: channel c's ReLU after the affine pass of ``mean``,
    ``scale`` and ``shift`` (:func:`affine_params`) stopped exactly the x with first <= x <= last
    (first > last: none), for :func:`.lines.passed_outside`."""
    stops = np.empty((2, mean.shape[0]), like.dtype)
    bottom = ordered_key(as_element(like, -np.inf))
    top = ordered_key(as_element(like, np.inf))
    for c in range(mean.shape[0]):
        hi, lo = split_mean(like, mean[c])
        p = (hi, lo, as_element(like, scale[c]), as_element(like, shift[c]))
        root = as_element(like, mean[c] - shift[c] / scale[c]) if scale[c] != 0 else as_element(like, np.nan)
        guess = ordered_key(root) if np.isfinite(root) else bottom
        stops[0, c], stops[1, c] = as_element(like, np.inf), as_element(like, -np.inf)
        # a stopped x, where there is one: -inf (scale > 0, or +inf), +inf (scale < 0, or -inf), or
        # mean_hi (scale = 0)
        for seed in (bottom, top, ordered_key(hi)):
            if _stopped(like, seed, p):
                stops[0, c] = from_ordered_key(_edge(like, p, seed, bottom, guess), like)
                stops[1, c] = from_ordered_key(_edge(like, p, seed, top, guess), like)
                break
    return stops


@njit(inline="always")
def no_stops(like):
    """The empty interval of :func:`relu_stops` in ``like``'s dtype: nothing masked."""
    return as_element(like, np.inf), as_element(like, -np.inf)


def register_stops(like, mean, relu):
    """:func:`relu_stops` of the kernels' ``relu`` = (z, g, scale, shift) when the mask goes in
    registers (no residual: z and g None); None otherwise (no ReLU, or a masked gradient written to g)."""


def masks_in_registers(relu):
    """Whether kernels given ``relu`` (the Numba type of their (z, g, scale, shift), or None) mask in
    registers: a ReLU with no residual, so no z to add and no g to write."""
    return isinstance(relu, types.BaseTuple) and isinstance(relu[0], types.NoneType) and isinstance(relu[1], types.NoneType)


@overload(register_stops, inline="always")
def _register_stops_overload(like, mean, relu):
    if masks_in_registers(relu):
        return lambda like, mean, relu: relu_stops(like, mean, relu[2], relu[3])
    return lambda like, mean, relu: None


def channel_stops(stops, c):
    """Channel c's (first, last) of :func:`relu_stops`; None without ``stops``."""


@overload(channel_stops, inline="always")
def _channel_stops_overload(stops, c):
    if isinstance(stops, types.NoneType):
        return lambda stops, c: None
    return lambda stops, c: (stops[0, c], stops[1, c])


def or_no_stops(stops, like):
    """``stops`` = (first, last), or :func:`no_stops` where it is None."""


@overload(or_no_stops, inline="always")
def _or_no_stops_overload(stops, like):
    if isinstance(stops, types.NoneType):
        return lambda stops, like: no_stops(like)
    return lambda stops, like: stops


@njit(**NESTED)
def line_tables(params, out):
    """The four rows of ``params`` as :func:`_cyclic` tables for the lines of ``out``."""
    tables = _cyclic(params, LINE_BYTES // out.itemsize)
    return tables[0], tables[1], tables[2], tables[3]


@njit(**NESTED)
def stop_tables(like, mean, scale, shift):
    """:func:`relu_stops` as :func:`_cyclic` tables (first, last) for the lines of ``like``."""
    tables = _cyclic(relu_stops(like, mean, scale, shift), LINE_BYTES // like.itemsize)
    return tables[0], tables[1]


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
