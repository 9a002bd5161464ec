"""The process groups synchronized batch norm runs over, behind one small protocol.

All accelbn asks of a group is an in-place sum all-reduce of a 1-D, C-contiguous float64 array of
the same length on every worker. A communicator is an object with

* ``rank``: this worker's index, 0 <= rank < size;
* ``size``: the number of workers;
* ``allreduce_sum(buffer)``: replace ``buffer`` (a NumPy array, or a CuPy array when the call's
  arrays are CuPy arrays) by its elementwise sum over all workers, returning when ``buffer`` holds
  the sum (for CuPy, when work queued on the current stream afterwards sees it). The handshake
  that starts every synchronized call passes a NumPy array, whatever the call's arrays are.

:func:`communicator` wraps the engines that exist (an ``mpi4py`` communicator, a
``cupy.cuda.nccl.NcclCommunicator``) and passes any other object with those three members through.
Nothing here imports mpi4py or CuPy unless such an object is handed to it.
"""

import ctypes
import functools
import sys

import numpy as np

from accelbn._core.arrays import CUPY, NUMPY, library_of, namespace


@functools.cache
def cuda_aware_mpi():
    """Whether the MPI library that mpi4py loaded says it can read CuPy (device) buffers itself,
    from ``MPIX_Query_cuda_support`` (MPICH 4 and Open MPI 4 and newer); False where it cannot say."""
    from mpi4py import MPI  # noqa: F401  (loads the MPI library, whose path /proc/self/maps then shows)

    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/libmpi" in line})
    except OSError:
        return False
    for path in paths:
        query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
        if query is not None:
            return bool(query())
    return False


class MpiCommunicator:
    """An ``mpi4py`` communicator: ``Allreduce`` in place. CuPy buffers go to MPI directly when its
    library is CUDA-aware (:func:`cuda_aware_mpi`), after the current stream has finished writing
    them, and are staged through host memory otherwise; :attr:`transport` says which."""

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    @property
    def transport(self):
        cupy = "CuPy buffers direct (CUDA-aware)" if cuda_aware_mpi() else "CuPy buffers staged through host memory"
        return f"MPI; NumPy buffers direct, {cupy}"

    def allreduce_sum(self, buffer):
        from mpi4py import MPI

        if library_of(buffer) != CUPY:
            self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        elif cuda_aware_mpi():
            namespace(CUPY).cuda.get_current_stream().synchronize()  # MPI reads the buffer off the stream's order
            self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        else:
            host = buffer.get()
            self.comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
            buffer.set(host)


# ncclFloat64 and ncclSum in nccl.h (cupy.cuda.nccl.NCCL_FLOAT64 and NCCL_SUM), the same in every
# NCCL 2 release: named here so that wrapping a communicator imports nothing.
_NCCL_FLOAT64, _NCCL_SUM = 8, 0


class NcclCommunicator:
    """A ``cupy.cuda.nccl.NcclCommunicator``: ``allReduce`` in place on the current stream. NCCL moves
    device memory only, so a NumPy buffer (the argument handshake) goes through the device."""

    transport = "NCCL on the current stream; NumPy buffers staged through the device"

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.rank_id()
        self.size = comm.size()

    def allreduce_sum(self, buffer):
        cupy = sys.modules["cupy"]
        device = buffer if library_of(buffer) == CUPY else cupy.asarray(buffer)
        stream = cupy.cuda.get_current_stream()
        self.comm.allReduce(device.data.ptr, device.data.ptr, device.size, _NCCL_FLOAT64, _NCCL_SUM, stream.ptr)
        if device is not buffer:
            buffer[...] = device.get(stream=stream)


_MEMBERS = ("rank", "size", "allreduce_sum")


def communicator(comm):
    """The communicator for ``comm``: an mpi4py communicator or a NCCL communicator wrapped, or an
    object with ``rank``, ``size`` and ``allreduce_sum`` as it is. TypeError for anything else."""
    kind = type(comm)
    if kind.__module__.startswith("mpi4py"):
        group = MpiCommunicator(comm)
    elif kind.__module__.startswith("cupy") and kind.__name__ == "NcclCommunicator":
        group = NcclCommunicator(comm)
    elif all(hasattr(comm, name) for name in _MEMBERS):
        group = comm
    else:
        raise TypeError(
            "comm must be an mpi4py communicator, a cupy.cuda.nccl.NcclCommunicator, or an object with rank, size "
            f"and allreduce_sum(buffer) (see accelbn.SyncBatchNorm); got {kind.__name__}"
        )
    size, rank = group.size, group.rank
    if not (isinstance(size, (int, np.integer)) and isinstance(rank, (int, np.integer)) and 0 <= rank < size):
        raise ValueError(f"comm must have an integer size >= 1 and 0 <= rank < size, got rank {rank!r} and size {size!r}")
    return group


def check_library(group, library):
    """A NCCL communicator moves CuPy arrays only."""
    if isinstance(group, NcclCommunicator) and library == NUMPY:
        raise TypeError("comm is a NCCL communicator, which carries CuPy arrays, but x is a NumPy array; "
                        "use an mpi4py communicator for NumPy arrays")
