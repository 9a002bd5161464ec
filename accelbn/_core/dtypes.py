"""The dtypes a call works in: what the kernels read and write, and what saved statistics and
gradients are returned as."""

import numpy as np


def stats_dtype(x_dtype):
    """The dtype of saved statistics and of gradients without a weight: float64 only for float64 x."""
    return np.dtype(np.float64) if x_dtype == np.float64 else np.dtype(np.float32)


def kernel_dtype(x_dtype, kernels):
    """The dtype kernels read and write: x's own when the backend stores it (in native byte order),
    else float32 (float16 and bfloat16 on the CPU)."""
    if x_dtype in kernels.STORAGE_DTYPES:
        return x_dtype
    native = np.dtype(x_dtype.type)
    return native if native in kernels.STORAGE_DTYPES else np.dtype(np.float32)


def float64_or(xp, v, channels, fill):
    """An optional per-channel vector as float64, or ``fill`` in every channel when it is None."""
    return xp.full(channels, fill, dtype=np.float64) if v is None else v.astype(np.float64)
