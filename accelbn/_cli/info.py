"""``python -m accelbn info``: what this installation runs on, one ``key: value`` per line.

Versions of accelbn, Python, NumPy, Numba and PyTorch, the usable backends, Numba's threading layer
and thread count, the CPU model, and MPI for SyncBatchNorm (mpi4py, its MPI library, and whether
CuPy arrays go to MPI directly or through host memory). The benchmark header reuses :func:`cpu_model`.
"""

import platform
import sys

import numpy as np

import accelbn

_NOT_INSTALLED = "not installed"


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo's "model name" on Linux, else the platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _numba_version():
    try:
        import numba
    except ImportError:
        return _NOT_INSTALLED
    return numba.__version__


def _numba_threading():
    """Numba's threading layer (and why it is not TBB, when it is not) and thread count, or "-" for
    both without Numba."""
    try:
        import numba
    except ImportError:
        return "-", "-"
    from accelbn.backends.numba_cpu import runtime  # pins the layer before Numba launches its threads

    layer = runtime.threading_layer()
    if layer != "tbb":
        layer += f" (not tbb: {runtime.NOT_TBB_REASON or 'Numba picked another layer'})"
    if runtime.serial_only():
        layer += "; serial kernels only in this forked child"
    return layer, str(numba.get_num_threads())


def _torch_version():
    # Imported here only: torch takes seconds to import and is not a dependency of accelbn.
    try:
        import torch
    except ImportError:
        return _NOT_INSTALLED
    return torch.__version__


def _mpi():
    """mpi4py's version and MPI library, and whether SyncBatchNorm hands CuPy buffers to it directly."""
    try:
        import mpi4py
        from mpi4py import MPI
    except ImportError:
        return _NOT_INSTALLED
    from accelbn._core import collectives

    library = " ".join(MPI.Get_library_version().splitlines()[0].split())
    cupy = "direct (CUDA-aware)" if collectives.cuda_aware_mpi() else "staged through host memory"
    return f"mpi4py {mpi4py.__version__}, {library}; CuPy buffers {cupy}"


def info_lines() -> list[tuple[str, str]]:
    """The (key, value) pairs that ``info`` prints, in order."""
    threading_layer, threads = _numba_threading()
    return [
        ("accelbn", accelbn.__version__),
        ("python", platform.python_version()),
        ("numpy", np.__version__),
        ("numba", _numba_version()),
        ("backends", ", ".join(accelbn.available_backends())),
        ("numba threading layer", threading_layer),
        ("numba threads", threads),
        ("cpu", cpu_model()),
        ("torch", _torch_version()),
        ("mpi", _mpi()),
    ]


def print_info(stream=sys.stdout) -> None:
    for key, value in info_lines():
        print(f"{key}: {value}", file=stream)
