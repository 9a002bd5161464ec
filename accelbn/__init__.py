"""accelbn: PyTorch-exact batch normalization for NumPy arrays, fast to the memory floor.

>>> import numpy as np, accelbn as abn
>>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4), dtype=np.float32)
>>> y = abn.batch_norm(x, None, None, training=True)

The functional API (:func:`batch_norm`, :func:`batch_norm_backward`) follows
``torch.nn.functional.batch_norm``; :class:`BatchNorm` follows ``torch.nn.BatchNorm2d`` and loads
its state dict. Arrays are dispatched to a backend by their type: NumPy arrays run on the Numba CPU
kernels by default.

The front is one module per operation (``accelbn._ops``) on a shared core (``accelbn._core``:
argument checks, array libraries, strided views, the backend registry, the layer base class); the
kernels are in ``accelbn.backends``; ``python -m accelbn`` is ``accelbn._cli``.
"""

import os as _os

# The kernels live beside this package in a source checkout (backends/, installed as
# accelbn.backends). When Python imports the checkout itself, as it does from the checkout's root
# even after a non-editable install, let accelbn.backends resolve to that folder.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "backends")) and _os.path.isfile(
    _os.path.join(_checkout, "backends", "formulas.py")
):
    __path__.append(_checkout)

from accelbn._core.registry import available_backends  # noqa: E402
from accelbn._ops.batch_norm import BatchNorm, BatchStats, FrozenBatchNorm, batch_norm, batch_norm_backward  # noqa: E402
from accelbn._ops.batch_renorm import BatchRenorm, Ramp, RenormStats, batch_renorm, batch_renorm_backward  # noqa: E402
from accelbn._ops.fold import fold_batch_norm  # noqa: E402
from accelbn._ops.fused import batch_norm_relu, batch_norm_relu_backward  # noqa: E402
from accelbn._ops.group_norm import (  # noqa: E402
    GroupNorm,
    InstanceNorm,
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
)
from accelbn._ops.layer_norm import (  # noqa: E402
    LayerNorm,
    RMSNorm,
    layer_norm,
    layer_norm_backward,
    rms_norm,
    rms_norm_backward,
)
from accelbn._ops.row_norm import Stats  # noqa: E402
from accelbn._ops.sync_batch_norm import SyncBatchNorm, SyncError, sync_batch_norm, sync_batch_norm_backward  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "BatchStats",
    "FrozenBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "Ramp",
    "RenormStats",
    "Stats",
    "SyncBatchNorm",
    "SyncError",
    "available_backends",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_relu",
    "batch_norm_relu_backward",
    "batch_renorm",
    "batch_renorm_backward",
    "fold_batch_norm",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "rms_norm",
    "rms_norm_backward",
    "sync_batch_norm",
    "sync_batch_norm_backward",
]
