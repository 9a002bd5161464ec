"""accelbn: PyTorch-exact batch normalization for NumPy arrays, fast to the memory floor.

>>> import numpy as np, accelbn as abn
>>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4), dtype=np.float32)
>>> y = abn.batch_norm(x, None, None, training=True)

The functional API (:func:`batch_norm`, :func:`batch_norm_backward`) follows
``torch.nn.functional.batch_norm``; :class:`BatchNorm` follows ``torch.nn.BatchNorm2d`` and loads
its state dict. Arrays are dispatched to a backend by their type: NumPy arrays run on the Numba CPU
kernels by default.
"""

from accelbn._backends import available_backends
from accelbn._functional import BatchStats, batch_norm, batch_norm_backward
from accelbn._layer import BatchNorm

__version__ = "0.1.0"

__all__ = ["BatchNorm", "BatchStats", "available_backends", "batch_norm", "batch_norm_backward"]
