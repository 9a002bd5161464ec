"""Layer, RMS, group and instance norm on every CPU backend against PyTorch (float64 autograd, the
contract) and against each other: outputs, saved and running statistics, gradients, layers and
their state dicts, layouts, views and dtypes, numerics, determinism and bad input."""

import functools

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import ArraysOn, random_array, rel_error

import accelbn as abn

torch.use_deterministic_algorithms(True)


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def _params(shape, seed=3):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 1.5, shape), rng.standard_normal(shape)


def _grads(function, x, dy, *params):
    """PyTorch's output and gradients (x, then each parameter) of ``function`` in float64."""
    tensors = [_t(a).requires_grad_() for a in (x, *params)]
    y = function(*tensors)
    y.backward(_t(dy))
    return [y.detach().numpy()] + [t.grad.numpy() for t in tensors]


# name: (x shape, normalized_shape)
LAYER_SHAPES = {"rows": ((6, 5, 16), (16,)), "two-dims": ((4, 3, 5, 8), (5, 8)), "one-row": ((1, 300), (300,))}


@pytest.mark.parametrize("case", list(LAYER_SHAPES))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layer_norm_matches_torch(backend, case, affine):
    shape, normalized = LAYER_SHAPES[case]
    x, dy = random_array(shape, np.float64, loc=2.0, scale=3.0), random_array(shape, np.float64, seed=1)
    weight, bias = _params(normalized) if affine else (None, None)
    y, stats = abn.layer_norm(x, normalized, weight, bias, 1e-4, return_stats=True, backend=backend)
    dx, dweight, dbias = abn.layer_norm_backward(dy, x, stats, normalized, weight, backend=backend)
    params = (weight, bias) if affine else ()
    want = _grads(lambda t, *p: F.layer_norm(t, normalized, *p, eps=1e-4), x, dy, *params)
    _, mean, rstd = torch.native_layer_norm(_t(x), normalized, None, None, 1e-4)
    for got, expected in zip([y, dx, *((dweight, dbias) if affine else ())], want):
        assert rel_error(got, expected) < 1e-12
    assert stats.mean.shape == stats.invstd.shape == shape[: len(shape) - len(normalized)]
    assert rel_error(stats.mean, mean.reshape(stats.mean.shape)) < 1e-12
    assert rel_error(stats.invstd, rstd.reshape(stats.invstd.shape)) < 1e-12
    xhat = (x - stats.mean.reshape(*stats.mean.shape, *[1] * len(normalized))) * stats.invstd.reshape(
        *stats.invstd.shape, *[1] * len(normalized))
    lead = tuple(range(x.ndim - len(normalized)))
    assert rel_error(dweight, (dy * xhat).sum(axis=lead)) < 1e-12 and dweight.shape == normalized
    assert rel_error(dbias, dy.sum(axis=lead)) < 1e-12


@pytest.mark.parametrize("case", list(LAYER_SHAPES))
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rms_norm_matches_torch(backend, case, eps):
    shape, normalized = LAYER_SHAPES[case]
    x, dy = random_array(shape, np.float64, loc=1.0, scale=2.0), random_array(shape, np.float64, seed=1)
    weight, _ = _params(normalized)
    y, stats = abn.rms_norm(x, normalized, weight, eps, return_stats=True, backend=backend)
    dx, dweight = abn.rms_norm_backward(dy, x, stats, normalized, weight, backend=backend)
    want = _grads(lambda t, w: F.rms_norm(t, normalized, w, eps), x, dy, weight)
    for got, expected in zip([y, dx, dweight], want):
        assert rel_error(got, expected) < 1e-12
    assert stats.mean is None and stats.invstd.shape == shape[: len(shape) - len(normalized)]


def test_rms_norm_default_eps_is_the_dtypes_machine_epsilon(backend):
    x = np.full((2, 4), 1e-4, np.float32)  # mean square 1e-8, below float32's epsilon (1.2e-7)
    y = abn.rms_norm(x, 4, backend=backend)
    expected = F.rms_norm(torch.from_numpy(x), (4,)).numpy()
    assert rel_error(y, expected) < 2e-6
    assert rel_error(y, x / np.sqrt(1e-8 + np.finfo(np.float32).eps)) < 2e-6


# name: (shape, axis, groups)
GROUP_CASES = {
    "NCHW": ((3, 6, 4, 5), 1, 3),
    "NHWC": ((3, 4, 5, 6), -1, 2),
    "NCL-one-group": ((4, 6, 7), 1, 1),
    "NC-groups-of-one": ((5, 6), 1, 6),
    "NCDHW": ((2, 4, 3, 2, 3), 1, 2),
}


def _channels_first(a, axis):
    return a if axis == 1 else np.moveaxis(a, axis, 1)


@pytest.mark.parametrize("case", list(GROUP_CASES))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_group_norm_matches_torch(backend, case, affine):
    shape, axis, groups = GROUP_CASES[case]
    x, dy = random_array(shape, np.float64, loc=-1.0, scale=2.0), random_array(shape, np.float64, seed=1)
    channels = shape[axis]
    weight, bias = _params(channels) if affine else (None, None)
    y, stats = abn.group_norm(x, groups, weight, bias, 1e-4, axis=axis, return_stats=True, backend=backend)
    dx, dweight, dbias = abn.group_norm_backward(dy, x, stats, groups, weight, axis=axis, backend=backend)
    first = functools.partial(_channels_first, axis=axis)
    params = (weight, bias) if affine else ()
    want = _grads(lambda t, *p: F.group_norm(t, groups, *p, eps=1e-4), first(x), first(dy), *params)
    got = [first(y), first(dx), *((dweight, dbias) if affine else ())]
    for a, b in zip(got, want):  # against dy's size too: groups of one element have dx = 0 exactly
        assert np.linalg.norm(a - b) <= 1e-12 * (np.linalg.norm(b) + np.linalg.norm(dy))
    tx = _t(first(x))
    _, mean, rstd = torch.native_group_norm(tx, None, None, shape[0], channels, tx[0, 0].numel(), groups, 1e-4)
    assert stats.mean.shape == stats.invstd.shape == (shape[0], groups)
    assert rel_error(stats.mean, mean) < 1e-12 and rel_error(stats.invstd, rstd) < 1e-12
    assert dbias.shape == (channels,) and rel_error(dbias, first(dy).sum(axis=tuple(a for a in range(x.ndim) if a != 1))) < 1e-12


@pytest.mark.parametrize("case", ["NCHW", "NHWC", "NCDHW", "NCL-one-group"])
@pytest.mark.parametrize("with_running_stats", [True, False], ids=["running-stats", "no-running-stats"])
def test_instance_norm_matches_torch(backend, case, with_running_stats):
    shape, axis, _ = GROUP_CASES[case]
    x, dy = random_array(shape, np.float64, loc=3.0, scale=2.0), random_array(shape, np.float64, seed=1)
    channels = shape[axis]
    weight, bias = _params(channels)
    rm, rv = (random_array(channels, np.float64, seed=5), np.random.default_rng(6).uniform(0.5, 2, channels))
    trm, trv = _t(rm), _t(rv)
    if not with_running_stats:
        rm = rv = trm = trv = None
    y, stats = abn.instance_norm(x, rm, rv, weight, bias, True, 0.3, 1e-4, axis=axis, return_stats=True, backend=backend)
    dx, dweight, dbias = abn.instance_norm_backward(dy, x, stats, weight, axis=axis, backend=backend)
    first = functools.partial(_channels_first, axis=axis)
    want = _grads(lambda t, w, b: F.instance_norm(t, trm, trv, w, b, True, 0.3, 1e-4), first(x), first(dy), weight, bias)
    for a, b in zip([first(y), first(dx), dweight, dbias], want):
        assert rel_error(a, b) < 1e-12
    if with_running_stats:
        assert rel_error(rm, trm.numpy()) < 1e-12 and rel_error(rv, trv.numpy()) < 1e-12
    assert stats.mean.shape == (shape[0], channels)


@pytest.mark.parametrize("case", ["NCHW", "NHWC"])
def test_instance_norm_with_running_stats_treats_them_as_constants(backend, case):
    shape, axis, _ = GROUP_CASES[case]
    x, dy = random_array(shape, np.float64, loc=3.0), random_array(shape, np.float64, seed=1)
    channels = shape[axis]
    weight, bias = _params(channels)
    rm, rv = random_array(channels, np.float64, seed=5), np.random.default_rng(6).uniform(0.5, 2, channels)
    before = rm.copy(), rv.copy()
    y, stats = abn.instance_norm(x, rm, rv, weight, bias, False, axis=axis, return_stats=True, backend=backend)
    dx, dweight, dbias = abn.instance_norm_backward(dy, x, stats, weight, use_input_stats=False, axis=axis, backend=backend)
    first = functools.partial(_channels_first, axis=axis)
    want = _grads(lambda t, w, b: F.instance_norm(t, _t(rm), _t(rv), w, b, False), first(x), first(dy), weight, bias)
    for a, b in zip([first(y), first(dx), dweight, dbias], want):
        assert rel_error(a, b) < 1e-12
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])


VIEWS = {
    "reversed": lambda a: np.flip(a).copy()[tuple(slice(None, None, -1) for _ in a.shape)],
    "every-other-element": lambda a: np.stack([a, np.zeros_like(a)], axis=-1)[..., 0],
    "fortran-order": np.asfortranarray,
}


@pytest.mark.parametrize("view", list(VIEWS))
def test_views_give_the_bits_of_a_contiguous_copy(backend, view):
    x = random_array((4, 6, 5, 7), loc=2.0)
    dy = random_array((4, 6, 5, 7), seed=1)
    xv, dyv = VIEWS[view](x), VIEWS[view](dy)
    np.testing.assert_array_equal(xv, x)
    w, b = (a.astype(np.float32) for a in _params(6))
    calls = {
        "layer": lambda x, dy: _layer_pair(x, dy, (5, 7), backend),
        "group": lambda x, dy: _group_pair(x, dy, 3, w, b, backend),
        "instance": lambda x, dy: _group_pair(x, dy, 6, w, b, backend),
    }
    for name, call in calls.items():
        for a, c in zip(call(x, dy), call(xv, dyv)):
            assert a.tobytes() == np.ascontiguousarray(c).tobytes(), name


def _layer_pair(x, dy, normalized, backend):
    y, stats = abn.layer_norm(x, normalized, return_stats=True, backend=backend)
    return [y, *stats, *abn.layer_norm_backward(dy, x, stats, normalized, backend=backend)]


def _group_pair(x, dy, groups, w, b, backend):
    y, stats = abn.group_norm(x, groups, w, b, return_stats=True, backend=backend)
    return [y, *stats, *abn.group_norm_backward(dy, x, stats, groups, w, backend=backend)]


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_every_dtype_within_its_precision_of_float64(backend, dtype):
    x64 = random_array((8, 6, 9), np.float64, loc=1.0, scale=2.0)
    x = x64.astype(dtype)
    exact = x.astype(np.float64)
    tol = {np.float16: 2e-3, ml_dtypes.bfloat16: 1e-2, np.float32: 2e-5}[dtype]
    for function, args in [(abn.layer_norm, (9,)), (abn.rms_norm, ((6, 9),)), (abn.group_norm, (3,)), (abn.instance_norm, ())]:
        y = function(x, *args, backend=backend)
        want = function(exact, *args, backend="numpy")
        assert y.dtype == x.dtype and rel_error(y, want) <= tol + 2 * rel_error(want.astype(dtype), want), function.__name__
        _, stats = function(x, *args, return_stats=True, backend=backend)
        assert stats.invstd.dtype == np.float32


def test_large_mean_small_spread_in_float32_normalizes_like_float64(backend):
    x64 = random_array((16, 8, 64), np.float64, loc=1e4, scale=1e-2)
    x = x64.astype(np.float32)
    for function, args in [(abn.layer_norm, (64,)), (abn.group_norm, (4,)), (abn.instance_norm, ())]:
        assert rel_error(function(x, *args, backend=backend), function(x.astype(np.float64), *args, backend="numpy")) < 2e-5


def test_numba_is_bitwise_identical_run_to_run_and_to_the_thread_count():
    import subprocess
    import sys

    code = """
import hashlib, numpy as np, accelbn as abn
rng = np.random.default_rng(0)
x = rng.standard_normal((64, 32, 40, 40), dtype=np.float32) + 3
digest = hashlib.sha256()
for f, a in [(abn.layer_norm, ((40, 40),)), (abn.group_norm, (8,)), (abn.instance_norm, ()), (abn.rms_norm, (40,))]:
    y, stats = f(x, *a, return_stats=True)
    digest.update(y.tobytes() + stats.invstd.tobytes())
    b = {"layer_norm": abn.layer_norm_backward, "group_norm": abn.group_norm_backward,
         "instance_norm": abn.instance_norm_backward, "rms_norm": abn.rms_norm_backward}[f.__name__]
    for g in b(x, x, stats, *a):
        digest.update(g.tobytes())
print(digest.hexdigest())
"""
    import os

    digests = set()
    for threads in ("1", "2", "3"):
        env = {**os.environ, "NUMBA_NUM_THREADS": "3", "ACCELBN_NUM_THREADS": threads}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        digests.add(result.stdout)
    assert len(digests) == 1


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x: abn.layer_norm(x, (5,)), ValueError, r"normalized_shape \(5,\) must match the last dimensions"),
        (lambda x: abn.layer_norm(x, (0,)), ValueError, "normalized_shape must be positive ints"),
        (lambda x: abn.layer_norm(x, 6, np.ones(5)), ValueError, r"weight must have shape \(6,\)"),
        (lambda x: abn.group_norm(x, 4), ValueError, "must be divisible by num_groups=4"),
        (lambda x: abn.group_norm(x, 0), ValueError, "num_groups must be a positive int"),
        (lambda x: abn.group_norm(x, 2, axis=0), ValueError, "axis must not be 0"),
        (lambda x: abn.instance_norm(x, use_input_stats=False), ValueError, "running_mean and running_var are required"),
        (lambda x: abn.instance_norm(x, np.zeros(3), None), ValueError, "must be given together"),
        (lambda x: abn.instance_norm(x[:, :, :1, :1]), ValueError, "Expected more than 1 spatial element"),
        (lambda x: abn.group_norm(x.astype(np.int32), 3), TypeError, "x must have dtype float16"),
        (lambda x: abn.rms_norm(x, 6, eps=-1.0), ValueError, "eps must be a finite number >= 0.0"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call(random_array((2, 3, 4, 6)))


def test_instance_norm_bad_input_leaves_running_stats_alone():
    x = random_array((2, 3, 4, 4))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        abn.instance_norm(x, rm, rv, np.ones(4, np.float32))
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


@pytest.mark.parametrize(
    "make, module, shape",
    [
        (lambda: abn.LayerNorm((5, 6)), lambda: torch.nn.LayerNorm((5, 6), dtype=torch.float64), (3, 4, 5, 6)),
        (lambda: abn.LayerNorm(6, bias=False), lambda: torch.nn.LayerNorm(6, bias=False, dtype=torch.float64), (3, 6)),
        (lambda: abn.RMSNorm(6), lambda: torch.nn.RMSNorm(6, dtype=torch.float64), (3, 4, 6)),
        (lambda: abn.GroupNorm(2, 4), lambda: torch.nn.GroupNorm(2, 4, dtype=torch.float64), (3, 4, 5, 5)),
        (lambda: abn.InstanceNorm(4, affine=True, track_running_stats=True),
         lambda: torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True, dtype=torch.float64), (3, 4, 5, 5)),
        (lambda: abn.InstanceNorm(4), lambda: torch.nn.InstanceNorm2d(4, dtype=torch.float64), (3, 4, 5, 5)),
    ],
    ids=["layer", "layer-no-bias", "rms", "group", "instance-tracked", "instance"],
)
def test_layers_match_torch_modules_and_load_their_state(make, module, shape):
    layer, reference = make(), module()
    assert list(layer.state_dict()) == list(reference.state_dict())
    with torch.no_grad():
        for p in reference.parameters():
            p.uniform_(0.5, 1.5)
    layer.load_state_dict(reference.state_dict())
    layer = layer.to("numpy")
    layer.weight = layer.weight.astype(np.float64) if layer.weight is not None else None
    if layer.bias is not None:
        layer.bias = layer.bias.astype(np.float64)
    for step, training in enumerate([True, True, False]):
        layer.train(training)
        reference.train(training)
        x = random_array(shape, np.float64, seed=step, loc=step)
        dy = random_array(shape, np.float64, seed=10 + step)
        tx = _t(x).requires_grad_()
        want = reference(tx)
        want.backward(_t(dy))
        assert rel_error(layer(x), want.detach().numpy()) < 2e-6
        assert rel_error(layer.backward(dy), tx.grad.numpy()) < 2e-6
        if layer.weight is not None:
            assert rel_error(layer.grad_weight, reference.weight.grad.numpy()) < 2e-6
            reference.weight.grad = None
        if getattr(reference, "bias", None) is not None:
            reference.bias.grad = None
        for name, value in reference.state_dict().items():
            np.testing.assert_allclose(getattr(layer, name), value.numpy(), rtol=2e-6, err_msg=name)


def test_layer_channel_mismatch_changes_nothing():
    layer = abn.InstanceNorm(4, track_running_stats=True)
    with pytest.raises(ValueError, match="x has 3 channels on axis 1, but this layer has 4"):
        layer(random_array((2, 3, 4, 4)))
    np.testing.assert_array_equal(layer.running_mean, 0)


# name: (function, backward, x shape, positional arguments, keyword arguments)
FAMILY_CASES = {
    "layer": (abn.layer_norm, abn.layer_norm_backward, (6, 5, 12), ((5, 12),), {}),
    "rms": (abn.rms_norm, abn.rms_norm_backward, (6, 5, 12), ((12,),), {}),
    "group": (abn.group_norm, abn.group_norm_backward, (3, 8, 5, 6), (4,), {}),
    "group-NHWC": (abn.group_norm, abn.group_norm_backward, (3, 5, 6, 8), (2,), {"axis": -1}),
    "instance": (abn.instance_norm, abn.instance_norm_backward, (3, 4, 5, 6), (), {}),
    "instance-NHWC": (abn.instance_norm, abn.instance_norm_backward, (3, 5, 6, 4), (), {"axis": -1}),
    # rows longer than a warp's share on the GPU (row_norm.WARP_ROW_MAX): a block per row
    "layer-long-rows": (abn.layer_norm, abn.layer_norm_backward, (3, 1500), ((1500,),), {}),
    "group-NHWC-long-rows": (abn.group_norm, abn.group_norm_backward, (2, 30, 40, 4), (2,), {"axis": -1}),
}


def _family_outputs(name, dtype, on, backend):
    """Forward (y and statistics) and backward of case ``name`` on ``backend``, as NumPy arrays."""
    function, backward, shape, args, kwargs = FAMILY_CASES[name]
    x = random_array(shape, np.float64, loc=2.0, scale=3.0).astype(dtype)
    dy = random_array(shape, np.float64, seed=1).astype(dtype)
    size = args[0] if function in (abn.layer_norm, abn.rms_norm) else (x.shape[kwargs.get("axis", 1)],)
    weight = np.random.default_rng(2).uniform(0.5, 1.5, size).astype(dtype)
    y, stats = function(on.put(x), *args, weight=on.put(weight), **kwargs, return_stats=True, backend=backend)
    grads = backward(on.put(dy), on.put(x), stats, *args, on.put(weight), **kwargs, backend=backend)
    return [on.get(a) for a in (y, stats.invstd, *grads)] + ([] if stats.mean is None else [on.get(stats.mean)])


@pytest.mark.parametrize("name", list(FAMILY_CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
def test_every_backend_matches_the_reference_on_every_dtype(any_backend, on, name, dtype):
    got = _family_outputs(name, dtype, on, any_backend)
    want = _family_outputs(name, np.float64, ArraysOn("numpy"), "numpy")
    tol = {np.float16: 2e-3, ml_dtypes.bfloat16: 1e-2, np.float32: 2e-5, np.float64: 1e-10}[dtype]
    for a, b in zip(got, want):
        # the reference ran on x rounded to dtype only through float64, so the input rounding counts too
        assert rel_error(a, b) <= tol + 4 * rel_error(b.astype(dtype), b) + (0 if dtype in (np.float32, np.float64) else 2 * tol)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(FAMILY_CASES))
def test_cuda_kernels_with_tiny_blocks_are_bitwise_repeatable_and_match(tiny_blocks, name):
    on = ArraysOn("cupy")
    first = _family_outputs(name, np.float32, on, "cupy")
    again = _family_outputs(name, np.float32, on, "cupy")
    want = _family_outputs(name, np.float64, ArraysOn("numpy"), "numpy")
    for a, b, c in zip(first, again, want):
        assert a.tobytes() == b.tobytes()
        assert rel_error(a, c) < 2e-5


@pytest.mark.gpu
def test_cuda_instance_norm_with_running_stats_matches_the_reference(gpu):
    on = ArraysOn("cupy")
    x = random_array((3, 4, 5, 6), np.float32, loc=1.0)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    rm_gpu, rv_gpu = on.put(rm.copy()), on.put(rv.copy())
    y = abn.instance_norm(on.put(x), rm_gpu, rv_gpu, momentum=0.3, backend="cupy")
    want = abn.instance_norm(x, rm, rv, momentum=0.3, backend="numpy")
    assert rel_error(on.get(y), want) < 2e-5
    assert rel_error(on.get(rm_gpu), rm) < 2e-6 and rel_error(on.get(rv_gpu), rv) < 2e-6
    dy = random_array((3, 4, 5, 6), np.float32, seed=1)
    weight = np.random.default_rng(2).uniform(0.5, 1.5, 4).astype(np.float32)
    y, stats = abn.instance_norm(on.put(x), rm_gpu, rv_gpu, on.put(weight), use_input_stats=False, return_stats=True)
    grads = abn.instance_norm_backward(on.put(dy), on.put(x), stats, on.put(weight), use_input_stats=False)
    _, want_stats = abn.instance_norm(x, rm, rv, weight, use_input_stats=False, return_stats=True, backend="numpy")
    want = abn.instance_norm_backward(dy, x, want_stats, weight, use_input_stats=False, backend="numpy")
    for a, b in zip(grads, want):
        assert rel_error(on.get(a), b) < 2e-5


@pytest.mark.gpu
def test_every_row_norm_kernel_instantiation_is_launched(tiny_blocks):
    from cudaemu import runtime

    runtime.launched.clear()
    on = ArraysOn("cupy")
    for dtype in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
        for name in FAMILY_CASES:
            _family_outputs(name, dtype, on, "cupy")
        for shape in ((2, 3, 4, 4), (2, 3, 40, 40)):  # rows for a warp, and for a block
            x = on.put(random_array(shape).astype(dtype))
            _, stats = abn.instance_norm(x, return_stats=True)
            abn.instance_norm_backward(x, x, stats, use_input_stats=False)
    from accelbn.backends.cuda import row_norm

    expected = {name for names in row_norm.compile_units().values() for name in names}
    assert sorted(expected - runtime.launched) == []


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["group", "group-NHWC", "layer"])
def test_cuda_row_norm_is_bitwise_identical_under_every_schedule(tiny_blocks, name):
    from cudaemu import schedule

    on = ArraysOn("cupy")
    results = []
    for schedule_name, seed in [("forward", 0), ("reverse", 0), ("random", 1), ("warp-ahead-high", 0)]:
        with schedule(schedule_name, seed):
            results.append(_family_outputs(name, np.float32, on, "cupy"))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    "shape, call, backward",
    [
        ((0, 8), lambda x, **k: abn.layer_norm(x, 8, **k), lambda dy, x, s: abn.layer_norm_backward(dy, x, s, 8)),
        ((2, 0, 3), lambda x, **k: abn.layer_norm(x, 3, **k), lambda dy, x, s: abn.layer_norm_backward(dy, x, s, 3)),
        ((0, 4, 3), lambda x, **k: abn.group_norm(x, 2, **k), lambda dy, x, s: abn.group_norm_backward(dy, x, s, 2)),
        ((2, 4, 0), lambda x, **k: abn.group_norm(x, 2, **k), lambda dy, x, s: abn.group_norm_backward(dy, x, s, 2)),
        ((0, 4, 3), lambda x, **k: abn.instance_norm(x, **k), lambda dy, x, s: abn.instance_norm_backward(dy, x, s)),
    ],
    ids=["no-rows", "no-rows-3d", "no-samples", "no-positions", "instance-no-samples"],
)
def test_empty_inputs_give_empty_outputs_and_zero_gradients_as_torch(shape, call, backward):
    x = np.zeros(shape, np.float32)
    y, stats = call(x, return_stats=True)
    dx, dweight, dbias = backward(x, x, stats)
    assert y.shape == dx.shape == shape
    np.testing.assert_array_equal(dweight, 0)
    np.testing.assert_array_equal(dbias, 0)


# (name, text in row_norm.cu, its replacement): each must make the check below fail.
ROW_NORM_MUTANTS = [
    ("warp_reduce skipping a level",
     "for (int offset = 16; offset > 0; offset /= 2) value = combine(value, shuffle_down(value, offset));\n    return value;",
     "for (int offset = 8; offset > 0; offset /= 2) value = combine(value, shuffle_down(value, offset));\n    return value;"),
    ("the block path reading a row's statistics before they are written",
     "            var[r] = row_var;\n        }\n        __syncthreads();\n",
     "            var[r] = row_var;\n        }\n"),
    ("a parameter's gradient one sample short", "for (index_t n = 0; n < samples; ++n) {", "for (index_t n = 1; n < samples; ++n) {"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name, original, replacement", ROW_NORM_MUTANTS, ids=[m[0] for m in ROW_NORM_MUTANTS])
def test_a_planted_bug_in_the_row_norm_kernels_is_caught(tiny_blocks, monkeypatch, tmp_path, name, original, replacement):
    from cudaemu import KernelError, schedule

    cuda = tiny_blocks
    source = cuda.row_norm.SOURCE.read_text()
    assert source.count(original) == 1, "the mutation no longer matches row_norm.cu"
    mutated = tmp_path / "row_norm.cu"
    mutated.write_text(source.replace(original, replacement))
    monkeypatch.setattr(cuda.row_norm, "SOURCE", mutated)
    monkeypatch.setattr(cuda.launcher, "BLOCK", 64)
    on = ArraysOn("cupy")
    caught = []
    for case in ("layer", "layer-long-rows", "group"):
        want = _family_outputs(case, np.float64, ArraysOn("numpy"), "numpy")
        for schedule_name in ("forward", "reverse"):
            try:
                with schedule(schedule_name):
                    got = _family_outputs(case, np.float32, on, "cupy")
            except KernelError as e:
                caught.append(f"KernelError: {e}")
                continue
            errors = [rel_error(a, b) for a, b in zip(got, want)]
            if not max(errors) < 2e-5:
                caught.append(f"{case} under {schedule_name}: relative error {max(errors):.1e}")
    assert caught, f"{name}: no test noticed"
