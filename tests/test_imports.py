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
    # A stand-in "cupy" module: dispatch must recognise its arrays through sys.modules alone.
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
        except TypeError as e:
            print(e)
        try:
            accelbn.batch_norm(np.ones((4, 3), np.float32), None, None, ndarray(), training=True)
        except TypeError as e:
            print(e)
        """
    )
    first, second = out.strip().splitlines()
    assert first.startswith("x is a cupy array, but no accelbn backend in this version runs on cupy arrays")
    assert second == "weight is a cupy array but x is a numpy array; pass arrays of one library"
