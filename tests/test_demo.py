"""``python -m accelbn demo``: the NumPy CNN's gradients against PyTorch autograd, the experiment's
finding on digits with fixed seeds, and the command's output (table, JSON, plots, CIFAR-10 loader)."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import GPU_DEVICE

from accelbn._cli.demo import data, experiments
from accelbn._cli.demo.cnn import CNN, BatchNormLayer, Conv3x3, Linear, softmax_cross_entropy


def _torch_loss(model, x, labels):
    """The same network in PyTorch, on the same parameters (float64); returns the loss and the
    parameter tensors, layer by layer, in the order of ``model.layers``."""
    params, h = [], torch.from_numpy(x.astype(np.float64))
    for layer in model.layers:
        tensors = {k: torch.from_numpy(np.asarray(v, np.float64)).requires_grad_() for k, v in layer.params.items()}
        params.append(tensors)
        if isinstance(layer, Conv3x3):
            h = F.conv2d(h, tensors["weight"], tensors.get("bias"), padding=1)
        elif isinstance(layer, BatchNormLayer):
            h = F.batch_norm(h, None, None, tensors["weight"], tensors["bias"], training=True, eps=layer.bn.eps)
        elif isinstance(layer, Linear):
            h = h.reshape(h.shape[0], -1) @ tensors["weight"].T + tensors["bias"]
        elif type(layer).__name__ == "ReLU":
            h = torch.relu(h)
        else:
            h = F.max_pool2d(h, 2)
    loss = F.cross_entropy(h, torch.from_numpy(labels))
    loss.backward()
    return float(loss.detach()), params


@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "none"])
def test_cnn_gradients_match_torch_autograd(batch_norm):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 10, 6)
    model = CNN(3, 1, 8, batch_norm=batch_norm)
    loss, grad = softmax_cross_entropy(np, model.forward(x, training=True), labels)
    model.backward(grad)
    want_loss, want = _torch_loss(model, x, labels)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for layer, tensors in zip(model.layers, want):
        for name, tensor in tensors.items():
            np.testing.assert_allclose(layer.grads[name], tensor.grad.numpy(), rtol=2e-4, atol=1e-5, err_msg=name)


def test_sgd_step_is_pytorchs():
    model = CNN(0, 1, 8, batch_norm=False)
    linear = model.layers[-1]
    weight = torch.from_numpy(linear.params["weight"].astype(np.float64)).requires_grad_()
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(3):
        gradient = np.full(linear.params["weight"].shape, 0.01 * (step + 1), np.float32)
        for layer in model.layers:
            layer.grads = {k: np.zeros_like(v) for k, v in layer.params.items()}
        linear.grads["weight"] = gradient
        model.sgd_step(0.1)
        weight.grad = torch.from_numpy(gradient.astype(np.float64))
        optimizer.step()
    np.testing.assert_allclose(linear.params["weight"], weight.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_on_digits_batch_norm_trains_where_the_unnormalized_net_does_not():
    # What digits shows (measured, fixed seeds): at the article's largest rate, 0.1, both nets train;
    # at 0.5 the net without normalization does not, the one with batch norm does.
    settings = experiments.Settings(epochs=6, seeds=(0, 1), learning_rates=(0.1, 0.5))
    final = {(h.batch_norm, h.lr, h.seed): h.val_accuracy[-1] for h in experiments.lr_sweep(data.digits(), settings)}
    for seed in settings.seeds:
        assert final[True, 0.1, seed] > 0.95 and final[False, 0.1, seed] > 0.95
        assert final[True, 0.5, seed] > 0.85
        assert final[False, 0.5, seed] < 0.6


def _demo(tmp_path, *args):
    result = subprocess.run([sys.executable, "-m", "accelbn", "demo", "--out", str(tmp_path), *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_demo_prints_the_table_and_writes_the_plots(tmp_path):
    out = _demo(tmp_path, "--quick", "--experiment", "lr", "--epochs", "1")
    assert "| batch norm | 0.5 |" in out and "| no normalization | 0.01 |" in out
    for name in ("summary.md", "results.json", "learning_curves.png", "gradient_norms.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "summary.md").read_text().strip() in out


def test_demo_json_has_each_experiment(tmp_path):
    results = json.loads(_demo(tmp_path, "--json", "--epochs", "1", "--seeds", "1", "--experiment", "momentum",
                               "--experiment", "batch1"))
    assert [r["keras_momentum"] for r in results["momentum"]] == [0.9, 0.99, 0.5]
    assert [r["accelbn_momentum"] for r in results["momentum"]] == [0.1, 0.01, 0.5]
    probes = results["batch_of_one"]
    assert probes["training a BN on flat features with a batch of 1"].startswith(
        "ValueError: Expected more than 1 value per channel when training")
    assert probes["eval, batches of 1"] == probes["eval, batches of 256"]  # eval does not depend on the batch
    assert "lr_sweep" not in results


def test_cifar10_is_read_from_its_python_batches(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 20))}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    dataset = data.cifar10(tmp_path)
    assert dataset.train_x.shape == (100, 3, 32, 32) and dataset.val_x.shape == (20, 3, 32, 32)
    first = pickle.loads((tmp_path / "data_batch_1").read_bytes())[b"data"][0].reshape(3, 32, 32) / 255.0
    want = (first - data.CIFAR10_MEAN[:, None, None]) / data.CIFAR10_STD[:, None, None]
    np.testing.assert_allclose(dataset.train_x[0], want, rtol=1e-6, atol=1e-6)  # float32 arithmetic
    out = _demo(tmp_path / "out", "--data", "cifar10", "--path", str(tmp_path), "--epochs", "1", "--seeds", "1",
                "--experiment", "lr")
    assert "cifar10" in out


def test_cifar10_without_its_files_says_what_is_missing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "accelbn", "demo", "--data", "cifar10", "--path", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "missing" in result.stderr and "data_batch_1" in result.stderr


def test_the_cnn_trains_on_cupy_arrays_as_on_numpy_arrays(emulated_cupy):
    # On the CUDA-on-CPU harness without a GPU: the CNN's arrays are (stand-in) CuPy arrays and its
    # BatchNorm layers run the CUDA kernels; the training curve matches the NumPy run's.
    digits = data.digits()
    small = data.Dataset("digits", digits.train_x[:192], digits.train_y[:192], digits.val_x[:64], digits.val_y[:64])
    settings = experiments.Settings(epochs=2, seeds=(0,), learning_rates=(0.1,))
    _, on_numpy = experiments.train(small, settings, batch_norm=True, lr=0.1, seed=0)
    model, on_cupy = experiments.train(small, settings, batch_norm=True, lr=0.1, seed=0, xp=emulated_cupy)
    assert isinstance(model.layers[1].bn.running_mean, emulated_cupy.ndarray)
    np.testing.assert_allclose(on_cupy.loss, on_numpy.loss, rtol=1e-4)
    assert on_cupy.val_accuracy == on_numpy.val_accuracy


@pytest.mark.skipif(GPU_DEVICE, reason="CuPy sees a device here")
def test_backend_cupy_without_a_device_says_why(tmp_path):
    result = subprocess.run([sys.executable, "-m", "accelbn", "demo", "--backend", "cupy", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--backend cupy: backend 'cupy' is not available" in result.stderr
