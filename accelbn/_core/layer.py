"""``Layer``: what every normalization layer shares, with PyTorch's module conventions: train and
eval modes, ``layer(x)`` then ``layer.backward(dy)`` with the gradients of the parameters stored on
the layer, ``to("numpy" | "cupy")``, and ``state_dict`` / ``load_state_dict`` under torch's keys.

A subclass names its state under torch's keys and in its order: float arrays in ``_ARRAYS``
(parameters and running statistics, each None when the layer has none) and integer counters in
``_COUNTERS``; and implements ``forward`` (saving what its backward needs with :meth:`Layer._save`)
and ``_backward``.
"""

import numpy as np

from accelbn._core import checks, registry
from accelbn._core.arrays import CUPY, NUMPY, library_of, namespace

_LIBRARIES = (NUMPY, CUPY)


class Layer:
    _ARRAYS = ()  # float parameters and buffers, which move with to()
    _COUNTERS = ()  # integer buffers, kept as host counters

    def __init__(self, backend=None):
        self.backend = registry.check_name(backend)
        self.training = True
        self.grad_weight = self.grad_bias = None
        self._saved = None

    def _state_names(self):
        """The parameters and buffers the layer has, under torch's keys and in its order."""
        return [name for name in (*self._ARRAYS, *self._COUNTERS) if getattr(self, name) is not None]

    def _arrays(self):
        return [name for name in self._ARRAYS if getattr(self, name) is not None]

    @property
    def library(self):
        """"numpy" or "cupy": where the parameters and running statistics live."""
        arrays = self._arrays()
        return (library_of(getattr(self, arrays[0])) if arrays else None) or NUMPY

    def to(self, library):
        """Move the parameters and running statistics to ``"numpy"`` or ``"cupy"`` arrays (CuPy's
        current device), like ``module.cuda()``/``module.cpu()``; returns the layer. Counters such as
        ``num_batches_tracked`` stay on the host, so a training step never waits for the GPU."""
        if library not in _LIBRARIES:
            raise ValueError(f"library must be one of {list(_LIBRARIES)}, got {library!r}")
        registry.require_library(library)
        for name in self._arrays():
            value = getattr(self, name)
            if library_of(value) == library:
                continue
            setattr(self, name, namespace(CUPY).asarray(value) if library == CUPY else value.get())
        self.grad_weight = self.grad_bias = None
        self._saved = None
        return self

    def train(self, mode=True):
        self.training = checks.boolean(mode, "mode")
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, x):
        return self.forward(x)

    def _check_library(self, x):
        """x's library, which must be the layer's (TypeError saying how to move the layer otherwise)."""
        library = checks.array_library(x, "x")
        arrays = self._arrays()
        if arrays and library != (library_of(getattr(self, arrays[0])) or NUMPY):
            raise TypeError(
                f"x is a {library} array but this layer's parameters are {self.library} arrays; "
                f"call layer.to({library!r}) first"
            )
        return library

    def _check_input(self, x, axis, channels):
        """:meth:`_check_library`, and x's length on ``axis`` must be the layer's ``channels``."""
        self._check_library(x)
        found = x.shape[checks.channel_axis(x, axis)]
        if found != channels:
            raise ValueError(f"x has {found} channels on axis {axis}, but this layer has {channels}")

    def _save(self, *saved):
        self._saved = saved

    def backward(self, dy):
        """dx for the last forward pass; stores ``grad_weight`` and ``grad_bias`` for the parameters
        the layer has (overwriting, not accumulating)."""
        if self._saved is None:
            raise RuntimeError("backward() needs a forward pass first: call layer(x) before layer.backward(dy)")
        dx, grad_weight, grad_bias = self._backward(dy, *self._saved)
        if self.weight is not None:
            self.grad_weight = grad_weight
            self.grad_bias = grad_bias if self.bias is not None else None
        return dx

    def state_dict(self):
        """Copies of the parameters and buffers under PyTorch's keys and shapes."""
        return {name: getattr(self, name).copy() for name in self._state_names()}

    def load_state_dict(self, state_dict, strict=True):
        """Load a state dict (e.g. a PyTorch module's, as NumPy arrays or CPU tensors).

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
            counter = name in self._COUNTERS
            kind_name = "integer" if counter else "float"
            if not (value.dtype.kind in "iu" if counter else checks.is_float_dtype(value.dtype)):
                raise TypeError(f"state_dict[{name!r}] must be a {kind_name} array, got dtype {value.dtype}")
            staged[name] = value
        for name, value in staged.items():
            target = getattr(self, name)
            xp = namespace(library_of(target))
            xp.copyto(target, xp.asarray(value), casting="unsafe")
