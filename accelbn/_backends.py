"""The backend registry: which kernels serve which array library, loaded lazily by name."""

import importlib
import importlib.util

from accelbn._arrays import NUMPY


class _Backend:
    def __init__(self, module, library, requires, install):
        self.module = module
        self.library = library
        self.requires = requires
        self.install = install

    def installed(self):
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


_BACKENDS = {
    "numba": _Backend("accelbn.backends.numba_cpu", NUMPY, "numba", "pip install numba"),
    "numpy": _Backend("accelbn.backends.numpy_reference", NUMPY, None, None),
}
# The backend used for each array library when ``backend=None``.
_DEFAULTS = {NUMPY: "numba"}


def available_backends():
    """Names of the backends that can run here, fastest first, e.g. ``["numba", "numpy"]``."""
    return [name for name, b in _BACKENDS.items() if b.installed()]


def kernels_for(backend, library):
    """The kernel module for ``backend`` (or the default for ``library``), checked to fit ``library``."""
    if backend is None:
        if library not in _DEFAULTS:
            raise TypeError(
                f"x is a {library} array, but no accelbn backend in this version runs on {library} "
                f"arrays; backends: {sorted(_BACKENDS)}"
            )
        backend = _DEFAULTS[library]
    entry = _BACKENDS.get(backend)
    if entry is None:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)} or None, got {backend!r}")
    if entry.library != library:
        raise TypeError(f"backend {backend!r} runs on {entry.library} arrays, but x is a {library} array")
    if not entry.installed():
        raise ValueError(f"backend {backend!r} is not available: install it with `{entry.install}`")
    return importlib.import_module(entry.module)
