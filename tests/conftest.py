"""Fixtures: the backends every conformance test runs through (any_backend, on), and CuPy real or
stood in by the CUDA-on-CPU harness (gpu, cuda, tiny_blocks). What tests share besides
fixtures is in support.py."""

import hashlib
import os
import pathlib
import sys
import tempfile
import zlib

import pytest
from hypothesis import settings

# Numba invalidates a cached kernel when its own file changes, not when a function it inlines from
# another file does (backends/formulas.py, the helpers of backends/numba_cpu/). Tests compile into a
# cache keyed by all of those sources, so an edited helper can never be tested through a stale
# kernel. Set before Numba is first imported.
_BACKENDS = pathlib.Path(__file__).resolve().parent.parent / "backends"
_KERNEL_SOURCES = [_BACKENDS / "formulas.py", *sorted((_BACKENDS / "numba_cpu").glob("*.py"))]
_DIGEST = hashlib.sha256(b"".join(p.read_bytes() for p in _KERNEL_SOURCES)).hexdigest()[:16]
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "accelbn-numba-cache", _DIGEST))

from support import CPU_BACKENDS, EMULATOR_MISSING, EMULATOR_REQUIRED, GPU_DEVICE, ArraysOn

settings.register_profile("default", max_examples=40, deadline=None, print_blob=True)
settings.load_profile("default")

if EMULATOR_MISSING and EMULATOR_REQUIRED:
    raise pytest.UsageError(f"ACCELBN_CUDA_TESTS=required, but the CUDA-on-CPU harness cannot run: {EMULATOR_MISSING}")


def pytest_sessionstart(session):
    """Before a run of the whole suite (no paths given), compile the CPU kernels into its cache in one
    process per core (``python -m accelbn compile``): the tests, in pytest-xdist's workers, then load
    them rather than each compile them one at a time. A few seconds when they are cached already."""
    config = session.config
    if hasattr(config, "workerinput") or config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return
    import subprocess

    subprocess.run([sys.executable, "-m", "accelbn", "compile"], check=True, timeout=1800, stdout=subprocess.DEVNULL)


@pytest.fixture
def emulated_cupy(monkeypatch, request):
    """The stand-in cupy in ``sys.modules`` for one test, the backend bound to it, and a seeded
    random fiber schedule that differs from test to test; everything is restored afterwards."""
    from cudaemu import runtime, standin_cupy

    from accelbn._core import registry

    cupy = standin_cupy.MODULE
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    from accelbn.backends.cuda import launcher

    monkeypatch.setattr(launcher, "cupy", cupy)
    monkeypatch.setattr(registry._GpuBackend, "_device_seen", False)
    monkeypatch.setattr(runtime.settings, "after_launch", standin_cupy.after_launch)
    monkeypatch.setattr(runtime.settings, "schedule", "random")
    monkeypatch.setattr(runtime.settings, "seed", zlib.crc32(request.node.nodeid.encode()))
    return cupy


@pytest.fixture
def gpu(request):
    """CuPy, real on a device or the stand-in on the harness, for a test of the cupy backend."""
    if GPU_DEVICE:
        import cupy

        return cupy
    if EMULATOR_MISSING:
        pytest.skip(f"no CUDA device, and the CUDA-on-CPU harness cannot run: {EMULATOR_MISSING}")
    return request.getfixturevalue("emulated_cupy")


@pytest.fixture
def cuda(gpu):
    """The CUDA backend's package, with its launcher and its operations' modules (bound to the
    stand-in cupy on the harness)."""
    from accelbn.backends import cuda
    from accelbn.backends.cuda import batch_norm, launcher, row_norm  # noqa: F401  (attributes of the package)

    return cuda


@pytest.fixture
def tiny_blocks(cuda, monkeypatch):
    """32-thread blocks, one vector or row per thread per item, and fewer blocks than items, so
    even small arrays span many work items, blocks loop over items, and every merge is exercised."""
    for name, value in [("BLOCK", 32), ("TILE_VECTORS_PER_THREAD", 1), ("TILE_ROWS_PER_THREAD", 1),
                        ("TARGET_ITEMS", 1 << 20), ("MAX_BLOCKS", 7)]:
        monkeypatch.setattr(cuda.launcher, name, value)
    return cuda


@pytest.fixture(params=CPU_BACKENDS + [pytest.param("cupy", marks=pytest.mark.gpu)])
def any_backend(request):
    if request.param == "cupy":
        request.getfixturevalue("gpu")
    return request.param


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def on(any_backend):
    return ArraysOn(any_backend)


def pytest_terminal_summary(terminalreporter, config):
    """The CUDA kernels' register counts, under ``-v`` or when something failed: a quiet run is short."""
    if config.option.verbose <= 0 and not terminalreporter.stats.get("failed"):
        return
    from nvrtc import registers_report

    for line in registers_report(config):
        terminalreporter.write_line(line)
