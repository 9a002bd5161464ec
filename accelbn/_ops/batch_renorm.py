"""Batch Renormalization (Ioffe 2017, arXiv 1702.03275) with the semantics and checkpoint of Keras's
``BatchNormalization(renorm=True)`` (tf-keras and Keras 3 agree): training normalizes with the
batch statistics and corrects by r = std_B / std' and d = (mean_B - renorm_mean) / std', clipped to
[rmin, rmax] and [-dmax, dmax] and treated as constants by the backward; eval normalizes with the
moving statistics. The correction is folded into the per-channel scale and shift, so the forward is
batch norm's own kernel pass and costs what it costs.

State, as Keras keeps it: ``running_mean`` and ``running_var`` (what eval uses), ``running_std`` (the
moving average that ``running_var`` is derived from: ``max(running_std**2 - eps, 0)``), and
``renorm_mean`` and ``renorm_std`` (the averages r and d are measured against, with their own
momentum). Momentum has PyTorch's meaning, the weight of the batch: Keras's 0.99 is 0.01 here.
"""

from typing import NamedTuple

import numpy as np

from accelbn._core import checks, views
from accelbn._core.arrays import CUPY, device_of, namespace
from accelbn._core.dtypes import float64_or, kernel_dtype, stats_dtype
from accelbn._core.layer import Layer
from accelbn._core.registry import kernels_for
from accelbn._ops import batch_norm as bn
from accelbn._ops import conventions
from accelbn.backends.formulas import inverse_std, renorm_correction, running_average


class RenormStats(NamedTuple):
    """What a :func:`batch_renorm` forward saves for its backward: the batch's ``mean`` and
    ``invstd`` (as :class:`~accelbn.BatchStats`) and the correction ``r`` and ``d`` per channel (1 and
    0 in eval), all in the dtype of saved statistics (float64 for float64 x, else float32)."""

    mean: np.ndarray
    invstd: np.ndarray
    r: np.ndarray
    d: np.ndarray


class Ramp:
    """A clipping bound as a function of the training step: ``start`` until ``begin``, then linear
    to ``end`` at step ``stop``, and ``end`` after. ``Ramp.paper_rmax()`` and ``Ramp.paper_dmax()``
    are the paper's schedule (Section 4.2): rmax from 1 to 3 over steps 5k to 40k, and dmax from 0
    to 5 over steps 5k to 25k."""

    def __init__(self, start, end, begin, stop):
        self.start = checks.real_number(start, "start")
        self.end = checks.real_number(end, "end")
        self.begin = checks.integer(begin, "begin")
        self.stop = checks.integer(stop, "stop")
        if not 0 <= self.begin < self.stop:
            raise ValueError(f"a Ramp needs 0 <= begin < stop, got begin={begin}, stop={stop}")

    @classmethod
    def paper_rmax(cls):
        return cls(1.0, 3.0, 5000, 40000)

    @classmethod
    def paper_dmax(cls):
        return cls(0.0, 5.0, 5000, 25000)

    def __call__(self, step):
        t = min(max((step - self.begin) / (self.stop - self.begin), 0.0), 1.0)
        return self.start + (self.end - self.start) * t

    def __repr__(self):
        return f"Ramp({self.start}, {self.end}, {self.begin}, {self.stop})"

    def __eq__(self, other):
        return isinstance(other, Ramp) and repr(self) == repr(other)


def _clipping(rmin, rmax, dmax):
    """Checked (rmin, rmax, dmax) as floats; rmin None is 1 / rmax (0 when rmax is inf: no lower clip)."""
    rmax = checks.real_number(rmax, "rmax", minimum=1.0, infinite=True)
    dmax = checks.real_number(dmax, "dmax", minimum=0.0, infinite=True)
    rmin = 1.0 / rmax if rmin is None else checks.real_number(rmin, "rmin", minimum=0.0)
    if rmin > 1.0:
        raise ValueError(f"rmin must be at most 1, got {rmin}")
    return rmin, rmax, dmax


def batch_renorm(
    x,
    running_mean,
    running_var,
    running_std,
    renorm_mean,
    renorm_std,
    weight=None,
    bias=None,
    training=False,
    momentum=0.01,
    renorm_momentum=0.01,
    eps=1e-3,
    *,
    rmax=3.0,
    dmax=5.0,
    rmin=None,
    axis=1,
    out=None,
    return_stats=False,
    backend=None,
):
    """Batch Renormalization, as Keras's ``BatchNormalization(renorm=True, renorm_clipping={"rmin":
    rmin, "rmax": rmax, "dmax": dmax})``.

    Training: y = ((x - mean_B) / sqrt(var_B + eps) * r + d) * weight + bias with the batch's mean
    and biased variance, then every moving statistic is blended with its momentum (the weight of the
    batch): running_mean and renorm_mean towards mean_B, running_std and renorm_std towards
    sqrt(var_B + eps), and running_var = max(running_std**2 - eps, 0). r and d use the averages from
    before the update. ``rmin`` defaults to 1 / rmax; ``rmax=math.inf`` and ``dmax=math.inf`` clip
    nothing (Keras without ``renorm_clipping``). Eval: batch norm with running_mean and running_var
    (r = 1, d = 0), needing neither running_std nor the renorm statistics (they may be None).

    Returns y, or ``(y, RenormStats)`` with ``return_stats=True``.
    """
    library = checks.array_library(x, "x")
    kernels = kernels_for(backend, library, bn._OPERATION)
    axis = checks.float_input(x, axis, library)
    channels = x.shape[axis]
    training = checks.boolean(training, "training")
    momentum = checks.real_number(momentum, "momentum")
    renorm_momentum = checks.real_number(renorm_momentum, "renorm_momentum")
    eps = checks.real_number(eps, "eps", minimum=0.0)
    rmin, rmax, dmax = _clipping(rmin, rmax, dmax)
    if eps == 0.0:
        raise ValueError(f"batch_renorm eps must be positive, but got {eps}")
    checks.channel_vector(weight, "weight", channels, library)
    checks.channel_vector(bias, "bias", channels, library)
    moving = {"running_mean": running_mean, "running_var": running_var}
    if training:
        moving.update(running_std=running_std, renorm_mean=renorm_mean, renorm_std=renorm_std)
    for name, v in moving.items():
        if v is None:
            raise ValueError(f"{name} is required{' when training' if training else ''}")
        checks.channel_vector(v, name, channels, library, writable=training)
    if training:
        named = list(moving.items())
        for i, (a_name, a) in enumerate(named):
            for b_name, b in named[i + 1:]:
                checks.distinct_buffers(a, a_name, b, b_name)
        if bn.count_per_channel(x, axis) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    checks.output_array(out, library, x, [("x", x)])
    if library == CUPY:
        checks.same_device(x, [("weight", weight), ("bias", bias), *moving.items(), ("out", out)])

    with device_of(x):
        xp = namespace(library)
        dtype = kernel_dtype(x.dtype, kernels)
        layout = views.channel_layout(x, axis)
        y = views.Output(x, out, layout, dtype)
        weight64 = float64_or(xp, weight, channels, 1.0)
        bias64 = float64_or(xp, bias, channels, 0.0)
        if training and x.size == 0:  # as batch_norm: an empty y, nothing updated
            mean = var = r = d = xp.full(channels, np.nan)
        elif training:
            correction = (renorm_mean.astype(np.float64), renorm_std.astype(np.float64), rmin, rmax, dmax)
            mean, var = kernels.forward_train(views.input3(x, layout, dtype), weight64, bias64, eps, y.view, correction)
            r, d = renorm_correction(mean, var, eps, *correction)  # as the kernel computed them
            std = xp.sqrt(var + eps)
            new_std = running_average(running_std, std, momentum).astype(running_std.dtype)
            updates = [
                (running_mean, running_average(running_mean, mean, momentum)),
                (running_std, new_std),
                (running_var, xp.maximum(new_std.astype(np.float64) ** 2 - eps, 0.0)),
                (renorm_mean, running_average(renorm_mean, mean, renorm_momentum)),
                (renorm_std, running_average(renorm_std, std, renorm_momentum)),
            ]
            for target, value in updates:
                xp.copyto(target, value, casting="same_kind")
        else:
            mean = running_mean.astype(np.float64)
            var = running_var.astype(np.float64)
            r, d = xp.ones(channels), xp.zeros(channels)
            if x.size:
                kernels.normalize(views.input3(x, layout, dtype), mean, var, weight64, bias64, eps, y.view)
        result = y.result()
        if return_stats:
            saved = stats_dtype(x.dtype)
            return result, RenormStats(*(v.astype(saved) for v in (mean, inverse_std(var, eps), r, d)))
        return result


def batch_renorm_backward(dy, x, stats, weight=None, *, training=True, axis=1, out=None, backend=None):
    """Gradients of :func:`batch_renorm`, with r and d constants (Keras's ``stop_gradient``).

    ``stats`` is the forward's :class:`RenormStats`; ``training`` says whether the statistics were
    the batch's (the forward's ``training``). dx is batch norm's gradient with weight * r; dweight =
    r * sum(dy * x_hat) + d * sum(dy); dbias = sum(dy). Returns ``(dx, dweight, dbias)``.
    """
    if not all(hasattr(stats, name) for name in RenormStats._fields):
        raise TypeError(f"stats must be a RenormStats (with .mean, .invstd, .r and .d), got {type(stats).__name__}")
    library = checks.array_library(x, "x")
    channels = x.shape[checks.float_input(x, axis, library)]
    checks.channel_vector(stats.r, "stats.r", channels, library)
    checks.channel_vector(stats.d, "stats.d", channels, library)
    r, d = stats.r.astype(np.float64), stats.d.astype(np.float64)
    dx, _, sum_dy_xhat, sum_dy = bn.backward(dy, x, stats, weight, training, axis, out, backend, weight_scale=r)
    return (dx, *bn.gradient_dtype(weight, x, r * sum_dy_xhat + d * sum_dy, sum_dy))


class BatchRenorm(Layer):
    """Batch Renormalization as a layer, Keras's ``BatchNormalization(renorm=True)`` with torch's
    layer conventions (``layer(x)``, ``layer.backward(dy)``, ``train()``/``eval()``).

    ``rmax`` and ``dmax`` are numbers or functions of the step (``num_batches_tracked`` before the
    batch), by default the paper's ramps (:class:`Ramp`); ``rmin`` is a number, or None for 1 / rmax.
    Momenta weigh the batch (Keras's ``momentum=0.99`` is ``momentum=0.01``). State, under these
    names or Keras's with ``layout="keras"``: weight (gamma), bias (beta), running_mean
    (moving_mean), running_var (moving_variance), running_std (moving_stddev), renorm_mean,
    renorm_std (renorm_stddev), and num_batches_tracked (not in Keras checkpoints).
    """

    _ARRAYS = ("weight", "bias", "running_mean", "running_var", "running_std", "renorm_mean", "renorm_std")
    _COUNTERS = ("num_batches_tracked",)

    def __init__(self, num_features, eps=1e-3, momentum=0.01, renorm_momentum=0.01, affine=True, *, rmax=None,
                 dmax=None, rmin=None, axis=1, dtype=np.float32, backend=None):
        self.num_features = checks.positive_int(num_features, "num_features")
        self.eps = checks.real_number(eps, "eps", minimum=0.0)
        if self.eps == 0.0:
            raise ValueError("eps must be positive")
        self.momentum = checks.real_number(momentum, "momentum")
        self.renorm_momentum = checks.real_number(renorm_momentum, "renorm_momentum")
        self.affine = checks.boolean(affine, "affine")
        self.rmax = Ramp.paper_rmax() if rmax is None else rmax
        self.dmax = Ramp.paper_dmax() if dmax is None else dmax
        self.rmin = rmin
        _clipping(*self._clipping_at(0))  # the bounds are checked now, not at the first step
        self.axis = checks.integer(axis, "axis")
        self.dtype = dtype = checks.float_dtype(dtype)
        n = self.num_features
        self.weight = np.ones(n, dtype) if self.affine else None
        self.bias = np.zeros(n, dtype) if self.affine else None
        self.running_mean, self.renorm_mean = np.zeros(n, dtype), np.zeros(n, dtype)
        self.running_var = np.ones(n, dtype)
        self.running_std = np.ones(n, dtype)
        self.renorm_std = np.ones(n, dtype)
        self.num_batches_tracked = np.zeros((), np.int64)
        super().__init__(backend)

    def _clipping_at(self, step):
        rmax, dmax = (bound(step) if callable(bound) else bound for bound in (self.rmax, self.dmax))
        return self.rmin, rmax, dmax

    def __repr__(self):
        return (f"BatchRenorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"renorm_momentum={self.renorm_momentum}, affine={self.affine}, rmax={self.rmax!r}, "
                f"dmax={self.dmax!r}, rmin={self.rmin!r}, axis={self.axis}, dtype={self.dtype.name})")

    def forward(self, x):
        self._check_input(x, self.axis, self.num_features)
        rmin, rmax, dmax = self._clipping_at(int(self.num_batches_tracked))
        y, stats = batch_renorm(x, self.running_mean, self.running_var, self.running_std, self.renorm_mean,
                                self.renorm_std, self.weight, self.bias, self.training, self.momentum,
                                self.renorm_momentum, self.eps, rmax=rmax, dmax=dmax, rmin=rmin, axis=self.axis,
                                return_stats=True, backend=self.backend)
        if self.training:
            self.num_batches_tracked += 1
        self._save(x, stats, self.training)
        return y

    def _backward(self, dy, x, stats, training):
        return batch_renorm_backward(dy, x, stats, self.weight, training=training, axis=self.axis, backend=self.backend)

    def state_dict(self, layout="torch"):
        """The state under torch-style names, or as a Keras checkpoint with ``layout="keras"``."""
        return conventions.export(super().state_dict(), _renorm_layout(layout), self._COUNTERS)

    def load_state_dict(self, state_dict, strict=True, layout="torch"):
        """Load a state dict, or a Keras checkpoint (``{"gamma": ..., "moving_stddev": ...}``, e.g.
        from ``{w.name: w.numpy() for w in layer.weights}``) with ``layout="keras"``."""
        layout = _renorm_layout(layout)
        ours = conventions.import_(state_dict, layout, self._state_names(), self._COUNTERS)
        if layout != "torch":
            ours.setdefault("num_batches_tracked", self.num_batches_tracked)
        super().load_state_dict(ours, strict)


def _renorm_layout(layout):
    if layout not in ("torch", "keras"):
        raise ValueError(f"layout must be 'torch' or 'keras' for BatchRenorm, got {layout!r}")
    return layout
