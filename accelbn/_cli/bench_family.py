"""``python -m accelbn bench --op NAME`` for layer, RMS, group and instance norm: forward and
backward against a memory copy of x and PyTorch CPU, side by side as the batch-norm bench
(:mod:`.bench`) times them; the copy and table are the same."""

import sys

import numpy as np

import accelbn
from accelbn._cli import bench
from accelbn._cli.grid import FAMILY_GRID, FAMILY_QUICK_GRID, GROUPS

OPERATIONS = ("layer_norm", "rms_norm", "group_norm", "instance_norm")
PASSES = ("forward", "backward")


class _Arrays:
    """x, dy, the affine parameters and the outputs of one case, and the forward's statistics."""

    def __init__(self, operation, case, rng):
        self.operation, self.case = operation, case
        self.x = rng.standard_normal(case.shape, dtype=case.dtype)
        self.dy = rng.standard_normal(case.shape, dtype=case.dtype)
        self.y, self.dx = np.empty_like(self.x), np.empty_like(self.x)
        if operation in ("layer_norm", "rms_norm"):
            self.args, self.kwargs, size = (case.shape[-1],), {}, case.shape[-1]
        else:
            self.args = (GROUPS,) if operation == "group_norm" else ()
            self.kwargs, size = {"axis": case.axis}, case.shape[case.axis]
        self.weight = rng.uniform(0.5, 1.5, size).astype(case.dtype)
        self.bias = None if operation == "rms_norm" else rng.uniform(-0.5, 0.5, size).astype(case.dtype)
        self.stats = self.forward(return_stats=True)[1]

    def parameters(self):
        if self.operation == "instance_norm":
            return {"weight": self.weight, "bias": self.bias}
        return {"weight": self.weight} if self.bias is None else {"weight": self.weight, "bias": self.bias}

    def forward(self, **kwargs):
        function = getattr(accelbn, self.operation)
        return function(self.x, *self.args, **self.parameters(), **self.kwargs, out=self.y, **kwargs)

    def backward(self):
        function = getattr(accelbn, f"{self.operation}_backward")
        return function(self.dy, self.x, self.stats, *self.args, self.weight, **self.kwargs, out=self.dx)


def _torch_calls(a, torch):
    """PyTorch's forward and its backward through autograd (x, weight and bias gradients), on the
    same memory; channels-last cases as NCHW views of it."""
    functional = torch.nn.functional
    x = torch.from_numpy(a.x)
    dy = torch.from_numpy(a.dy)
    if a.case.layout == "NHWC":
        x, dy = x.permute(0, 3, 1, 2), dy.permute(0, 3, 1, 2)
    x.requires_grad_()
    weight = torch.from_numpy(a.weight).requires_grad_()
    bias = None if a.bias is None else torch.from_numpy(a.bias).requires_grad_()
    normalized = (a.x.shape[-1],)
    forward = {
        "layer_norm": lambda: functional.layer_norm(x, normalized, weight, bias),
        "rms_norm": lambda: functional.rms_norm(x, normalized, weight),
        "group_norm": lambda: functional.group_norm(x, GROUPS, weight, bias),
        "instance_norm": lambda: functional.instance_norm(x, weight=weight, bias=bias),
    }[a.operation]
    inputs = [t for t in (x, weight, bias) if t is not None]
    output = forward()

    def backward():
        torch.autograd.grad(output, inputs, dy, retain_graph=True)

    return {"forward": forward, "backward": backward}


def measure(operation, grid, repeat, torch, progress_stream=None):
    """One :class:`bench.Row` per case and pass (the numpy column empty)."""
    progress = bench._Progress(len(grid) * len(PASSES), progress_stream or sys.stderr)
    rng = np.random.default_rng(0)
    rows = []
    for case in grid:
        arrays = _Arrays(operation, case, rng)

        def copy(a=arrays):
            np.copyto(a.y, a.x)

        columns = {"copy": dict.fromkeys(PASSES, copy), "accelbn": {"forward": arrays.forward, "backward": arrays.backward}}
        if torch is not None:
            columns["torch"] = _torch_calls(arrays, torch)
        for pass_name in PASSES:
            progress.start(f"{operation} {pass_name} {case.label} {case.layout}")
            timed = {name: calls[pass_name] for name, calls in columns.items()}
            ms = dict(zip(timed, bench._median_ms(list(timed.values()), repeat)))
            rows.append(bench.Row(case, pass_name, ms["copy"], ms["accelbn"], None, ms.get("torch"), None))
    progress.close()
    return rows


def run(operation, quick=False, repeat=None, stream=None, as_json=False):
    """Benchmark ``operation`` on its grid and print the table (or JSON) to ``stream``."""
    grid = (FAMILY_QUICK_GRID if quick else FAMILY_GRID)[operation]
    if repeat is None:
        repeat = bench.QUICK_REPEAT if quick else bench.FULL_REPEAT
    torch = bench._import_torch()
    rows = measure(operation, grid, repeat, torch)
    if as_json:
        print(bench.format_json(rows, repeat), file=stream)
    else:
        print(f"{operation}; " + bench._header(torch), file=stream)
        print(bench.format_table(rows), file=stream)
