"""What the tests share, imported by them and by conftest.py (no test imports another): which
backends and CUDA targets can run here, the tolerances and the oracle's references (tests/oracle.py
shares no code with accelbn), tables of layouts and shapes, and test arrays on either library."""

import ctypes
import os

import ml_dtypes
import numpy as np
import oracle

import accelbn as abn

# Every backend that can run here goes through the same tests, against the oracle. conftest's
# `any_backend` includes "cupy", whose cases carry the "gpu" mark (`pytest -m gpu` runs just those)
# and move arrays with `on`; `backend` is the CPU backends, for tests written on NumPy arrays.
BACKENDS = abn.available_backends()
CPU_BACKENDS = [b for b in BACKENDS if b != "cupy"]

# The cupy backend runs on a CUDA device when CuPy sees one, and otherwise on the CUDA-on-CPU
# harness (tests/cudaemu) with the stand-in cupy; ACCELBN_CUDA_TESTS=emulator picks the harness
# even on a GPU. ACCELBN_CUDA_TESTS=required (CI) makes a missing harness an error, not a skip.
_CUDA_TESTS = os.environ.get("ACCELBN_CUDA_TESTS", "")
GPU_DEVICE = "cupy" in BACKENDS and _CUDA_TESTS != "emulator"


def _emulator_missing():
    from cudaemu.build import BuildUnavailable, compiler, cuda_include

    try:
        compiler()
        cuda_include()
    except BuildUnavailable as e:
        return str(e)
    return None


EMULATOR_MISSING = _emulator_missing()
EMULATOR_REQUIRED = _CUDA_TESTS == "required"


def _to_device(a):
    """A CuPy array with ``a``'s shape, dtype, strides and offset: a view into a device copy of the
    whole host buffer ``a`` spans, so strided and negative-stride layouts reach the kernels as they are."""
    import cupy

    if a.size == 0:
        return cupy.empty(a.shape, a.dtype)
    low, high = np.lib.array_utils.byte_bounds(a)
    span = cupy.asarray(np.frombuffer((ctypes.c_char * (high - low)).from_address(low), np.uint8))
    start = a.__array_interface__["data"][0] - low
    return cupy.ndarray(a.shape, a.dtype, memptr=span.data + start, strides=a.strides)


class ArraysOn:
    """Test arrays on the backend's array library: ``put`` moves NumPy inputs there (layout kept),
    ``get`` brings results back to NumPy. Both are the identity for the CPU backends."""

    def __init__(self, backend):
        self.gpu = backend == "cupy"

    def put(self, a):
        return _to_device(a) if self.gpu and a is not None else a

    def puts(self, params):
        return {k: self.put(v) for k, v in params.items()}

    def get(self, a):
        return a.get() if self.gpu and a is not None else a


def rel_error(actual, expected):
    """Norm-wise relative error, the measure the tolerances are stated in."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = np.linalg.norm(expected.ravel())
    return np.linalg.norm((actual - expected).ravel()) / (scale if scale else 1.0)


# float32 within 2e-5 (norm-wise) of a float64 reference; float64 within 1e-10; float16 and bfloat16
# at their precision (unit roundoff 2**-11 and 2**-8).
TOLERANCE = {np.float16: 2e-3, ml_dtypes.bfloat16: 1e-2, np.float32: 2e-5, np.float64: 1e-10}


def tolerance(dtype):
    return TOLERANCE[np.dtype(dtype).type]


def assert_matches_reference(got, want):
    """``got`` within its dtype's tolerance of the float64 ``want``, plus the error that rounding
    ``want`` itself to that dtype costs (it dominates only for results near the dtype's underflow)."""
    representable = rel_error(np.asarray(want).astype(got.dtype), want)
    assert rel_error(got, want) <= tolerance(got.dtype) + 2 * representable


def reference_forward(x, running_mean, running_var, weight, bias, training, momentum=0.1, eps=1e-5, axis=1):
    """The oracle's forward (tests/oracle.py, independent of accelbn): ``(y, stats, running_mean,
    running_var)`` in float64, the running statistics as updated (new arrays; the inputs are unchanged)."""
    r = oracle.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, axis)
    return r.y, abn.BatchStats(r.mean, r.invstd), r.running_mean, r.running_var


def reference_backward(dy, x, stats, weight, training, axis=1):
    """The oracle's ``(dx, dweight, dbias)`` at the saved statistics ``stats``, in float64."""
    return oracle.batch_norm_backward(dy, x, stats.mean, stats.invstd, weight, training, axis)


def channel_params(channels, dtype, seed=7):
    """Running statistics, weight and bias of ``channels`` channels, away from 0 and 1 so that a
    value in the wrong slot shows."""
    rng = np.random.default_rng(seed)
    return {
        "running_mean": rng.standard_normal(channels).astype(dtype),
        "running_var": rng.uniform(0.5, 2.0, channels).astype(dtype),
        "weight": rng.uniform(0.5, 1.5, channels).astype(dtype),
        "bias": rng.standard_normal(channels).astype(dtype),
    }


def numba_outputs(x, dy, axis, out=None):
    """Every output of the numba backend on ``x``: train forward (into ``out`` when given), its saved
    and updated running statistics, eval with them, and the trained and frozen backward (12 arrays);
    then (:data:`FUSED_OUTPUTS`) the fused residual-and-ReLU train forward and backward and the fused
    ReLU's eval forward and backward, and Batch Renormalization's train forward and its r; then
    synchronized batch norm's train forward, saved statistics and backward on one worker."""
    p = channel_params(x.shape[axis], x.dtype)
    y, stats = abn.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], True, 0.1, 1e-5,
                              axis=axis, out=out, return_stats=True, backend="numba")
    evaluated = abn.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], axis=axis, backend="numba")
    trained = abn.batch_norm_backward(dy, x, stats, p["weight"], axis=axis, backend="numba")
    frozen = abn.batch_norm_backward(dy, x, stats, p["weight"], training=False, axis=axis, backend="numba")
    fused = _fused_outputs(x, dy, axis, p)
    synchronized = _synchronized_outputs(x, dy, axis, p)
    return [y.copy(), *stats, p["running_mean"], p["running_var"], evaluated, *trained, *frozen, *fused, *synchronized]


class Alone:
    """A communicator of one worker: synchronized batch norm's kernels (local statistics, gradient
    sums, and the gradient from given sums) without anyone to talk to."""

    rank, size = 0, 1

    def allreduce_sum(self, buffer):
        pass


def _synchronized_outputs(x, dy, axis, p):
    """sync_batch_norm's train forward, saved statistics and backward on one worker (batch norm's)."""
    y, stats = abn.sync_batch_norm(x, None, None, p["weight"], p["bias"], True, comm=Alone(), axis=axis,
                                   return_stats=True, backend="numba")
    return [y, *stats, *abn.sync_batch_norm_backward(dy, x, stats, p["weight"], comm=Alone(), axis=axis, backend="numba")]


def fused_residual(x):
    """The residual the fused outputs add: same values whatever x's layout."""
    return random_array(x.shape, x.dtype, seed=21)


def _fused_outputs(x, dy, axis, p):
    weight, bias = p["weight"], p["bias"]
    z = fused_residual(x)
    y, stats = abn.batch_norm_relu(x, None, None, weight, bias, True, residual=z, axis=axis, return_stats=True,
                                   backend="numba")
    grads = abn.batch_norm_relu_backward(dy, x, stats, weight, bias, residual=z, axis=axis, backend="numba")
    rm, rv = p["running_mean"], p["running_var"]
    y_eval, eval_stats = abn.batch_norm_relu(x, rm, rv, weight, bias, axis=axis, return_stats=True, backend="numba")
    dx_eval = abn.batch_norm_relu_backward(dy, x, eval_stats, weight, bias, training=False, axis=axis, backend="numba")[0]
    c = x.shape[axis]
    moving = [rm.copy(), rv.copy(), np.sqrt(rv + 1e-3), *renorm_statistics(c, x.dtype)]
    renormed, renorm_stats = abn.batch_renorm(x, *moving, weight, bias, True, rmax=1.5, dmax=0.5, axis=axis,
                                              return_stats=True, backend="numba")
    assert renorm_stats.r.shape == (c,)
    return [y, *grads, y_eval, dx_eval, renormed, renorm_stats.r]


FUSED_OUTPUTS = 9  # the entries _fused_outputs adds


def renorm_statistics(channels, dtype):
    """renorm_mean and renorm_std for the fused outputs' Batch Renormalization."""
    return np.linspace(-1.0, 1.0, channels).astype(dtype), np.linspace(0.5, 2.0, channels).astype(dtype)


def random_array(shape, dtype=np.float32, seed=0, loc=0.0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + loc).astype(dtype)



def _channels_last_as_nchw(shape):
    n, c, h, w = shape
    return random_array((n, h, w, c), seed=3).transpose(0, 3, 1, 2)


# name: (make x, axis). Sizes are chosen so that several statistics chunks and row blocks are used.
LAYOUTS = {
    "NC": (lambda: random_array((37, 5)), 1),
    "NC-fortran-order": (lambda: np.asfortranarray(random_array((37, 5))), 1),
    "NC-many-rows": (lambda: random_array((20000, 4), seed=1), 1),
    "NCL": (lambda: random_array((4, 3, 7)), 1),
    "NCHW": (lambda: random_array((3, 4, 5, 6)), 1),
    "NCHW-chunks": (lambda: random_array((9, 3, 40, 40), seed=2), 1),
    "NCDHW": (lambda: random_array((2, 3, 3, 4, 5)), 1),
    "NHWC-axis-1": (lambda: random_array((3, 5, 6, 4)), -1),
    "NHWC-memory-as-NCHW": (lambda: _channels_last_as_nchw((3, 4, 5, 6)), 1),
    "strided-unmergeable": (lambda: random_array((4, 6, 10, 9))[:, 1::2, ::2, 1::3], 1),
    "negative-strides": (lambda: random_array((3, 4, 5, 6))[::-1, :, :, ::-1], 1),
    "channel-axis-2": (lambda: random_array((3, 4, 5, 6)), 2),
    "C=1": (lambda: random_array((6, 1, 3, 3)), 1),
    "spatial-1x1": (lambda: random_array((8, 5, 1, 1)), 1),
}


# Large enough that every channel spans many statistics chunks and row blocks.
DETERMINISM = [((32, 5, 40, 40), 1), ((70000, 6), 1), ((30, 40, 40, 3), -1)]
