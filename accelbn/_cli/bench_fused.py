"""``python -m accelbn bench --fused``: the fused ops against batch norm alone, side by side in one
process: ReLU and residual-plus-ReLU fused into batch norm's train forward and backward, the same
chains unfused (batch norm, then NumPy's add and ReLU; the mask, then batch norm's backward), Batch
Renormalization's train forward, and a memory copy of x. Each is timed in turns with batch norm's
own pass (medians), and reported as the ratio of the two: the issue's targets are a fused forward
within 1.1x and a fused backward within 1.15x."""

import sys

import numpy as np

import accelbn
from accelbn._cli import bench
from accelbn._cli.grid import FULL_GRID, QUICK_GRID

# name: (pass, what it times); "batch_norm" is each pass's baseline.
COLUMNS = {
    "forward": ("copy", "batch_norm", "relu", "add_relu", "unfused_add_relu", "renorm"),
    "backward": ("batch_norm", "relu", "add_relu", "unfused_add_relu"),
}


class _Arrays:
    def __init__(self, case, rng):
        c = case.shape[case.axis]
        self.case = case
        self.x, self.z, self.dy = (rng.standard_normal(case.shape, dtype=case.dtype) for _ in range(3))
        self.y, self.dx, self.dz = (np.empty_like(self.x) for _ in range(3))
        self.weight = rng.uniform(0.5, 1.5, c).astype(case.dtype)
        self.bias = rng.uniform(-0.5, 0.5, c).astype(case.dtype)
        self.running = [np.zeros(c, case.dtype), np.ones(c, case.dtype)]
        self.renorm = [np.zeros(c, case.dtype), np.ones(c, case.dtype), np.ones(c, case.dtype),
                       np.zeros(c, case.dtype), np.ones(c, case.dtype)]
        self.bn_stats = self.batch_norm()[1]
        self.relu_stats = self.fused(None)[1]

    def batch_norm(self):
        return accelbn.batch_norm(self.x, *self.running, self.weight, self.bias, True, axis=self.case.axis, out=self.y,
                                  return_stats=True)

    def fused(self, residual):
        return accelbn.batch_norm_relu(self.x, *self.running, self.weight, self.bias, True, residual=residual,
                                       axis=self.case.axis, out=self.y, return_stats=True)

    def unfused_add_relu(self):
        self.batch_norm()
        np.add(self.y, self.z, out=self.y)
        np.maximum(self.y, 0, out=self.y)

    def renorm_forward(self):
        accelbn.batch_renorm(self.x, *self.renorm, self.weight, self.bias, True, rmax=3.0, dmax=5.0,
                             axis=self.case.axis, out=self.y)

    def backward(self):
        accelbn.batch_norm_backward(self.dy, self.x, self.bn_stats, self.weight, axis=self.case.axis, out=self.dx)

    def fused_backward(self, residual):
        accelbn.batch_norm_relu_backward(self.dy, self.x, self.relu_stats, self.weight, self.bias, residual=residual,
                                         axis=self.case.axis, out=self.dx)

    def unfused_add_relu_backward(self):
        np.multiply(self.dy, self.y > 0, out=self.dz)  # y: the unfused forward's output, kept
        accelbn.batch_norm_backward(self.dz, self.x, self.bn_stats, self.weight, axis=self.case.axis, out=self.dx)

    def calls(self):
        return {
            "forward": {
                "copy": lambda: np.copyto(self.y, self.x),
                "batch_norm": self.batch_norm,
                "relu": lambda: self.fused(None),
                "add_relu": lambda: self.fused(self.z),
                "unfused_add_relu": self.unfused_add_relu,
                "renorm": self.renorm_forward,
            },
            "backward": {
                "batch_norm": self.backward,
                "relu": lambda: self.fused_backward(None),
                "add_relu": lambda: self.fused_backward(self.z),
                "unfused_add_relu": self.unfused_add_relu_backward,
            },
        }


def measure(grid, repeat, progress_stream=None):
    """``[(case, pass, {column: (ms, ratio to batch_norm)})]``: each column timed in turns with batch
    norm's own pass, so that a ratio compares two callables under the same conditions."""
    progress = bench._Progress(len(grid) * len(COLUMNS), progress_stream or sys.stderr)
    rng = np.random.default_rng(0)
    results = []
    for case in grid:
        calls = _Arrays(case, rng).calls()
        for pass_name, names in COLUMNS.items():
            progress.start(f"fused {pass_name} {case.label} {case.layout}")
            baseline = calls[pass_name]["batch_norm"]
            row = {}
            for name in names:
                base_ms, ms = bench._median_ms([baseline, calls[pass_name][name]], repeat)
                row[name] = (ms, ms / base_ms)
            results.append((case, pass_name, row))
    progress.close()
    return results


def format_table(results):
    lines = ["| case | pass | batch_norm ms | relu | add+relu | unfused add+relu | renorm | copy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for case, pass_name, row in results:
        ratio = lambda name: f"{row[name][1]:.2f}x" if name in row else ""  # noqa: E731
        lines.append(f"| {case.label} {case.layout} | {pass_name} | {row['batch_norm'][0]:.3f} | {ratio('relu')} | "
                     f"{ratio('add_relu')} | {ratio('unfused_add_relu')} | {ratio('renorm')} | {ratio('copy')} |")
    return "\n".join(lines)


def run(quick=False, repeat=None, stream=None):
    grid = [c for c in (QUICK_GRID if quick else FULL_GRID)]
    if repeat is None:
        repeat = bench.QUICK_REPEAT if quick else bench.FULL_REPEAT
    results = measure(grid, repeat)
    print("fused ops: time relative to batch norm's own pass (numba backend, medians, interleaved)", file=stream)
    print(format_table(results), file=stream)
