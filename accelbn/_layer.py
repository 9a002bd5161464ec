"""``BatchNorm``: the stateful layer, with PyTorch's ``BatchNorm{1,2,3}d`` buffers and state dict."""

import numbers

import numpy as np

from accelbn import _checks
from accelbn._arrays import CUPY, NUMPY, library_of, namespace
from accelbn._backends import require_library
from accelbn._functional import batch_norm, batch_norm_backward

_LIBRARIES = (NUMPY, CUPY)


class BatchNorm:
    """Batch normalization over channel axis ``axis`` of N-d NumPy arrays, like ``torch.nn.BatchNorm2d``.

    Parameters and buffers are NumPy arrays of ``dtype``, or CuPy arrays after ``layer.to("cupy")``:
    ``weight`` (ones) and ``bias`` (zeros) when ``affine`` (with ``bias=False``, a weight and no
    bias, as in PyTorch); ``running_mean`` (zeros), ``running_var`` (ones) and
    ``num_batches_tracked`` (a 0-d int64 array) when ``track_running_stats``. ``momentum=None``
    averages the running statistics cumulatively, with factor 1 / num_batches_tracked.

    ``layer(x)`` runs the forward pass and keeps ``x`` (by reference) and its statistics;
    ``layer.backward(dy)`` returns dx and stores ``grad_weight`` and ``grad_bias`` (overwriting,
    not accumulating).
    """

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
    ):
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.eps = _checks.real_number(eps, "eps", minimum=0.0)
        self.momentum = None if momentum is None else _checks.real_number(momentum, "momentum")
        self.affine = _checks.boolean(affine, "affine")
        self.track_running_stats = _checks.boolean(track_running_stats, "track_running_stats")
        has_bias = _checks.boolean(bias, "bias") and self.affine
        if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        self.axis = int(axis)
        dtype = np.dtype(dtype)
        if not _checks.is_float_dtype(dtype):
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
        self.num_features = int(num_features)
        self.dtype = dtype
        self.weight = np.ones(num_features, dtype) if affine else None
        self.bias = np.zeros(num_features, dtype) if has_bias else None
        if track_running_stats:
            self.running_mean = np.zeros(num_features, dtype)
            self.running_var = np.ones(num_features, dtype)
            self.num_batches_tracked = np.zeros((), np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.training = True
        self.grad_weight = self.grad_bias = None
        self._saved = None

    def __repr__(self):
        return (
            f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, axis={self.axis}, dtype={self.dtype.name}"
            + ("" if self.bias is not None or not self.affine else ", bias=False")
            + ")"
        )

    def _arrays(self):
        return [n for n in ("weight", "bias", "running_mean", "running_var") if getattr(self, n) is not None]

    @property
    def library(self):
        """"numpy" or "cupy": where the parameters and running statistics live."""
        return library_of(self.running_mean if self.weight is None else self.weight) or NUMPY

    def to(self, library):
        """Move the parameters and running statistics to ``"numpy"`` or ``"cupy"`` arrays (CuPy's
        current device), like ``module.cuda()``/``module.cpu()``; returns the layer.
        ``num_batches_tracked`` stays a host counter, so a training step never waits for the GPU."""
        if library not in _LIBRARIES:
            raise ValueError(f"library must be one of {list(_LIBRARIES)}, got {library!r}")
        require_library(library)
        for name in self._arrays():
            value = getattr(self, name)
            if library_of(value) == library:
                continue
            setattr(self, name, namespace(CUPY).asarray(value) if library == CUPY else value.get())
        self.grad_weight = self.grad_bias = None
        self._saved = None
        return self

    def train(self, mode=True):
        self.training = _checks.boolean(mode, "mode")
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        """Normalize x; in training, update the running statistics when they are tracked."""
        library = _checks.array_library(x, "x")
        if self._arrays() and library != self.library:
            raise TypeError(
                f"x is a {library} array but this layer's parameters are {self.library} arrays; "
                f"call layer.to({library!r}) first"
            )
        channels = x.shape[_checks.channel_axis(x, self.axis)]
        if channels != self.num_features:
            raise ValueError(f"x has {channels} channels on axis {self.axis}, but this layer has {self.num_features}")
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
        )
        if updates_running:
            self.num_batches_tracked += 1
        self._saved = (x, stats, use_batch_stats)
        return y

    def backward(self, dy):
        """dx for the last forward pass; stores ``grad_weight`` and ``grad_bias`` when affine."""
        if self._saved is None:
            raise RuntimeError("backward() needs a forward pass first: call layer(x) before layer.backward(dy)")
        x, stats, use_batch_stats = self._saved
        dx, grad_weight, grad_bias = batch_norm_backward(
            dy, x, stats, self.weight, training=use_batch_stats, axis=self.axis
        )
        if self.affine:
            self.grad_weight = grad_weight
            self.grad_bias = grad_bias if self.bias is not None else None
        return dx

    def _state_names(self):
        names = [n for n in ("weight", "bias") if getattr(self, n) is not None]
        if self.track_running_stats:
            names += ["running_mean", "running_var", "num_batches_tracked"]
        return names

    def state_dict(self):
        """Copies of the parameters and buffers under PyTorch's keys and shapes."""
        return {name: getattr(self, name).copy() for name in self._state_names()}

    def load_state_dict(self, state_dict, strict=True):
        """Load a state dict (e.g. a PyTorch BatchNorm's, as NumPy arrays or CPU tensors).

        Every entry is checked before any is written. With ``strict=True`` the keys must match
        :meth:`state_dict`'s exactly; with ``strict=False`` missing and unexpected keys are ignored
        (e.g. for old checkpoints without ``num_batches_tracked``).
        """
        names = self._state_names()
        missing = [n for n in names if n not in state_dict]
        unexpected = [k for k in state_dict if k not in names]
        if strict and (missing or unexpected):
            raise KeyError(f"state_dict does not match this layer: missing {missing}, unexpected {unexpected}")
        staged = {}
        for name in names:
            if name not in state_dict:
                continue
            value = state_dict[name]
            if library_of(value) == CUPY:
                value = value.get()
            value = np.asarray(value.detach() if hasattr(value, "detach") else value)  # torch parameters too
            target = getattr(self, name)
            if value.shape != target.shape:
                raise ValueError(f"state_dict[{name!r}] must have shape {target.shape}, got {value.shape}")
            counter = name == "num_batches_tracked"
            kind_name = "integer" if counter else "float"
            if not (value.dtype.kind in "iu" if counter else _checks.is_float_dtype(value.dtype)):
                raise TypeError(f"state_dict[{name!r}] must be a {kind_name} array, got dtype {value.dtype}")
            staged[name] = value
        for name, value in staged.items():
            target = getattr(self, name)
            xp = namespace(library_of(target))
            xp.copyto(target, xp.asarray(value), casting="unsafe")
