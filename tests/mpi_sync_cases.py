"""Synchronized batch norm over real MPI: run by tests/test_sync_mpi.py as ``mpiexec -n 3 python
tests/mpi_sync_cases.py``. Every rank builds the same whole batch, takes its slice (5, 0 and 11
samples), and checks against single-process batch norm on the whole batch, and against the other
ranks' bits. A failed check aborts the job, so mpiexec exits nonzero; on success each rank prints
one line."""

import os
import sys
import traceback

import numba
import numpy as np
from mpi4py import MPI
from support import channel_params, random_array, rel_error, tolerance
from workers import split

import accelbn as abn

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
COUNTS = (5, 0, 11)
LAYOUTS = {"NCHW": ((16, 3, 5, 6), 1), "NHWC": ((16, 5, 6, 3), -1)}


def _close(got, want, dtype, what):
    error = rel_error(got, want)
    assert got.dtype == want.dtype and error <= tolerance(dtype), f"{what}: error {error} (dtype {got.dtype})"


def _same_on_every_rank(arrays, what):
    mine = [np.ascontiguousarray(a).tobytes() for a in arrays]
    for rank, theirs in enumerate(COMM.allgather(mine)):
        assert theirs == mine, f"{what} differ between rank {RANK} and rank {rank}"


def whole_batch(layout, dtype):
    shape, axis = LAYOUTS[layout]
    x, dy = random_array(shape, dtype, seed=1, loc=3.0), random_array(shape, dtype, seed=2)
    p = channel_params(shape[axis], dtype)
    rm, rv = p["running_mean"].copy(), p["running_var"].copy()
    y, stats = abn.batch_norm(x, rm, rv, p["weight"], p["bias"], True, axis=axis, return_stats=True)
    dx, dw, db = abn.batch_norm_backward(dy, x, stats, p["weight"], axis=axis)

    x_k, dy_k = split(x, COUNTS)[RANK], split(dy, COUNTS)[RANK]
    rm_k, rv_k = p["running_mean"].copy(), p["running_var"].copy()
    y_k, stats_k = abn.sync_batch_norm(x_k, rm_k, rv_k, p["weight"], p["bias"], True, comm=COMM, axis=axis,
                                       return_stats=True)
    dx_k, dw_k, db_k = abn.sync_batch_norm_backward(dy_k, x_k, stats_k, p["weight"], comm=COMM, axis=axis)

    _close(np.concatenate(COMM.allgather(y_k)), y, dtype, "y")
    _close(np.concatenate(COMM.allgather(dx_k)), dx, dtype, "dx")
    for got, want, what in [(rm_k, rm, "running_mean"), (rv_k, rv, "running_var"), (stats_k.mean, stats.mean, "mean"),
                            (stats_k.invstd, stats.invstd, "invstd")]:
        _close(got, want, dtype, what)
    summed = [np.zeros(len(dw)), np.zeros(len(db))]
    COMM.Allreduce(MPI.IN_PLACE, summed[0].__iadd__(dw_k), op=MPI.SUM)
    COMM.Allreduce(MPI.IN_PLACE, summed[1].__iadd__(db_k), op=MPI.SUM)
    _close(summed[0].astype(dtype), dw, dtype, "dweight summed over ranks")
    _close(summed[1].astype(dtype), db, dtype, "dbias summed over ranks")
    _same_on_every_rank([rm_k, rv_k, stats_k.mean, stats_k.invstd], "running and saved statistics")


def thread_counts():
    """Bitwise the same with 1 thread and with all, on inputs large enough for the parallel kernels."""
    for shape, axis in [((32, 5, 40, 40), 1), ((30, 40, 40, 3), -1)]:
        x, dy = random_array(shape, seed=4), random_array(shape, seed=5)
        counts = (7, 0, shape[0] - 7)
        x_k, dy_k = split(x, counts)[RANK], split(dy, counts)[RANK]
        p = channel_params(shape[axis], np.float32)
        runs = []
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            rm, rv = p["running_mean"].copy(), p["running_var"].copy()
            y, stats = abn.sync_batch_norm(x_k, rm, rv, p["weight"], p["bias"], True, comm=COMM, axis=axis,
                                           return_stats=True)
            runs.append([y, rm, rv, *abn.sync_batch_norm_backward(dy_k, x_k, stats, p["weight"], comm=COMM, axis=axis)])
        for got, want in zip(*runs):
            assert got.tobytes() == want.tobytes(), "results depend on the thread count"


def layer_steps():
    """Three SGD steps on SyncBatchNorm (gradients all-reduced as data parallelism does) against
    BatchNorm on the whole batch; state dicts identical on every rank."""
    whole = abn.BatchNorm(3)
    layer = abn.SyncBatchNorm(3, comm=COMM)
    for step in range(3):
        x, dy = random_array((16, 3, 4, 4), seed=20 + step, loc=1.0), random_array((16, 3, 4, 4), seed=30 + step)
        y, dx = whole(x), whole.backward(dy)
        y_k, dx_k = layer(split(x, COUNTS)[RANK]), layer.backward(split(dy, COUNTS)[RANK])
        _close(np.concatenate(COMM.allgather(y_k)), y, np.float32, f"step {step} y")
        _close(np.concatenate(COMM.allgather(dx_k)), dx, np.float32, f"step {step} dx")
        grads = np.concatenate([layer.grad_weight, layer.grad_bias]).astype(np.float64)
        COMM.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)
        for model, gw, gb in [(whole, whole.grad_weight, whole.grad_bias), (layer, grads[:3], grads[3:])]:
            model.weight -= (0.1 * gw).astype(np.float32)
            model.bias -= (0.1 * gb).astype(np.float32)
    state = layer.state_dict()
    _same_on_every_rank(list(state.values()), "state dicts")
    for name, value in whole.state_dict().items():
        np.testing.assert_allclose(state[name], value, rtol=2e-5, atol=1e-6, err_msg=name)


def _expect_everywhere(call, kind_of_rank, text):
    try:
        call()
    except Exception as error:  # noqa: BLE001  (checked below)
        kind = kind_of_rank(RANK)
        assert isinstance(error, kind) and text(RANK) in str(error), f"rank {RANK}: {error!r}"
    else:
        raise AssertionError(f"rank {RANK}: no error")


def errors_on_every_rank():
    """Bad input on one rank and mismatched shapes across ranks: an error on every rank (never a
    hang), nothing changed, and the communicator still usable afterwards."""
    p = channel_params(3, np.float32)
    rm, rv = p["running_mean"].copy(), p["running_var"].copy()
    x = random_array((4, 3, 2, 2), seed=8)
    _expect_everywhere(lambda: abn.sync_batch_norm(x, rm, rv, training=True, eps=-1.0 if RANK == 1 else 1e-5, comm=COMM),
                       lambda r: ValueError if r == 1 else abn.SyncError,
                       lambda r: "eps" if r == 1 else "worker(s) [1] of 3")
    wide = random_array((4, 4, 2, 2), seed=8)
    _expect_everywhere(lambda: abn.sync_batch_norm(wide if RANK == 2 else x, None, None, training=True, comm=COMM),
                       lambda r: ValueError, lambda r: "disagree on channels; by rank: [3.0, 3.0, 4.0]")
    np.testing.assert_array_equal(rm, p["running_mean"])
    np.testing.assert_array_equal(rv, p["running_var"])
    abn.sync_batch_norm(x, rm, rv, training=True, comm=COMM)  # the group is still in step


def bench_table():
    """`bench --sync`'s measurement and table on a small case: every column on every rank."""
    from accelbn._cli import bench_sync
    from accelbn._cli.grid import Case

    results = bench_sync.measure(COMM, [Case((4, 8, 4, 4), "NCHW")], repeat=2, progress_stream=open(os.devnull, "w"))
    assert [(r[0].label, r[1]) for r in results] == [("4x8x4x4", "forward"), ("4x8x4x4", "backward")]
    assert all(ms > 0 for r in results for ms in r[2].values())
    table = bench_sync.format_table(results, COMM.Get_size()).splitlines()
    assert len(table) == 4 and "3 ranks" in table[0] and "all-reduce share" in table[0]


CASES = [
    *[(f"whole batch {layout} {np.dtype(dtype).name}", lambda layout=layout, dtype=dtype: whole_batch(layout, dtype))
      for layout in LAYOUTS for dtype in (np.float32, np.float64)],
    ("thread counts", thread_counts),
    ("layer steps", layer_steps),
    ("errors on every rank", errors_on_every_rank),
    ("bench --sync", bench_table),
]


def main():
    assert COMM.Get_size() == len(COUNTS), f"run with mpiexec -n {len(COUNTS)}"
    for name, case in CASES:
        try:
            case()
        except BaseException:  # noqa: BLE001  (any failure ends the whole job, never a hang)
            print(f"rank {RANK}: case {name!r} failed", file=sys.stderr, flush=True)
            traceback.print_exc()
            sys.stderr.flush()
            COMM.Abort(1)
    print(f"rank {RANK}: {len(CASES)} cases passed", flush=True)


if __name__ == "__main__":
    main()
