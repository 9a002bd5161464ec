"""``python -m accelbn compile``: compile every CPU kernel ahead of time, into Numba's on-disk cache.

For images and CI, so that no process pays for compiling on first use. The four jobs (float32 and
float64, serial and parallel kernels) run in one process each, as many at a time as there are cores:
Numba compiles one function at a time per process, and its cache is safe for processes writing it
together.
"""

import concurrent.futures
import multiprocessing
import os
import sys
import time

import numpy as np

DTYPES = (np.float32, np.float64)


def precompile_all(dtype, serial):
    """Every operation's Numba kernels for ``dtype``, serial or parallel."""
    from accelbn.backends.numba_cpu import batch_norm, row_norm

    for operation in (batch_norm, row_norm):
        operation.precompile(np.dtype(dtype), serial)


def _job(dtype, serial):
    from accelbn.backends.numba_cpu import runtime

    runtime.announce_compiles = False
    start = time.perf_counter()
    precompile_all(dtype, serial)
    return time.perf_counter() - start


def run(stream=sys.stdout):
    """Compile (or load) every kernel for every dtype; one line per job, then the total."""
    start = time.perf_counter()
    jobs = [(dtype, serial) for dtype in DTYPES for serial in (False, True)]
    workers = min(len(jobs), os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")  # a clean interpreter each, whatever the caller ran
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(_job, dtype, serial): (dtype, serial) for dtype, serial in jobs}
        for future in concurrent.futures.as_completed(futures):
            dtype, serial = futures[future]
            kind = "serial" if serial else "parallel"
            print(f"{np.dtype(dtype).name} {kind} kernels: {future.result():.1f} s", file=stream, flush=True)
    print(f"all CPU kernels compiled or loaded from the cache in {time.perf_counter() - start:.1f} s", file=stream)
