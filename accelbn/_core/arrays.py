"""Which array library an array belongs to, found without importing any library, and the few
library-specific facts the front needs (namespace, device, an address-only view for overlap tests).

CuPy is recognised through ``sys.modules``: if cupy was never imported, no array can be a CuPy
array, so a NumPy call never pays for (or requires) a CUDA import.
"""

import contextlib
import sys

import numpy as np

NUMPY = "numpy"
CUPY = "cupy"


def library_of(a):
    """Return "numpy" or "cupy" for an array, or None for anything else."""
    if isinstance(a, np.ndarray):
        return NUMPY
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(a, cupy.ndarray):
        return CUPY
    return None


def namespace(library):
    """The array module of ``library``: numpy, or cupy (already imported if a CuPy array exists)."""
    return np if library == NUMPY else sys.modules["cupy"]


def device_of(a):
    """A context that makes ``a``'s device current (CuPy), or does nothing (NumPy)."""
    return a.device if library_of(a) == CUPY else _NO_DEVICE


_NO_DEVICE = contextlib.nullcontext()  # reusable, and cheaper than a new one per call


def address_view(a):
    """A NumPy array with ``a``'s address, shape and strides, for overlap tests only: its memory
    is never read (for a CuPy array it is device memory)."""
    if isinstance(a, np.ndarray):
        return a

    class _Extent:
        __array_interface__ = {
            "shape": a.shape,
            "typestr": f"|V{a.dtype.itemsize}",
            "data": (a.data.ptr, False),
            "strides": a.strides,
            "version": 3,
        }

    return np.asarray(_Extent())
