"""The article's experiments on the demo CNN: batch norm against none over a learning-rate sweep,
running-statistics momentum under a shift, and a batch of one."""

import math
from typing import NamedTuple

import numpy as np

import accelbn
from accelbn._cli.demo.cnn import CNN, BatchNormLayer, softmax_cross_entropy
from accelbn._cli.demo.data import swap_classes

# A run whose mean training loss exceeds this (or is not finite) has diverged; chance is ln 10 = 2.3.
DIVERGED_LOSS = 100.0


class Settings(NamedTuple):
    epochs: int
    seeds: tuple
    learning_rates: tuple
    batch_size: int = 64
    target_accuracy: float = 0.9
    momentum_lr: float = 0.05


class History(NamedTuple):
    batch_norm: bool
    lr: float
    seed: int
    loss: list  # mean training loss per epoch
    val_accuracy: list  # per epoch
    grad_norms: list  # per epoch: mean weight-gradient norm of each conv and the linear layer
    diverged: bool
    steps_to_target: int | None  # steps until validation accuracy first reached the target


def accuracy(model, x, y, xp, batch=256, training=False):
    correct = 0
    for i in range(0, len(y), batch):
        predicted = model.predict(xp.asarray(x[i : i + batch]), training)
        correct += int((predicted == xp.asarray(y[i : i + batch])).sum())
    return correct / len(y)


def train(data, settings, *, batch_norm, lr, seed, xp=np, bn_momentum=0.1, progress=None):
    """Train one model; the learning rate drops tenfold for the last quarter of the epochs."""
    model = CNN(seed, data.shape[0], data.shape[1], batch_norm=batch_norm, bn_momentum=bn_momentum, xp=xp)
    order_rng = np.random.default_rng(seed + 1)
    n = len(data.train_y)
    history = History(batch_norm, lr, seed, [], [], [], False, None)
    step, diverged, steps_to_target = 0, False, None
    for epoch in range(settings.epochs):
        rate = lr * (0.1 if epoch >= math.ceil(settings.epochs * 0.75) else 1.0)
        order = order_rng.permutation(n)
        losses, norms = [], []
        for i in range(0, n - settings.batch_size + 1, settings.batch_size):  # full batches only
            batch = order[i : i + settings.batch_size]
            logits = model.forward(xp.asarray(data.train_x[batch]), training=True)
            loss, grad = softmax_cross_entropy(xp, logits, xp.asarray(data.train_y[batch]))
            if not math.isfinite(loss) or loss > DIVERGED_LOSS:
                diverged = True
                break
            model.backward(grad)
            norms.append(model.gradient_norms())
            model.sgd_step(rate)
            losses.append(loss)
            step += 1
        if diverged:
            break
        history.loss.append(float(np.mean(losses)))
        history.grad_norms.append([float(v) for v in np.mean(norms, axis=0)])
        history.val_accuracy.append(accuracy(model, data.val_x, data.val_y, xp))
        if steps_to_target is None and history.val_accuracy[-1] >= settings.target_accuracy:
            steps_to_target = step
        if progress:
            progress()
    return model, history._replace(diverged=diverged, steps_to_target=steps_to_target)


def lr_sweep(data, settings, xp=np, progress=None):
    return [train(data, settings, batch_norm=bn, lr=lr, seed=seed, xp=xp, progress=progress)[1]
            for bn in (True, False) for lr in settings.learning_rates for seed in settings.seeds]


# The article's momenta are Keras' (running = m * running + (1 - m) * batch); accelbn follows
# PyTorch (running = (1 - m) * running + m * batch), so Keras' m is accelbn's 1 - m.
KERAS_MOMENTA = (0.9, 0.99, 0.5)


def momentum_under_shift(data, settings, xp=np, progress=None):
    """Validation accuracy with the running statistics each momentum left, on the validation set as
    it is and with classes 0 and 1 swapped in it."""
    shifted = swap_classes(data.val_y)
    rows = []
    for keras in KERAS_MOMENTA:
        accuracies, shifted_accuracies = [], []
        for seed in settings.seeds:
            model, _ = train(data, settings, batch_norm=True, lr=settings.momentum_lr, seed=seed, xp=xp,
                             bn_momentum=round(1 - keras, 6), progress=progress)
            accuracies.append(accuracy(model, data.val_x, data.val_y, xp))
            shifted_accuracies.append(accuracy(model, data.val_x, shifted, xp))
        rows.append({"keras_momentum": keras, "accelbn_momentum": round(1 - keras, 6),
                     "val_accuracy": float(np.mean(accuracies)), "shifted_val_accuracy": float(np.mean(shifted_accuracies))})
    return rows


def batch_of_one(data, settings, xp=np, progress=None):
    """What a batch of one does: in training through the conv BN layers and through a BN on flat
    features; in eval; in train mode by mistake (forgetting ``eval()``); and with stale statistics."""
    model, _ = train(data, settings, batch_norm=True, lr=settings.momentum_lr, seed=settings.seeds[0], xp=xp,
                     progress=progress)
    bns = [layer.bn for layer in model.layers if isinstance(layer, BatchNormLayer)]
    saved = [bn.state_dict() for bn in bns]
    x, y = data.val_x, data.val_y
    rows = {"eval, batches of 256": accuracy(model, x, y, xp)}
    rows["eval, batches of 1"] = accuracy(model, x, y, xp, batch=1)
    one = xp.asarray(data.train_x[:1])
    logits = model.forward(one, training=True)
    rows["a training forward on a batch of 1 (conv BN: H*W values per channel)"] = (
        f"runs: loss {softmax_cross_entropy(xp, logits, xp.asarray(data.train_y[:1]))[0]:.3f}"
    )
    try:
        features = accelbn.BatchNorm(int(np.prod(data.shape)))
        if xp is not np:
            features.to("cupy")
        features(one.reshape(1, -1))
        rows["training a BN on flat features with a batch of 1"] = "no error"
    except ValueError as e:
        rows["training a BN on flat features with a batch of 1"] = f"ValueError: {e}"
    for bn, state in zip(bns, saved):  # the training forward moved the running statistics
        bn.load_state_dict(state)
    rows["forgot eval(): train mode, batches of 1"] = accuracy(model, x, y, xp, batch=1, training=True)
    for bn in bns:  # statistics never updated, as after loading weights without buffers
        bn.running_mean[...] = 0
        bn.running_var[...] = 1
    rows["eval with stale statistics (mean 0, var 1)"] = accuracy(model, x, y, xp)
    return rows
