"""The backend registry: which kernels serve which array library, keyed by backend and operation and
imported lazily (``accelbn.backends.<package>.<operation>``) the first time a call needs them."""

import importlib
import importlib.util
import sys

from accelbn._core.arrays import CUPY, NUMPY


class _Backend:
    def __init__(self, package, library, requires, install):
        self.package = package
        self.library = library
        self.requires = requires
        self.install = install

    def installed(self):
        if self.requires is None:
            return True
        try:
            return importlib.util.find_spec(self.requires) is not None
        except ValueError:  # imported, but without a spec (a stand-in module)
            return self.requires in sys.modules

    def missing(self):
        """Why this backend cannot run here, or None when it can."""
        if not self.installed():
            return f"install it with `{self.install}`"
        return None


class _GpuBackend(_Backend):
    _device_seen = False  # a device, once seen, does not go away; don't ask CUDA on every call

    def missing(self):
        if not self.installed():
            return super().missing()
        if not _GpuBackend._device_seen:
            import cupy

            try:
                count = cupy.cuda.runtime.getDeviceCount()
            except Exception as e:  # CuPy raises CUDARuntimeError without a driver, nothing narrower
                return f"CuPy sees no CUDA device ({type(e).__name__}: {e})"
            if count == 0:
                return "CuPy sees no CUDA device"
            _GpuBackend._device_seen = True
        return None


_BACKENDS = {
    "cupy": _GpuBackend("accelbn.backends.cuda", CUPY, "cupy", "pip install cupy-cuda13x[ctk]"),
    "numba": _Backend("accelbn.backends.numba_cpu", NUMPY, "numba", "pip install numba"),
    "numpy": _Backend("accelbn.backends.reference", NUMPY, None, None),
}
# The backend used for each array library when ``backend=None``.
_DEFAULTS = {NUMPY: "numba", CUPY: "cupy"}
# Kernel modules by (backend, operation), once found available: a backend that ran stays available for the
# process, and asking the import system on every call would cost more than a small input's kernel.
_RESOLVED = {}


def available_backends():
    """Names of the backends that can run here, fastest first, e.g. ``["numba", "numpy"]``, with
    "cupy" first when CuPy is installed and sees a GPU. Imports CuPy when it is installed."""
    return [name for name, b in _BACKENDS.items() if b.missing() is None]


def _require(backend):
    missing = _BACKENDS[backend].missing()
    if missing is not None:
        raise ValueError(f"backend {backend!r} is not available: {missing}")


def require_library(library):
    """Raise what ``backend=`` raises when the default backend of ``library`` cannot run here (for
    ``BatchNorm.to("cupy")`` without CuPy or without a device)."""
    _require(_DEFAULTS[library])


def check_name(backend):
    """``backend`` as given when it names a backend or is None; ValueError naming the argument otherwise."""
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)} or None, got {backend!r}")
    return backend


def kernels_for(backend, library, operation):
    """The kernel module of ``operation`` for ``backend`` (or the default for ``library``), checked to
    fit ``library``."""
    if backend is None:
        backend = _DEFAULTS[library]
    module = _RESOLVED.get((backend, operation))
    if module is not None and _BACKENDS[backend].library == library:
        return module
    entry = _BACKENDS[check_name(backend)]
    if entry.library != library:
        raise TypeError(f"backend {backend!r} runs on {entry.library} arrays, but x is a {library} array")
    _require(backend)
    name = f"{entry.package}.{operation}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise NotImplementedError(f"backend {backend!r} has no kernels for {operation} yet") from None
    _RESOLVED[backend, operation] = module
    return module
