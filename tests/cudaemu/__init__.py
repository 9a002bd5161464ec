"""A CUDA-on-CPU execution harness for the tests: the project's CUDA kernels built by the host
compiler against ``cuda_host.h`` and launched with CuPy's calling convention, every CUDA thread a
fiber; and ``standin_cupy``, the part of CuPy that accelbn uses, over guarded host memory."""

from cudaemu.build import BuildUnavailable, cuda_include
from cudaemu.runtime import KernelError, Module, launched, schedule, settings

__all__ = ["BuildUnavailable", "KernelError", "Module", "cuda_include", "launched", "schedule", "settings"]
