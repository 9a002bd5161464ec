"""``python -m accelbn bench``: time accelbn against a memory copy, plain NumPy, PyTorch CPU and
ONNX Runtime.

For each shape of a grid and each pass (train forward, eval forward, training backward) up to five
callables are timed side by side:

* copy: ``np.copyto(y, x)``, the memory traffic of a forward pass (one read, one write; a backward
  pass reads two arrays, about 1.5 copies). NumPy copies on one thread, so a parallel kernel can
  come in under it where one core cannot saturate memory;
* accelbn: ``batch_norm`` / ``batch_norm_backward`` on the default backend, writing into ``out``;
* numpy: the few lines a user would write, in x's dtype, allocating as such code does;
* torch: ``torch.nn.functional.batch_norm`` and its backward kernel, on the same memory (skipped,
  shown as "-", when PyTorch is not installed), its idle OpenMP threads spinning for at most
  about a millisecond (``GOMP_SPINCOUNT=10000``, ``KMP_BLOCKTIME=1``, unless the environment
  says how they wait), as ONNX Runtime's are told not to spin below;
* onnxruntime: the eval pass only, as ONNX Runtime is an inference runtime: a model of one
  BatchNormalization node (opset 15) with the case's parameters as initializers, run on the CPU
  provider with Numba's thread count through IO binding, x bound as input and a preallocated
  array of its own as output, so no allocation is timed. ONNX wants channels at axis 1, so for
  NHWC the model transposes x to NCHW and the result back, and the column includes both
  transposes. It is shown only when ``onnxruntime`` and ``onnx`` (which builds the model) are
  installed.

Before anything is timed, accelbn's kernels for the grid are compiled (or loaded from the cache) in
worker processes, one per core. Every callable runs once untimed (pages get touched), then
once per repeat in interleaved order, so that drift in clock speed or memory state reaches all
alike; the table reports medians. ``--json`` prints the same medians as one JSON document.
"""

import concurrent.futures
import datetime
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from typing import NamedTuple

import numba
import numpy as np

import accelbn
from accelbn._cli.grid import EPS, FULL_GRID, MOMENTUM, QUICK_GRID, Case
from accelbn._cli.info import cpu_model

PASSES = ("train", "eval", "backward")
FULL_REPEAT = 7
QUICK_REPEAT = 5


class Row(NamedTuple):
    """Median milliseconds of one (case, pass); ``torch_ms`` is None without PyTorch, and
    ``onnxruntime_ms`` without ONNX Runtime or outside the eval pass."""

    case: Case
    pass_name: str
    copy_ms: float
    accelbn_ms: float
    numpy_ms: float
    torch_ms: float | None
    onnxruntime_ms: float | None

    @property
    def ratio_to_copy(self):
        return self.accelbn_ms / self.copy_ms

    @property
    def speedup_vs_torch(self):
        return None if self.torch_ms is None else self.torch_ms / self.accelbn_ms


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


def _onnx_model(a):
    """The eval pass as an ONNX model: one BatchNormalization node with the case's parameters as
    initializers, between transposes to channels-first and back when channels are last."""
    from onnx import helper, numpy_helper

    parameters = {"scale": a.weight, "B": a.bias, "input_mean": a.running_mean, "input_var": a.running_var}
    channels_first = a.channel_axis == 1
    x, y = ("X", "Y") if channels_first else ("X_channels_first", "Y_channels_first")
    nodes = [helper.make_node("BatchNormalization", [x, *parameters], [y], epsilon=EPS)]
    if not channels_first:
        to_channels_first = [0, a.channel_axis, *range(1, a.channel_axis)]
        nodes = [
            helper.make_node("Transpose", ["X"], [x], perm=to_channels_first),
            *nodes,
            helper.make_node("Transpose", [y], ["Y"], perm=np.argsort(to_channels_first).tolist()),
        ]
    element_type = helper.np_dtype_to_tensor_dtype(a.x.dtype)
    graph = helper.make_graph(
        nodes,
        "batch_norm_eval",
        [helper.make_tensor_value_info("X", element_type, a.x.shape)],
        [helper.make_tensor_value_info("Y", element_type, a.x.shape)],
        [numpy_helper.from_array(value, name) for name, value in parameters.items()],
    )
    # IR version 8 goes with opset 15; onnx otherwise writes its newest, which older runtimes reject.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


def _onnxruntime_calls(a, onnxruntime):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = numba.get_num_threads()
    # Idle ONNX Runtime threads otherwise spin after each run, taking cores from the callable timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(
        _onnx_model(a).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    # Its own output: one more write into y between accelbn's runs slowed accelbn's eval by a third.
    out = np.empty_like(a.x)
    binding = session.io_binding()
    binding.bind_cpu_input("X", a.x)
    binding.bind_ortvalue_output("Y", onnxruntime.OrtValue.ortvalue_from_numpy(out))

    def eval_():
        session.run_with_iobinding(binding)
        return out

    return {"eval": eval_}


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


def _measure_case(case, repeat, torch, onnxruntime, progress, rng):
    # Arrays live only in this call, so one case's memory is freed before the next is allocated.
    arrays = _Arrays(case, rng)
    columns = {"copy": _copy_calls(arrays), "accelbn": _accelbn_calls(arrays), "numpy": _numpy_calls(arrays)}
    if torch is not None:
        columns["torch"] = _torch_calls(arrays, torch)
    if onnxruntime is not None:
        columns["onnxruntime"] = _onnxruntime_calls(arrays, onnxruntime)
    rows = []
    for pass_name in PASSES:
        progress.start(f"{pass_name} {case.label} {case.layout} {np.dtype(case.dtype).name}")
        timed = {name: calls[pass_name] for name, calls in columns.items() if pass_name in calls}
        ms = dict(zip(timed, _median_ms(list(timed.values()), repeat)))
        rows.append(
            Row(case, pass_name, ms["copy"], ms["accelbn"], ms["numpy"], ms.get("torch"), ms.get("onnxruntime"))
        )
    return rows


def _import_torch():
    """torch, or None. Its idle OpenMP threads are told to stop spinning within about a millisecond
    (unless the user set how they wait): by default they spin for milliseconds after each call, on
    the cores that the callable timed next needs, which slowed whatever ran beside torch without
    making torch faster (benchmarks/RESULTS.md)."""
    if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"} & os.environ.keys():
        os.environ["GOMP_SPINCOUNT"] = "10000"  # GNU OpenMP, as in PyTorch's wheels; read when it loads
        os.environ["KMP_BLOCKTIME"] = "1"  # Intel OpenMP, in milliseconds
    try:
        import torch
    except ImportError:
        return None
    return torch


def _import_onnxruntime():
    """onnxruntime, or None unless both it and onnx, which :func:`_onnx_model` builds with, import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def measure(grid, repeat, torch, onnxruntime=None, progress_stream=None):
    """One :class:`Row` per case of ``grid`` and pass, from ``repeat`` timed runs of each callable.

    ``torch`` and ``onnxruntime`` are those modules, or None to leave them out. Progress goes to
    ``progress_stream``, by default standard error.
    """
    rng = np.random.default_rng(0)
    progress = _Progress(len(grid) * len(PASSES), progress_stream or sys.stderr)
    try:
        return [row for case in grid for row in _measure_case(case, repeat, torch, onnxruntime, progress, rng)]
    finally:
        progress.close()


def _ms(value):
    """Milliseconds to three significant digits, without exponents."""
    if value is None:
        return "-"
    decimals = max(0, 2 - math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:.{decimals}f}"


def _ratio(value):
    return "-" if value is None else f"{value:.2f}"


COLUMNS = (
    "shape", "layout", "dtype", "pass",
    "copy ms", "accelbn ms", "accelbn/copy", "numpy ms", "torch ms", "speedup vs torch", "onnxruntime ms",
)
_TEXT_COLUMNS = 4


def format_table(rows):
    """The rows as an aligned text table: text columns left-aligned, numbers right-aligned; the
    onnxruntime column only when some row has its time."""
    cells = [COLUMNS] + [
        (
            row.case.label, row.case.layout, np.dtype(row.case.dtype).name, row.pass_name,
            _ms(row.copy_ms), _ms(row.accelbn_ms), _ratio(row.ratio_to_copy),
            _ms(row.numpy_ms), _ms(row.torch_ms), _ratio(row.speedup_vs_torch), _ms(row.onnxruntime_ms),
        )
        for row in rows
    ]
    if all(row.onnxruntime_ms is None for row in rows):
        cells = [line[:-1] for line in cells]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
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


def format_json(rows, repeat):
    """The rows and the machine they ran on as one JSON document; None becomes null."""
    document = {
        "accelbn_version": accelbn.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "threads": numba.get_num_threads(),
        "threading_layer": numba.threading_layer(),
        "repeat": repeat,
        "results": [
            {
                "shape": list(row.case.shape),
                "layout": row.case.layout,
                "dtype": np.dtype(row.case.dtype).name,
                "pass": row.pass_name,
                "copy_ms": row.copy_ms,
                "accelbn_ms": row.accelbn_ms,
                "numpy_ms": row.numpy_ms,
                "torch_ms": row.torch_ms,
                "onnxruntime_ms": row.onnxruntime_ms,
                "ratio_to_copy": row.ratio_to_copy,
                "speedup_vs_torch": row.speedup_vs_torch,
            }
            for row in rows
        ],
    }
    return json.dumps(document, indent=2)


def _run_accelbn_once(cases):
    """Each of accelbn's passes once on each case, which compiles (or loads) their kernels."""
    rng = np.random.default_rng(0)
    for case in cases:
        for call in _accelbn_calls(_Arrays(case, rng)).values():
            call()


def _kernel_groups(grid):
    """The cases of ``grid`` in groups that share kernels: the channels-last ones (NHWC and NC) of
    one dtype together, every other case on its own."""
    groups = {}
    for case in grid:
        key = ("channels-last", case.dtype) if case.layout != "NCHW" else case
        groups.setdefault(key, []).append(case)
    return list(groups.values())


def _compile_ahead(grid):
    """Compile the kernels of ``grid`` in worker processes, one per core, before anything is timed.

    A run on an empty cache is mostly compiling, and Numba compiles one function at a time per
    process. A group of cases that share kernels goes to one worker; the cache is safe for processes
    writing it together. Nothing is gained on one core."""
    groups = _kernel_groups(grid)
    workers = min(len(groups), os.cpu_count() or 1)
    if workers < 2:
        return
    print(f"compiling or loading accelbn's kernels in {workers} processes", file=sys.stderr)
    context = multiprocessing.get_context("spawn")  # a clean interpreter, whatever this process ran
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        list(pool.map(_run_accelbn_once, groups))  # raises what a worker raised


def run(quick=False, repeat=None, stream=None, as_json=False):
    """Benchmark the full or quick grid and print to ``stream`` (by default standard output) the
    header line and table, or with ``as_json`` one JSON document."""
    grid = QUICK_GRID if quick else FULL_GRID
    if repeat is None:
        repeat = QUICK_REPEAT if quick else FULL_REPEAT
    _compile_ahead(grid)
    torch = _import_torch()
    rows = measure(grid, repeat, torch, _import_onnxruntime())
    if as_json:
        print(format_json(rows, repeat), file=stream)
    else:
        print(_header(torch), file=stream)
        print(format_table(rows), file=stream)
