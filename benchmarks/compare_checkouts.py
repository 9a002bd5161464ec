"""Batch norm's ratio to a memory copy in two source checkouts, side by side: the checkouts take turns
in fresh processes, round after round, so that drift in the machine reaches both alike.

    git worktree add /tmp/before <commit>
    python benchmarks/compare_checkouts.py /tmp/before . [--rounds 4] [--repeat 15] [--case 64x256x56x56 ...]

Each process imports accelbn from its checkout (``PYTHONPATH``), runs train, eval and backward on
the numba backend next to ``np.copyto`` of the same array, interleaved ``--repeat`` times, and
reports median over median. The table gives, per case and pass, the median and range over the
rounds, and after over before. For the asv suite's view across commits see benchmarks/README.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

# (shape, channel axis): the bench's grid (accelbn/_cli/grid.py) without the slowest cases.
CASES = {
    "64x256x56x56": ((64, 256, 56, 56), 1),
    "64x56x56x256": ((64, 56, 56, 256), -1),
    "8192x1024": ((8192, 1024), 1),
    "65536x64": ((65536, 64), 1),
    "4x8x4x4": ((4, 8, 4, 4), 1),
}

_MEASURE = """
import json, statistics, sys, time
import numpy as np
import accelbn as abn
assert abn.__file__.startswith(sys.argv[1]), abn.__file__
cases, repeat = json.loads(sys.argv[2]), int(sys.argv[3])
ratios = {}
for name, (shape, axis) in cases.items():
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)
    y, channels = np.empty_like(x), shape[axis]
    rm, rv = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    _, stats = abn.batch_norm(x, None, None, training=True, axis=axis, return_stats=True)
    calls = {"train": lambda: abn.batch_norm(x, rm, rv, training=True, axis=axis, out=y),
             "eval": lambda: abn.batch_norm(x, rm, rv, axis=axis, out=y),
             "backward": lambda: abn.batch_norm_backward(dy, x, stats, axis=axis, out=y)}
    copy = lambda: np.copyto(y, x)
    batch = 200 if x.size < 1000 else 1  # tiny arrays: time batches of calls
    for pass_name, call in calls.items():
        call(), copy()
        times = {call: [], copy: []}
        for _ in range(repeat):
            for f in (call, copy):
                start = time.perf_counter()
                for _ in range(batch):
                    f()
                times[f].append(time.perf_counter() - start)
        ratios[f"{name} {pass_name}"] = statistics.median(times[call]) / statistics.median(times[copy])
print(json.dumps(ratios))
"""


def _ratios(checkout, cases, repeat):
    checkout = os.path.realpath(checkout)
    env = {**os.environ, "PYTHONPATH": checkout}
    command = [sys.executable, "-c", _MEASURE, checkout, json.dumps(cases), str(repeat)]
    result = subprocess.run(command, env=env, cwd=checkout, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"measuring {checkout} failed:\n{result.stderr}")
    return json.loads(result.stdout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="the checkout measured as 'before'")
    parser.add_argument("after", help="the checkout measured as 'after'")
    parser.add_argument("--rounds", type=int, default=4, help="processes per checkout (default 4)")
    parser.add_argument("--repeat", type=int, default=15, help="interleaved timings per pass (default 15)")
    parser.add_argument("--case", action="append", choices=list(CASES), help="a case (repeatable; default all)")
    args = parser.parse_args(argv)
    cases = {name: CASES[name] for name in args.case or CASES}
    rounds = {"before": [], "after": []}
    for _ in range(args.rounds):
        for side in ("before", "after"):
            rounds[side].append(_ratios(getattr(args, side), cases, args.repeat))
    print("| case, pass | before (median, range) | after (median, range) | after / before |")
    print("| --- | --- | --- | --- |")
    for key in rounds["before"][0]:
        before = [r[key] for r in rounds["before"]]
        after = [r[key] for r in rounds["after"]]
        print(f"| {key} | {statistics.median(before):.3f} ({min(before):.3f}-{max(before):.3f}) "
              f"| {statistics.median(after):.3f} ({min(after):.3f}-{max(after):.3f}) "
              f"| {statistics.median(after) / statistics.median(before):.3f} |")


if __name__ == "__main__":
    main()
