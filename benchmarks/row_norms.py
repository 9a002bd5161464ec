"""airspeed velocity benchmarks of layer, RMS, group and instance norm on the grid of
``python -m accelbn bench --op NAME``: forward and backward per CPU backend, their peak memory,
and their time relative to a memory copy of x."""

import statistics
import time

import numpy as np

import accelbn as abn

try:
    from accelbn._cli.grid import FAMILY_GRID, GROUPS
except ImportError:  # commits before the family existed: nothing to measure
    FAMILY_GRID, GROUPS = {}, 32

CASES = {f"{op} {case.layout} {case.label}": (op, case) for op, cases in FAMILY_GRID.items() for case in cases}
BACKENDS = ["numba", "numpy"]
PASSES = ["forward", "backward"]


class _RowNorm:
    params = (BACKENDS, list(CASES), PASSES)
    param_names = ["backend", "case", "pass"]

    def setup(self, backend, case, pass_):
        if case not in CASES:
            raise NotImplementedError(f"{case} is not in this commit's grid")
        operation, case = CASES[case]
        rng = np.random.default_rng(0)
        x = rng.standard_normal(case.shape, dtype=case.dtype)
        dy = rng.standard_normal(case.shape, dtype=case.dtype)
        out = np.empty_like(x)
        if operation in ("layer_norm", "rms_norm"):
            args, kwargs = (case.shape[-1],), {}
        else:
            args, kwargs = ((GROUPS,) if operation == "group_norm" else ()), {"axis": case.axis}
        forward = getattr(abn, operation)
        backward = getattr(abn, f"{operation}_backward")
        _, stats = forward(x, *args, **kwargs, return_stats=True, backend=backend)
        self.copy = lambda: np.copyto(out, x)
        self.run = {
            "forward": lambda: forward(x, *args, **kwargs, out=out, backend=backend),
            "backward": lambda: backward(dy, x, stats, *args, **kwargs, out=out, backend=backend),
        }[pass_]
        self.run()  # compiles (or loads) the kernels outside the timed body
        self.copy()


class RowNorm(_RowNorm):
    def time_pass(self, backend, case, pass_):
        self.run()

    def peakmem_pass(self, backend, case, pass_):
        self.run()


class RowNormRatioToCopy(_RowNorm):
    """The pass's median time over that of ``np.copyto`` of x, measured side by side."""

    unit = "ratio"
    repeat = 7

    def track_ratio_to_copy(self, backend, case, pass_):
        pass_times, copy_times = [], []
        for _ in range(self.repeat):
            for run, times in ((self.run, pass_times), (self.copy, copy_times)):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
        return statistics.median(pass_times) / statistics.median(copy_times)
