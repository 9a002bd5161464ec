"""Layer norm and RMS norm: each row of x's last ``len(normalized_shape)`` dimensions normalized on
its own (RMS norm by its root mean square, without centring), as ``torch.nn.functional.layer_norm``
and ``rms_norm``; ``LayerNorm`` and ``RMSNorm`` are the layers."""

import math
import numbers

import numpy as np

from accelbn._core import checks
from accelbn._core.layer import Layer
from accelbn._ops import row_norm
from accelbn._ops.row_norm import Rows


def _normalized_shape(normalized_shape):
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    try:
        shape = tuple(int(n) for n in normalized_shape if not isinstance(n, bool) and isinstance(n, numbers.Integral))
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}") from None
    if len(shape) != len(normalized_shape) or not shape or min(shape) < 1:
        raise ValueError(f"normalized_shape must be positive ints, at least one, got {normalized_shape!r}")
    return shape


def _rows(x, normalized_shape):
    shape = _normalized_shape(normalized_shape)
    if x.ndim < len(shape) or x.shape[x.ndim - len(shape) :] != shape:
        raise ValueError(f"normalized_shape {shape} must match the last dimensions of x, whose shape is {x.shape}")
    return Rows(groups=1, channels=math.prod(shape), inner=1, stats_shape=x.shape[: x.ndim - len(shape)]), shape


def machine_epsilon(dtype):
    """``torch.finfo(dtype).eps`` for x's float dtype (bfloat16's through ml_dtypes)."""
    if dtype.name == "bfloat16":
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, return_stats=False, out=None, backend=None):
    """Layer normalization with the semantics of ``torch.nn.functional.layer_norm``.

    Returns y, or ``(y, Stats)`` with ``return_stats=True``: ``stats.mean`` and ``stats.invstd`` of
    shape ``x.shape[:x.ndim - len(normalized_shape)]``."""
    library, kernels = row_norm.check_input(x, backend)
    rows, shape = _rows(x, normalized_shape)
    row_norm.check_parameters(library, x, [("weight", weight), ("bias", bias)], shape)
    eps = checks.real_number(eps, "eps", minimum=0.0)
    return row_norm.forward(x, rows, kernels, library, weight, bias, eps, True, out, return_stats)[0]


def layer_norm_backward(dy, x, stats, normalized_shape, weight=None, *, out=None, backend=None):
    """Gradients of :func:`layer_norm`: ``(dx, dweight, dbias)``, dweight = sum(dy * x_hat) and
    dbias = sum(dy) over the rows, of normalized_shape (returned even without a weight)."""
    library, kernels = row_norm.check_input(x, backend)
    rows, shape = _rows(x, normalized_shape)
    row_norm.check_parameters(library, x, [("weight", weight)], shape)
    row_norm.check_stats(stats, rows, library, centered=True)
    dx, dweight, dbias = row_norm.backward(dy, x, stats, rows, kernels, library, weight, True, True, out)
    return dx, dweight.reshape(shape), dbias.reshape(shape)


def rms_norm(x, normalized_shape, weight=None, eps=None, *, return_stats=False, out=None, backend=None):
    """Root-mean-square normalization with the semantics of ``torch.nn.functional.rms_norm``:
    y = x / sqrt(mean(x^2) + eps) * weight, ``eps=None`` being the machine epsilon of x's dtype.

    Returns y, or ``(y, Stats)`` with ``stats.mean`` None and ``stats.invstd`` of shape
    ``x.shape[:x.ndim - len(normalized_shape)]``."""
    library, kernels = row_norm.check_input(x, backend)
    rows, shape = _rows(x, normalized_shape)
    row_norm.check_parameters(library, x, [("weight", weight)], shape)
    eps = machine_epsilon(x.dtype) if eps is None else checks.real_number(eps, "eps", minimum=0.0)
    return row_norm.forward(x, rows, kernels, library, weight, None, eps, False, out, return_stats)[0]


def rms_norm_backward(dy, x, stats, normalized_shape, weight=None, *, out=None, backend=None):
    """Gradients of :func:`rms_norm`: ``(dx, dweight)``, dweight = sum(dy * x_hat) over the rows."""
    library, kernels = row_norm.check_input(x, backend)
    rows, shape = _rows(x, normalized_shape)
    row_norm.check_parameters(library, x, [("weight", weight)], shape)
    row_norm.check_stats(stats, rows, library, centered=False)
    dx, dweight, _ = row_norm.backward(dy, x, stats, rows, kernels, library, weight, False, True, out)
    return dx, dweight.reshape(shape)


def layer_dtype(dtype):
    """A layer's parameter dtype: float32 for None, as torch's default."""
    return checks.float_dtype(np.float32 if dtype is None else dtype)


class LayerNorm(Layer):
    """Layer normalization over the last dimensions, like ``torch.nn.LayerNorm``: ``weight`` (ones)
    and ``bias`` (zeros) of ``normalized_shape`` when ``elementwise_affine`` (``bias=False``: a
    weight only). ``backend`` is passed to every call."""

    _ARRAYS = ("weight", "bias")

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, dtype=None, *, backend=None):
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = checks.real_number(eps, "eps", minimum=0.0)
        self.elementwise_affine = checks.boolean(elementwise_affine, "elementwise_affine")
        has_bias = checks.boolean(bias, "bias") and self.elementwise_affine
        self.dtype = layer_dtype(dtype)
        self.weight = np.ones(self.normalized_shape, self.dtype) if self.elementwise_affine else None
        self.bias = np.zeros(self.normalized_shape, self.dtype) if has_bias else None
        super().__init__(backend)

    def __repr__(self):
        return f"LayerNorm({self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine})"

    def forward(self, x):
        self._check_library(x)
        y, stats = layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, return_stats=True,
                              backend=self.backend)
        self._save(x, stats)
        return y

    def _backward(self, dy, x, stats):
        return layer_norm_backward(dy, x, stats, self.normalized_shape, self.weight, backend=self.backend)


class RMSNorm(Layer):
    """RMS normalization over the last dimensions, like ``torch.nn.RMSNorm``: ``weight`` (ones) of
    ``normalized_shape`` when ``elementwise_affine``; ``eps=None`` is the machine epsilon of x's dtype."""

    _ARRAYS = ("weight",)
    bias = None

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, dtype=None, *, backend=None):
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = None if eps is None else checks.real_number(eps, "eps", minimum=0.0)
        self.elementwise_affine = checks.boolean(elementwise_affine, "elementwise_affine")
        self.dtype = layer_dtype(dtype)
        self.weight = np.ones(self.normalized_shape, self.dtype) if self.elementwise_affine else None
        super().__init__(backend)

    def __repr__(self):
        return f"RMSNorm({self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine})"

    def forward(self, x):
        self._check_library(x)
        y, stats = rms_norm(x, self.normalized_shape, self.weight, self.eps, return_stats=True, backend=self.backend)
        self._save(x, stats)
        return y

    def _backward(self, dy, x, stats):
        dx, dweight = rms_norm_backward(dy, x, stats, self.normalized_shape, self.weight, backend=self.backend)
        return dx, dweight, None
