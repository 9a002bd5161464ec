"""``batch_norm`` and ``batch_norm_backward``: check arguments once, pick the kernels, compute the
per-channel numbers (momentum blend, unbiased correction, gradient sums to weight and bias), and hand
arrays to exactly one backend."""

import math
from typing import NamedTuple

import numpy as np

from accelbn import _checks, _layout
from accelbn._arrays import CUPY, device_of, namespace
from accelbn._backends import kernels_for
from accelbn._formulas import inverse_std


class BatchStats(NamedTuple):
    """Per-channel statistics saved by a forward pass for its backward pass.

    ``mean`` and ``invstd`` (1 / sqrt(var + eps)) have one entry per channel, float64 for float64
    x and float32 otherwise; they correspond to PyTorch's ``save_mean`` and ``save_invstd``. In eval
    they are the running statistics.
    """

    mean: np.ndarray
    invstd: np.ndarray


def stats_dtype(x_dtype):
    """The dtype of saved statistics and of gradients without a weight: float64 only for float64 x."""
    return np.dtype(np.float64) if x_dtype == np.float64 else np.dtype(np.float32)


def _kernel_dtype(x_dtype, kernels):
    """The dtype kernels read and write: x's own when the backend stores it (in native byte order),
    else float32 (float16 and bfloat16 on the CPU)."""
    if x_dtype in kernels.STORAGE_DTYPES:
        return x_dtype
    native = np.dtype(x_dtype.type)
    return native if native in kernels.STORAGE_DTYPES else np.dtype(np.float32)


def _float64_or(xp, v, channels, fill):
    return xp.full(channels, fill, dtype=np.float64) if v is None else v.astype(np.float64)


def _blend(running, batch, momentum):
    """The running-statistics update: (1 - momentum) * running + momentum * batch."""
    return (1.0 - momentum) * running.astype(np.float64) + momentum * batch


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
    library = _checks.array_library(x, "x")
    kernels = kernels_for(backend, library)
    _checks.float_array(x, "x", library)
    axis = _checks.channel_axis(x, axis)
    channels = x.shape[axis]
    training = _checks.boolean(training, "training")
    momentum = _checks.real_number(momentum, "momentum")
    eps = _checks.real_number(eps, "eps", minimum=0.0)
    if training and eps == 0.0:  # a constant channel would divide by zero
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    _checks.channel_vector(weight, "weight", channels, library)
    _checks.channel_vector(bias, "bias", channels, library)
    _checks.channel_vector(running_mean, "running_mean", channels, library, writable=training)
    _checks.channel_vector(running_var, "running_var", channels, library, writable=training)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if training:
        _checks.distinct_buffers(running_mean, "running_mean", running_var, "running_var")
        count = _count_per_channel(x, axis)
        if count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    elif running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    _checks.output_array(out, library, x, [("x", x)])
    if library == CUPY:
        vectors = [("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)]
        _checks.same_device(x, [*vectors, ("out", out)])

    with device_of(x):
        xp = namespace(library)
        dtype = _kernel_dtype(x.dtype, kernels)
        layout = _layout.channel_layout(x, axis)
        y = _layout.Output(x, out, layout, dtype)
        weight64 = _float64_or(xp, weight, channels, 1.0)
        bias64 = _float64_or(xp, bias, channels, 0.0)
        if training and x.size == 0:  # PyTorch returns an empty y and leaves running stats alone
            mean = var = xp.full(channels, np.nan)
        elif training:
            mean, var = kernels.forward_train(_layout.input3(x, layout, dtype), weight64, bias64, eps, y.view)
            if running_mean is not None:
                new_mean = _blend(running_mean, mean, momentum)
                new_var = _blend(running_var, var * (count / (count - 1)), momentum)
                xp.copyto(running_mean, new_mean, casting="same_kind")
                xp.copyto(running_var, new_var, casting="same_kind")
        else:
            mean = running_mean.astype(np.float64)
            var = running_var.astype(np.float64)
            if x.size:
                kernels.normalize(_layout.input3(x, layout, dtype), mean, var, weight64, bias64, eps, y.view)

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
    library = _checks.array_library(x, "x")
    kernels = kernels_for(backend, library)
    _checks.float_array(x, "x", library)
    axis = _checks.channel_axis(x, axis)
    channels = x.shape[axis]
    _checks.float_array(dy, "dy", library)
    _checks.same_shape_and_dtype(dy, "dy", x)
    if not hasattr(stats, "mean") or not hasattr(stats, "invstd"):
        raise TypeError(f"stats must be a BatchStats (with .mean and .invstd), got {type(stats).__name__}")
    _checks.channel_vector(stats.mean, "stats.mean", channels, library)
    _checks.channel_vector(stats.invstd, "stats.invstd", channels, library)
    _checks.channel_vector(weight, "weight", channels, library)
    training = _checks.boolean(training, "training")
    _checks.output_array(out, library, x, [("dy", dy), ("x", x)])
    if library == CUPY:
        vectors = [("stats.mean", stats.mean), ("stats.invstd", stats.invstd), ("weight", weight)]
        _checks.same_device(x, [("dy", dy), *vectors, ("out", out)])

    with device_of(x):
        xp = namespace(library)
        dtype = _kernel_dtype(x.dtype, kernels)
        layout = _layout.channel_layout(x, axis)
        dx = _layout.Output(x, out, layout, dtype)
        mean = stats.mean.astype(np.float64)
        invstd = stats.invstd.astype(np.float64)
        if x.size:
            sum_dy, sum_dy_xmu = kernels.backward(
                _layout.input3(dy, layout, dtype),
                _layout.input3(x, layout, dtype),
                mean,
                invstd,
                _float64_or(xp, weight, channels, 1.0),
                training,
                dx.view,
            )
        else:
            sum_dy = sum_dy_xmu = xp.zeros(channels)
        grad_dtype = weight.dtype if weight is not None else stats_dtype(x.dtype)
        dweight = (sum_dy_xmu * invstd).astype(grad_dtype)
        dbias = sum_dy.astype(grad_dtype)
        return dx.result(), dweight, dbias
