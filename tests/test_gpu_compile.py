"""Every CUDA kernel the CuPy backend can launch compiles through NVRTC with no GPU present, for the
oldest and newest architectures we support, without spilling registers to local memory."""

import numpy as np
import pytest
from nvrtc import REPORT_KEY, Nvrtc

from accelbn.backends.cuda import batch_norm, launcher, row_norm

# Every CUDA source of the backend, one module each.
OPERATIONS = [batch_norm, row_norm]

# (CUDA major version of the NVRTC used, target architecture). CUDA 13 dropped sm_70, so Volta is
# compiled with CUDA 12's NVRTC, the last that targets it.
TARGETS = [(12, 70), (12, 80), (13, 80), (13, 90)]


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_compile_units_cover_every_storage_dtype(operation):
    import ml_dtypes

    expected = {np.dtype(t) for t in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)}
    assert set(operation.compile_units()) == expected


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
@pytest.mark.parametrize(("cuda_major", "arch"), TARGETS, ids=[f"cuda{m}-sm_{a}" for m, a in TARGETS])
def test_every_kernel_compiles_without_spills(cuda_major, arch, operation, request):
    nvrtc = Nvrtc(cuda_major)
    source = launcher.source(operation.SOURCE)
    report = request.config.stash.setdefault(REPORT_KEY, [])
    for dtype, expressions in operation.compile_units().items():
        lowered, resources = nvrtc.compile(source, expressions, launcher.OPTIONS, arch)
        for expression in expressions:
            kernel = resources[lowered[expression]]  # ptxas compiled it for this architecture
            report.append((f"sm_{arch} (NVRTC {nvrtc.version[0]}.{nvrtc.version[1]})", expression, kernel.registers))
            assert kernel.spill_store_bytes == kernel.spill_load_bytes == 0, (
                f"{expression} spills on sm_{arch}: {kernel}"
            )
            assert kernel.stack_bytes == 0, f"{expression} uses local memory on sm_{arch}: {kernel}"
