"""Hypothesis: every backend agrees with the reference over generated shapes, axes, dtypes and strides."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from conftest import BACKENDS, assert_matches_reference, reference_backward, reference_forward

import accelbn as abn


@st.composite
def inputs(draw):
    ndim = draw(st.integers(2, 5))
    shape = draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape[0] = max(shape[0], 2)  # at least two values per channel for training
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    # A larger parent array, then a strided, possibly reversed and transposed view of it.
    steps = draw(st.lists(st.sampled_from([1, 2, -1, -2]), min_size=ndim, max_size=ndim))
    parent = np.random.default_rng(seed).standard_normal([n * abs(s) for n, s in zip(shape, steps)]) * 3 + 1
    x = parent.astype(dtype)[tuple(slice(None, None, s) for s in steps)]
    permutation = draw(st.permutations(range(ndim)))
    x = x.transpose(permutation)
    axis = permutation.index(axis % ndim)
    return x, axis, np.random.default_rng(seed + 1).standard_normal(x.shape).astype(dtype), draw(st.sampled_from(BACKENDS))


@given(inputs(), st.booleans())
def test_backend_agrees_with_reference_on_any_layout(case, with_affine):
    x, axis, dy, backend = case
    c = x.shape[axis]
    weight = np.linspace(0.5, 1.5, c).astype(np.float32) if with_affine else None
    bias = np.linspace(-1, 1, c).astype(np.float32) if with_affine else None
    if x.size // c < 2:
        return
    expected, _, _, _ = reference_forward(x, None, None, weight, bias, training=True, axis=axis)
    y, stats = abn.batch_norm(x, None, None, weight, bias, True, axis=axis, return_stats=True, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_matches_reference(y, expected)
    expected_grads = reference_backward(dy, x, stats, weight, True, axis=axis)
    grads = abn.batch_norm_backward(dy, x, stats, weight, axis=axis, backend=backend)
    for got, want in zip(grads, expected_grads):
        assert_matches_reference(got, want)
