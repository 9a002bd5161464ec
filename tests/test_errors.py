"""Bad input: the exact exception type, a message naming the argument, and no state changed."""

import warnings

import numpy as np
import pytest

import accelbn as abn
from accelbn._core import registry

C = 3


def _args():
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((4, C, 5)).astype(np.float32),
        # Not the zeros and ones a buggy reset or a blend with a default would leave behind unseen.
        "running_mean": rng.standard_normal(C).astype(np.float32),
        "running_var": rng.uniform(0.5, 2.0, C).astype(np.float32),
        "weight": np.ones(C, np.float32),
        "bias": np.zeros(C, np.float32),
        "training": True,
    }


def _matrix(shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.asmatrix(np.ones(shape, np.float32))


def _read_only(a):
    a.flags.writeable = False
    return a


# name: (changes to the default arguments, exception type, text the message must contain)
FORWARD_CASES = {
    "one value per channel": (
        {"x": np.ones((1, C), np.float32)},
        ValueError,
        "Expected more than 1 value per channel when training, got input size (1, 3)",
    ),
    "one value per channel NCHW": (
        {"x": np.ones((1, C, 1, 1), np.float32)},
        ValueError,
        "Expected more than 1 value per channel when training, got input size (1, 3, 1, 1)",
    ),
    "short weight": ({"weight": np.ones(C - 1, np.float32)}, ValueError, "weight must have shape (3,)"),
    "long bias": ({"bias": np.ones(C + 1, np.float32)}, ValueError, "bias must have shape (3,)"),
    "2-d running_mean": ({"running_mean": np.zeros((1, C), np.float32)}, ValueError, "running_mean must have shape"),
    "short running_var": ({"running_var": np.ones(2, np.float32)}, ValueError, "running_var must have shape"),
    "int x": ({"x": np.ones((4, C), np.int32)}, TypeError, "x must have dtype float16, bfloat16, float32 or float64"),
    "bool x": ({"x": np.ones((4, C), bool)}, TypeError, "x must have dtype"),
    "complex x": ({"x": np.ones((4, C), np.complex64)}, TypeError, "x must have dtype"),
    "int weight": ({"weight": np.ones(C, np.int64)}, TypeError, "weight must have dtype"),
    "list x": ({"x": [[1.0, 2.0, 3.0]] * 4}, TypeError, "x must be a numpy.ndarray or cupy.ndarray, got list"),
    "list weight": ({"weight": [1.0, 1.0, 1.0]}, TypeError, "weight must be a numpy.ndarray"),
    "matrix x": ({"x": _matrix((4, C))}, TypeError, "x must be a numpy.ndarray"),
    "running stats sharing memory": (
        {"running_var": "running_mean"},
        ValueError,
        "running_mean and running_var share memory",
    ),
    "out with a zero stride": (
        {"out": np.lib.stride_tricks.as_strided(np.empty(5, np.float32), (4, C, 5), (0, 0, 4))},
        ValueError,
        "out has elements that share memory",
    ),
    "masked x": ({"x": np.ma.ones((4, C), np.float32)}, TypeError, "x must be a numpy.ndarray"),
    "rank 1": ({"x": np.ones(C, np.float32)}, ValueError, "x must have at least 2 dimensions"),
    "rank 0": ({"x": np.float32(1.0)}, TypeError, "x must be a numpy.ndarray"),
    "axis out of range": ({"axis": 3}, ValueError, "axis 3 is out of range"),
    "axis not int": ({"axis": 1.0}, TypeError, "axis must be an int"),
    "eval without running stats": (
        {"training": False, "running_mean": None, "running_var": None},
        ValueError,
        "running_mean and running_var are required when training=False",
    ),
    "only running_mean": ({"running_var": None}, ValueError, "running_mean and running_var must be given together"),
    "read-only running_var": (
        {"running_var": _read_only(np.ones(C, np.float32))},
        ValueError,
        "running_var is read-only",
    ),
    "negative eps": ({"eps": -1e-5}, ValueError, "eps must be a finite number >= 0.0"),
    "zero eps in training": ({"eps": 0.0}, ValueError, "batch_norm eps must be positive during training, but got 0.0"),
    "nan momentum": ({"momentum": float("nan")}, ValueError, "momentum must be a finite number"),
    "string momentum": ({"momentum": "0.1"}, TypeError, "momentum must be a real number"),
    "training not bool": ({"training": "yes"}, TypeError, "training must be a bool"),
    "unknown backend": ({"backend": "cuda"}, ValueError, "backend must be one of ['cupy', 'numba', 'numpy'] or None, got 'cuda'"),
    "out wrong shape": ({"out": np.empty((4, C, 6), np.float32)}, ValueError, "out must have the shape of x"),
    "out wrong dtype": ({"out": np.empty((4, C, 5), np.float64)}, TypeError, "out must have the dtype of x"),
    "out read-only": ({"out": _read_only(np.empty((4, C, 5), np.float32))}, ValueError, "out is read-only"),
}


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_rejects(case):
    changes, error, message = FORWARD_CASES[case]
    args = _args() | changes
    if isinstance(args["running_var"], str):  # the "sharing memory" case
        args["running_var"] = args["running_mean"]
    state = {k: v.copy() for k, v in args.items() if k.startswith("running") and v is not None}
    x = args.pop("x")
    with pytest.raises(error) as info:
        abn.batch_norm(x, **args)
    assert message in str(info.value)
    for name, before in state.items():
        np.testing.assert_array_equal(args[name], before)


def test_out_partially_overlapping_x_is_rejected():
    base = np.random.default_rng(0).standard_normal((5, C, 5)).astype(np.float32)
    x, out = base[:4], base[1:]
    rm = np.zeros(C, np.float32)
    with pytest.raises(ValueError, match="out overlaps x without being x itself"):
        abn.batch_norm(x, rm, np.ones(C, np.float32), training=True, out=out)
    np.testing.assert_array_equal(rm, 0)


def test_out_interleaved_with_x_is_accepted():
    base = np.random.default_rng(0).standard_normal((4, 2 * C, 5)).astype(np.float32)
    x, out = base[:, 0::2], base[:, 1::2]
    expected = abn.batch_norm(x.copy(), None, None, training=True)
    abn.batch_norm(x, None, None, training=True, out=out)
    np.testing.assert_array_equal(out, expected)


def test_eval_reads_running_stats_that_share_memory():
    """Only training writes the running statistics, so only training needs them apart."""
    x = np.random.default_rng(0).standard_normal((4, C, 5)).astype(np.float32)
    stats = np.full(C, 0.5, np.float32)
    expected = abn.batch_norm(x, stats.copy(), stats.copy())
    np.testing.assert_array_equal(abn.batch_norm(x, stats, stats), expected)


def test_backend_for_another_array_library():
    x = np.ones((4, C), np.float32)
    with pytest.raises(TypeError, match="backend 'numba' runs on numpy arrays, but x is a cupy array"):
        registry.kernels_for("numba", "cupy", "batch_norm")
    assert abn.batch_norm(x, None, None, training=True, backend="numpy").shape == x.shape


def test_cupy_without_a_device_says_so(monkeypatch):
    import cupy

    def no_driver():
        raise cupy.cuda.runtime.CUDARuntimeError(35)  # cudaErrorInsufficientDriver

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", no_driver)
    monkeypatch.setattr(registry._GpuBackend, "_device_seen", False)
    monkeypatch.setattr(registry, "_RESOLVED", {})
    with pytest.raises(ValueError, match=r"backend 'cupy' is not available: CuPy sees no CUDA device \(CUDARuntimeError"):
        registry.kernels_for(None, "cupy", "batch_norm")
    assert "cupy" not in abn.available_backends()


def test_layer_to_cupy_without_a_device_raises_what_backend_cupy_raises(monkeypatch):
    import cupy

    def no_driver():
        raise cupy.cuda.runtime.CUDARuntimeError(35)

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", no_driver)
    monkeypatch.setattr(registry._GpuBackend, "_device_seen", False)
    layer = abn.BatchNorm(4)
    weight = layer.weight
    with pytest.raises(ValueError, match=r"backend 'cupy' is not available: CuPy sees no CUDA device \(CUDARuntimeError"):
        layer.to("cupy")
    assert layer.weight is weight and layer.library == "numpy"


def test_layer_to_cupy_without_cupy_says_how_to_install(monkeypatch):
    monkeypatch.setattr(registry._BACKENDS["cupy"], "requires", "cupy_that_is_not_installed")
    with pytest.raises(ValueError, match=r"backend 'cupy' is not available: install it with `pip install cupy-cuda13x\[ctk\]`"):
        abn.BatchNorm(4).to("cupy")


def test_missing_backend_says_how_to_install(monkeypatch):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(registry, "_RESOLVED", {})  # as in a process that never ran a backend
    with pytest.raises(ValueError, match="backend 'numba' is not available: install it with `pip install numba`"):
        abn.batch_norm(np.ones((4, C), np.float32), None, None, training=True)
    assert abn.available_backends() == ["numpy"]


def _backward_args():
    a = _args()
    _, stats = abn.batch_norm(a["x"], None, None, training=True, return_stats=True)
    return {"dy": np.ones_like(a["x"]), "x": a["x"], "stats": stats, "weight": a["weight"]}


BACKWARD_CASES = {
    "dy wrong shape": ({"dy": np.ones((4, C, 6), np.float32)}, ValueError, "dy must have the shape of x"),
    "dy wrong dtype": ({"dy": np.ones((4, C, 5), np.float64)}, TypeError, "dy must have the dtype of x"),
    "dy int": ({"dy": np.ones((4, C, 5), np.int32)}, TypeError, "dy must have dtype float16"),
    "stats tuple without fields": ({"stats": (1, 2)}, TypeError, "stats must be a BatchStats"),
    "stats short mean": (
        {"stats": abn.BatchStats(np.zeros(2, np.float32), np.ones(C, np.float32))},
        ValueError,
        "stats.mean must have shape (3,)",
    ),
    "weight long": ({"weight": np.ones(C + 1, np.float32)}, ValueError, "weight must have shape (3,)"),
    "training not bool": ({"training": None}, TypeError, "training must be a bool"),
    "out overlapping dy": ({"out": "dy-shifted"}, ValueError, "out overlaps dy"),
    "unknown backend": ({"backend": "torch"}, ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("case", list(BACKWARD_CASES))
def test_backward_rejects(case):
    changes, error, message = BACKWARD_CASES[case]
    args = _backward_args() | changes
    if args.get("out") == "dy-shifted":
        base = np.ones((5, C, 5), np.float32)
        args["dy"], args["out"] = base[:4], base[1:]
    with pytest.raises(error) as info:
        abn.batch_norm_backward(args.pop("dy"), args.pop("x"), args.pop("stats"), **args)
    assert message in str(info.value)


def test_an_operation_a_backend_lacks_says_so(gpu):
    with pytest.raises(NotImplementedError, match="backend 'cupy' has no kernels for no_such_operation yet"):
        registry.kernels_for("cupy", "cupy", "no_such_operation")
