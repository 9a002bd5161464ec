"""``python -m accelbn info``: what this installation runs on, one ``key: value`` per line.

Versions of accelbn, Python, NumPy, Numba and PyTorch, the usable backends, Numba's threading layer
and thread count, and the CPU model. The benchmark header reuses :func:`cpu_model`.
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
    """Numba's threading layer and thread count, or "-" for both without Numba."""
    try:
        import numba
    except ImportError:
        return "-", "-"
    # Numba picks its threading layer when it first launches its threads, and threading_layer()
    # raises before that. Asking for the thread count launches them, once the backend has pinned
    # the layer it prefers.
    import accelbn.backends.numba_cpu  # noqa: F401

    threads = numba.get_num_threads()
    return numba.threading_layer(), str(threads)


def _torch_version():
    # Imported here only: torch takes seconds to import and is not a dependency of accelbn.
    try:
        import torch
    except ImportError:
        return _NOT_INSTALLED
    return torch.__version__


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
    ]


def print_info(stream=sys.stdout) -> None:
    for key, value in info_lines():
        print(f"{key}: {value}", file=stream)
