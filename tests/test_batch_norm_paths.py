"""Every path of the Numba kernels, reached by comparisons with the oracle and with PyTorch.

A path is a kernel of backends/numba_cpu/batch_norm*.py (per-channel or per-block fused, chunk-parallel,
channels-last; statistics, normalize and gradient passes), run serial (small inputs) or parallel,
with direct or streaming stores. The shapes below select them, with the thresholds forced each
way (CONFIGS); `test_every_kernel_path_is_reached` fails if the table leaves one out. Each case
checks every output (y, saved statistics, running statistics, eval y, and the trained and frozen
gradients) against the oracle and PyTorch, and the bits against the case's first configuration.
Strided views (reversed, offset, every other element, channels not adjacent) run on every shape.
"""

import functools
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import (
    FUSED_OUTPUTS,
    assert_matches_reference,
    channel_params,
    fused_residual,
    renorm_statistics,
    numba_outputs,
    random_array,
    reference_backward,
    reference_forward,
)

import accelbn as abn
from accelbn.backends.numba_cpu import runtime, tiling

# name: (shape, axis, what it selects)
PATHS = {
    "NCHW": ((8, 16, 37, 5), 1),  # rows of 185: short rows, in blocks of channels
    "7x7": ((200, 12, 7, 7), 1),  # short rows; several statistics chunks when not fused
    "rows-of-7": ((1200, 10, 7), 1),  # very short rows, many chunks
    "long-rows": ((2, 3, 70001), 1),  # long rows, each split into two segments of the element passes
    "rows-of-300": ((3, 4, 300), 1),  # long rows just past the short-row threshold (256)
    "16-channels": ((2, 16, 300), 1),  # long rows, channels enough for a task each (fused per channel)
    "NC": ((300, 40), 1),  # channels-last
    "NHWC": ((6, 7, 9, 24), -1),  # channels-last through a 4-d view
    "NC-3": ((5000, 3), 1),  # channels-last with a channel count that does not fill a cache line
}

_HUGE = 1 << 62
# name: (STREAM_MIN_BYTES, CACHED_SLICE_BYTES, SERIAL_MAX_ELEMENTS): each threshold forced each way.
CONFIGS = {
    f"{stores}-{work}-{threads}": (0 if stores == "streamed" else _HUGE, _HUGE if work == "fused" else 0,
                                   _HUGE if threads == "serial" else 0)
    for stores in ("direct", "streamed")
    for work in ("fused", "chunked")
    for threads in ("parallel", "serial")
}


class _Recorder:
    """Records (kernel, "serial" | "parallel", stream flag or None) for every kernel call."""

    def __init__(self):
        self.calls = set()
        self._choose = runtime.choose

    def __call__(self, x):
        namespace = self._choose(x)
        mode = "serial" if namespace is runtime.SERIAL else "parallel"
        recorder = self

        class Proxy:
            serial = namespace.serial
            tasks = namespace.tasks

            def __getattr__(self, name):
                kernel = getattr(namespace, name)

                def call(*args):
                    stream = args[-1] if isinstance(args[-1], bool) else None
                    recorder.calls.add((name, mode, stream))
                    return kernel(*args)

                return call

        return Proxy()


def _every_path():
    """Every (kernel, mode, stream) the entry points could call."""
    paths = set()
    for name, kernel in vars(runtime.PARALLEL).items():
        if not hasattr(kernel, "py_func"):  # the twins' own attributes, not kernels
            continue
        streams = (True, False) if "stream" in inspect.signature(kernel.py_func).parameters else (None,)
        paths.update((name, mode, s) for mode in ("serial", "parallel") for s in streams)
    return paths


def _configure(monkeypatch, config):
    stream_min, cached_slice, serial_max = CONFIGS[config]
    monkeypatch.setattr(tiling, "STREAM_MIN_BYTES", stream_min)
    monkeypatch.setattr(tiling, "CACHED_SLICE_BYTES", cached_slice)
    monkeypatch.setattr(runtime, "SERIAL_MAX_ELEMENTS", serial_max)


def _check_against_oracle(x, dy, axis, outputs):
    y, mean, invstd, rm, rv, evaluated, dx, dweight, dbias, frozen_dx, frozen_dweight, frozen_dbias = outputs[:12]
    p = channel_params(x.shape[axis], x.dtype)
    want_y, want_stats, want_rm, want_rv = reference_forward(x, **p, training=True, axis=axis)
    for got, want in [(y, want_y), (mean, want_stats.mean), (invstd, want_stats.invstd), (rm, want_rm), (rv, want_rv)]:
        assert_matches_reference(got, want)
    want_eval = reference_forward(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], False, axis=axis)[0]
    want_eval_updated = reference_forward(x, want_rm, want_rv, p["weight"], p["bias"], False, axis=axis)[0]
    assert_matches_reference(evaluated, want_eval_updated)
    assert not np.array_equal(want_eval, want_eval_updated)  # eval used the updated statistics
    for got, want in zip((dx, dweight, dbias), reference_backward(dy, x, want_stats, p["weight"], True, axis=axis)):
        assert_matches_reference(got, want)
    for got, want in zip((frozen_dx, frozen_dweight, frozen_dbias),
                         reference_backward(dy, x, want_stats, p["weight"], False, axis=axis)):
        assert_matches_reference(got, want)


def _check_fused(x, dy, axis, outputs):
    """The fused outputs (support.numba_outputs) against the unfused chain on this path: bit for bit
    for the ReLU ops; Batch Renormalization against its formula, which the oracle's statistics give."""
    y, evaluated = outputs[0], outputs[5]
    fy, fdx, fdz, fdw, fdb, fy_eval, fdx_eval, renormed, r = outputs[12:12 + FUSED_OUTPUTS]
    p = channel_params(x.shape[axis], x.dtype)
    z = fused_residual(x)
    pre = y + z
    np.testing.assert_array_equal(fy, np.maximum(pre, 0))
    masked = np.where(pre <= 0, 0, dy).astype(x.dtype)
    np.testing.assert_array_equal(fdz, masked)
    stats = abn.batch_norm_relu(x, None, None, p["weight"], p["bias"], True, axis=axis, return_stats=True)[1]
    for got, want in zip((fdx, fdw, fdb), abn.batch_norm_backward(masked, x, stats, p["weight"], axis=axis)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(fy_eval, np.maximum(evaluated, 0))  # eval with the running stats updated
    updated_var = outputs[4].astype(np.float64)
    want_eval_dx = np.where(fy_eval <= 0, 0, dy) * np.expand_dims(
        p["weight"] / np.sqrt(updated_var + 1e-5), tuple(a for a in range(x.ndim) if a != axis % x.ndim))
    assert_matches_reference(fdx_eval, want_eval_dx)
    _, want_stats, _, _ = reference_forward(x, **p, training=True, axis=axis)
    var = 1.0 / want_stats.invstd.astype(np.float64) ** 2 - 1e-5
    renorm_mean, renorm_std = (v.astype(np.float64) for v in renorm_statistics(x.shape[axis], x.dtype))
    r_want = np.clip(np.sqrt(var + 1e-3) / renorm_std, 1 / 1.5, 1.5)
    d_want = np.clip((want_stats.mean - renorm_mean) / renorm_std, -0.5, 0.5)
    assert_matches_reference(r, r_want)
    shape = [1] * x.ndim
    shape[axis] = -1
    expand = lambda v: np.reshape(v, shape)  # noqa: E731
    want_renormed = ((x - expand(want_stats.mean)) * expand(r_want / np.sqrt(var + 1e-3)) + expand(d_want)) * expand(
        p["weight"].astype(np.float64)) + expand(p["bias"].astype(np.float64))
    assert_matches_reference(renormed, want_renormed)


def _check_synchronized(x, dy, axis, outputs):
    """Synchronized batch norm on one worker (support.numba_outputs) against the oracle."""
    y, mean, invstd, dx, dweight, dbias = outputs[12 + FUSED_OUTPUTS:]
    p = channel_params(x.shape[axis], x.dtype)
    want_y, want_stats, _, _ = reference_forward(x, **p, training=True, axis=axis)
    for got, want in [(y, want_y), (mean, want_stats.mean), (invstd, want_stats.invstd)]:
        assert_matches_reference(got, want)
    for got, want in zip((dx, dweight, dbias), reference_backward(dy, x, want_stats, p["weight"], True, axis=axis)):
        assert_matches_reference(got, want)


def _check_against_torch(x, dy, axis, outputs):
    """Forward, running statistics and autograd's gradients of PyTorch on the same values (NCHW, in
    float64 so that PyTorch's own float32 rounding does not count against accelbn)."""
    y, _, _, rm, rv, _, dx, dweight, dbias = outputs[:9]
    p = {k: v.astype(np.float64) for k, v in channel_params(x.shape[axis], x.dtype).items()}
    move = functools.partial(np.moveaxis, source=axis, destination=1)
    tx = torch.from_numpy(np.ascontiguousarray(move(x), dtype=np.float64)).requires_grad_()
    tw, tb = (torch.from_numpy(p[k]).requires_grad_() for k in ("weight", "bias"))
    trm, trv = torch.from_numpy(p["running_mean"]), torch.from_numpy(p["running_var"])
    ty = F.batch_norm(tx, trm, trv, tw, tb, True, 0.1, 1e-5)
    ty.backward(torch.from_numpy(np.ascontiguousarray(move(dy), dtype=np.float64)))
    tol = 1e-10 if x.dtype == np.float64 else 2e-5
    for got, want in [(move(y), ty), (rm, trm), (rv, trv), (move(dx), tx.grad), (dweight, tw.grad), (dbias, tb.grad)]:
        want = want.detach().numpy().astype(np.float64)
        assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want)


def _in_wider_array(a, axis, channels):
    """``a``'s values in a view of a wider array with twice the channels, taking ``channels`` of them:
    ``slice(None, n)`` keeps an outer row's channels adjacent, ``slice(1, None, 2)`` does not."""
    shape = list(a.shape)
    shape[axis] *= 2
    index = [slice(None)] * a.ndim
    index[axis] = channels
    wide = np.zeros(shape, a.dtype)
    wide[tuple(index)] = a
    return wide[tuple(index)]


# Strided views holding the same values as ``a``: name -> view(a, axis).
VIEWS = {
    "reversed": lambda a, axis: np.flip(a).copy()[tuple(slice(None, None, -1) for _ in a.shape)],
    "offset": lambda a, axis: np.concatenate([np.zeros(1, a.dtype), a.ravel()])[1:].reshape(a.shape),
    "every-other-element": lambda a, axis: np.stack([a, np.zeros_like(a)], axis=-1)[..., 0],
    "channels-not-adjacent": lambda a, axis: _in_wider_array(a, axis, slice(1, None, 2)),
    "channels-adjacent-in-a-wider-array": lambda a, axis: _in_wider_array(a, axis, slice(None, a.shape[axis])),
}


def _run(shape, axis, dtype, config, monkeypatch, recorder, views=True):
    """Every output for x and dy as contiguous arrays (with an aligned and an unaligned out=) and,
    with ``views``, as each of VIEWS, with the thresholds of ``config``, every kernel call going
    through ``recorder``."""
    monkeypatch.setattr(runtime, "choose", recorder)
    _configure(monkeypatch, config)
    x = random_array(shape, dtype, loc=3.0)
    dy = random_array(shape, dtype, seed=1)
    results = []
    for offset in (0, 1):  # out= one element past a line boundary: unaligned heads and tails
        out = np.empty(x.size + offset, dtype)[offset:].reshape(shape)
        results.append(numba_outputs(x, dy, axis, out))
    for name, view in VIEWS.items() if views else ():
        xv, dyv = view(x, axis), view(dy, axis)
        np.testing.assert_array_equal(xv, x, err_msg=name)
        results.append(numba_outputs(xv, dyv, axis))
    return x, dy, results


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", list(PATHS))
def test_path_matches_the_oracle_and_torch_on_every_view(monkeypatch, path, dtype, config):
    shape, axis = PATHS[path]
    x, dy, results = _run(shape, axis, dtype, config, monkeypatch, _Recorder())
    _check_against_oracle(x, dy, axis, results[0])
    _check_against_torch(x, dy, axis, results[0])
    _check_fused(x, dy, axis, results[0])
    _check_synchronized(x, dy, axis, results[0])
    for other in results[1:]:
        _check_against_oracle(x, dy, axis, other)
        for a, b in zip(results[0], other):  # strides never change the bits
            assert a.tobytes() == b.tobytes()


def test_every_kernel_path_is_reached(monkeypatch):
    recorder = _Recorder()
    for shape, axis in PATHS.values():
        for config in CONFIGS:
            with monkeypatch.context() as m:
                _run(shape, axis, np.float32, config, m, recorder, views=False)  # views reach the same kernels
    missing = sorted(_every_path() - recorder.calls, key=str)
    assert not missing, f"kernel paths no case reaches: {missing}"


@pytest.mark.parametrize("path", list(PATHS))
def test_zero_size_views_on_every_path(path):
    shape, axis = PATHS[path]
    others = [a for a in range(len(shape)) if a != axis % len(shape)]
    empty_shape = list(shape)
    empty_shape[others[0]] = 0
    x = np.zeros(empty_shape, np.float32)[tuple(slice(None, None, -1) for _ in shape)]
    p = channel_params(shape[axis], np.float32)
    rm, rv = p["running_mean"].copy(), p["running_var"].copy()
    assert abn.batch_norm(x, p["running_mean"], p["running_var"], training=True, axis=axis).shape == x.shape
    np.testing.assert_array_equal(p["running_mean"], rm)  # left alone, as PyTorch does
    np.testing.assert_array_equal(p["running_var"], rv)
    assert abn.batch_norm(x, rm, rv, axis=axis).shape == x.shape
    stats = abn.BatchStats(rm, 1 / np.sqrt(rv + 1e-5))
    dx, dweight, dbias = abn.batch_norm_backward(x, x, stats, p["weight"], axis=axis)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dweight, 0)
    np.testing.assert_array_equal(dbias, 0)
