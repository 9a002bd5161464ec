"""Dispatch never imports heavy libraries: proven in fresh subprocesses."""

import subprocess
import sys
import textwrap


def _run(code):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_numpy_call_imports_no_cupy_and_no_torch():
    out = _run(
        """
        import sys, numpy as np, accelbn
        assert "numba" not in sys.modules, "import accelbn must stay cheap"
        x = np.ones((4, 3, 2), np.float32)
        accelbn.batch_norm(x, None, None, training=True)
        print(sorted(m for m in ("cupy", "torch", "cupy_backends") if m in sys.modules))
        """
    )
    assert out.strip() == "[]"


def test_cupy_array_gets_a_clear_error_without_a_gpu():
    # A stand-in "cupy" module without CUDA: dispatch recognises its arrays through sys.modules alone
    # and says that no device is there.
    out = _run(
        """
        import sys, types
        fake = types.ModuleType("cupy")
        class ndarray:
            shape, ndim, dtype = (4, 3), 2, None
        fake.ndarray = ndarray
        sys.modules["cupy"] = fake
        import numpy as np, accelbn
        try:
            accelbn.batch_norm(ndarray(), None, None, training=True)
        except ValueError as e:
            print(e)
        try:
            accelbn.batch_norm(np.ones((4, 3), np.float32), None, None, ndarray(), training=True)
        except TypeError as e:
            print(e)
        """
    )
    first, second = out.strip().splitlines()
    assert first.startswith("backend 'cupy' is not available: CuPy sees no CUDA device (AttributeError")
    assert second == "weight is a cupy array but x is a numpy array; pass arrays of one library"


def test_available_backends_omit_cupy_without_a_device():
    # CuPy is installed with the test extra; on a machine without a GPU it must not be offered.
    out = _run(
        """
        import cupy, accelbn
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception:
            count = 0
        print(count, accelbn.available_backends())
        """
    )
    count, backends = out.split(maxsplit=1)
    assert ("cupy" in backends) == (int(count) > 0)
    assert "'numba', 'numpy'" in backends
