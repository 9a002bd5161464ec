"""``mpiexec -n 2 python -m accelbn bench --sync``: what synchronizing costs. On every rank, x has
the grid's shape (the whole batch is ranks times as large); each case times batch norm's local
train forward and backward, the synchronized ones, and the two all-reduces of each synchronized
pass alone (the handshake and the packed numbers, on buffers of their sizes). Passes are timed in
turns after a barrier; the table shows rank medians, the slowest rank's, as a step waits for it.

Ranks on one machine share its cores: each runs Numba on cores / ranks threads unless
ACCELBN_NUM_THREADS says otherwise."""

import os
import statistics
import sys
import time

import numpy as np

import accelbn
from accelbn._cli import bench
from accelbn._cli.grid import FULL_GRID, QUICK_GRID
from accelbn._core import collectives
from accelbn._ops import sync_batch_norm as sync

COLUMNS = ("local", "sync", "allreduce")


class _Arrays:
    def __init__(self, case, comm, rng):
        c = case.shape[case.axis]
        self.case, self.comm = case, comm
        self.x, self.dy = (rng.standard_normal(case.shape, dtype=case.dtype) for _ in range(2))
        self.y, self.dx = np.empty_like(self.x), np.empty_like(self.x)
        self.weight = rng.uniform(0.5, 1.5, c).astype(case.dtype)
        self.bias = rng.uniform(-0.5, 0.5, c).astype(case.dtype)
        self.running = [np.zeros(c, case.dtype), np.ones(c, case.dtype)]
        self.stats = self.sync_forward()[1]
        group = collectives.communicator(comm)
        self.handshake = np.zeros(group.size * len(sync._FIELDS))
        self.packed = np.zeros(group.size * 2 * c)
        self.group = group

    def local_forward(self):
        accelbn.batch_norm(self.x, *self.running, self.weight, self.bias, True, axis=self.case.axis, out=self.y)

    def sync_forward(self):
        return accelbn.sync_batch_norm(self.x, *self.running, self.weight, self.bias, True, comm=self.comm,
                                       axis=self.case.axis, out=self.y, return_stats=True)

    def local_backward(self):
        accelbn.batch_norm_backward(self.dy, self.x, self.stats, self.weight, axis=self.case.axis, out=self.dx)

    def sync_backward(self):
        accelbn.sync_batch_norm_backward(self.dy, self.x, self.stats, self.weight, comm=self.comm, axis=self.case.axis,
                                         out=self.dx)

    def allreduces(self):
        self.group.allreduce_sum(self.handshake)
        self.group.allreduce_sum(self.packed)

    def calls(self):
        return {
            "forward": {"local": self.local_forward, "sync": self.sync_forward, "allreduce": self.allreduces},
            "backward": {"local": self.local_backward, "sync": self.sync_backward, "allreduce": self.allreduces},
        }


def _slowest_median_ms(comm, calls, repeat):
    """Each callable's median milliseconds on the slowest rank: warmed once, then timed in turns,
    every run started together after a barrier."""
    for call in calls:
        comm.Barrier()
        call()
    seconds = [[] for _ in calls]
    for _ in range(repeat):
        for call, times in zip(calls, seconds):
            comm.Barrier()
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return [comm.allreduce(statistics.median(times) * 1e3, op=_max()) for times in seconds]


def _max():
    from mpi4py import MPI

    return MPI.MAX


def measure(comm, grid, repeat, progress_stream=None):
    """``[(case, pass, {column: ms})]`` for the local, synchronized and all-reduce-only passes."""
    progress = bench._Progress(len(grid) * 2, progress_stream or (sys.stderr if comm.Get_rank() == 0 else open(os.devnull, "w")))
    rng = np.random.default_rng(comm.Get_rank())
    results = []
    for case in grid:
        calls = _Arrays(case, comm, rng).calls()
        for pass_name, timed in calls.items():
            progress.start(f"sync {pass_name} {case.label} {case.layout}")
            results.append((case, pass_name, dict(zip(COLUMNS, _slowest_median_ms(comm, [timed[c] for c in COLUMNS], repeat)))))
    progress.close()
    return results


def format_table(results, ranks):
    lines = [f"| case (per rank, {ranks} ranks) | pass | local ms | synchronized ms | all-reduces ms | all-reduce share | sync / local |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for case, pass_name, ms in results:
        lines.append(f"| {case.label} {case.layout} | {pass_name} | {ms['local']:.3f} | {ms['sync']:.3f} | "
                     f"{ms['allreduce']:.3f} | {ms['allreduce'] / ms['sync']:.0%} | {ms['sync'] / ms['local']:.2f}x |")
    return "\n".join(lines)


def run(quick=False, repeat=None, stream=None):
    try:
        from mpi4py import MPI
    except ImportError:
        raise SystemExit("bench --sync needs mpi4py and an MPI (pip install 'accelbn[mpi]'); run it as "
                         "`mpiexec -n 2 python -m accelbn bench --sync`") from None
    import numba

    comm = MPI.COMM_WORLD
    ranks = comm.Get_size()
    if "ACCELBN_NUM_THREADS" not in os.environ:
        numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, (os.cpu_count() or 1) // ranks)))
    if repeat is None:
        repeat = bench.QUICK_REPEAT if quick else bench.FULL_REPEAT
    results = measure(comm, QUICK_GRID if quick else FULL_GRID, repeat)
    if comm.Get_rank() == 0:
        if ranks == 1:
            print("note: one rank; run under `mpiexec -n 2` (or more) to time real all-reduces", file=stream)
        library = " ".join(MPI.Get_library_version().splitlines()[0].split())
        print(f"synchronized batch norm over {ranks} MPI ranks ({library}), "
              f"numba backend, {numba.get_num_threads()} threads per rank, medians of the slowest rank", file=stream)
        print(format_table(results, ranks), file=stream)
