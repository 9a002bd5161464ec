"""Numerical promises: stable variance, exact constant channels, NaN isolation, precision against a
float64 reference (on every backend, the GPU's included), and bitwise determinism run to run and
across thread counts."""

import os
import pathlib
import subprocess
import sys

import numba
import numpy as np
import pytest
from support import random_array, reference_backward, reference_forward, rel_error

import accelbn as abn

LAYOUTS = [((16, 4, 30, 30), 1), ((4096, 8), 1), ((8, 12, 12, 6), -1)]
LAYOUT_IDS = ["NCHW", "NC", "NHWC"]


@pytest.mark.parametrize("loc, scale", [(1e4, 1e-2), (-300.0, 1.2)], ids=["1e4+-1e-2", "-300+-1.2"])
@pytest.mark.parametrize("shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_large_mean_small_std_in_float32(any_backend, on, shape, axis, loc, scale):
    # E[x^2] - E[x]^2 loses every digit here: x^2 ~ 1e8 while the variance is 1e-4; and float sums
    # of a channel with mean -300 carry errors of 1e-4 of its std into the mean.
    x = random_array(shape, np.float32, loc=loc, scale=scale)
    expected, _, _, _ = reference_forward(x, None, None, None, None, training=True, axis=axis)
    y = on.get(abn.batch_norm(on.put(x), None, None, training=True, axis=axis, backend=any_backend))
    assert np.abs(y - expected).max() / np.abs(expected).max() < 1e-3
    assert rel_error(y, expected) < 2e-5


@pytest.mark.parametrize("shape, axis", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_channel_gives_exactly_the_bias(any_backend, on, shape, axis, dtype):
    x = random_array(shape, dtype)
    constant = [slice(None)] * x.ndim
    constant[axis] = 1
    x[tuple(constant)] = 0.1
    bias = np.arange(x.shape[axis], dtype=dtype)
    rv = on.put(np.ones(x.shape[axis], dtype))
    y = abn.batch_norm(on.put(x), on.put(np.zeros(x.shape[axis], dtype)), rv, None, on.put(bias), True, axis=axis,
                       backend=any_backend)
    assert np.all(on.get(y)[tuple(constant)] == bias[1])
    assert on.get(rv)[1] == 0.9  # the running variance moved towards 0, exactly


@pytest.mark.parametrize("shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_nan_poisons_only_its_channel(any_backend, on, shape, axis):
    x = random_array(shape)
    index = [0] * x.ndim
    index[axis] = 2
    x[tuple(index)] = np.nan
    rm, rv = on.put(np.zeros(x.shape[axis], np.float32)), on.put(np.ones(x.shape[axis], np.float32))
    y, stats = abn.batch_norm(on.put(x), rm, rv, training=True, axis=axis, return_stats=True, backend=any_backend)
    rm, rv = on.get(rm), on.get(rv)
    bad = np.moveaxis(np.isnan(on.get(y)), axis, 0).reshape(x.shape[axis], -1)
    assert bad[2].all() and not np.delete(bad, 2, axis=0).any()
    assert np.isnan(rm[2]) and np.isnan(rv[2]) and np.isfinite(np.delete(rm, 2)).all()
    dy = random_array(shape, seed=1)
    dx, dweight, _ = map(on.get, abn.batch_norm_backward(on.put(dy), on.put(x), stats, axis=axis, backend=any_backend))
    bad = np.moveaxis(np.isnan(dx), axis, 0).reshape(x.shape[axis], -1)
    assert bad[2].all() and not np.delete(bad, 2, axis=0).any()
    assert np.isnan(dweight[2]) and np.isfinite(np.delete(dweight, 2)).all()


def test_frozen_backward_ignores_non_finite_x(any_backend, on):
    # dx = dy * weight * invstd does not depend on x; only dweight does.
    x = random_array((4, 3, 5))
    x[0, 0, 0], x[1, 1, 1] = np.nan, np.inf
    dy = random_array(x.shape, seed=1)
    stats = abn.BatchStats(on.put(np.zeros(3, np.float32)), on.put(np.full(3, 2.0, np.float32)))
    weight = np.array([1.0, -0.5, 3.0], np.float32)
    dx, dweight, dbias = map(on.get, abn.batch_norm_backward(on.put(dy), on.put(x), stats, on.put(weight),
                                                             training=False, backend=any_backend))
    np.testing.assert_allclose(dx, dy * (weight * 2.0)[None, :, None], rtol=1e-6)
    assert np.isfinite(dbias).all() and np.isnan(dweight[0]) and np.isinf(dweight[1]) and np.isfinite(dweight[2])


@pytest.mark.parametrize("shape, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_values_near_the_float32_limit_do_not_overflow(any_backend, on, shape, axis):
    # Differences of such values overflow float32: they must be taken in float64.
    x = np.where(random_array(shape) > 0, np.float32(3e38), np.float32(-3e38))
    expected, _, _, _ = reference_forward(x, None, None, None, None, training=True, axis=axis)
    y = on.get(abn.batch_norm(on.put(x), None, None, training=True, axis=axis, backend=any_backend))
    assert np.isfinite(y).all()
    assert rel_error(y, expected) < 2e-5


def test_nan_in_dy_stays_in_its_element_with_frozen_statistics(any_backend, on):
    x = random_array((4, 3, 5))
    dy = random_array(x.shape, seed=1)
    dy[1, 2, 3] = np.nan
    stats = abn.BatchStats(on.put(np.zeros(3, np.float32)), on.put(np.ones(3, np.float32)))
    dx, _, _ = abn.batch_norm_backward(on.put(dy), on.put(x), stats, training=False, backend=any_backend)
    assert np.isnan(on.get(dx)).sum() == 1


@pytest.mark.parametrize("shape, axis", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_precision_against_float64_reference(any_backend, on, shape, axis, dtype):
    x = random_array(shape, dtype, loc=3.0, scale=5.0)
    dy = random_array(shape, dtype, seed=1)
    expected, stats64, _, _ = reference_forward(x, None, None, None, None, training=True, axis=axis)
    y, stats = abn.batch_norm(on.put(x), None, None, training=True, axis=axis, return_stats=True, backend=any_backend)
    tol = 2e-5 if dtype == np.float32 else 1e-10
    assert rel_error(on.get(y), expected) < tol
    expected_dx = reference_backward(dy, x, stats64, None, True, axis=axis)[0]
    dx = abn.batch_norm_backward(on.put(dy), on.put(x), stats, axis=axis, backend=any_backend)[0]
    assert rel_error(on.get(dx), expected_dx) < tol


# Every output of train forward, backward (trained and frozen) and eval on the DETERMINISM shapes,
# hashed; run in a fresh process whose thread count is set through ACCELBN_NUM_THREADS.
_DIGEST_SCRIPT = """
import hashlib, sys
sys.path.insert(0, sys.argv[1])
from support import DETERMINISM, numba_outputs, random_array
digest = hashlib.sha256()
for shape, axis in DETERMINISM:
    for a in numba_outputs(random_array(shape, loc=2.0), random_array(shape, seed=1), axis):
        digest.update(a.tobytes())
print(digest.hexdigest())
"""


def _digest_with_threads(threads):
    env = {**os.environ, "NUMBA_NUM_THREADS": "8", "ACCELBN_NUM_THREADS": str(threads)}
    tests = str(pathlib.Path(__file__).parent)
    result = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT, tests], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[-1]


@pytest.mark.slow
def test_bitwise_identical_run_to_run_and_for_any_number_of_threads():
    digests = {threads: _digest_with_threads(threads) for threads in (1, 2, 3, 4, 8)}
    assert len(set(digests.values())) == 1, digests
    again = _digest_with_threads(3)
    assert again == digests[3]


@pytest.mark.parametrize("shape, axis", [*LAYOUTS, ((2, 2), 1)], ids=[*LAYOUT_IDS, "NC-two-rows"])
def test_gradient_that_cancels_far_below_dy(any_backend, on, shape, axis):
    # dy almost a linear function of x: dx is dy minus its projection, 1e-4 of dy here (and of order
    # eps with two rows). Its accuracy needs sum(dy * (x - mean)) with exact products.
    x = random_array(shape, loc=1.0)
    _, stats = abn.batch_norm(x, None, None, training=True, axis=axis, return_stats=True, backend="numpy")
    channel_shape = [1] * x.ndim
    channel_shape[axis] = -1
    x_hat = (x - stats.mean.reshape(channel_shape)) * stats.invstd.reshape(channel_shape)
    dy = (0.3 + 0.7 * x_hat + 1e-4 * random_array(shape, seed=1)).astype(np.float32)
    want, _, _ = reference_backward(dy, x, stats, None, training=True, axis=axis)
    stats_on = abn.BatchStats(on.put(stats.mean), on.put(stats.invstd))
    got, _, _ = abn.batch_norm_backward(on.put(dy), on.put(x), stats_on, axis=axis, backend=any_backend)
    assert rel_error(on.get(got), want) < 2e-5


def test_fma_rounds_once_in_scalar_code_and_in_line_kernels():
    # The gradient's fused multiply-adds must round once on both paths (a line of SIMD lanes and the
    # element-by-element ends), or the paths would disagree. Here a * b + c rounded twice is 0.
    from accelbn.backends.numba_cpu.lines import fma, line_kernel

    a, b, c = 1 + 2.0**-30, 1 - 2.0**-30, -1.0
    assert a * b + c == 0.0
    scalar = numba.njit(lambda a, b, c: fma(a, b, c))
    line = line_kernel(lambda a, b, c: fma(a, b, c), nontemporal=False)

    @numba.njit
    def one_line(values, b, c, out):
        line(out, 0, (values,), (b, c), 0)

    out = np.zeros(8)
    one_line(np.full(8, a), b, c, out)
    assert scalar(a, b, c) == -(2.0**-60)
    np.testing.assert_array_equal(out, -(2.0**-60))


@pytest.mark.parametrize(
    "x_dtype, run_dtype", [(np.float32, np.float32), (np.float64, np.float64), (np.float32, np.float64)]
)
def test_column_kernels_sum_each_column_row_after_row(x_dtype, run_dtype):
    # The channels-last statistics sum columns a strip of cache lines at a time, in registers; each
    # column must get exactly the row-by-row sum that a scalar loop computes. 85 columns: strips,
    # a single line and a scalar tail for float32; 37 rows: runs of ROW_RUN and a short last run.
    from accelbn.backends.numba_cpu import batch_norm_channels_last as channels_last

    x = random_array((37, 85), x_dtype, loc=3.0)
    shift = x[0].astype(run_dtype)
    hi = (x.mean(axis=0) + 0.1).astype(run_dtype)
    lo = np.full(85, 1e-3, run_dtype)
    run = np.empty(85, run_dtype)

    def row_after_row(term):
        total = np.zeros(85)
        for q in range(1, 37, channels_last.ROW_RUN):
            sums = np.zeros(85, run_dtype)
            for r in range(q, min(q + channels_last.ROW_RUN, 37)):
                sums = sums + term(x[r].astype(run_dtype))
            total += sums
        return total

    shifted = np.empty(85)
    channels_last._columns_shifted(x, 1, 37, shift, run, shifted)
    assert shifted.tobytes() == row_after_row(lambda row: row - shift).tobytes()
    squared = np.empty(85)
    channels_last._columns_squared_deviations(x, 1, 37, hi, lo, run, squared)
    assert squared.tobytes() == row_after_row(lambda row: ((row - hi) - lo) * ((row - hi) - lo)).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_gradient_sums_go_row_after_row_in_float64(dtype):
    from accelbn.backends.numba_cpu import batch_norm_channels_last as channels_last

    x = random_array((37, 85), dtype, loc=3.0)
    dy = random_array((37, 85), dtype, seed=1)
    mean = x.mean(axis=0, dtype=np.float64) + 0.1
    want_dy, want_dy_xmu = np.zeros(85), np.zeros(85)
    for r in range(1, 37):
        g = dy[r].astype(np.float64)
        want_dy = want_dy + g
        want_dy_xmu = want_dy_xmu + g * (x[r].astype(np.float64) - mean)
    sum_dy, sum_dy_xmu = np.empty(85), np.empty(85)
    channels_last._row_block_gradient_sums(dy, x, mean, 1, 37, sum_dy, sum_dy_xmu)
    assert sum_dy.tobytes() == want_dy.tobytes()
    assert sum_dy_xmu.tobytes() == want_dy_xmu.tobytes()


def test_column_sweeps_read_from_an_offset_in_rows_of_any_stride():
    # The short-row paths sweep a block's columns [j0, j0 + width) of (outer, C * inner) planes, which
    # may be a view with gaps between the rows; each column still gets its row-after-row sum.
    from accelbn.backends.numba_cpu import reductions

    planes = random_array((2 * 21, 100), np.float32, loc=3.0)[::2]  # rows 400 bytes apart, not 800
    shift = random_array((85,), np.float64, seed=2)
    run = np.zeros(85)
    reductions.shifted_columns((run,), (planes,), 7, 1, 21, 85, (shift,))
    want = np.zeros(85)
    for r in range(1, 21):
        want = want + (planes[r, 7:92].astype(np.float64) - shift)
    assert run.tobytes() == want.tobytes()
