"""Argument checks shared by every operation and layer. Each raises before any state changes,
with a message that names the offending argument."""

import math
import numbers

import numpy as np

from accelbn._core.arrays import NUMPY, address_view, library_of

_FLOAT_ITEMSIZES = (2, 4, 8)
_FLOAT_DTYPES = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64))  # native byte order


def array_library(a, name):
    """The library of ``a`` ("numpy" or "cupy"); TypeError for anything else."""
    if type(a) is np.ndarray:  # the usual case skips the subclass tests
        return NUMPY
    library = library_of(a)
    if library is None or isinstance(a, (np.ma.MaskedArray, np.matrix)):
        raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray, got {type(a).__name__}")
    return library


def is_float_dtype(dtype):
    """float16/32/64, or bfloat16 (``ml_dtypes.bfloat16``, which NumPy sees as a void type)."""
    return (dtype.kind == "f" and dtype.itemsize in _FLOAT_ITEMSIZES) or dtype.name == "bfloat16"


def float_array(a, name, library):
    """Check that ``a`` is a float16/bfloat16/float32/float64 array of ``library``."""
    if type(a) is np.ndarray and library == NUMPY and a.dtype in _FLOAT_DTYPES:
        return  # the usual case, in one test
    other = array_library(a, name)
    if other != library:
        raise TypeError(f"{name} is a {other} array but x is a {library} array; pass arrays of one library")
    if a.dtype not in _FLOAT_DTYPES and not is_float_dtype(a.dtype):  # a hash lookup for the usual dtypes
        raise TypeError(f"{name} must have dtype float16, bfloat16, float32 or float64, got {a.dtype}")


def same_device(x, named_arrays):
    """The CuPy arrays of one call must live on CuPy array x's device (kernels run there)."""
    for name, a in named_arrays:
        if a is not None and a.device.id != x.device.id:
            raise ValueError(f"{name} is on GPU {a.device.id} but x is on GPU {x.device.id}; move it to x's device")


def _writeable(a):
    return getattr(a.flags, "writeable", True)  # CuPy arrays are always writable


def updated_in_place(a, name):
    """An array the call writes into (running statistics): it must be writable."""
    if a is not None and not _writeable(a):
        raise ValueError(f"{name} is read-only, but it is updated in place when training")


def float_input(x, axis, library):
    """Check that ``x`` is a float array of ``library`` with a channel axis ``axis``; the axis in
    [0, x.ndim)."""
    float_array(x, "x", library)
    return channel_axis(x, axis)


def channel_axis(x, axis):
    """Check ``x``'s rank and normalise ``axis`` into [0, x.ndim)."""
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch and channel), got shape {x.shape}")
    if type(axis) is not int and (not isinstance(axis, numbers.Integral) or isinstance(axis, bool)):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x with {x.ndim} dimensions")
    return int(axis) % x.ndim


def channel_vector(v, name, channels, library, writable=False):
    """Check an optional per-channel vector: None, or a float array of shape (channels,)."""
    if v is None:
        return
    float_array(v, name, library)
    if v.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) to match the channels of x, got {v.shape}")
    if writable:
        updated_in_place(v, name)


def like_x(a, name, x, library):
    """An array that goes with x (dy, a residual): a float array of x's library, shape and dtype."""
    float_array(a, name, library)
    same_shape_and_dtype(a, name, x)


def same_shape_and_dtype(a, name, x):
    if a.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {x.shape}, got {a.shape}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {a.dtype}")


def output_array(out, library, x, inputs):
    """Check ``out``: x's shape and dtype, writable, and either one of ``inputs`` exactly or disjoint."""
    if out is None:
        return
    float_array(out, "out", library)
    same_shape_and_dtype(out, "out", x)
    if not _writeable(out):
        raise ValueError("out is read-only")
    if 0 in out.strides and any(stride == 0 and n > 1 for stride, n in zip(out.strides, out.shape)):
        raise ValueError("out has elements that share memory (a zero stride); pass an array with distinct elements")
    for name, a in inputs:
        if a is not out and _shares_memory(out, a) and not _same_elements(out, a):
            raise ValueError(
                f"out overlaps {name} without being {name} itself; pass {name} (in place) or a separate array"
            )


def _same_elements(a, b):
    a, b = address_view(a), address_view(b)
    return (
        a.shape == b.shape
        and a.strides == b.strides
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


def _shares_memory(a, b):
    """Exact overlap from addresses and strides alone: no device work, no synchronization."""
    return np.shares_memory(address_view(a), address_view(b))


def distinct_buffers(a, a_name, b, b_name):
    """Two arrays that are both written must not share memory."""
    if a is not None and b is not None and _shares_memory(a, b):
        raise ValueError(f"{a_name} and {b_name} share memory; pass separate arrays")


def positive_int(value, name):
    """A positive int (not a bool), such as a channel or group count."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def integer(value, name):
    """An int (not a bool), such as a layer's channel axis before it meets an x."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def float_dtype(dtype):
    """A layer's parameter dtype: float16, bfloat16, float32 or float64."""
    dtype = np.dtype(dtype)
    if not is_float_dtype(dtype):
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    return dtype


def boolean(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def real_number(value, name, minimum=None, infinite=False):
    """A finite real number (not a bool), at least ``minimum`` when given; +inf too with ``infinite``."""
    if type(value) is not float:  # the usual case skips the slow abstract-class test
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        value = float(value)
    allowed = math.isfinite(value) or (infinite and value == math.inf)
    if not allowed or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        kind = "a number (or inf)" if infinite else "a finite number"
        raise ValueError(f"{name} must be {kind}{bound}, got {value}")
    return value
