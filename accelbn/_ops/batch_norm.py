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
from accelbn._ops import conventions
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


def count_per_channel(x, axis):
    return math.prod(n for a, n in enumerate(x.shape) if a != axis)


def check_forward(x, running_mean, running_var, weight, bias, training, momentum, eps, axis, out, backend, residual=None):
    """The forward's argument checks, but for the count of values per channel: ``(library, kernels,
    axis, training, momentum, eps)``, each checked and normalized."""
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
    elif running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    inputs = [("x", x)]
    if residual is not None:
        checks.like_x(residual, "residual", x, library)
        inputs.append(("residual", residual))
    checks.output_array(out, library, x, inputs)
    if library == CUPY:
        vectors = [("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)]
        checks.same_device(x, [*vectors, ("residual", residual), ("out", out)])
    return library, kernels, axis, training, momentum, eps


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
    unbiased=True,
    backend=None,
):
    """Batch normalization with the semantics of ``torch.nn.functional.batch_norm``.

    ``axis`` is the channel axis (1 for NCHW-style and (N, C), -1 for channels-last). Training
    normalizes with the biased batch variance and, when running statistics are given, updates them
    in place: ``running = (1 - momentum) * running + momentum * batch``, with the unbiased variance
    for ``running_var`` (the biased one with ``unbiased=False``, as Keras, Flax and ONNX keep it).
    Eval normalizes with the running statistics.

    Returns y (x's shape and dtype; ``out`` when given), or ``(y, BatchStats)`` with
    ``return_stats=True``.
    """
    return forward(x, running_mean, running_var, weight, bias, training, momentum, eps, axis, out, return_stats,
                   checks.boolean(unbiased, "unbiased"), backend)


def forward(x, running_mean, running_var, weight, bias, training, momentum, eps, axis, out, return_stats, unbiased,
            backend, residual=None, relu=False, exact_stats=False):
    """:func:`batch_norm`, and with ``relu`` the fused ReLU (after adding ``residual``, when given);
    ``exact_stats`` saves the statistics in float64, as the fused backward needs them."""
    library, kernels, axis, training, momentum, eps = check_forward(x, running_mean, running_var, weight, bias, training,
                                                                    momentum, eps, axis, out, backend, residual)
    channels = x.shape[axis]
    count = count_per_channel(x, axis)
    if training and count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")

    with device_of(x):
        xp = namespace(library)
        dtype = kernel_dtype(x.dtype, kernels)
        layout = views.channel_layout(x, axis)
        y = views.Output(x, out, layout, dtype)
        z = None if residual is None else views.input3(residual, layout, dtype)
        weight64 = float64_or(xp, weight, channels, 1.0)
        bias64 = float64_or(xp, bias, channels, 0.0)
        if training and x.size == 0:  # PyTorch returns an empty y and leaves running stats alone
            mean = var = xp.full(channels, np.nan)
        elif training:
            mean, var = kernels.forward_train(views.input3(x, layout, dtype), weight64, bias64, eps, y.view, None, z, relu)
            update_running(xp, running_mean, running_var, mean, var, count, momentum, unbiased)
        else:
            mean = running_mean.astype(np.float64)
            var = running_var.astype(np.float64)
            if x.size:
                kernels.normalize(views.input3(x, layout, dtype), mean, var, weight64, bias64, eps, y.view, z, relu)

        return finish_forward(y.result(), x, mean, var, eps, return_stats, exact_stats)


def update_running(xp, running_mean, running_var, mean, var, count, momentum, unbiased):
    """Blend a batch's float64 mean and biased var (over ``count`` values per channel) into the
    running statistics in place, with the unbiased variance unless ``unbiased`` is False."""
    if running_mean is None:
        return
    new_mean = running_average(running_mean, mean, momentum)
    new_var = running_average(running_var, var * (count / (count - 1)) if unbiased else var, momentum)
    xp.copyto(running_mean, new_mean, casting="same_kind")
    xp.copyto(running_var, new_var, casting="same_kind")


def finish_forward(result, x, mean, var, eps, return_stats, exact_stats=False):
    """The forward's return value: y, or (y, BatchStats) in x's stats dtype (float64 if ``exact_stats``)."""
    if not return_stats:
        return result
    invstd = inverse_std(var, eps)  # only the saved statistics need it
    saved = np.dtype(np.float64) if exact_stats else stats_dtype(x.dtype)
    return result, BatchStats(mean.astype(saved), invstd.astype(saved))


def batch_norm_backward(dy, x, stats, weight=None, *, training=True, axis=1, out=None, backend=None):
    """Gradients of :func:`batch_norm` with respect to x, weight and bias.

    ``stats`` is the :class:`BatchStats` returned by the forward pass (``return_stats=True``).
    With ``training=True`` the statistics are functions of x (the training gradient); with
    ``training=False`` they are constants (eval, frozen statistics): dx = dy * weight * invstd.

    Returns ``(dx, dweight, dbias)``: dx has x's shape and dtype (``out`` when given); dweight is
    sum(dy * x_hat) and dbias is sum(dy) per channel, in weight's dtype (or the stats dtype without
    a weight).
    """
    dx, _, dweight, dbias = backward(dy, x, stats, weight, training, axis, out, backend)
    return dx, *gradient_dtype(weight, x, dweight, dbias)


def gradient_dtype(weight, x, *gradients):
    """Parameter gradients in weight's dtype, or the stats dtype without a weight."""
    dtype = weight.dtype if weight is not None else stats_dtype(x.dtype)
    return tuple(g.astype(dtype) for g in gradients)


def check_backward(dy, x, stats, weight, axis, backend):
    """The checks every batch-norm backward shares: ``(library, kernels, axis)``."""
    library = checks.array_library(x, "x")
    kernels = kernels_for(backend, library, _OPERATION)
    axis = checks.float_input(x, axis, library)
    channels = x.shape[axis]
    checks.like_x(dy, "dy", x, library)
    if not hasattr(stats, "mean") or not hasattr(stats, "invstd"):
        raise TypeError(f"stats must be a BatchStats (with .mean and .invstd), got {type(stats).__name__}")
    checks.channel_vector(stats.mean, "stats.mean", channels, library)
    checks.channel_vector(stats.invstd, "stats.invstd", channels, library)
    checks.channel_vector(weight, "weight", channels, library)
    return library, kernels, axis


def backward(dy, x, stats, weight, training, axis, out, backend, relu=False, bias=None, residual=None, weight_scale=None):
    """:func:`batch_norm_backward` with float64 parameter gradients; with ``relu`` the fused ReLU's,
    its mask recomputed from x (and ``residual``) by the forward's own formula from ``bias`` and the
    float64 stats, also returning the residual's gradient. ``weight_scale`` multiplies the weight in
    dx (Batch Renormalization's r). Returns (dx, dresidual or None, dweight, dbias)."""
    library, kernels, axis = check_backward(dy, x, stats, weight, axis, backend)
    channels = x.shape[axis]
    training = checks.boolean(training, "training")
    inputs = [("dy", dy), ("x", x)]
    if relu:
        checks.channel_vector(bias, "bias", channels, library)
        for name, v in (("stats.mean", stats.mean), ("stats.invstd", stats.invstd)):
            if v.dtype != np.float64:
                raise TypeError(f"{name} must be float64, as batch_norm_relu(..., return_stats=True) saves it "
                                f"(the ReLU's mask is recomputed from it bit for bit), got {v.dtype}")
        if residual is not None:
            checks.like_x(residual, "residual", x, library)
            inputs.append(("residual", residual))
    checks.output_array(out, library, x, inputs)
    if library == CUPY:
        vectors = [("stats.mean", stats.mean), ("stats.invstd", stats.invstd), ("weight", weight), ("bias", bias)]
        checks.same_device(x, [("dy", dy), *vectors, ("residual", residual), ("out", out)])

    with device_of(x):
        xp = namespace(library)
        dtype = kernel_dtype(x.dtype, kernels)
        layout = views.channel_layout(x, axis)
        dx = views.Output(x, out, layout, dtype)
        mean = stats.mean.astype(np.float64)
        invstd = stats.invstd.astype(np.float64)
        weight64 = float64_or(xp, weight, channels, 1.0)
        x3 = views.input3(x, layout, dtype)
        dy3 = views.input3(dy, layout, dtype)
        masked = dz = None
        if relu:  # the gradient past the ReLU goes to the residual's gradient, or to dx and is used in place
            dz = views.Output(x, None, layout, dtype) if residual is not None else dx
            z3 = None if residual is None else views.input3(residual, layout, dtype)
            masked = (weight64 * invstd, float64_or(xp, bias, channels, 0.0), z3, dz.view)
        if x.size:
            applied = weight64 if weight_scale is None else weight64 * weight_scale
            sum_dy, sum_dy_xmu = kernels.backward(dy3, x3, mean, invstd, applied, training, dx.view, masked)
        else:
            sum_dy = sum_dy_xmu = xp.zeros(channels)
        dresidual = dz.result() if residual is not None else None
        return dx.result(), dresidual, sum_dy_xmu * invstd, sum_dy


class _ConventionDefault:
    def __repr__(self):
        return "the convention's default"


CONVENTION_DEFAULT = _ConventionDefault()


class BatchNorm(Layer):
    """Batch normalization over channel axis ``axis`` of N-d NumPy arrays, like ``torch.nn.BatchNorm2d``.

    Parameters and buffers are NumPy arrays of ``dtype``, or CuPy arrays after ``layer.to("cupy")``:
    ``weight`` (ones) and ``bias`` (zeros) when ``affine`` (with ``bias=False``, a weight and no
    bias, as in PyTorch); ``running_mean`` (zeros), ``running_var`` (ones) and
    ``num_batches_tracked`` (a 0-d int64 array) when ``track_running_stats``. ``momentum=None``
    averages the running statistics cumulatively, with factor 1 / num_batches_tracked.

    ``convention`` takes another framework's update rule: ``"keras"``, ``"flax"`` or ``"onnx"``
    read ``momentum`` in their meaning (the weight of the running value) and keep the biased batch
    variance; ``eps`` and ``momentum`` default to the convention's (torch 1e-5 and 0.1, Keras 1e-3 and
    0.99, Flax 1e-5 and 0.99, ONNX 1e-5 and 0.9). ``state_dict(layout=...)`` and
    ``load_state_dict(..., layout=...)`` write and read those frameworks' checkpoints.

    ``freeze_after=n`` freezes the statistics after n training batches (the large-batch recipes'
    warmup); :meth:`freeze` does it now. A frozen layer normalizes with the running statistics in
    train mode too, updates nothing, and its backward treats them as constants.

    ``layer(x)`` runs the forward pass and keeps ``x`` (by reference) and its statistics;
    ``layer.backward(dy)`` returns dx and stores ``grad_weight`` and ``grad_bias`` (overwriting,
    not accumulating). ``backend`` is passed to every call, as the functions' ``backend=``.
    """

    _ARRAYS = ("weight", "bias", "running_mean", "running_var")
    _COUNTERS = ("num_batches_tracked",)

    def __init__(
        self,
        num_features,
        eps=None,
        momentum=CONVENTION_DEFAULT,
        affine=True,
        track_running_stats=True,
        *,
        convention="torch",
        freeze_after=None,
        axis=1,
        dtype=np.float32,
        bias=True,
        backend=None,
    ):
        num_features = checks.positive_int(num_features, "num_features")
        self.convention = convention
        rule = conventions.convention(convention)
        self.eps = checks.real_number(rule.eps if eps is None else eps, "eps", minimum=0.0)
        if momentum is CONVENTION_DEFAULT:
            momentum = rule.momentum
        self.momentum = None if momentum is None else checks.real_number(momentum, "momentum")
        if momentum is None and not rule.momentum_of_batch:
            raise ValueError(f"momentum=None (a cumulative average) is torch's; the {convention} convention needs a number")
        self.affine = checks.boolean(affine, "affine")
        self.track_running_stats = checks.boolean(track_running_stats, "track_running_stats")
        has_bias = checks.boolean(bias, "bias") and self.affine
        if freeze_after is not None:
            freeze_after = checks.integer(freeze_after, "freeze_after")
            if freeze_after < 0 or not self.track_running_stats:
                raise ValueError("freeze_after needs track_running_stats=True and a step count >= 0, "
                                 f"got {freeze_after} with track_running_stats={self.track_running_stats}")
        self.freeze_after = freeze_after
        self.frozen = freeze_after == 0
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
            f"{type(self).__name__}({self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, axis={self.axis}, dtype={self.dtype.name}"
            + ("" if self.bias is not None or not self.affine else ", bias=False")
            + ("" if self.convention == "torch" else f", convention={self.convention!r}")
            + ("" if self.freeze_after is None else f", freeze_after={self.freeze_after}")
            + ("" if self.backend is None else f", backend={self.backend!r}")
            + ")"
        )

    def freeze(self):
        """From now on, normalize with the running statistics, update nothing, and treat them as
        constants in the backward, in train mode too. Returns the layer."""
        if not self.track_running_stats:
            raise ValueError("freeze() needs running statistics (track_running_stats=True)")
        self.frozen = True
        return self

    def forward(self, x):
        """Normalize x; in training, update the running statistics when they are tracked."""
        self._check_input(x, self.axis, self.num_features)
        rule = conventions.CONVENTIONS[self.convention]
        updates_running = self.training and self.track_running_stats and not self.frozen
        momentum = conventions.batch_momentum(self.momentum, rule)
        if momentum is None:  # a cumulative average over the batches seen, this one included
            momentum = 1.0 / float(self.num_batches_tracked + 1) if updates_running else 0.0
        use_batch_stats = (self.training and not self.frozen) or not self.track_running_stats
        y, stats = self._normalize(x, use_batch_stats, momentum, rule.unbiased)
        if updates_running:
            self.num_batches_tracked += 1
            if self.freeze_after is not None and self.num_batches_tracked >= self.freeze_after:
                self.frozen = True
        self._save(x, stats, use_batch_stats)
        return y

    def _normalize(self, x, use_batch_stats, momentum, unbiased):
        """(y, BatchStats): the forward's arithmetic on the layer's arrays."""
        return forward(x, self.running_mean, self.running_var, self.weight, self.bias, use_batch_stats, momentum,
                       self.eps, self.axis, None, True, unbiased, self.backend)

    def _backward(self, dy, x, stats, use_batch_stats):
        return batch_norm_backward(dy, x, stats, self.weight, training=use_batch_stats, axis=self.axis, backend=self.backend)

    def state_dict(self, layout="torch"):
        """Copies of the parameters and buffers: under PyTorch's keys, or as a checkpoint of
        ``layout`` ``"keras"`` (gamma, beta, moving_mean, moving_variance), ``"flax"`` (``{"params":
        {"scale", "bias"}, "batch_stats": {"mean", "var"}}``) or ``"onnx"`` (the BatchNormalization
        inputs scale, B, input_mean, input_var). Only torch's has num_batches_tracked."""
        return conventions.export(super().state_dict(), layout, self._COUNTERS)

    def load_state_dict(self, state_dict, strict=True, layout="torch"):
        """Load a state dict: PyTorch's, or another framework's checkpoint with ``layout`` (as
        :meth:`state_dict` writes it). A checkpoint without num_batches_tracked leaves it as it is."""
        ours = conventions.import_(state_dict, layout, self._state_names(), self._COUNTERS)
        if layout != "torch" and self.num_batches_tracked is not None:
            ours.setdefault("num_batches_tracked", self.num_batches_tracked)
        super().load_state_dict(ours, strict)


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
