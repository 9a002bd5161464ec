"""What layer, RMS, group and instance norm share: each normalizes rows of x, a row being a sample's
group of K channels by S elements, with affine parameters per (group, channel). The operations
differ in how x maps to rows (:class:`Rows`) and what they check; this module moves x into the
backends' C-contiguous ``(R, K, S)`` rows and back, and runs the ``row_norm`` kernels.
"""

from typing import NamedTuple

import numpy as np

from accelbn._core import checks
from accelbn._core.arrays import device_of, namespace
from accelbn._core.dtypes import float64_or, kernel_dtype, stats_dtype
from accelbn._core.registry import kernels_for
from accelbn.backends.formulas import inverse_std

OPERATION = "row_norm"


class Stats(NamedTuple):
    """Statistics saved by a forward pass for its backward pass: ``mean`` (None for RMS norm) and
    ``invstd`` (1 / sqrt(var + eps), or 1 / sqrt(mean(x^2) + eps) for RMS norm), one entry per
    normalized group, float64 for float64 x and float32 otherwise."""

    mean: np.ndarray | None
    invstd: np.ndarray


class Rows(NamedTuple):
    """How x maps to rows: x with ``axis`` moved to position ``moved_to`` (or as it is when None),
    reshaped to (N * G, K, S); or, ``channels_last``, x as (N, S, G * K) samples. Statistics have
    ``stats_shape``, parameters G * K entries."""

    groups: int
    channels: int
    inner: int
    stats_shape: tuple
    axis: int | None = None
    moved_to: int = 1
    channels_last: bool = False

    @property
    def shape3(self):
        if self.channels_last:
            return (self.stats_shape[0], self.inner, self.groups * self.channels)
        return (int(np.prod(self.stats_shape)), self.channels, self.inner)

    def _moved(self):
        return self.axis is not None and self.axis != self.moved_to and not self.channels_last

    def view(self, xp, a, dtype):
        """``a`` as the kernels' C-contiguous array of ``dtype`` (copied only when it is not already)."""
        if self._moved():
            a = xp.moveaxis(a, self.axis, self.moved_to)
        return xp.ascontiguousarray(a, dtype=dtype).reshape(self.shape3)

    def target(self, xp, out, dtype):
        """Where the kernels write: ``out`` itself when it is C-contiguous in the kernels' dtype and
        needs no axis moved; else a new array."""
        if out is not None and out.dtype == dtype and not self._moved() and out.flags.c_contiguous:
            return out.reshape(self.shape3)
        return xp.empty(self.shape3, dtype)

    def result(self, xp, rows, x, out):
        """The (R, K, S) ``rows`` as an array of x's shape and dtype, written into ``out`` when given
        (unless they are ``out`` already)."""
        if out is not None and rows.base is out or rows is out:
            return out
        shape = list(x.shape)
        if self._moved():
            shape.insert(self.moved_to, shape.pop(self.axis))
        y = rows.reshape(shape)
        if self._moved():
            y = xp.moveaxis(y, self.moved_to, self.axis)
        if out is not None:
            xp.copyto(out, y, casting="same_kind")
            return out
        return y if y.dtype == x.dtype else y.astype(x.dtype)


def check_input(x, backend, min_ndim=1):
    """x's library and the row-normalization kernels of ``backend`` for it."""
    library = checks.array_library(x, "x")
    kernels = kernels_for(backend, library, OPERATION)
    checks.float_array(x, "x", library)
    if x.ndim < min_ndim:
        raise ValueError(f"x must have at least {min_ndim} dimensions, got shape {x.shape}")
    return library, kernels


def check_parameters(library, x, named_arrays, shape):
    """Optional parameters (None or float arrays of ``shape``), of x's library and device."""
    for name, a in named_arrays:
        if a is None:
            continue
        checks.float_array(a, name, library)
        if a.shape != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    if library == "cupy":
        checks.same_device(x, named_arrays)


def forward(x, rows, kernels, library, weight, bias, eps, centered, out, return_stats):
    """Normalize x's rows; y (``out`` when given), or ``(y, Stats)``; also the float64 per-row mean
    and variance (mean square without centring) for the running statistics of instance norm."""
    checks.output_array(out, library, x, [("x", x)])
    with device_of(x):
        xp = namespace(library)
        size = rows.groups * rows.channels
        dtype = kernel_dtype(x.dtype, kernels)
        x3 = rows.view(xp, x, dtype)
        y3 = rows.target(xp, out, dtype)
        run = kernels.forward_channels_last if rows.channels_last else kernels.forward
        weight64 = float64_or(xp, None if weight is None else weight.reshape(-1), size, 1.0)
        bias64 = float64_or(xp, None if bias is None else bias.reshape(-1), size, 0.0)
        if x.size:
            mean, var = run(x3, rows.groups, weight64, bias64, eps, centered, y3)
        else:
            mean = var = xp.full(int(np.prod(rows.stats_shape)), np.nan)
        y = rows.result(xp, y3, x, out)
        saved = stats_dtype(x.dtype)
        stats = Stats(
            mean.astype(saved).reshape(rows.stats_shape) if centered else None,
            inverse_std(var, eps).astype(saved).reshape(rows.stats_shape),
        )
        return (y, stats) if return_stats else y, mean, var


def check_stats(stats, rows, library, centered):
    if not hasattr(stats, "invstd") or not hasattr(stats, "mean"):
        raise TypeError(f"stats must be the Stats of the forward pass (with .mean and .invstd), got {type(stats).__name__}")
    named = [("stats.invstd", stats.invstd)] + ([("stats.mean", stats.mean)] if centered else [])
    for name, a in named:
        checks.float_array(a, name, library)
        if a.shape != rows.stats_shape:
            raise ValueError(f"{name} must have shape {rows.stats_shape}, got {a.shape}")


def backward(dy, x, stats, rows, kernels, library, weight, centered, trained, out):
    """``(dx, dweight, dbias)``: dweight and dbias of weight's shape (or G * K entries), in weight's
    dtype, or the statistics' without a weight."""
    checks.like_x(dy, "dy", x, library)
    checks.output_array(out, library, x, [("dy", dy), ("x", x)])
    with device_of(x):
        xp = namespace(library)
        size = rows.groups * rows.channels
        dtype = kernel_dtype(x.dtype, kernels)
        dy3, x3 = rows.view(xp, dy, dtype), rows.view(xp, x, dtype)
        dx3 = rows.target(xp, out, dtype)
        mean = stats.mean.reshape(-1).astype(np.float64) if centered else xp.zeros(stats.invstd.size)
        invstd = stats.invstd.reshape(-1).astype(np.float64)
        weight64 = float64_or(xp, None if weight is None else weight.reshape(-1), size, 1.0)
        if x.size:
            run = kernels.backward_channels_last if rows.channels_last else kernels.backward
            dweight, dbias = run(dy3, x3, rows.groups, mean, invstd, weight64, centered, trained, dx3)
        else:
            dweight = dbias = xp.zeros(size)
        dx = rows.result(xp, dx3, x, out)
        grad_dtype = weight.dtype if weight is not None else stats_dtype(x.dtype)
        shape = weight.shape if weight is not None else (size,)
        return dx, dweight.astype(grad_dtype).reshape(shape), dbias.astype(grad_dtype).reshape(shape)
