"""Reductions of the Numba kernels, each in an order fixed by the shape alone: sums of a row (in
runs of the element dtype added in float64), shifted moments merged with Chan's formula, float64
gradient sums, column sums held in SIMD registers down the rows, and merges of per-part partials in
part order.

Only these helpers are compiled with ``reassoc``: it lets LLVM vectorize a sum, in an order fixed
when the function is compiled. Everything else is strict IEEE arithmetic.
"""

import numpy as np
from numba import njit

from accelbn.backends.numba_cpu.lines import column_sweep, passed_outside
from accelbn.backends.numba_cpu.runtime import NESTED, NESTED_REDUCTION, OPTIONS, REDUCTION
from accelbn.backends.numba_cpu.scalars import as_element, fill_zero, split_mean


@njit(**NESTED_REDUCTION)
def vector_sum(v):
    s = 0.0
    for i in range(v.shape[0]):
        s += v[i]
    return s


# The moment reductions add SUM_RUN elements at a time in the element dtype (float32 for float32 x),
# which LLVM spreads over vector lanes and accumulators, so a run's total is nearly a pairwise sum;
# the runs' totals are added in float64 (converting every element to float64 instead doubles the
# statistics' time: benchmarks/RESULTS.md). A float32 run can overflow where float64 would not (values
# near 3e38, squares beyond 1.8e19): a row whose sum is not finite is summed again in float64, so
# only rows holding inf or NaN pay twice. Runs start at fixed offsets of the row: the order is fixed
# by the shape alone.
SUM_RUN = 256


@njit(inline="always", **REDUCTION)
def _runs_shifted(v, shift, zero):
    """Sum of v - shift, in runs computed in the type of ``zero`` and ``shift``."""
    n = v.shape[0]
    e = n - n % SUM_RUN
    s = 0.0
    for i0 in range(0, e, SUM_RUN):
        t = zero
        for i in range(i0, i0 + SUM_RUN):
            t += v[i] - shift
        s += np.float64(t)
    t = zero
    for i in range(e, n):
        t += v[i] - shift
    return s + np.float64(t)


@njit(inline="always", **REDUCTION)
def _runs_squared_deviations(v, mean_hi, mean_lo, zero):
    n = v.shape[0]
    e = n - n % SUM_RUN
    s = 0.0
    for i0 in range(0, e, SUM_RUN):
        t = zero
        for i in range(i0, i0 + SUM_RUN):
            d = (v[i] - mean_hi) - mean_lo
            t += d * d
        s += np.float64(t)
    t = zero
    for i in range(e, n):
        d = (v[i] - mean_hi) - mean_lo
        t += d * d
    return s + np.float64(t)


@njit(**NESTED_REDUCTION)
def sum_shifted(v, shift):
    """Sum of v - shift, for a shift that is exact in v's dtype (an element of v)."""
    s = _runs_shifted(v, as_element(v, shift), as_element(v, 0.0))
    if not np.isfinite(s):
        s = _runs_shifted(v, shift, 0.0)
    return s


@njit(**NESTED_REDUCTION)
def sum_squared_deviations(v, mean):
    hi, lo = split_mean(v, mean)
    s = _runs_squared_deviations(v, hi, lo, as_element(v, 0.0))
    if not np.isfinite(s):
        s = _runs_squared_deviations(v, mean, 0.0, 0.0)
    return s


# Contracted: the product and its sum in one fused multiply-add, one rounding fewer and faster.
@njit(**dict(REDUCTION, fastmath={"reassoc", "contract"}))
def gradient_sums(dy, x, mean, first, last):
    """Sums of g and of g * (x - mean), g = dy masked where first <= x <= last (the fused ReLU's
    backward, :func:`.elements.relu_stops`; batch norm's own passes an empty interval, so that both
    add in the one order LLVM chose for this loop), in float64 throughout: a product of two float32
    numbers is exact in float64, and the gradient needs the second sum exactly where dx cancels to
    far below dy (dy nearly a linear function of x)."""
    sum_dy = 0.0
    sum_dy_xmu = 0.0
    for i in range(dy.shape[0]):
        g = np.float64(passed_outside(x[i], first, last, dy[i]))
        sum_dy += g
        sum_dy_xmu += g * (np.float64(x[i]) - mean)
    return sum_dy, sum_dy_xmu


@njit(**NESTED)
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, sum of squared deviations) triples (Chan et al., 1979)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


# --- column sums: down the rows first, in registers ----------------------------------------------


def _shifted(x, shift):
    return x - shift


def _squared_deviation(x, mean_hi, mean_lo):
    d = (x - mean_hi) - mean_lo
    return d * d


def _gradient_terms(dy, x, mean):
    return dy, dy * (x - mean)


# Column sums with the sums held in registers (column_sweep), in strips of four cache lines, or of
# two for the gradient's two float64 sums per column.
shifted_columns = column_sweep(_shifted, 4)
squared_deviation_columns = column_sweep(_squared_deviation, 4)
gradient_columns = column_sweep(_gradient_terms, 2)

# Merges of partials, in part order.


@njit(**OPTIONS)
def merge_moments(count, part_mean, part_m2, mean, var):
    """Merge the parts in part order into each channel's mean and biased variance. Parts go in the
    outer loop, so the loop over channels vectorizes (thousands of row blocks for channels-last)."""
    m2 = np.zeros(mean.shape[0])
    fill_zero(mean)
    n = 0.0
    for p in range(part_mean.shape[0]):
        for c in range(mean.shape[0]):
            _, mean[c], m2[c] = chan_merge(n, mean[c], m2[c], count[p], part_mean[p, c], part_m2[p, c])
        n += count[p]
    for c in range(mean.shape[0]):
        var[c] = m2[c] / n


@njit(**OPTIONS)
def sum_parts(parts, total):
    fill_zero(total)
    for p in range(parts.shape[0]):
        for c in range(parts.shape[1]):
            total[c] += parts[p, c]
