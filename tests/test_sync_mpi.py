"""Synchronized batch norm over real MPI: ``mpiexec -n 3`` (the mpich wheel's) runs
tests/mpi_sync_cases.py, and every rank must report its cases passed. The MPI adapter's other
half, CuPy buffers staged through host memory, runs in this process on MPI.COMM_SELF."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
from support import ArraysOn, channel_params, random_array

import accelbn as abn

RANKS = 3
CASES = pathlib.Path(__file__).with_name("mpi_sync_cases.py")


def _mpiexec():
    found = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    assert found, "mpiexec not found: install the test extra (the mpich wheel provides it)"
    return found


def test_mpiexec_three_ranks():
    result = subprocess.run([_mpiexec(), "-n", str(RANKS), sys.executable, str(CASES)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    passed = sorted(int(rank) for rank in re.findall(r"rank (\d+): \d+ cases passed", result.stdout))  # lines may interleave
    assert passed == list(range(RANKS)), result.stdout


def test_cupy_buffers_are_staged_through_host_memory(gpu):
    from mpi4py import MPI

    from accelbn._core import collectives

    group = collectives.communicator(MPI.COMM_SELF)
    assert isinstance(group, collectives.MpiCommunicator) and (group.rank, group.size) == (0, 1)
    assert not collectives.cuda_aware_mpi()  # the mpich wheel is built without CUDA
    assert "staged through host memory" in group.transport
    on = ArraysOn("cupy")
    x = random_array((6, 3, 4, 4), seed=3, loc=2.0)
    p = channel_params(3, np.float32)
    runs = []
    for sync in (True, False):
        rm, rv = on.put(p["running_mean"].copy()), on.put(p["running_var"].copy())
        args = (on.put(x), rm, rv, on.put(p["weight"]), on.put(p["bias"]), True)
        if sync:
            y = abn.sync_batch_norm(*args, comm=MPI.COMM_SELF, backend="cupy")
        else:
            y = abn.batch_norm(*args, backend="cupy")
        runs.append([on.get(a) for a in (y, rm, rv)])
    for got, want in zip(*runs):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
