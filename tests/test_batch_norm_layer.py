"""The BatchNorm layer's own API: modes, buffers, state dict checks, and errors that change nothing."""

import numpy as np
import pytest
from support import random_array

import accelbn as abn


def test_defaults_and_buffers():
    layer = abn.BatchNorm(4)
    assert layer.training
    np.testing.assert_array_equal(layer.weight, 1)
    np.testing.assert_array_equal(layer.bias, 0)
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    assert layer.num_batches_tracked.shape == () and layer.num_batches_tracked.dtype == np.int64
    assert layer.weight.dtype == np.float32
    assert "BatchNorm(4" in repr(layer)


def test_train_updates_running_stats_and_eval_uses_them():
    layer = abn.BatchNorm(3)
    x = random_array((8, 3, 4, 4), loc=5.0)
    layer(x)
    layer(x)
    assert int(layer.num_batches_tracked) == 2
    # two blends with momentum 0.1: 0 -> 0.1 m -> 0.19 m, and 1 -> 0.9 + 0.1 v -> 0.81 + 0.19 v, with
    # the unbiased batch variance v
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(layer.running_mean, 0.19 * x64.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(layer.running_var, 0.81 + 0.19 * x64.var(axis=(0, 2, 3), ddof=1), rtol=1e-6)
    before = layer.state_dict()
    layer.eval()
    y = layer(x)
    for name, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[name])
    expected = abn.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias)
    np.testing.assert_array_equal(y, expected)
    assert layer.train() is layer and layer.training


def test_channels_last_layer():
    layer = abn.BatchNorm(5, axis=-1, dtype=np.float64)
    x = random_array((6, 3, 3, 5), np.float64)
    y = layer(x)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-12)


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="backward\\(\\) needs a forward pass first"):
        abn.BatchNorm(3).backward(np.ones((2, 3), np.float32))


def test_affine_false_has_no_gradients_or_parameters():
    layer = abn.BatchNorm(3, affine=False)
    x = random_array((4, 3))
    layer(x)
    layer.backward(np.ones_like(x))
    assert layer.weight is None and layer.grad_weight is None and layer.grad_bias is None
    assert list(layer.state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]


def test_wrong_channel_count_changes_nothing():
    layer = abn.BatchNorm(3, affine=False, track_running_stats=False)
    with pytest.raises(ValueError, match="x has 4 channels on axis 1, but this layer has 3"):
        layer(np.ones((2, 4), np.float32))
    tracked = abn.BatchNorm(3)
    with pytest.raises(ValueError):
        tracked(np.ones((1, 3), np.float32))  # one value per channel
    assert int(tracked.num_batches_tracked) == 0
    np.testing.assert_array_equal(tracked.running_var, 1)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_features": 0}, ValueError, "num_features must be a positive int"),
        ({"num_features": 2.5}, ValueError, "num_features must be a positive int"),
        ({"eps": -1.0}, ValueError, "eps must be a finite number"),
        ({"momentum": "fast"}, TypeError, "momentum must be a real number"),
        ({"affine": 1}, TypeError, "affine must be a bool"),
        ({"bias": "no"}, TypeError, "bias must be a bool"),
        ({"affine": False, "bias": 0}, TypeError, "bias must be a bool"),
        ({"dtype": np.int32}, TypeError, "dtype must be float16, bfloat16, float32 or float64"),
        ({"axis": "last"}, TypeError, "axis must be an int"),
    ],
)
def test_constructor_rejects(kwargs, error, message):
    with pytest.raises(error, match=message):
        abn.BatchNorm(**({"num_features": 3} | kwargs))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda d: d.pop("running_var"), KeyError, "missing \\['running_var'\\]"),
        (lambda d: d.update(extra=np.zeros(3)), KeyError, "unexpected \\['extra'\\]"),
        (lambda d: d.update(bias=np.zeros(4, np.float32)), ValueError, "state_dict\\['bias'\\] must have shape \\(3,\\)"),
        (lambda d: d.update(running_mean=np.zeros(3, np.int64)), TypeError, "must be a float array"),
        (lambda d: d.update(num_batches_tracked=np.float32(2)), TypeError, "must be a integer array|must be an integer"),
    ],
)
def test_load_state_dict_checks_everything_before_writing(change, error, message):
    layer = abn.BatchNorm(3)
    state = {k: v + 7 for k, v in layer.state_dict().items()}
    change(state)
    before = layer.state_dict()
    with pytest.raises(error, match=message):
        layer.load_state_dict(state)
    for name, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def test_load_state_dict_non_strict_skips_missing_and_unexpected():
    layer = abn.BatchNorm(3)
    layer.load_state_dict({"weight": np.full(3, 2.0), "extra": np.zeros(1)}, strict=False)
    np.testing.assert_array_equal(layer.weight, 2)
    assert layer.weight.dtype == np.float32


def test_state_dict_returns_copies():
    layer = abn.BatchNorm(3)
    layer.state_dict()["weight"][:] = 5
    np.testing.assert_array_equal(layer.weight, 1)


def test_to_rejects_an_unknown_library_and_keeps_numpy_arrays():
    layer = abn.BatchNorm(3)
    weight = layer.weight
    with pytest.raises(ValueError, match=r"library must be one of \['numpy', 'cupy'\], got 'gpu'"):
        layer.to("gpu")
    assert layer.to("numpy") is layer and layer.weight is weight and layer.library == "numpy"


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_layer_backend_runs_every_call_on_that_backend(backend):
    x = random_array((6, 3, 4, 4), loc=2.0)
    dy = random_array((6, 3, 4, 4), seed=1)
    layer = abn.BatchNorm(3, backend=backend)
    y, dx = layer(x), layer.backward(dy)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    want_y, stats = abn.batch_norm(x, rm, rv, layer.weight, layer.bias, True, return_stats=True, backend=backend)
    want_dx, want_dweight, _ = abn.batch_norm_backward(dy, x, stats, layer.weight, backend=backend)
    assert y.tobytes() == want_y.tobytes() and dx.tobytes() == want_dx.tobytes()
    assert layer.grad_weight.tobytes() == want_dweight.tobytes()
    assert layer.running_mean.tobytes() == rm.tobytes() and layer.running_var.tobytes() == rv.tobytes()
    assert repr(layer).endswith(f", backend={backend!r})")


def test_layer_backend_is_checked_when_built_and_when_called():
    with pytest.raises(ValueError, match=r"backend must be one of \['cupy', 'numba', 'numpy'\] or None, got 'tpu'"):
        abn.BatchNorm(3, backend="tpu")
    layer = abn.BatchNorm(3, backend="cupy")
    with pytest.raises(TypeError, match="backend 'cupy' runs on cupy arrays, but x is a numpy array"):
        layer(random_array((4, 3)))
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_mean, 0)


def _torchvision_frozen_batch_norm(x, state, eps):
    """torchvision.ops.FrozenBatchNorm2d.forward, written out (torchvision is not a test dependency)."""
    scale = state["weight"] * (state["running_var"] + eps) ** -0.5
    shift = state["bias"] - state["running_mean"] * scale
    return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def test_frozen_batch_norm_loads_torchvision_state_and_never_updates():
    rng = np.random.default_rng(0)
    state = {"weight": rng.uniform(0.5, 1.5, 4), "bias": rng.standard_normal(4),
             "running_mean": rng.standard_normal(4), "running_var": rng.uniform(0.5, 2, 4)}
    layer = abn.FrozenBatchNorm(4, dtype=np.float64)
    assert list(layer.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    layer.load_state_dict(state)
    x = random_array((3, 4, 5, 5), np.float64, loc=2.0)
    dy = random_array((3, 4, 5, 5), np.float64, seed=1)
    for training in (True, False):
        layer.train(training)
        y = layer(x)
        np.testing.assert_allclose(y, _torchvision_frozen_batch_norm(x, state, 1e-5), rtol=1e-12, atol=1e-12)
        dx = layer.backward(dy)
        np.testing.assert_allclose(dx, dy * (state["weight"] / np.sqrt(state["running_var"] + 1e-5)).reshape(1, -1, 1, 1),
                                   rtol=1e-12)
        xhat = (x - state["running_mean"].reshape(1, -1, 1, 1)) / np.sqrt(state["running_var"] + 1e-5).reshape(1, -1, 1, 1)
        np.testing.assert_allclose(layer.grad_weight, (dy * xhat).sum(axis=(0, 2, 3)), rtol=1e-12)
        for name, value in state.items():
            np.testing.assert_array_equal(getattr(layer, name), value)  # nothing updated
    with pytest.raises(ValueError, match="x has 3 channels on axis 1, but this layer has 4"):
        layer(random_array((2, 3, 4, 4)))
