"""Workers of a synchronized call, as threads of the test process: :class:`ThreadGroup` is a
communicator under accelbn's protocol (rank, size, allreduce_sum) with a fixed summation order, and
:func:`run_workers` runs one function per rank and collects each rank's result or exception.

The workers take turns: one runs at a time, and a worker hands the turn on only while it waits in
an all-reduce. Kernels (the Numba ones, and the CUDA-on-CPU harness's) never run concurrently, and
the interleaving is the same on every run. A worker that never arrives breaks the barrier after
``timeout`` seconds, so a call that would hang under MPI fails here instead.
"""

import threading

import numpy as np

from accelbn._core.arrays import CUPY, library_of, namespace


class ThreadGroup:
    def __init__(self, size, timeout=60.0):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.turn = threading.Lock()
        self.slots = [None] * size
        self.reductions = 0  # all-reduces completed, counted by rank 0

    def member(self, rank):
        return Member(self, rank)

    def wait(self):
        self.turn.release()
        try:
            self.barrier.wait()
        finally:
            self.turn.acquire()


class Member:
    """One rank's communicator."""

    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group.size

    def allreduce_sum(self, buffer):
        group = self.group
        if buffer.dtype != np.float64 or buffer.ndim != 1 or not buffer.flags.c_contiguous:
            raise TypeError(f"allreduce_sum takes a 1-D contiguous float64 buffer, got {buffer.dtype} {buffer.shape}")
        group.slots[self.rank] = buffer.copy()
        group.wait()
        sizes = {s.size for s in group.slots}
        if len(sizes) != 1:
            raise RuntimeError(f"allreduce_sum: buffers of different lengths {sorted(sizes)}")
        total = group.slots[0]
        for s in group.slots[1:]:
            total = total + s
        group.wait()  # everyone has read every slot before any is reused
        xp = namespace(CUPY if library_of(buffer) == CUPY else "numpy")
        xp.copyto(buffer, total)
        if self.rank == 0:
            group.reductions += 1


def run_workers(size, work, timeout=60.0, group=None):
    """``work(rank, comm)`` on ``size`` threads; returns ``(results, errors)`` by rank, each list
    holding None where the other has an entry."""
    group = group or ThreadGroup(size, timeout)
    results, errors = [None] * size, [None] * size

    def run(rank):
        with group.turn:
            try:
                results[rank] = work(rank, group.member(rank))
            except BaseException as error:  # noqa: BLE001  (reported to the test by rank)
                errors[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
        if t.is_alive():
            raise RuntimeError("a worker thread did not finish")
    return results, errors


def split(x, counts, axis=0):
    """x cut along ``axis`` into consecutive slices of ``counts`` lengths (copies, C order)."""
    edges = np.cumsum([0, *counts])
    if edges[-1] != x.shape[axis]:
        raise ValueError(f"counts {counts} do not add up to {x.shape[axis]}")
    index = [slice(None)] * x.ndim
    parts = []
    for a, b in zip(edges[:-1], edges[1:]):
        index[axis] = slice(a, b)
        parts.append(np.ascontiguousarray(x[tuple(index)]))
    return parts
