"""fold_batch_norm against torch.nn.utils.fusion and against running the layer and the batch norm."""

import numpy as np
import pytest
import torch
from support import random_array, rel_error
from torch.nn.utils import fusion

import accelbn as abn


def _bn_state(channels, seed=0):
    rng = np.random.default_rng(seed)
    return {"running_mean": rng.standard_normal(channels), "running_var": rng.uniform(0.5, 2, channels),
            "weight": rng.uniform(0.5, 1.5, channels), "bias": rng.standard_normal(channels)}


def _t(a):
    return None if a is None else torch.from_numpy(np.asarray(a))


@pytest.mark.parametrize("kernel", [(3,), (3, 3), (2, 3, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_matches_torch_fusion(kernel, groups, with_bias):
    weight = random_array((6, 4 // groups, *kernel), np.float64)
    bias = random_array(6, np.float64, seed=1) if with_bias else None
    state = _bn_state(6)
    got = abn.fold_batch_norm(weight, bias, state, eps=1e-3)
    want = fusion.fuse_conv_bn_weights(_t(weight), _t(bias), *(_t(state[k]) for k in ("running_mean", "running_var")),
                                       1e-3, _t(state["weight"]), _t(state["bias"]))
    for a, b in zip(got, want):
        assert rel_error(a, b.detach().numpy()) < 1e-14


def test_linear_from_a_layer_matches_torch_fusion_and_keeps_dtypes():
    layer = abn.BatchNorm(5, eps=1e-4, dtype=np.float32)
    layer.load_state_dict({k: v.astype(np.float32) for k, v in _bn_state(5).items()} | {"num_batches_tracked": np.array(3)})
    weight, bias = random_array((5, 7)), random_array(5, seed=1)
    got = abn.fold_batch_norm(weight, bias, layer)
    want = fusion.fuse_linear_bn_weights(_t(weight), _t(bias), _t(layer.running_mean), _t(layer.running_var), 1e-4,
                                         _t(layer.weight), _t(layer.bias))
    assert got[0].dtype == got[1].dtype == np.float32
    for a, b in zip(got, want):
        assert rel_error(a, b.detach().numpy()) < 2e-7


@pytest.mark.parametrize("groups", [1, 3])
def test_transposed_conv_folded_gives_the_outputs_of_conv_then_batch_norm(groups):
    conv = torch.nn.ConvTranspose2d(6, 9, 3, groups=groups, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(9, dtype=torch.float64).eval()
    with torch.no_grad():
        for name, value in _bn_state(9).items():
            getattr(bn, name).copy_(torch.from_numpy(value))
    x = torch.from_numpy(random_array((2, 6, 5, 5), np.float64))
    weight, bias = abn.fold_batch_norm(conv.weight.detach().numpy(), conv.bias.detach().numpy(), bn.state_dict(),
                                       transpose=True, groups=groups)
    folded = torch.nn.functional.conv_transpose2d(x, torch.from_numpy(weight), torch.from_numpy(bias), groups=groups)
    assert rel_error(folded.detach().numpy(), bn(conv(x)).detach().numpy()) < 1e-13


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda w: abn.fold_batch_norm(w, None, _bn_state(5)), ValueError, "bn has 5 channels but the layer has 6 outputs"),
        (lambda w: abn.fold_batch_norm(w, None, {"running_var": np.ones(6)}), KeyError, "missing"),
        (lambda w: abn.fold_batch_norm(w, None, abn.BatchNorm(6, track_running_stats=False)), ValueError, "nothing to fold"),
        (lambda w: abn.fold_batch_norm(w, np.zeros(5), _bn_state(6)), ValueError, r"bias must have shape \(6,\)"),
        (lambda w: abn.fold_batch_norm(w[:, 0, 0, 0], None, _bn_state(6)), ValueError, "at least 2 dimensions"),
        (lambda w: abn.fold_batch_norm(w, None, [1, 2]), TypeError, "bn must be a BatchNorm or its state dict"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call(random_array((6, 4, 3, 3)))


@pytest.mark.gpu
def test_cupy_weights_fold_on_the_device_as_numpy_ones(gpu):
    weight, bias, state = random_array((6, 2, 3, 3)), random_array(6, seed=1), _bn_state(6)
    got = abn.fold_batch_norm(gpu.asarray(weight), gpu.asarray(bias), {k: gpu.asarray(v) for k, v in state.items()},
                              groups=2)
    want = abn.fold_batch_norm(weight, bias, state, groups=2)
    for a, b in zip(got, want):
        assert a.get().tobytes() == b.tobytes()
