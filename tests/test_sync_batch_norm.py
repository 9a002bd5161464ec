"""Synchronized batch norm on every backend, its workers as threads of this process
(tests/workers.py): against single-process batch norm on the concatenated batch, bitwise the same
on every worker and every run, exact where E[x^2] - E[x]^2 would cancel, with errors raised on
every worker, the layer over several steps, and the NCCL adapter on a fake NCCL communicator.
Real MPI, under mpiexec, is tests/test_sync_mpi.py."""

import ctypes

import numpy as np
import pytest
from support import ArraysOn, channel_params, random_array, rel_error, tolerance
from workers import ThreadGroup, run_workers, split

import accelbn as abn
from accelbn._core import collectives
from accelbn._ops import sync_batch_norm as sync_module

# name: (shape of the whole batch, channel axis); the batch axis is 0
LAYOUTS = {
    "NCHW": ((16, 3, 5, 6), 1),
    "NHWC": ((16, 5, 6, 3), -1),
    "NC": ((16, 4), 1),
}
SPLITS = [pytest.param((5, 0, 11), id="5-0-11"), pytest.param((2, 9, 5), id="2-9-5")]


def _whole_batch(on, x, dy, p, axis, backend):
    """Single-process batch norm on the whole batch: y, running stats, saved stats, dx, dw, db."""
    rm, rv = on.put(p["running_mean"].copy()), on.put(p["running_var"].copy())
    w, b = on.put(p["weight"]), on.put(p["bias"])
    y, stats = abn.batch_norm(on.put(x), rm, rv, w, b, True, axis=axis, return_stats=True, backend=backend)
    grads = abn.batch_norm_backward(on.put(dy), on.put(x), stats, w, axis=axis, backend=backend)
    return [on.get(a) for a in (y, rm, rv, stats.mean, stats.invstd, *grads)]


def _synchronized(on, xs, dys, p, axis, backend, group=None):
    """Each worker's y, running stats, saved stats, dx, dw, db from sync_batch_norm over threads."""

    def work(rank, comm):
        rm, rv = on.put(p["running_mean"].copy()), on.put(p["running_var"].copy())
        w, b = on.put(p["weight"]), on.put(p["bias"])
        y, stats = abn.sync_batch_norm(on.put(xs[rank]), rm, rv, w, b, True, comm=comm, axis=axis, return_stats=True,
                                       backend=backend)
        grads = abn.sync_batch_norm_backward(on.put(dys[rank]), on.put(xs[rank]), stats, w, comm=comm, axis=axis,
                                             backend=backend)
        return [on.get(a) for a in (y, rm, rv, stats.mean, stats.invstd, *grads)]

    results, errors = run_workers(len(xs), work, group=group)
    for error in errors:
        if error is not None:
            raise error
    return results


def _case(layout, dtype, counts):
    shape, axis = LAYOUTS[layout]
    x = random_array(shape, dtype, seed=1, loc=3.0)
    dy = random_array(shape, dtype, seed=2)
    return x, dy, split(x, counts), split(dy, counts), channel_params(shape[axis], dtype), axis


def _assert_close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert rel_error(got, want) <= tolerance(dtype), (rel_error(got, want), tolerance(dtype))


@pytest.mark.parametrize("counts", SPLITS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_one_process_on_the_whole_batch(on, any_backend, layout, dtype, counts):
    x, dy, xs, dys, p, axis = _case(layout, dtype, counts)
    y, rm, rv, mean, invstd, dx, dw, db = _whole_batch(on, x, dy, p, axis, any_backend)
    workers = _synchronized(on, xs, dys, p, axis, any_backend)
    _assert_close(np.concatenate([w[0] for w in workers]), y, dtype)
    _assert_close(np.concatenate([w[5] for w in workers]), dx, dtype)
    _assert_close(sum(w[6].astype(np.float64) for w in workers).astype(dw.dtype), dw, dtype)
    _assert_close(sum(w[7].astype(np.float64) for w in workers).astype(db.dtype), db, dtype)
    for got, want in zip(workers[0][1:5], (rm, rv, mean, invstd)):
        _assert_close(got, want, dtype)
    for worker in workers[1:]:  # running and saved statistics: the same bits everywhere
        for got, first in zip(worker[1:5], workers[0][1:5]):
            np.testing.assert_array_equal(got, first)
    # local parameter gradients, as PyTorch's: each worker's own sums
    for worker, x_k, dy_k in zip(workers, xs, dys):
        local = abn.batch_norm_backward(on.put(dy_k), on.put(x_k), abn.BatchStats(on.put(worker[3]), on.put(worker[4])),
                                        on.put(p["weight"]), axis=axis, backend=any_backend)
        if x_k.shape[0]:
            _assert_close(worker[6], on.get(local[1]), dtype)
        else:
            np.testing.assert_array_equal(worker[6], np.zeros_like(worker[6]))


@pytest.mark.parametrize("shape, axis", [((32, 5, 40, 40), 1), ((30, 40, 40, 3), -1)])
def test_bitwise_the_same_run_to_run_and_for_any_thread_count(shape, axis):
    import numba

    x = random_array(shape, seed=4)
    dy = random_array(shape, seed=5)
    xs, dys = split(x, (7, 0, shape[0] - 7)), split(dy, (7, 0, shape[0] - 7))
    p = channel_params(shape[axis], np.float32)
    runs = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS, 1):

        def work(rank, comm, threads=threads):
            numba.set_num_threads(threads)
            rm, rv = p["running_mean"].copy(), p["running_var"].copy()
            y, stats = abn.sync_batch_norm(xs[rank], rm, rv, p["weight"], p["bias"], True, comm=comm, axis=axis,
                                           return_stats=True)
            grads = abn.sync_batch_norm_backward(dys[rank], xs[rank], stats, p["weight"], comm=comm, axis=axis)
            return [y, rm, rv, stats.mean, stats.invstd, *grads]

        results, errors = run_workers(3, work)
        assert errors == [None] * 3
        runs.append(results)
    for run in runs[1:]:
        for worker, first in zip(run, runs[0]):
            for got, want in zip(worker, first):
                np.testing.assert_array_equal(got, want)


def test_large_means_do_not_cancel(backend):
    """Chan's merge of the workers' shifted moments: a variance of 1 beside a mean of 1e9 (where
    E[x^2] - E[x]^2 loses every digit in float64), over unequal workers."""
    rng = np.random.default_rng(6)
    noise = rng.standard_normal((64, 2))
    x = 1e9 + noise
    noise = x - 1e9  # exact: what x holds above 1e9
    want = noise.var(axis=0)
    xs = split(x, (3, 60, 1))

    def work(rank, comm):
        y, stats = abn.sync_batch_norm(xs[rank], None, None, training=True, comm=comm, return_stats=True, backend=backend)
        return 1.0 / stats.invstd**2 - 1e-5

    results, errors = run_workers(3, work)
    assert errors == [None] * 3
    # Each worker's mean is exact to half an ulp of 1e9 (6e-8), which bounds any merge of means;
    # E[x^2] - E[x]^2 would be off by about 1e18 * 1e-16 = 100.
    naive = (x * x).mean(axis=0) - x.mean(axis=0) ** 2
    assert np.abs(naive - want).max() > 1.0
    for var in results:
        np.testing.assert_allclose(var, want, rtol=1e-6)


def test_each_call_is_a_handshake_and_one_packed_all_reduce():
    x, dy, xs, dys, p, axis = _case("NCHW", np.float32, (5, 0, 11))
    group = ThreadGroup(3)
    _synchronized(ArraysOn("numba"), xs, dys, p, axis, "numba", group)
    assert group.reductions == 4  # forward: handshake and statistics; backward: handshake and sums


def test_eval_makes_no_call(backend):
    class Silent:
        rank, size = 0, 2

        def allreduce_sum(self, buffer):
            raise AssertionError("eval must not communicate")

    x = random_array((6, 3, 4, 4), seed=7)
    p = channel_params(3, np.float32)
    want = abn.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], False, backend=backend)
    got = abn.sync_batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], False, comm=Silent(),
                              backend=backend)
    np.testing.assert_array_equal(got, want)


# --- errors: raised on every worker, before anything changed ------------------------------------


def _errors_on_all(call_of_rank, size=3):
    """Run ``call_of_rank(rank)(comm)`` on every worker; return each worker's exception and the
    running statistics it held, which must be unchanged."""
    p = channel_params(3, np.float32)
    buffers = [(p["running_mean"].copy(), p["running_var"].copy()) for _ in range(size)]

    def work(rank, comm):
        call_of_rank(rank, comm, *buffers[rank])

    results, errors = run_workers(size, work)
    assert None not in errors, errors
    for rm, rv in buffers:
        np.testing.assert_array_equal(rm, p["running_mean"])
        np.testing.assert_array_equal(rv, p["running_var"])
    return errors


def _forward(x, rm, rv, comm, **changes):
    kwargs = dict(training=True, momentum=0.1, eps=1e-5)
    kwargs.update(changes)
    return abn.sync_batch_norm(x, rm, rv, comm=comm, **kwargs)


def test_bad_arguments_on_one_worker_raise_on_every_worker():
    x = random_array((4, 3, 2, 2), seed=8)
    errors = _errors_on_all(lambda rank, comm, rm, rv: _forward(x, rm, rv, comm, eps=-1.0 if rank == 1 else 1e-5))
    assert isinstance(errors[1], ValueError) and "eps" in str(errors[1])
    for rank in (0, 2):
        assert isinstance(errors[rank], abn.SyncError) and "worker(s) [1] of 3" in str(errors[rank])


def test_a_bad_training_flag_on_one_worker_raises_on_every_worker():
    x = random_array((4, 3, 2, 2), seed=8)
    errors = _errors_on_all(lambda rank, comm, rm, rv: _forward(x, rm, rv, comm, training="yes" if rank == 2 else True))
    assert isinstance(errors[2], TypeError) and "training" in str(errors[2])
    assert all(isinstance(e, abn.SyncError) for e in errors[:2])


def test_mismatched_channels_raise_on_every_worker():
    def call(rank, comm, rm, rv):
        channels = 4 if rank == 2 else 3
        x = random_array((4, channels, 2, 2), seed=8)
        _forward(x, *(np.zeros(channels, np.float32), np.ones(channels, np.float32)) if rank == 2 else (rm, rv), comm)

    for error in _errors_on_all(call):
        assert isinstance(error, ValueError) and "disagree on channels; by rank: [3.0, 3.0, 4.0]" in str(error)


@pytest.mark.parametrize("argument, value", [("momentum", 0.2), ("eps", 1e-3)])
def test_mismatched_numbers_raise_on_every_worker(argument, value):
    x = random_array((4, 3, 2, 2), seed=8)
    errors = _errors_on_all(lambda rank, comm, rm, rv: _forward(x, rm, rv, comm, **({argument: value} if rank == 0 else {})))
    for error in errors:
        assert isinstance(error, ValueError) and f"disagree on {argument}" in str(error)


def test_a_forward_against_a_backward_raises_on_every_worker():
    x = random_array((4, 3, 2, 2), seed=8)
    stats = abn.BatchStats(np.zeros(3, np.float32), np.ones(3, np.float32))

    def call(rank, comm, rm, rv):
        if rank == 0:
            abn.sync_batch_norm_backward(x, x, stats, comm=comm)
        else:
            _forward(x, rm, rv, comm)

    for error in _errors_on_all(call):
        assert isinstance(error, abn.SyncError) and "not making the same call" in str(error)


def test_one_value_per_channel_in_all_raises_on_every_worker():
    def call(rank, comm, rm, rv):
        _forward(random_array((1 if rank == 1 else 0, 3), seed=8), rm, rv, comm)

    for error in _errors_on_all(call):
        assert isinstance(error, ValueError) and "more than 1 value per channel" in str(error)


def test_a_layer_input_of_the_wrong_width_raises_on_every_worker():
    def work(rank, comm):
        layer = abn.SyncBatchNorm(3, comm=comm)
        layer(random_array((4, 5 if rank == 0 else 3, 2, 2), seed=8))

    _, errors = run_workers(3, work)
    assert isinstance(errors[0], ValueError) and "channels" in str(errors[0])
    assert all(isinstance(e, abn.SyncError) for e in errors[1:])


def test_a_communicator_must_be_one():
    x = random_array((4, 3), seed=8)
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        abn.sync_batch_norm(x, None, None, training=True, comm=object())
    with pytest.raises(TypeError, match="comm must be"):
        abn.SyncBatchNorm(3, comm=None)

    class Wrong:
        rank, size = 3, 2

        def allreduce_sum(self, buffer):
            pass

    with pytest.raises(ValueError, match="0 <= rank < size"):
        abn.sync_batch_norm(x, None, None, training=True, comm=Wrong())


# --- the layer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("freeze_after", [None, 2])
def test_layer_over_steps_matches_one_process_and_stays_identical(freeze_after):
    """Three SGD steps and an eval on three workers (data-parallel: the parameter gradients summed
    over workers by the test's own all-reduce) against BatchNorm on the whole batch."""
    counts = (6, 0, 10)
    steps = [(random_array((16, 3, 4, 4), seed=20 + s, loc=1.0), random_array((16, 3, 4, 4), seed=30 + s)) for s in range(3)]
    lr = 0.1
    whole = abn.BatchNorm(3, freeze_after=freeze_after)
    want = []
    for x, dy in steps:
        want.append((whole(x), whole.backward(dy)))
        whole.weight -= lr * whole.grad_weight
        whole.bias -= lr * whole.grad_bias
    whole.eval()
    want_eval = whole(steps[0][0])

    def work(rank, comm):
        layer = abn.SyncBatchNorm(3, comm=comm, freeze_after=freeze_after)
        outputs = []
        for x, dy in steps:
            xs, dys = split(x, counts), split(dy, counts)
            y = layer(xs[rank])
            dx = layer.backward(dys[rank])
            grads = np.concatenate([layer.grad_weight, layer.grad_bias]).astype(np.float64)
            comm.allreduce_sum(grads)  # the data-parallel gradient all-reduce
            layer.weight -= (lr * grads[:3]).astype(np.float32)
            layer.bias -= (lr * grads[3:]).astype(np.float32)
            outputs.append((y, dx))
        layer.eval()
        return outputs, layer(split(steps[0][0], counts)[rank]), layer.state_dict(), repr(layer)

    results, errors = run_workers(3, work)
    assert errors == [None] * 3
    for step, (y, dx) in enumerate(want):
        _assert_close(np.concatenate([r[0][step][0] for r in results]), y, np.float32)
        _assert_close(np.concatenate([r[0][step][1] for r in results]), dx, np.float32)
    _assert_close(np.concatenate([r[1] for r in results]), want_eval, np.float32)
    for name, value in whole.state_dict().items():
        for r in results:
            np.testing.assert_array_equal(r[2][name], results[0][2][name])  # identical on every worker
        if value.dtype.kind == "f":
            np.testing.assert_allclose(results[0][2][name], value, rtol=2e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(results[0][2][name], value)
    assert results[0][3].startswith("SyncBatchNorm(3, eps=1e-05")


# --- NCCL, through a fake NcclCommunicator ----------------------------------------------------------


def _fake_nccl(group):
    """A stand-in for cupy.cuda.nccl.NcclCommunicator over ``group``: it takes what NCCL takes
    (device pointers, a count, ncclFloat64, ncclSum, a stream handle) and sums through the group."""

    class NcclCommunicator:
        def __init__(self, rank):
            self.rank = rank
            self.calls = []

        def rank_id(self):
            return self.rank

        def size(self):
            return group.size

        def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):  # noqa: N802  (NCCL's name)
            self.calls.append((datatype, op, stream))
            assert (datatype, op) == (8, 0) and sendbuf == recvbuf
            buffer = np.ctypeslib.as_array((ctypes.c_double * count).from_address(recvbuf))
            group.member(self.rank).allreduce_sum(buffer)

    NcclCommunicator.__module__ = "cupy_backends.cuda.libs.nccl"
    return NcclCommunicator


def test_nccl_path_on_a_fake_communicator(gpu):
    on = ArraysOn("cupy")
    x, dy, xs, dys, p, axis = _case("NCHW", np.float32, (5, 0, 11))
    group = ThreadGroup(3)
    fake = _fake_nccl(group)
    comms = [fake(rank) for rank in range(3)]
    adapters = [collectives.communicator(c) for c in comms]
    assert all(isinstance(a, collectives.NcclCommunicator) for a in adapters)
    assert [a.rank for a in adapters] == [0, 1, 2] and adapters[0].size == 3

    def work(rank, comm):
        rm, rv = on.put(p["running_mean"].copy()), on.put(p["running_var"].copy())
        y, stats = abn.sync_batch_norm(on.put(xs[rank]), rm, rv, on.put(p["weight"]), on.put(p["bias"]), True,
                                       comm=comms[rank], return_stats=True, backend="cupy")
        dx, _, _ = abn.sync_batch_norm_backward(on.put(dys[rank]), on.put(xs[rank]), stats, on.put(p["weight"]),
                                                comm=comms[rank], backend="cupy")
        return on.get(y), on.get(rm), on.get(dx)

    results, errors = run_workers(3, work, group=group)
    assert errors == [None] * 3
    y, rm, _, _, _, dx, _, _ = _whole_batch(on, x, dy, p, axis, "cupy")
    _assert_close(np.concatenate([r[0] for r in results]), y, np.float32)
    _assert_close(np.concatenate([r[2] for r in results]), dx, np.float32)
    _assert_close(results[0][1], rm, np.float32)
    assert all(len(c.calls) == 4 for c in comms)


def test_nccl_carries_cupy_arrays_only(gpu):
    group = ThreadGroup(1)
    comm = _fake_nccl(group)(0)
    x = random_array((4, 3))
    _, errors = run_workers(1, lambda rank, _: abn.sync_batch_norm(x, None, None, training=True, comm=comm), group=group)
    assert isinstance(errors[0], TypeError) and "carries CuPy arrays" in str(errors[0])


# --- the packing and the merge, alone ------------------------------------------------------------


def test_merge_is_exact_with_empty_workers():
    rng = np.random.default_rng(9)
    parts = [rng.standard_normal((n, 4)) * 3 + 5 for n in (4, 0, 7, 1)]
    packed = np.zeros((4, 2, 4))
    for rank, part in enumerate(parts):
        if len(part):
            packed[rank] = part.mean(axis=0), ((part - part.mean(axis=0)) ** 2).sum(axis=0)
    mean, var = sync_module.merge_moments(packed, np.array([len(q) for q in parts], float))
    whole = np.concatenate(parts)
    np.testing.assert_allclose(mean, whole.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(var, whole.var(axis=0), rtol=1e-13)
