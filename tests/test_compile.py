"""First use: a call that compiles says so on stderr, once; a cached one is silent; ``precompile``
(``python -m accelbn compile``) leaves no kernel for a first call to compile."""

import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from accelbn._cli.precompile import precompile_all
from accelbn.backends.numba_cpu import runtime, tiling

NOTICE = "accelbn: compiling CPU kernels for float32, first use only"


def _first_call(cache_dir):
    code = """
        import numpy as np, accelbn as abn
        abn.batch_norm(np.ones((8, 3, 4, 4), np.float32), None, None, training=True)
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_a_compiling_call_says_so_once_and_a_cached_one_is_silent(tmp_path):
    assert [line for line in _first_call(tmp_path).splitlines() if line.startswith("accelbn:")] == [
        NOTICE + " (`python -m accelbn compile` does it ahead of time)"
    ]
    assert _first_call(tmp_path) == ""


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_precompile_leaves_no_kernel_uncompiled(dtype):
    for serial in (True, False):
        precompile_all(dtype, serial)
    element = numba.from_dtype(np.dtype(dtype))
    missing = [
        kernel.py_func.__name__
        for kernel in runtime._KERNELS
        if not any(signature[0].dtype == element for signature in kernel.signatures)
    ]
    assert missing == []
    assert tiling.CACHED_SLICE_BYTES == 1 << 20 and runtime.SERIAL_MAX_ELEMENTS == 1 << 15  # restored
