"""NVRTC through ctypes, for compiling the CUDA kernels on a machine without a GPU.

NVRTC needs no device and no driver. The libraries and the CUDA headers come from NVIDIA's wheels
(``nvidia-cuda-nvrtc``/``nvidia-cuda-runtime`` for CUDA 13, the ``-cu12`` ones for CUDA 12, whose
NVRTC is the last to target sm_70), found by path in site-packages.
"""

import ctypes
import pathlib
import re
import sysconfig
from typing import NamedTuple

import pytest

# CUDA major version -> (library, include directory), relative to site-packages.
_TOOLKITS = {
    12: ("nvidia/cuda_nvrtc/lib/libnvrtc.so.12", "nvidia/cuda_runtime/include"),
    13: ("nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cu13/include"),
}


def _site_packages():
    return pathlib.Path(sysconfig.get_paths()["purelib"])


def toolkit_paths(cuda_major):
    library, include = _TOOLKITS[cuda_major]
    return _site_packages() / library, _site_packages() / include


class KernelResources(NamedTuple):
    name: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int


_PTXAS_FUNCTION = re.compile(
    r"Function properties for (\S+)\s*\n"
    r"\S+\s+\.\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\s*\n"
    r".*?Used (\d+) registers"
)


class CompileError(RuntimeError):
    pass


class Nvrtc:
    def __init__(self, cuda_major):
        library, self.include = toolkit_paths(cuda_major)
        for builtins in sorted(library.parent.glob("libnvrtc-builtins.so.*")):  # not always found by NVRTC itself
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        self._lib = ctypes.CDLL(str(library))
        self._lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self._lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        self.version = (major.value, minor.value)

    def _check(self, status):
        if status != 0:
            raise CompileError(self._lib.nvrtcGetErrorString(status).decode())

    def compile(self, source, name_expressions, options, arch):
        """Compile ``source`` for ``sm_<arch>`` into a CUBIN; return each kernel's resources (from
        ptxas -v), keyed by the mangled name, and the lowered name of each name expression."""
        program = ctypes.c_void_p()
        self._check(
            self._lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"batch_norm.cu", 0, None, None)
        )
        try:
            for expression in name_expressions:
                self._check(self._lib.nvrtcAddNameExpression(program, expression.encode()))
            flags = [*options, f"-arch=sm_{arch}", f"-I{self.include}", "-Xptxas=-v"]
            argv = (ctypes.c_char_p * len(flags))(*(f.encode() for f in flags))
            status = self._lib.nvrtcCompileProgram(program, len(flags), argv)
            log = self._log(program)
            if status != 0:
                raise CompileError(f"sm_{arch}: {self._lib.nvrtcGetErrorString(status).decode()}\n{log}")
            lowered = {}
            for expression in name_expressions:
                name = ctypes.c_char_p()
                self._check(self._lib.nvrtcGetLoweredName(program, expression.encode(), ctypes.byref(name)))
                lowered[expression] = name.value.decode()
            resources = {
                m[0]: KernelResources(m[0], int(m[4]), int(m[1]), int(m[2]), int(m[3]))
                for m in _PTXAS_FUNCTION.findall(log)
            }
            return lowered, resources
        finally:
            self._lib.nvrtcDestroyProgram(ctypes.byref(program))

    def _log(self, program):
        size = ctypes.c_size_t()
        self._check(self._lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)))
        buffer = ctypes.create_string_buffer(size.value)
        self._check(self._lib.nvrtcGetProgramLog(program, buffer))
        return buffer.value.decode()


# Where test_gpu_compile.py leaves the registers per thread of each kernel, for conftest's summary.
REPORT_KEY = pytest.StashKey[list]()


def registers_report(config):
    """Lines for the terminal summary: registers per thread of each kernel and target."""
    rows = config.stash.get(REPORT_KEY, [])
    if not rows:
        return []
    width = max(len(expression) for _, expression, _ in rows)
    lines = ["registers per thread of each CUDA kernel (no spills):"]
    for target, expression, registers in rows:
        lines.append(f"  {target:<20} {expression:<{width}} {registers:>4}")
    return lines
