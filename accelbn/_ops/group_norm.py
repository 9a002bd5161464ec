"""Group norm and instance norm: each sample's channels normalized in groups (instance norm: one
channel a group), as ``torch.nn.functional.group_norm`` and ``instance_norm``, over channel axis
``axis`` (1, or -1 for channels-last); ``GroupNorm`` and ``InstanceNorm`` are the layers."""

import math

import numpy as np

from accelbn._core import checks
from accelbn._core.arrays import device_of, namespace
from accelbn._core.dtypes import stats_dtype
from accelbn._core.layer import Layer
from accelbn._ops import row_norm
from accelbn._ops.batch_norm import batch_norm
from accelbn._ops.layer_norm import layer_dtype
from accelbn._ops.row_norm import Rows, Stats
from accelbn.backends.formulas import running_average


def _grouped_rows(x, axis, groups):
    """Rows of (sample, group): x's batch axis 0, channels on ``axis``."""
    axis = checks.channel_axis(x, axis)
    if axis == 0:
        raise ValueError("axis must not be 0, the batch axis")
    channels = x.shape[axis]
    if channels % groups:
        raise ValueError(f"the {channels} channels of x (axis {axis}) must be divisible by num_groups={groups}")
    inner = math.prod(n for a, n in enumerate(x.shape) if a not in (0, axis))
    channels_last = axis == x.ndim - 1 and x.ndim > 2
    return Rows(groups=groups, channels=channels // groups, inner=inner, stats_shape=(x.shape[0], groups), axis=axis,
                channels_last=channels_last)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, return_stats=False, out=None, backend=None):
    """Group normalization with the semantics of ``torch.nn.functional.group_norm``: the channels of
    each sample in ``num_groups`` groups, each group normalized over its channels and positions.

    Returns y, or ``(y, Stats)`` with ``stats.mean`` and ``stats.invstd`` of shape (N, num_groups)."""
    library, kernels = row_norm.check_input(x, backend, min_ndim=2)
    rows = _grouped_rows(x, axis, checks.positive_int(num_groups, "num_groups"))
    channels = rows.groups * rows.channels
    row_norm.check_parameters(library, x, [("weight", weight), ("bias", bias)], (channels,))
    eps = checks.real_number(eps, "eps", minimum=0.0)
    return row_norm.forward(x, rows, kernels, library, weight, bias, eps, True, out, return_stats)[0]


def group_norm_backward(dy, x, stats, num_groups, weight=None, *, axis=1, out=None, backend=None):
    """Gradients of :func:`group_norm`: ``(dx, dweight, dbias)``, per channel."""
    library, kernels = row_norm.check_input(x, backend, min_ndim=2)
    rows = _grouped_rows(x, axis, checks.positive_int(num_groups, "num_groups"))
    row_norm.check_parameters(library, x, [("weight", weight)], (rows.groups * rows.channels,))
    row_norm.check_stats(stats, rows, library, centered=True)
    return row_norm.backward(dy, x, stats, rows, kernels, library, weight, True, True, out)


def _instance_rows(x, axis):
    axis = checks.channel_axis(x, axis)
    return _grouped_rows(x, axis, x.shape[axis])


def instance_norm(
    x,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
    *,
    axis=1,
    return_stats=False,
    out=None,
    backend=None,
):
    """Instance normalization with the semantics of ``torch.nn.functional.instance_norm``: each
    sample's channels normalized on their own with their own statistics (``use_input_stats``),
    updating the running statistics, when given, with their mean over the batch (the variance
    unbiased); or with the running statistics (``use_input_stats=False``).

    Returns y, or ``(y, Stats)`` with ``stats.mean`` and ``stats.invstd`` of shape (N, C)."""
    library, kernels = row_norm.check_input(x, backend, min_ndim=2)
    rows = _instance_rows(x, axis)
    channels = rows.groups
    named = [("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)]
    row_norm.check_parameters(library, x, named, (channels,))
    use_input_stats = checks.boolean(use_input_stats, "use_input_stats")
    momentum = checks.real_number(momentum, "momentum")
    eps = checks.real_number(eps, "eps", minimum=0.0)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if not use_input_stats:
        if running_mean is None:
            raise ValueError("running_mean and running_var are required when use_input_stats=False")
        return _with_running_stats(x, running_mean, running_var, weight, bias, eps, rows, library, out, return_stats, backend)
    if rows.inner <= 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {x.shape}")
    for name, a in named[2:]:
        checks.updated_in_place(a, name)
    checks.distinct_buffers(running_mean, "running_mean", running_var, "running_var")
    result, mean, var = row_norm.forward(x, rows, kernels, library, weight, bias, eps, True, out, return_stats)
    if running_mean is not None and x.size:
        with device_of(x):
            xp = namespace(library)
            samples = x.shape[0]
            batch_mean = mean.reshape(samples, channels).mean(axis=0)
            batch_var = (var * (rows.inner / (rows.inner - 1))).reshape(samples, channels).mean(axis=0)
            xp.copyto(running_mean, running_average(running_mean, batch_mean, momentum), casting="same_kind")
            xp.copyto(running_var, running_average(running_var, batch_var, momentum), casting="same_kind")
    return result


def _with_running_stats(x, running_mean, running_var, weight, bias, eps, rows, library, out, return_stats, backend):
    y, channel_stats = batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps, axis=rows.axis, out=out,
                                  return_stats=True, backend=backend)
    if not return_stats:
        return y
    with device_of(x):
        xp = namespace(library)
        saved = stats_dtype(x.dtype)
        return y, Stats(*(xp.zeros(rows.stats_shape, saved) + v.astype(saved) for v in channel_stats))


def instance_norm_backward(dy, x, stats, weight=None, *, use_input_stats=True, axis=1, out=None, backend=None):
    """Gradients of :func:`instance_norm`: ``(dx, dweight, dbias)``, per channel; with
    ``use_input_stats=False`` the statistics are constants (dx = dy * weight * invstd)."""
    library, kernels = row_norm.check_input(x, backend, min_ndim=2)
    rows = _instance_rows(x, axis)
    row_norm.check_parameters(library, x, [("weight", weight)], (rows.groups,))
    row_norm.check_stats(stats, rows, library, centered=True)
    trained = checks.boolean(use_input_stats, "use_input_stats")
    return row_norm.backward(dy, x, stats, rows, kernels, library, weight, True, trained, out)


class GroupNorm(Layer):
    """Group normalization, like ``torch.nn.GroupNorm``: ``weight`` (ones) and ``bias`` (zeros) of
    ``num_channels`` when ``affine`` (``bias=False``: a weight only), channels on ``axis``."""

    _ARRAYS = ("weight", "bias")

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, dtype=None, *, bias=True, axis=1, backend=None):
        self.num_groups = checks.positive_int(num_groups, "num_groups")
        self.num_channels = checks.positive_int(num_channels, "num_channels")
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_channels={num_channels} must be divisible by num_groups={num_groups}")
        self.eps = checks.real_number(eps, "eps", minimum=0.0)
        self.affine = checks.boolean(affine, "affine")
        has_bias = checks.boolean(bias, "bias") and self.affine
        self.axis = checks.integer(axis, "axis")
        self.dtype = layer_dtype(dtype)
        self.weight = np.ones(self.num_channels, self.dtype) if self.affine else None
        self.bias = np.zeros(self.num_channels, self.dtype) if has_bias else None
        super().__init__(backend)

    def __repr__(self):
        return f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine})"

    def forward(self, x):
        self._check_input(x, self.axis, self.num_channels)
        y, stats = group_norm(x, self.num_groups, self.weight, self.bias, self.eps, axis=self.axis, return_stats=True,
                              backend=self.backend)
        self._save(x, stats)
        return y

    def _backward(self, dy, x, stats):
        return group_norm_backward(dy, x, stats, self.num_groups, self.weight, axis=self.axis, backend=self.backend)


class InstanceNorm(Layer):
    """Instance normalization, like ``torch.nn.InstanceNorm1d/2d/3d`` (x with a batch axis):
    ``weight`` and ``bias`` when ``affine``; ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` when ``track_running_stats``, which eval then normalizes with."""

    _ARRAYS = ("weight", "bias", "running_mean", "running_var")
    _COUNTERS = ("num_batches_tracked",)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False, dtype=None, *,
                 bias=True, axis=1, backend=None):
        self.num_features = checks.positive_int(num_features, "num_features")
        self.eps = checks.real_number(eps, "eps", minimum=0.0)
        self.momentum = None if momentum is None else checks.real_number(momentum, "momentum")
        self.affine = checks.boolean(affine, "affine")
        self.track_running_stats = checks.boolean(track_running_stats, "track_running_stats")
        has_bias = checks.boolean(bias, "bias") and self.affine
        self.axis = checks.integer(axis, "axis")
        self.dtype = layer_dtype(dtype)
        self.weight = np.ones(self.num_features, self.dtype) if self.affine else None
        self.bias = np.zeros(self.num_features, self.dtype) if has_bias else None
        if self.track_running_stats:
            self.running_mean = np.zeros(self.num_features, self.dtype)
            self.running_var = np.ones(self.num_features, self.dtype)
            self.num_batches_tracked = np.zeros((), np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        super().__init__(backend)

    def __repr__(self):
        return (f"InstanceNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats})")

    def forward(self, x):
        self._check_input(x, self.axis, self.num_features)
        use_input_stats = self.training or not self.track_running_stats
        y, stats = instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias, use_input_stats,
                                 0.0 if self.momentum is None else self.momentum, self.eps, axis=self.axis,
                                 return_stats=True, backend=self.backend)
        self._save(x, stats, use_input_stats)
        return y

    def _backward(self, dy, x, stats, use_input_stats):
        return instance_norm_backward(dy, x, stats, self.weight, use_input_stats=use_input_stats, axis=self.axis,
                                      backend=self.backend)
