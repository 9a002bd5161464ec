"""A small CNN in plain array code (NumPy or CuPy), with or without ``accelbn.BatchNorm`` after each
convolution: conv 3x3 -> [BN] -> ReLU -> max-pool 2x2, twice, then a linear layer and softmax
cross-entropy, trained by SGD with momentum, weight decay and a step learning-rate schedule.

Every layer is written out with its backward pass (the tests check them against PyTorch autograd).
A convolution is 9 shifted views of the padded input multiplied by the kernel's taps, so the same
code runs on NumPy and CuPy arrays.
"""

import math

import numpy as np

import accelbn


def _he(rng, shape, fan_in):
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)


class Conv3x3:
    """3x3 convolution, stride 1, zero padding 1: (N, C, H, W) -> (N, F, H, W)."""

    def __init__(self, rng, xp, channels, filters, bias):
        self.params = {"weight": xp.asarray(_he(rng, (filters, channels, 3, 3), channels * 9))}
        if bias:
            self.params["bias"] = xp.zeros(filters, np.float32)
        self.xp = xp

    def __call__(self, x, training=True):
        xp = self.xp
        n, c, h, w = x.shape
        self.padded = xp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        weight = self.params["weight"]
        y = xp.zeros((n, weight.shape[0], h, w), np.float32)
        for i in range(3):
            for j in range(3):
                tap = self.padded[:, :, i : i + h, j : j + w]  # (N, C, H, W)
                y += xp.einsum("nchw,fc->nfhw", tap, weight[:, :, i, j])
        if "bias" in self.params:
            y += self.params["bias"][None, :, None, None]
        return y

    def backward(self, dy):
        xp = self.xp
        h, w = dy.shape[2:]
        weight = self.params["weight"]
        dpadded = xp.zeros_like(self.padded)
        self.grads = {"weight": xp.zeros_like(weight)}
        for i in range(3):
            for j in range(3):
                tap = self.padded[:, :, i : i + h, j : j + w]
                self.grads["weight"][:, :, i, j] = xp.einsum("nfhw,nchw->fc", dy, tap)
                dpadded[:, :, i : i + h, j : j + w] += xp.einsum("nfhw,fc->nchw", dy, weight[:, :, i, j])
        if "bias" in self.params:
            self.grads["bias"] = dy.sum(axis=(0, 2, 3))
        return dpadded[:, :, 1:-1, 1:-1]


class BatchNormLayer:
    """``accelbn.BatchNorm`` as a layer of this network (parameters and gradients by name)."""

    def __init__(self, xp, channels, momentum):
        self.bn = accelbn.BatchNorm(channels, momentum=momentum)
        if xp is not np:
            self.bn.to("cupy")
        self.params = {"weight": self.bn.weight, "bias": self.bn.bias}

    def __call__(self, x, training=True):
        self.bn.train(training)
        return self.bn(x)

    def backward(self, dy):
        dx = self.bn.backward(dy)
        self.grads = {"weight": self.bn.grad_weight, "bias": self.bn.grad_bias}
        return dx


class ReLU:
    params = {}

    def __call__(self, x, training=True):
        self.positive = x > 0
        return x * self.positive

    def backward(self, dy):
        self.grads = {}
        return dy * self.positive


class MaxPool2:
    """2x2 max pooling, stride 2 (H and W even); the gradient goes to the first maximum."""

    params = {}

    def __init__(self, xp):
        self.xp = xp

    def __call__(self, x, training=True):
        n, c, h, w = x.shape
        windows = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
        self.shape = x.shape
        self.argmax = windows.argmax(axis=-1)
        return windows.max(axis=-1)

    def backward(self, dy):
        xp = self.xp
        n, c, h, w = self.shape
        windows = (xp.arange(4) == self.argmax[..., None]) * dy[..., None]
        self.grads = {}
        return windows.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


class Linear:
    def __init__(self, rng, xp, inputs, outputs):
        self.params = {"weight": xp.asarray(_he(rng, (outputs, inputs), inputs)), "bias": xp.zeros(outputs, np.float32)}

    def __call__(self, x, training=True):
        self.shape = x.shape
        self.x = x.reshape(x.shape[0], -1)
        return self.x @ self.params["weight"].T + self.params["bias"]

    def backward(self, dy):
        self.grads = {"weight": dy.T @ self.x, "bias": dy.sum(axis=0)}
        return (dy @ self.params["weight"]).reshape(self.shape)


def softmax_cross_entropy(xp, logits, labels):
    """Mean cross-entropy of ``logits`` (N, K) against integer ``labels``, and its gradient."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -log_p[xp.arange(n), labels].mean()
    grad = xp.exp(log_p)
    grad[xp.arange(n), labels] -= 1
    return float(loss), grad / n


class CNN:
    """The network; ``batch_norm=False`` builds it without batch norm (the convolutions then get
    biases). ``bn_momentum`` is BatchNorm's (PyTorch's convention)."""

    def __init__(self, seed, in_channels, size, classes=10, batch_norm=True, bn_momentum=0.1, xp=np):
        rng = np.random.default_rng(seed)
        self.xp = xp
        self.layers = []
        channels = in_channels
        for filters in (8, 16):
            self.layers.append(Conv3x3(rng, xp, channels, filters, bias=not batch_norm))
            if batch_norm:
                self.layers.append(BatchNormLayer(xp, filters, bn_momentum))
            self.layers += [ReLU(), MaxPool2(xp)]
            channels, size = filters, size // 2
        self.layers.append(Linear(rng, xp, channels * size * size, classes))
        self.velocity = [{k: xp.zeros_like(v) for k, v in layer.params.items()} for layer in self.layers]

    def forward(self, x, training=True):
        for layer in self.layers:
            x = layer(x, training)
        return x

    def backward(self, dlogits):
        for layer in reversed(self.layers):
            dlogits = layer.backward(dlogits)
        return dlogits

    def gradient_norms(self):
        """The norm of each weighted layer's weight gradient (convolutions, then the linear layer)."""
        return [float(self.xp.linalg.norm(layer.grads["weight"])) for layer in self.layers
                if isinstance(layer, (Conv3x3, Linear))]

    def sgd_step(self, lr, momentum=0.9, weight_decay=5e-4):
        """SGD with momentum (PyTorch's form: v = m v + g + wd w; w -= lr v), in place."""
        for layer, velocity in zip(self.layers, self.velocity):
            for name, param in layer.params.items():
                grad = layer.grads[name]
                decay = weight_decay if not isinstance(layer, BatchNormLayer) else 0.0
                velocity[name][...] = momentum * velocity[name] + grad + decay * param
                param -= lr * velocity[name]

    def predict(self, x, training=False):
        return self.forward(x, training).argmax(axis=1)
