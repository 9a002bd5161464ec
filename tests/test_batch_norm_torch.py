"""The contract: PyTorch's semantics. Each backend (the reference included) against PyTorch CPU."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import oracle
from support import random_array, rel_error

import accelbn as abn

torch.use_deterministic_algorithms(True)

SHAPES = [(16, 5), (4, 3, 7), (4, 3, 5, 6), (2, 3, 3, 4, 5)]


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_forward_and_running_stats(backend, shape, dtype, training):
    c = shape[1]
    x = random_array(shape, dtype, loc=0.5, scale=2.0)
    weight, bias = random_array(c, dtype, seed=1), random_array(c, dtype, seed=2)
    rm, rv = random_array(c, dtype, seed=3), np.abs(random_array(c, dtype, seed=4)) + 0.5
    trm, trv = _t(rm.copy()), _t(rv.copy())  # torch updates its own buffers, accelbn rm and rv
    expected = F.batch_norm(_t(x), trm, trv, _t(weight), _t(bias), training, 0.3, 1e-4)
    y = abn.batch_norm(x, rm, rv, weight, bias, training, 0.3, 1e-4, backend=backend)
    tol = 2e-5 if dtype == np.float32 else 1e-10
    assert rel_error(y, expected.numpy()) < tol
    assert rel_error(rm, trm.numpy()) < tol
    assert rel_error(rv, trv.numpy()) < tol


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_backward_matches_autograd(backend, shape, training):
    c = shape[1]
    x = random_array(shape, np.float64, loc=-1.0, scale=3.0)
    weight, bias = random_array(c, np.float64, seed=1), random_array(c, np.float64, seed=2)
    rm, rv = random_array(c, np.float64, seed=3), np.abs(random_array(c, np.float64, seed=4)) + 0.5
    dy = random_array(shape, np.float64, seed=5)

    tx, tw, tb = (_t(a).requires_grad_() for a in (x, weight, bias))
    F.batch_norm(tx, _t(rm), _t(rv), tw, tb, training, 0.1, 1e-5).backward(_t(dy))

    _, stats = abn.batch_norm(x, rm.copy(), rv.copy(), weight, bias, training, return_stats=True, backend=backend)
    dx, dweight, dbias = abn.batch_norm_backward(dy, x, stats, weight, training=training, backend=backend)
    assert rel_error(dx, tx.grad.numpy()) < 1e-10
    assert rel_error(dweight, tw.grad.numpy()) < 1e-10
    assert rel_error(dbias, tb.grad.numpy()) < 1e-10


def test_saved_stats_equal_native_batch_norm(backend):
    x = random_array((8, 4, 5, 5), np.float32, loc=3.0)
    _, save_mean, save_invstd = torch.native_batch_norm(_t(x), None, None, None, None, True, 0.1, 1e-5)
    _, stats = abn.batch_norm(x, None, None, training=True, return_stats=True, backend=backend)
    assert rel_error(stats.mean, save_mean.numpy()) < 1e-6
    assert rel_error(stats.invstd, save_invstd.numpy()) < 1e-6


def test_channels_last_axis_matches_torch_channels_last(backend):
    nhwc = random_array((4, 5, 6, 3))
    expected = F.batch_norm(_t(nhwc).permute(0, 3, 1, 2), None, None, training=True).permute(0, 2, 3, 1)
    assert rel_error(abn.batch_norm(nhwc, None, None, training=True, axis=-1, backend=backend), expected.numpy()) < 2e-5


def _run_both(layer, module, batches, training_flags):
    for x, training in zip(batches, training_flags):
        layer.train(training)
        module.train(training)
        y = layer(x)
        expected = module(_t(x)).detach().numpy()
        assert rel_error(y, expected) < 2e-5
        for name, value in module.state_dict().items():
            np.testing.assert_allclose(getattr(layer, name), value.numpy(), rtol=2e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"momentum": None},
        {"momentum": 0.5, "eps": 1e-3},
        {"track_running_stats": False},
        {"affine": False},
        {"affine": False, "track_running_stats": False, "momentum": None},
        {"bias": False},
        {"affine": False, "bias": False},
    ],
    ids=["default", "cumulative", "momentum-eps", "no-running-stats", "no-affine", "bare", "no-bias", "no-affine-no-bias"],
)
def test_layer_matches_batchnorm2d_over_train_and_eval_steps(backend, kwargs):
    layer = abn.BatchNorm(3, **kwargs, backend=backend)
    module = torch.nn.BatchNorm2d(3, **kwargs)
    assert list(layer.state_dict()) == list(module.state_dict())
    if layer.affine:
        layer.weight[:] = [0.5, 1.0, 2.0]
        with torch.no_grad():
            module.weight.copy_(_t(layer.weight))
    if layer.bias is not None:
        layer.bias[:] = [0.1, -0.2, 0.3]
        with torch.no_grad():
            module.bias.copy_(_t(layer.bias))
    assert (layer.bias is None) == (module.bias is None)
    batches = [random_array((4, 3, 5, 5), seed=s, loc=s, scale=1 + s) for s in range(5)]
    _run_both(layer, module, batches, [True, True, False, True, False])


def test_batchnorm2d_checkpoint_loads_and_gives_the_same_outputs(backend):
    module = torch.nn.BatchNorm2d(4, momentum=0.2)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-1, 1)
    for s in range(3):
        module(_t(random_array((6, 4, 3, 3), seed=s, loc=s)))
    module.eval()
    layer = abn.BatchNorm(4, momentum=0.2)
    layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})
    layer.eval()
    x = random_array((5, 4, 3, 3), seed=9)
    y = abn.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, backend=backend)
    assert rel_error(y, module(_t(x)).detach().numpy()) < 2e-5
    assert int(layer.num_batches_tracked) == 3


def test_tensors_load_directly_and_state_dict_round_trips_into_torch():
    module = torch.nn.BatchNorm1d(5)
    module(torch.randn(8, 5))
    layer = abn.BatchNorm(5)
    layer.load_state_dict(module.state_dict())  # CPU tensors convert through __array__
    layer.load_state_dict(module.state_dict(keep_vars=True))  # parameters that require grad
    other = torch.nn.BatchNorm1d(5)
    other.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    for name, value in module.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name


def test_state_dict_has_torch_keys_shapes_and_dtypes():
    expected = torch.nn.BatchNorm2d(6).state_dict()
    got = abn.BatchNorm(6).state_dict()
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].shape == tuple(value.shape), name
        assert str(got[name].dtype) == str(value.dtype).removeprefix("torch."), name


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_layer_backward_matches_autograd(bias):
    layer = abn.BatchNorm(3, dtype=np.float64, bias=bias)
    layer.weight[:] = [0.5, 1.5, -1.0]
    module = torch.nn.BatchNorm2d(3, dtype=torch.float64, bias=bias)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    x = random_array((4, 3, 5, 5), np.float64, loc=2.0)
    dy = random_array(x.shape, np.float64, seed=1)
    for training in (True, False):
        layer.train(training)
        module.train(training)
        tx = _t(x).requires_grad_()
        module.zero_grad()
        module(tx).backward(_t(dy))
        layer(x)
        assert rel_error(layer.backward(dy), tx.grad.numpy()) < 1e-10
        assert rel_error(layer.grad_weight, module.weight.grad.numpy()) < 1e-10
        if bias:
            assert rel_error(layer.grad_bias, module.bias.grad.numpy()) < 1e-10
        else:
            assert layer.grad_bias is None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_eps_is_rejected_in_training_as_torch_rejects_it(training):
    x = random_array((4, 3))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    layer, module = abn.BatchNorm(3, eps=0.0).train(training), torch.nn.BatchNorm1d(3, eps=0.0).train(training)
    if not training:
        np.testing.assert_allclose(layer(x), module(_t(x)).detach().numpy(), rtol=1e-6)
        assert rel_error(abn.batch_norm(x, rm, rv, eps=0.0), F.batch_norm(_t(x), _t(rm), _t(rv), eps=0.0).numpy()) < 2e-5
        return
    with pytest.raises(ValueError) as expected:
        module(_t(x))
    with pytest.raises(ValueError) as got:
        layer(x)
    assert str(got.value) == str(expected.value)
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_oracle_matches_torch(shape, training):
    """The tests' oracle (tests/oracle.py) is itself checked against PyTorch: forward, the updated
    running statistics (in torch's own buffers), and the gradients by autograd."""
    c = shape[1]
    x = random_array(shape, np.float64, loc=0.5, scale=2.0)
    weight, bias = random_array(c, np.float64, seed=1), random_array(c, np.float64, seed=2)
    rm, rv = random_array(c, np.float64, seed=3), np.abs(random_array(c, np.float64, seed=4)) + 0.5
    dy = random_array(shape, np.float64, seed=5)
    trm, trv = _t(rm.copy()), _t(rv.copy())
    tx, tw, tb = (_t(a).requires_grad_() for a in (x, weight, bias))
    expected = F.batch_norm(tx, trm, trv, tw, tb, training, 0.3, 1e-4)
    expected.backward(_t(dy))
    got = oracle.batch_norm(x, rm, rv, weight, bias, training, 0.3, 1e-4)
    assert rel_error(got.y, expected.detach().numpy()) < 1e-12
    assert rel_error(got.running_mean, trm.numpy()) < 1e-12
    assert rel_error(got.running_var, trv.numpy()) < 1e-12
    dx, dweight, dbias = oracle.batch_norm_backward(dy, x, got.mean, got.invstd, weight, training)
    assert rel_error(dx, tx.grad.numpy()) < 1e-10
    assert rel_error(dweight, tw.grad.numpy()) < 1e-10
    assert rel_error(dbias, tb.grad.numpy()) < 1e-10
