"""Batch normalization: ``batch_norm`` and ``batch_norm_backward`` check their arguments once, pick
the kernels, compute the per-channel numbers (momentum blend, unbiased correction, gradient sums to
weight and bias) and hand arrays to exactly one backend; ``BatchNorm`` is the layer on top."""

import math
from typing import NamedTuple

import numpy as np

from accelbn._core import checks, views
from accelbn._core.dtypes import float64_or, kernel_dtype, stats_dtype
from accelbn._core.arrays import CUPY, device_of, namespace
from accelbn._core.layer import Layer
from accelbn._core.registry import kernels_for
from accelbn.backends.formulas import inverse_std, running_average

_OPERATION = "batch_norm"


class BatchStats(NamedTuple):
    """Per-channel statistics saved by a forward pass for its backward pass.

    ``mean`` and ``invstd`` (1 / sqrt(var + eps)) have one entry per channel, float64 for float64
    x and float32 otherwise; they correspond to PyTorch's ``save_mean`` and ``save_invstd``. In eval
    they are the running statistics.
    """

    mean: np.ndarray
    invstd: np.ndarray


def _count_per_channel(x, axis):
    return math.prod(n for a, n in enumerate(x.shape) if a != axis)


def batch_norm(
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    *,
    axis=1,
    out=None,
    return_stats=False,
    backend=None,
):
    """Batch normalization with the semantics of ``torch.nn.functional.batch_norm``.

    ``axis`` is the channel axis (1 for NCHW-style and (N, C), -1 for channels-last). Training
    normalizes with the biased batch variance and, when running statistics are given, updates them
    in place: ``running = (1 - momentum) * running + momentum * batch``, with the unbiased variance
    for ``running_var``. Eval normalizes with the running statistics.

    Returns y (x's shape and dtype; ``out`` when given), or ``(y, BatchStats)`` with
    ``return_stats=True``.
    """
    library = checks.array_library(x, "x")
    kernels = kernels_for(backend, library, _OPERATION)
    axis = checks.float_input(x, axis, library)
    channels = x.shape[axis]
    training = checks.boolean(training, "training")
    momentum = checks.real_number(momentum, "momentum")
    eps = checks.real_number(eps, "eps", minimum=0.0)
    if training and eps == 0.0:  # a constant channel would divide by zero
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    checks.channel_vector(weight, "weight", channels, library)
    checks.channel_vector(bias, "bias", channels, library)
    checks.channel_vector(running_mean, "running_mean", channels, library, writable=training)
    checks.channel_vector(running_var, "running_var", channels, library, writable=training)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if training:
        checks.distinct_buffers(running_mean, "running_mean", running_var, "running_var")
        count = _count_per_channel(x, axis)
        if count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    elif running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    checks.output_array(out, library, x, [("x", x)])
    if library == CUPY:
        vectors = [("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)]
        checks.same_device(x, [*vectors, ("out", out)])

    with device_of(x):
        xp = namespace(library)
        dtype = kernel_dtype(x.dtype, kernels)
        layout = views.channel_layout(x, axis)
        y = views.Output(x, out, layout, dtype)
        weight64 = float64_or(xp, weight, channels, 1.0)
        bias64 = float64_or(xp, bias, channels, 0.0)
        if training and x.size == 0:  # PyTorch returns an empty y and leaves running stats alone
            mean = var = xp.full(channels, np.nan)
        elif training:
            mean, var = kernels.forward_train(views.input3(x, layout, dtype), weight64, bias64, eps, y.view)
            if running_mean is not None:
                new_mean = running_average(running_mean, mean, momentum)
                new_var = running_average(running_var, var * (count / (count - 1)), momentum)
                xp.copyto(running_mean, new_mean, casting="same_kind")
                xp.copyto(running_var, new_var, casting="same_kind")
        else:
            mean = running_mean.astype(np.float64)
            var = running_var.astype(np.float64)
            if x.size:
                kernels.normalize(views.input3(x, layout, dtype), mean, var, weight64, bias64, eps, y.view)

        result = y.result()
        if return_stats:
            invstd = inverse_std(var, eps)  # only the saved statistics need it
            saved = stats_dtype(x.dtype)
            return result, BatchStats(mean.astype(saved), invstd.astype(saved))
        return result


def batch_norm_backward(dy, x, stats, weight=None, *, training=True, axis=1, out=None, backend=None):
    """Gradients of :func:`batch_norm` with respect to x, weight and bias.

    ``stats`` is the :class:`BatchStats` returned by the forward pass (``return_stats=True``).
    With ``training=True`` the statistics are functions of x (the training gradient); with
    ``training=False`` they are constants (eval, frozen statistics): dx = dy * weight * invstd.

    Returns ``(dx, dweight, dbias)``: dx has x's shape and dtype (``out`` when given); dweight is
    sum(dy * x_hat) and dbias is sum(dy) per channel, in weight's dtype (or the stats dtype without
    a weight).
    """
    library = checks.array_library(x, "x")
    kernels = kernels_for(backend, library, _OPERATION)
    axis = checks.float_input(x, axis, library)
    channels = x.shape[axis]
    checks.float_array(dy, "dy", library)
    checks.same_shape_and_dtype(dy, "dy", x)
    if not hasattr(stats, "mean") or not hasattr(stats, "invstd"):
        raise TypeError(f"stats must be a BatchStats (with .mean and .invstd), got {type(stats).__name__}")
    checks.channel_vector(stats.mean, "stats.mean", channels, library)
    checks.channel_vector(stats.invstd, "stats.invstd", channels, library)
    checks.channel_vector(weight, "weight", channels, library)
    training = checks.boolean(training, "training")
    checks.output_array(out, library, x, [("dy", dy), ("x", x)])
    if library == CUPY:
        vectors = [("stats.mean", stats.mean), ("stats.invstd", stats.invstd), ("weight", weight)]
        checks.same_device(x, [("dy", dy), *vectors, ("out", out)])

    with device_of(x):
        xp = namespace(library)
        dtype = kernel_dtype(x.dtype, kernels)
        layout = views.channel_layout(x, axis)
        dx = views.Output(x, out, layout, dtype)
        mean = stats.mean.astype(np.float64)
        invstd = stats.invstd.astype(np.float64)
        if x.size:
            sum_dy, sum_dy_xmu = kernels.backward(
                views.input3(dy, layout, dtype),
                views.input3(x, layout, dtype),
                mean,
                invstd,
                float64_or(xp, weight, channels, 1.0),
                training,
                dx.view,
            )
        else:
            sum_dy = sum_dy_xmu = xp.zeros(channels)
        grad_dtype = weight.dtype if weight is not None else stats_dtype(x.dtype)
        dweight = (sum_dy_xmu * invstd).astype(grad_dtype)
        dbias = sum_dy.astype(grad_dtype)
        return dx.result(), dweight, dbias


class BatchNorm(Layer):
    """Batch normalization over channel axis ``axis`` of N-d NumPy arrays, like ``torch.nn.BatchNorm2d``.

    Parameters and buffers are NumPy arrays of ``dtype``, or CuPy arrays after ``layer.to("cupy")``:
    ``weight`` (ones) and ``bias`` (zeros) when ``affine`` (with ``bias=False``, a weight and no
    bias, as in PyTorch); ``running_mean`` (zeros), ``running_var`` (ones) and
    ``num_batches_tracked`` (a 0-d int64 array) when ``track_running_stats``. ``momentum=None``
    averages the running statistics cumulatively, with factor 1 / num_batches_tracked.

    ``layer(x)`` runs the forward pass and keeps ``x`` (by reference) and its statistics;
    ``layer.backward(dy)`` returns dx and stores ``grad_weight`` and ``grad_bias`` (overwriting,
    not accumulating). ``backend`` is passed to every call, as the functions' ``backend=``.
    """

    _ARRAYS = ("weight", "bias", "running_mean", "running_var")
    _COUNTERS = ("num_batches_tracked",)

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        *,
        axis=1,
        dtype=np.float32,
        bias=True,
        backend=None,
    ):
        num_features = checks.positive_int(num_features, "num_features")
        self.eps = checks.real_number(eps, "eps", minimum=0.0)
        self.momentum = None if momentum is None else checks.real_number(momentum, "momentum")
        self.affine = checks.boolean(affine, "affine")
        self.track_running_stats = checks.boolean(track_running_stats, "track_running_stats")
        has_bias = checks.boolean(bias, "bias") and self.affine
        self.axis = checks.integer(axis, "axis")
        self.dtype = dtype = checks.float_dtype(dtype)
        self.num_features = num_features
        self.weight = np.ones(num_features, dtype) if affine else None
        self.bias = np.zeros(num_features, dtype) if has_bias else None
        if track_running_stats:
            self.running_mean = np.zeros(num_features, dtype)
            self.running_var = np.ones(num_features, dtype)
            self.num_batches_tracked = np.zeros((), np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        super().__init__(backend)

    def __repr__(self):
        return (
            f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, axis={self.axis}, dtype={self.dtype.name}"
            + ("" if self.bias is not None or not self.affine else ", bias=False")
            + ("" if self.backend is None else f", backend={self.backend!r}")
            + ")"
        )

    def forward(self, x):
        """Normalize x; in training, update the running statistics when they are tracked."""
        self._check_input(x, self.axis, self.num_features)
        updates_running = self.training and self.track_running_stats
        momentum = self.momentum
        if momentum is None:  # a cumulative average over the batches seen, this one included
            momentum = 1.0 / float(self.num_batches_tracked + 1) if updates_running else 0.0
        use_batch_stats = self.training or not self.track_running_stats
        y, stats = batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            axis=self.axis,
            return_stats=True,
            backend=self.backend,
        )
        if updates_running:
            self.num_batches_tracked += 1
        self._save(x, stats, use_batch_stats)
        return y

    def _backward(self, dy, x, stats, use_batch_stats):
        return batch_norm_backward(dy, x, stats, self.weight, training=use_batch_stats, axis=self.axis, backend=self.backend)


class FrozenBatchNorm(Layer):
    """Batch normalization with frozen statistics and affine parameters, like torchvision's
    ``FrozenBatchNorm2d`` (detection models): in train and eval alike, y = (x - running_mean) /
    sqrt(running_var + eps) * weight + bias; nothing is updated, and the backward treats the
    statistics as constants (dx = dy * weight / sqrt(running_var + eps)). Loads torchvision's state
    dicts: ``weight``, ``bias``, ``running_mean`` and ``running_var``."""

    _ARRAYS = ("weight", "bias", "running_mean", "running_var")

    def __init__(self, num_features, eps=1e-5, *, axis=1, dtype=np.float32, backend=None):
        self.num_features = checks.positive_int(num_features, "num_features")
        self.eps = checks.real_number(eps, "eps", minimum=0.0)
        self.axis = checks.integer(axis, "axis")
        self.dtype = dtype = checks.float_dtype(dtype)
        self.weight = np.ones(self.num_features, dtype)
        self.bias = np.zeros(self.num_features, dtype)
        self.running_mean = np.zeros(self.num_features, dtype)
        self.running_var = np.ones(self.num_features, dtype)
        super().__init__(backend)

    def __repr__(self):
        return f"FrozenBatchNorm({self.num_features}, eps={self.eps}, axis={self.axis}, dtype={self.dtype.name})"

    def forward(self, x):
        """Normalize x with the running statistics, in train mode too."""
        self._check_input(x, self.axis, self.num_features)
        y, stats = batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps,
                              axis=self.axis, return_stats=True, backend=self.backend)
        self._save(x, stats)
        return y

    def _backward(self, dy, x, stats):
        return batch_norm_backward(dy, x, stats, self.weight, training=False, axis=self.axis, backend=self.backend)
