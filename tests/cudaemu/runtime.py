"""Loading a built library and launching its kernels as CuPy does: ``kernel(grid, block, args,
shared_mem=...)``, every argument checked against the kernel's parameter type first."""

import contextlib
import ctypes
import re
import shutil
import subprocess

import ml_dtypes
import numpy as np

from cudaemu.build import build

(K_OTHER, K_BOOL, K_I8, K_U8, K_I16, K_U16, K_I32, K_U32, K_I64, K_U64, K_F16, K_BF16, K_F32, K_F64) = range(14)
KIND_NAMES = ["other", "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
              "float16", "bfloat16", "float32", "float64"]
_DTYPE_KINDS = {
    np.dtype(t): k
    for t, k in [(np.bool_, K_BOOL), (np.int8, K_I8), (np.uint8, K_U8), (np.int16, K_I16), (np.uint16, K_U16),
                 (np.int32, K_I32), (np.uint32, K_U32), (np.int64, K_I64), (np.uint64, K_U64),
                 (np.float16, K_F16), (ml_dtypes.bfloat16, K_BF16), (np.float32, K_F32), (np.float64, K_F64)]
}
# CuPy passes a Python bool, int or float as bool, 64-bit int or double: anything narrower in the
# kernel would read part of it (on a GPU, silently).
_PYTHON_KINDS = {bool: (K_BOOL, np.bool_), int: (K_I64, np.int64), float: (K_F64, np.float64)}

SCHEDULES = {"forward": 0, "reverse": 1, "random": 2, "warp-ahead-high": 3, "warp-ahead-low": 4}


class KernelError(RuntimeError):
    """A launch broke a CUDA rule or faulted; the message names the kernel, block, thread and line."""


class _Settings:
    schedule = "forward"
    seed = 0
    # Called after every launch with the error message (or None); returns a replacement message.
    # The stand-in cupy uses it to check its allocations' canaries and to name faulting addresses.
    after_launch = None


settings = _Settings()
# Name expressions of every kernel launched in this process.
launched = set()


@contextlib.contextmanager
def schedule(name, seed=0):
    """Launches inside the block run their fibers and blocks in ``name`` order."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {name!r}")
    saved = settings.schedule, settings.seed
    settings.schedule, settings.seed = name, seed
    try:
        yield
    finally:
        settings.schedule, settings.seed = saved


def _source_line(library, message):
    """``message`` with the source lines (inline chain, innermost first) of a fault's pc-offset."""
    match = re.search(r" \[pc-offset (0x[0-9a-f]+)\]", message)
    if not match:
        return message
    where = "source line unknown (no addr2line)"
    if shutil.which("addr2line"):
        out = subprocess.run(["addr2line", "-e", str(library), "-f", "-i", "-C", match.group(1)],
                             capture_output=True, text=True).stdout.split("\n")
        frames = [f"{out[i + 1].rsplit('/', 1)[-1]} in {out[i].split('(')[0]}" for i in range(0, len(out) - 1, 2)]
        where = "at " + ", inlined into ".join(frames)
    return message[: match.start()] + ", " + where


class Function:
    def __init__(self, module, index, name):
        self.module, self.index, self.name = module, index, name
        out = (ctypes.c_int * 4)()
        self.params = []
        for j in range(module.lib.cudaemu_nparams(index)):
            module.lib.cudaemu_param(index, j, out)
            self.params.append(tuple(out))

    def _argument(self, j, a, param):
        is_pointer, kind, size, _ = param
        if is_pointer:
            ptr = getattr(getattr(a, "data", None), "ptr", None)
            if not isinstance(ptr, int) or not hasattr(a, "dtype"):
                raise TypeError(f"{self.name}: argument {j} must be a device array (the parameter is a pointer), "
                                f"got {type(a).__name__}")
            if kind != K_OTHER and _DTYPE_KINDS.get(np.dtype(a.dtype)) != kind:
                raise TypeError(f"{self.name}: argument {j} must be a {KIND_NAMES[kind]} array, got {a.dtype}")
            return ctypes.c_void_p(ptr)
        if isinstance(a, np.generic):
            got, raw = _DTYPE_KINDS.get(a.dtype, K_OTHER), a.tobytes()
        elif type(a) in _PYTHON_KINDS:
            got, numpy_type = _PYTHON_KINDS[type(a)]
            raw = numpy_type(a).tobytes()
        else:
            raise TypeError(f"{self.name}: argument {j} must be a scalar, got {type(a).__name__}")
        if got != kind or len(raw) != size:
            raise TypeError(f"{self.name}: argument {j} is a {KIND_NAMES[got]} ({len(raw)} bytes) but the kernel "
                            f"takes a {KIND_NAMES[kind]} ({size} bytes)")
        return ctypes.create_string_buffer(raw, 8)

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None):
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        values = [self._argument(j, a, p) for j, (a, p) in enumerate(zip(args, self.params))]
        pointers = (ctypes.c_void_p * max(1, len(values)))(
            *[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values]
        )
        err = ctypes.create_string_buffer(4096)
        failed = self.module.lib.cudaemu_launch(
            self.index, (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), ctypes.c_ulonglong(shared_mem),
            pointers, SCHEDULES[settings.schedule], ctypes.c_uint(settings.seed), err, ctypes.c_ulonglong(len(err)),
        )
        launched.add(self.name)
        message = _source_line(self.module.path, err.value.decode()) if failed else None
        if settings.after_launch is not None:
            message = settings.after_launch(message)
        if message:
            raise KernelError(f"{self.name} grid={grid} block={block}: {message}")


class Module:
    """The kernels of one CUDA source, built for the host: ``get_function(name_expression)``."""

    def __init__(self, code, name_expressions, options=(), filename="kernel.cu"):
        self.path = build(code, name_expressions, options, filename)
        self.lib = ctypes.CDLL(str(self.path))
        self.lib.cudaemu_name.restype = ctypes.c_char_p
        self.lib.cudaemu_launch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulonglong,
                                            ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p,
                                            ctypes.c_ulonglong]
        self.names = {self.lib.cudaemu_name(i).decode(): i for i in range(self.lib.cudaemu_count())}

    def get_function(self, name):
        if name not in self.names:
            raise KeyError(f"{name!r} is not among the module's name expressions")
        return Function(self, self.names[name], name)
