"""Hypothesis: the CPU backends agree with the oracle over generated shapes, axes, dtypes and strides.

Deterministic (the profile derandomizes, so CI draws the same cases every run), and every draw
asserts: each has at least two values per channel, and both CPU backends (the Numba kernels and
plain NumPy) run against the oracle in every draw. One axis may be long (up to past a row
segment), so draws reach the long-row, short-row and channels-last kernels with strided views."""

import ml_dtypes
import numpy as np
from support import CPU_BACKENDS, assert_matches_reference, reference_backward, reference_forward
from hypothesis import given, settings
from hypothesis import strategies as st

import accelbn as abn

# Lengths for the one long axis: around the short-row threshold (256) and past a row segment
# (65536 elements), where the parallel element passes split a row.
_LONG = [255, 256, 257, 1000, 65537]


@st.composite
def inputs(draw):
    ndim = draw(st.integers(2, 5))
    shape = draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    if draw(st.booleans()):
        shape[draw(st.integers(0, ndim - 1))] = draw(st.sampled_from(_LONG))
    others = [a for a in range(ndim) if a != axis % ndim]
    shape[others[0]] = max(shape[others[0]], 2)  # at least two values per channel for training
    dtype = draw(st.sampled_from([np.float16, ml_dtypes.bfloat16, np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    # A larger parent array, then a strided, possibly reversed and transposed view of it.
    steps = draw(st.lists(st.sampled_from([1, 2, -1, -2]), min_size=ndim, max_size=ndim))
    parent = np.random.default_rng(seed).standard_normal([n * abs(s) for n, s in zip(shape, steps)]) * 3 + 1
    x = parent.astype(dtype)[tuple(slice(None, None, s) for s in steps)]
    permutation = draw(st.permutations(range(ndim)))
    x = x.transpose(permutation)
    axis = permutation.index(axis % ndim)
    return x, axis, np.random.default_rng(seed + 1).standard_normal(x.shape).astype(dtype)


@settings(derandomize=True, max_examples=60)
@given(inputs(), st.booleans())
def test_backends_agree_with_the_oracle_on_any_layout(case, with_affine):
    x, axis, dy = case
    c = x.shape[axis]
    assert x.size // c >= 2
    weight = np.linspace(0.5, 1.5, c).astype(np.float32) if with_affine else None
    bias = np.linspace(-1, 1, c).astype(np.float32) if with_affine else None
    expected, _, _, _ = reference_forward(x, None, None, weight, bias, training=True, axis=axis)
    assert "numba" in CPU_BACKENDS
    for backend in CPU_BACKENDS:
        y, stats = abn.batch_norm(x, None, None, weight, bias, True, axis=axis, return_stats=True, backend=backend)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert_matches_reference(y, expected)
        expected_grads = reference_backward(dy, x, stats, weight, True, axis=axis)
        grads = abn.batch_norm_backward(dy, x, stats, weight, axis=axis, backend=backend)
        for got, want in zip(grads, expected_grads):
            assert_matches_reference(got, want)
