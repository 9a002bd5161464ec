"""``python -m accelbn bench``: time accelbn against a memory copy, plain NumPy and PyTorch CPU.

For each shape of a grid and each pass (train forward, eval forward, training backward) four
callables are timed side by side:

* copy: ``np.copyto(y, x)``, the memory traffic of a forward pass (one read, one write; a backward
  pass reads two arrays, about 1.5 copies). NumPy copies on one thread, so a parallel kernel can
  come in under it where one core cannot saturate memory;
* accelbn: ``batch_norm`` / ``batch_norm_backward`` on the default backend, writing into ``out``;
* numpy: the few lines a user would write, in x's dtype, allocating as such code does;
* torch: ``torch.nn.functional.batch_norm`` and its backward kernel, on the same memory (skipped,
  shown as "-", when PyTorch is not installed).

Every callable runs once untimed (Numba compiles or loads its kernels, pages get touched), then
once per repeat in interleaved order, so that drift in clock speed or memory state reaches all four
alike; the table reports medians.
"""

import datetime
import math
import statistics
import sys
import time
from typing import NamedTuple

import numba
import numpy as np

import accelbn
from accelbn._info import cpu_model

MOMENTUM = 0.1
EPS = 1e-5
PASSES = ("train", "eval", "backward")
FULL_REPEAT = 7
QUICK_REPEAT = 5


class Case(NamedTuple):
    """One benchmarked array: its shape, its memory layout ("NCHW", "NHWC" or "NC") and dtype."""

    shape: tuple
    layout: str
    dtype: type = np.float32

    @property
    def axis(self):
        return -1 if self.layout == "NHWC" else 1

    @property
    def label(self):
        return "x".join(map(str, self.shape))


FULL_GRID = (
    Case((64, 256, 56, 56), "NCHW"),
    Case((64, 56, 56, 256), "NHWC"),
    Case((256, 2048, 7, 7), "NCHW"),
    Case((8192, 1024), "NC"),
    Case((65536, 64), "NC"),
    Case((16, 3, 512, 512), "NCHW"),
    Case((4, 8, 4, 4), "NCHW"),
    Case((32, 64, 56, 56), "NCHW", np.float64),
)
QUICK_GRID = (
    Case((32, 64, 56, 56), "NCHW"),
    Case((32, 56, 56, 64), "NHWC"),
    Case((4096, 256), "NC"),
    Case((4, 8, 4, 4), "NCHW"),
)


class Row(NamedTuple):
    """Median milliseconds of one (case, pass); ``torch_ms`` is None without PyTorch."""

    case: Case
    pass_name: str
    copy_ms: float
    accelbn_ms: float
    numpy_ms: float
    torch_ms: float | None


class _Arrays:
    """The inputs and preallocated outputs of one case, shared by every callable timed on it."""

    def __init__(self, case, rng):
        self.case = case
        self.channel_axis = case.axis % len(case.shape)
        channels = case.shape[self.channel_axis]
        self.x = rng.standard_normal(case.shape, dtype=case.dtype)
        self.dy = rng.standard_normal(case.shape, dtype=case.dtype)
        self.weight = rng.uniform(0.5, 1.5, channels).astype(case.dtype)
        self.bias = rng.uniform(-0.5, 0.5, channels).astype(case.dtype)
        self.running_mean = np.zeros(channels, case.dtype)
        self.running_var = np.ones(channels, case.dtype)
        self.y = np.empty_like(self.x)
        self.dx = np.empty_like(self.x)
        _, self.stats = accelbn.batch_norm(
            self.x, None, None, self.weight, self.bias, training=True, eps=EPS, axis=case.axis, return_stats=True
        )


def _copy_calls(a):
    # Into y, which accelbn overwrites anyway: one output buffer fewer per case.
    def copy():
        np.copyto(a.y, a.x)

    return dict.fromkeys(PASSES, copy)


def _accelbn_calls(a):
    axis = a.case.axis

    def train():
        accelbn.batch_norm(
            a.x, a.running_mean, a.running_var, a.weight, a.bias,
            training=True, momentum=MOMENTUM, eps=EPS, axis=axis, out=a.y,
        )

    def eval_():
        accelbn.batch_norm(
            a.x, a.running_mean, a.running_var, a.weight, a.bias, training=False, eps=EPS, axis=axis, out=a.y
        )

    def backward():
        accelbn.batch_norm_backward(a.dy, a.x, a.stats, a.weight, axis=axis, out=a.dx)

    return {"train": train, "eval": eval_, "backward": backward}


def _numpy_calls(a):
    x, dy = a.x, a.dy
    reduce_axes = tuple(i for i in range(x.ndim) if i != a.channel_axis)
    channel_shape = [1] * x.ndim
    channel_shape[a.channel_axis] = x.shape[a.channel_axis]
    count = x.size // x.shape[a.channel_axis]
    weight = a.weight.reshape(channel_shape)
    bias = a.bias.reshape(channel_shape)
    # Its own running statistics, so that accelbn's updates and these never mix.
    running_mean = a.running_mean.copy()
    running_var = a.running_var.copy()

    def train():
        mean = x.mean(axis=reduce_axes, keepdims=True)
        var = x.var(axis=reduce_axes, keepdims=True)
        running_mean[...] = (1 - MOMENTUM) * running_mean + MOMENTUM * mean.ravel()
        running_var[...] = (1 - MOMENTUM) * running_var + MOMENTUM * var.ravel() * (count / (count - 1))
        return (x - mean) / np.sqrt(var + EPS) * weight + bias

    def eval_():
        mean = running_mean.reshape(channel_shape)
        var = running_var.reshape(channel_shape)
        return (x - mean) / np.sqrt(var + EPS) * weight + bias

    mean = a.stats.mean.astype(x.dtype).reshape(channel_shape)
    invstd = a.stats.invstd.astype(x.dtype).reshape(channel_shape)

    def backward():
        x_hat = (x - mean) * invstd
        dbias = dy.sum(axis=reduce_axes, keepdims=True)
        dweight = (dy * x_hat).sum(axis=reduce_axes, keepdims=True)
        dx = weight * invstd / count * (count * dy - dbias - x_hat * dweight)
        return dx, dweight.ravel(), dbias.ravel()

    return {"train": train, "eval": eval_, "backward": backward}


def _torch_calls(a, torch):
    def tensor(array):
        t = torch.from_numpy(array)
        # An NCHW view of NHWC memory: PyTorch sees channels_last tensors and runs its NHWC kernels.
        return t.permute(0, 3, 1, 2) if a.case.layout == "NHWC" else t

    x, dy = tensor(a.x), tensor(a.dy)
    weight, bias = torch.from_numpy(a.weight), torch.from_numpy(a.bias)
    running_mean = torch.from_numpy(a.running_mean.copy())
    running_var = torch.from_numpy(a.running_var.copy())
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, MOMENTUM, EPS)
    functional = torch.nn.functional

    def train():
        return functional.batch_norm(
            x, running_mean, running_var, weight, bias, training=True, momentum=MOMENTUM, eps=EPS
        )

    def eval_():
        return functional.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=EPS)

    # Autograd's NativeBatchNormBackward0 calls this very op on CPU; calling it directly keeps
    # building the graph out of the timer, and it times the kernel autograd would run.
    def backward():
        return torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, running_mean, running_var, save_mean, save_invstd, True, EPS, [True, True, True]
        )

    return {"train": train, "eval": eval_, "backward": backward}


def _median_ms(calls, repeat):
    """Median milliseconds of each callable: all warmed once, then timed once per repeat, interleaved."""
    for call in calls:
        call()
    seconds = [[] for _ in calls]
    for _ in range(repeat):
        for call, times in zip(calls, seconds):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return [statistics.median(times) * 1e3 for times in seconds]


class _Progress:
    """Progress on stderr: a bar rewritten with ``\\r`` on a terminal, one line per step otherwise."""

    _BAR = 20

    def __init__(self, total, stream):
        self._total = total
        self._stream = stream
        self._tty = stream.isatty()
        self._step = 0
        self._width = 0

    def start(self, label):
        self._step += 1
        filled = self._BAR * self._step // self._total
        line = f"[{'#' * filled}{'.' * (self._BAR - filled)}] {self._step}/{self._total} {label}"
        if self._tty:
            # Padding erases the tail of a longer previous line.
            self._stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def close(self):
        if self._tty and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()


def _measure_case(case, repeat, torch, progress, rng):
    # Arrays live only in this call, so one case's memory is freed before the next is allocated.
    arrays = _Arrays(case, rng)
    columns = [_copy_calls(arrays), _accelbn_calls(arrays), _numpy_calls(arrays)]
    if torch is not None:
        columns.append(_torch_calls(arrays, torch))
    rows = []
    for pass_name in PASSES:
        progress.start(f"{pass_name} {case.label} {case.layout} {np.dtype(case.dtype).name}")
        copy_ms, accelbn_ms, numpy_ms, *torch_ms = _median_ms([c[pass_name] for c in columns], repeat)
        rows.append(Row(case, pass_name, copy_ms, accelbn_ms, numpy_ms, torch_ms[0] if torch_ms else None))
    return rows


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def measure(grid, repeat, torch, progress_stream=sys.stderr):
    """One :class:`Row` per case of ``grid`` and pass, from ``repeat`` timed runs of each callable.

    ``torch`` is the torch module, or None to leave PyTorch out.
    """
    rng = np.random.default_rng(0)
    progress = _Progress(len(grid) * len(PASSES), progress_stream)
    try:
        return [row for case in grid for row in _measure_case(case, repeat, torch, progress, rng)]
    finally:
        progress.close()


def _ms(value):
    """Milliseconds to three significant digits, without exponents."""
    if value is None:
        return "-"
    decimals = max(0, 2 - math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:.{decimals}f}"


def _ratio(numerator, denominator):
    return "-" if numerator is None else f"{numerator / denominator:.2f}"


COLUMNS = (
    "shape", "layout", "dtype", "pass",
    "copy ms", "accelbn ms", "accelbn/copy", "numpy ms", "torch ms", "speedup vs torch",
)
_TEXT_COLUMNS = 4


def format_table(rows):
    """The rows as an aligned text table: text columns left-aligned, numbers right-aligned."""
    cells = [COLUMNS] + [
        (
            row.case.label, row.case.layout, np.dtype(row.case.dtype).name, row.pass_name,
            _ms(row.copy_ms), _ms(row.accelbn_ms), _ratio(row.accelbn_ms, row.copy_ms),
            _ms(row.numpy_ms), _ms(row.torch_ms), _ratio(row.torch_ms, row.accelbn_ms),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i < _TEXT_COLUMNS else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths))
        ).rstrip()
        for line in cells
    )


def _header(torch):
    threads = f"numba threads: {numba.get_num_threads()}"
    if torch is not None:
        threads += f", torch threads: {torch.get_num_threads()}"
    return f"cpu: {cpu_model()}; {threads}; date: {datetime.datetime.now():%Y-%m-%d %H:%M}"


def run(quick=False, repeat=None, stream=sys.stdout):
    """Benchmark the full or quick grid and print the header line and table to ``stream``."""
    grid = QUICK_GRID if quick else FULL_GRID
    if repeat is None:
        repeat = QUICK_REPEAT if quick else FULL_REPEAT
    torch = _import_torch()
    rows = measure(grid, repeat, torch)
    print(_header(torch), file=stream)
    print(format_table(rows), file=stream)
