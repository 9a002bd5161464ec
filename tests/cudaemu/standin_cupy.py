"""A stand-in ``cupy``: the part of CuPy that accelbn and its tests use, over guarded host memory,
with ``RawModule`` building kernels through the CUDA-on-CPU harness. The ``emulated_cupy`` fixture
(tests/conftest.py) puts ``MODULE`` in ``sys.modules`` for one test, with ``after_launch`` checking
every launch, and restores the real module afterwards.

It behaves as CuPy does where accelbn could tell the difference: ``ndarray`` is not a NumPy array,
``np.asarray`` on one raises TypeError (results come back with ``.get()``), mixing a NumPy array
into an operation raises TypeError, and a reduction returns a 0-d array. Anything CuPy has and this
module lacks raises AttributeError naming it, so a new use shows up instead of passing by accident.

Device memory: every allocation ends at an inaccessible page, with one before it, so a kernel that
reads or writes past the end faults; the bytes between the start of its first page and the array
(and the few bytes of padding after it) hold a canary checked after every launch, so writes before
the start show too. New memory is filled with 0xFF bytes (NaN for floats), as uninitialised device
memory could hold anything.
"""

import contextlib
import ctypes
import mmap
import types
import weakref

import numpy as np

from cudaemu import runtime

_PAGE = mmap.PAGESIZE
_CANARY = 0xA5
_libc = ctypes.CDLL(None, use_errno=True)
_live = weakref.WeakSet()


class _Allocation:
    def __init__(self, nbytes, what):
        self.what = what
        padded = (nbytes + 15) // 16 * 16
        body = max(_PAGE, (padded + _PAGE - 1) // _PAGE * _PAGE)
        self._map = mmap.mmap(-1, body + 2 * _PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        for guard in (base, base + _PAGE + body):
            if _libc.mprotect(ctypes.c_void_p(guard), ctypes.c_size_t(_PAGE), 0) != 0:
                raise OSError(ctypes.get_errno(), "mprotect of a guard page failed")
        self._body = np.frombuffer(self._map, np.uint8, count=body, offset=_PAGE)
        self._offset = body - padded  # the array sits at the end of its pages
        self.nbytes = nbytes
        self.start = base + _PAGE + self._offset
        self.buffer = self._body[self._offset : self._offset + nbytes]
        self.arm_canaries()
        _live.add(self)

    def describe(self):
        return f"{self.what} ({self.nbytes} bytes)"

    def where(self, address):
        """Where ``address`` lies relative to this allocation, or None when it is not near it."""
        low, high = self.start - self._offset - _PAGE, self.start + self.nbytes + _PAGE + 16
        if not low <= address < high:
            return None
        if address < self.start:
            return f"{self.start - address} bytes before the start of {self.describe()}"
        if address >= self.start + self.nbytes:
            return f"{address - self.start - self.nbytes} bytes past the end of {self.describe()}"
        return f"inside {self.describe()}"

    def arm_canaries(self):
        """Fill the bytes around the array with the canary."""
        self._body[: self._offset] = _CANARY
        self._body[self._offset + self.nbytes :] = _CANARY

    def canary_damage(self):
        before = self._body[: self._offset]
        after = self._body[self._offset + self.nbytes :]
        if (before != _CANARY).any():
            return f"a kernel wrote {self._offset - int(np.flatnonzero(before != _CANARY)[0])} bytes before the start of {self.describe()}"
        if (after != _CANARY).any():
            return f"a kernel wrote {int(np.flatnonzero(after != _CANARY)[0]) + 1} bytes past the end of {self.describe()}"
        return None


def after_launch(message):
    """Names the allocation a fault hit, or reports a canary a launch overwrote."""
    if message and "at address 0x" in message:
        address = int(message.split("at address ")[1].split()[0], 16)
        for a in list(_live):
            where = a.where(address)
            if where:
                return f"{message} ({where})"
        return message
    for a in list(_live):
        damage = a.canary_damage()
        if damage:
            a.arm_canaries()  # report it once
            return damage
    return message


class MemoryPointer:
    __slots__ = ("mem", "ptr")

    def __init__(self, mem, ptr):
        self.mem, self.ptr = mem, ptr

    def __add__(self, offset):
        return MemoryPointer(self.mem, self.ptr + int(offset))


class _Synchronous(contextlib.AbstractContextManager):
    """A context a launch runs in; everything here has finished when the launch returns."""

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


class Device(_Synchronous):
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise ValueError(f"the stand-in cupy has one device, 0, not {self.id}")


class Stream(_Synchronous):
    ptr = 0  # the null stream's handle

    def __init__(self, null=False, non_blocking=False, ptds=False):
        pass


def _host(x, what="operand"):
    """The NumPy array behind a stand-in array; scalars pass; NumPy arrays are refused, as by CuPy."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type <class 'numpy.ndarray'> as {what}: move it with cupy.asarray first")
    if isinstance(x, (list, tuple)):
        return type(x)(_host(v, what) for v in x)
    return x


class ndarray:
    """A device array: a NumPy view into an ``_Allocation`` (``_mem``)."""

    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        if memptr is None:
            fresh = _new(shape, dtype, order)
            self._a, self._mem = fresh._a, fresh._mem
            return
        mem = memptr.mem
        self._mem = mem
        self._a = np.ndarray(shape, dtype, buffer=mem.buffer, offset=memptr.ptr - mem.start, strides=strides, order=order)

    @classmethod
    def _of(cls, a, mem):
        self = cls.__new__(cls)
        self._a, self._mem = a, mem
        return self

    def _wrap(self, result):
        """A view of this array stays in its memory; anything new moves into device memory."""
        if isinstance(result, np.ndarray) and result.base is not None and np.may_share_memory(result, self._a):
            return ndarray._of(result, self._mem)
        return _adopt(result)

    def __array__(self, *args, **kwargs):
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array explicitly."
        )

    # --- attributes ---
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    strides = property(lambda self: self._a.strides)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    T = property(lambda self: self._wrap(self._a.T))
    device = property(lambda self: Device(0))

    @property
    def data(self):
        return MemoryPointer(self._mem, self._a.__array_interface__["data"][0])

    @property
    def flags(self):
        # CuPy's flags: no "writeable", every device array can be written
        return types.SimpleNamespace(c_contiguous=self._a.flags.c_contiguous, f_contiguous=self._a.flags.f_contiguous,
                                     owndata=self._a.base is None)

    # --- methods ---
    def get(self, stream=None, out=None):
        if out is not None:
            out[...] = self._a
            return out
        return self._a.copy()

    def set(self, arr, stream=None):
        self._a[...] = arr

    def copy(self, order="C"):
        return _adopt(self._a.copy(order=order))

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _adopt(self._a.astype(dtype, order=order))

    def reshape(self, *shape, order="C"):
        return self._wrap(self._a.reshape(*shape, order=order))

    def transpose(self, *axes):
        return self._wrap(self._a.transpose(*axes))

    def ravel(self, order="C"):
        return self._wrap(self._a.ravel(order))

    def view(self, dtype):
        return self._wrap(self._a.view(dtype))

    def fill(self, value):
        self._a.fill(value)

    def sum(self, axis=None, dtype=None, keepdims=False):
        return _adopt(np.asarray(self._a.sum(axis=axis, dtype=dtype, keepdims=keepdims)))

    def mean(self, axis=None, keepdims=False):
        return _adopt(np.asarray(self._a.mean(axis=axis, keepdims=keepdims)))

    def max(self, axis=None, keepdims=False):
        return _adopt(np.asarray(self._a.max(axis=axis, keepdims=keepdims)))

    def argmax(self, axis=None):
        return _adopt(np.asarray(self._a.argmax(axis=axis)))

    def __getitem__(self, key):
        return self._wrap(self._a[_host(key, "index")])

    def __setitem__(self, key, value):
        self._a[_host(key, "index")] = _host(value, "value")

    def __len__(self):
        return len(self._a)

    def __bool__(self):
        return bool(self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __index__(self):
        return self._a.__index__()

    def __repr__(self):
        return "standin_cupy." + repr(self._a)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        kwargs = {k: _host(v, k) for k, v in kwargs.items()}
        result = getattr(ufunc, method)(*_host(inputs), **kwargs)
        if out is not None:
            return out[0] if isinstance(out, tuple) and len(out) == 1 else out
        return _adopt(result)


def _operator(name):
    def op(self, other):
        result = getattr(self._a, name)(_host(other))
        return self if name.startswith("__i") else _adopt(result)

    op.__name__ = name
    return op


for _name in ["add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "matmul"]:
    for _pattern in ("__{}__", "__r{}__", "__i{}__"):
        setattr(ndarray, _pattern.format(_name), _operator(_pattern.format(_name)))
for _name in ["__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__"]:
    setattr(ndarray, _name, _operator(_name))
for _name in ["__neg__", "__pos__", "__abs__"]:
    setattr(ndarray, _name, (lambda n: lambda self: _adopt(getattr(self._a, n)()))(_name))


def _new(shape, dtype, order="C", fill=0xFF):
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    mem = _Allocation(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, f"a {dtype} array of shape {shape}")
    mem.buffer.fill(fill)
    return ndarray._of(mem.buffer.view(dtype).reshape(shape, order=order), mem)


def _adopt(result):
    """A NumPy result as a stand-in array in new device memory (0-d for a scalar, as CuPy returns)."""
    if isinstance(result, (np.ndarray, np.generic)):
        result = np.asarray(result)
        out = _new(result.shape, result.dtype, "F" if result.flags.f_contiguous and not result.flags.c_contiguous else "C")
        out._a[...] = result
        return out
    return result


# --- module functions ---


def empty(shape, dtype=float, order="C"):
    return _new(shape, dtype, order)


def empty_like(a, dtype=None, order="K", shape=None):
    return _new(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def zeros(shape, dtype=float, order="C"):
    return _new(shape, dtype, order, fill=0)


def zeros_like(a, dtype=None):
    return zeros(a.shape, a.dtype if dtype is None else dtype)


def ones(shape, dtype=float):
    return full(shape, 1, dtype)


def full(shape, fill_value, dtype=None):
    out = _new(shape, np.asarray(fill_value).dtype if dtype is None else dtype)
    out._a[...] = fill_value
    return out


def array(obj, dtype=None, copy=True, order="K"):
    source = obj._a if isinstance(obj, ndarray) else np.asarray(obj)
    return _adopt(source.astype(dtype) if dtype is not None else source)


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return array(a, dtype=dtype)


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray) and a._a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    source = _host(a, "a")
    return _adopt(np.ascontiguousarray(source, dtype=dtype))


def asnumpy(a, stream=None, out=None):
    return a.get(out=out) if isinstance(a, ndarray) else np.asarray(a)


def copyto(dst, src, casting="same_kind", where=None):
    if not isinstance(dst, ndarray):
        raise TypeError(f"copyto: dst must be a cupy.ndarray, got {type(dst).__name__}")
    np.copyto(dst._a, _host(src, "src"), casting=casting)


def _numpy_function(function):
    """A CuPy function with NumPy's semantics: stand-in arrays in, a new stand-in array out."""

    def call(*args, **kwargs):
        return _adopt(function(*_host(args, "argument"), **{k: _host(v, k) for k, v in kwargs.items()}))

    call.__name__ = function.__name__
    return call


# Functions with NumPy's semantics that the front (sqrt, maximum) and the demo's CNN (accelbn/_demo/cnn.py) call.
_NUMPY_FUNCTIONS = ["sqrt", "maximum", "pad", "einsum", "exp", "log", "arange"]


class RawModule:
    def __init__(self, code=None, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, name_expressions=None, jitify=False):
        if code is None:
            with open(path) as f:
                code = f.read()
        self._module = runtime.Module(code, name_expressions or (), options, "kernel.cu" if path is None else path)

    def get_function(self, name):
        return self._module.get_function(name)


def _as_strided(a, shape=None, strides=None):
    return ndarray._of(np.lib.stride_tricks.as_strided(a._a, shape, strides), a._mem)


def _build():
    module = types.ModuleType("cupy", "the stand-in cupy of tests/cudaemu")
    for name in ["ndarray", "empty", "empty_like", "zeros", "zeros_like", "ones", "full", "array", "asarray",
                 "ascontiguousarray", "asnumpy", "copyto", "RawModule"]:
        setattr(module, name, globals()[name])
    for name in ["float16", "float32", "float64", "int32", "int64", "bool_"]:
        setattr(module, name, getattr(np, name))
    for name in _NUMPY_FUNCTIONS:
        setattr(module, name, _numpy_function(getattr(np, name)))
    module.linalg = types.SimpleNamespace(norm=_numpy_function(np.linalg.norm))
    module.lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(as_strided=_as_strided))
    module.cuda = types.SimpleNamespace(
        Device=Device, Stream=Stream, MemoryPointer=MemoryPointer, get_current_stream=Stream,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
    )
    module.__standin__ = True

    def __getattr__(name):
        raise AttributeError(f"the stand-in cupy (tests/cudaemu/standin_cupy.py) has no {name!r}; add it there")

    module.__getattr__ = __getattr__
    return module


MODULE = _build()

