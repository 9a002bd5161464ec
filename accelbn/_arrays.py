"""Which array library an array belongs to, found without importing any library.

CuPy is recognised through ``sys.modules``: if cupy was never imported, no array can be a CuPy
array, so a NumPy call never pays for (or requires) a CUDA import.
"""

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

