"""Synchronized batch norm: training statistics over the union of every worker's batch, with
PyTorch ``SyncBatchNorm``'s semantics, over any communicator of :mod:`accelbn._core.collectives`.

A training call makes two all-reduces: a handshake of a few numbers per worker, then the packed
per-channel numbers. The handshake makes every worker's mistake every worker's error: each worker
checks its own arguments, and all of them learn together whether any failed, whether their calls
match (channels, momentum, eps, which operation) and how many values each holds, before any of
them reduces data or changes state, so no worker raises while another waits.

Both all-reduces carry one slot per worker, zero but for the worker's own, so the sum delivers
every worker's numbers exactly, whatever the engine's reduction order. Every worker then merges
them by the same arithmetic in the same order (Chan's formula for the moments), so all workers
hold bitwise the same statistics, run after run. Eval makes no call: each worker normalizes with its
own running statistics, as PyTorch does.
"""

import numpy as np

from accelbn._core import checks, collectives, views
from accelbn._core.arrays import CUPY, device_of, library_of, namespace
from accelbn._core.dtypes import float64_or, kernel_dtype
from accelbn._ops import batch_norm as bn
from accelbn._ops.batch_norm import CONVENTION_DEFAULT, BatchNorm

_FORWARD, _BACKWARD = 1.0, 2.0
_CALLS = {_FORWARD: "sync_batch_norm", _BACKWARD: "sync_batch_norm_backward"}
# The handshake's numbers per worker. Those after "count" must agree across workers.
_FIELDS = ("call", "failed", "count", "channels", "momentum", "eps", "running_stats", "unbiased")


class SyncError(RuntimeError):
    """A synchronized call that cannot go on because of another worker: its arguments were bad (it
    raises its own error), or the workers are not making the same call. Raised on every worker
    but the one whose own arguments were bad, before anything changed."""


def _handshake(group, call, error=None, **fields):
    """Exchange ``fields`` (or the fact that this worker's ``error`` stopped it) with every worker.
    Returns the per-channel value counts by rank, a float64 vector; raises on every worker when any
    failed (``error`` itself on its own worker) or when the calls do not match."""
    table = np.zeros((group.size, len(_FIELDS)))
    row = table[group.rank]
    row[0], row[1] = call, error is not None
    if error is None:
        for name, value in fields.items():
            row[_FIELDS.index(name)] = value
    group.allreduce_sum(table.reshape(-1))
    name = _CALLS[call]
    if error is not None:
        raise error
    failed = [r for r in range(group.size) if table[r, 1]]
    if failed:
        raise SyncError(f"{name}: worker(s) {failed} of {group.size} rejected their arguments (each raised its own "
                        "error, which says why); nothing changed on any worker")
    calls = table[:, 0]
    if (calls != call).any():
        made = [_CALLS.get(c, "something else") for c in calls]
        raise SyncError(f"{name}: the workers are not making the same call; by rank: {made}")
    for f in range(_FIELDS.index("channels"), len(_FIELDS)):
        column = table[:, f]
        if (column != column[0]).any():
            values = [v.item() for v in column]
            raise ValueError(f"{name}: the workers disagree on {_FIELDS[f]}; by rank: {values}")
    return table[:, 2]


def _fail_together(group, call, error):
    """Join the handshake the other workers are waiting in, to raise ``error`` on this worker and a
    SyncError on theirs."""
    _handshake(group, call, error)


def merge_moments(packed, counts):
    """The whole batch's per-channel mean and biased variance from every worker's: ``packed`` is
    (workers, 2, C), each worker's mean and sum of squared deviations, ``counts`` its values per
    channel (not all zero). Chan's formula for many parts at once: mean = sum(n_k mean_k) / n and
    m2 = sum(m2_k) + sum(n_k (mean_k - mean)^2), deviations from the merged mean rather than
    E[x^2] - E[x]^2, so large means do not cancel; an empty worker adds nothing."""
    xp = namespace(library_of(packed))
    weights = xp.asarray(counts, dtype=np.float64)[:, None]
    n = float(counts.sum())
    mean = (weights * packed[:, 0]).sum(axis=0) / n
    deviation = packed[:, 0] - mean
    m2 = packed[:, 1].sum(axis=0) + (weights * deviation * deviation).sum(axis=0)
    return mean, m2 / n


def _all_workers(group, xp, local):
    """Every worker's ``local`` array (per-channel vectors as rows), by rank: one all-reduce of a
    (workers, *local.shape) array of slots."""
    packed = xp.zeros((group.size, *local.shape))
    packed[group.rank] = local
    group.allreduce_sum(packed.reshape(-1))
    return packed


def sync_batch_norm(
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    *,
    comm,
    axis=1,
    return_stats=False,
    out=None,
    unbiased=True,
    backend=None,
):
    """:func:`batch_norm` over the union of every worker's batch, like PyTorch's ``SyncBatchNorm``.

    Every worker in ``comm`` (an mpi4py communicator, a ``cupy.cuda.nccl.NcclCommunicator``, or
    an object with ``rank``, ``size`` and ``allreduce_sum(buffer)``) calls it together with its
    own slice of the batch; slices may differ in length, and may be empty. In training, the mean
    and variance are those of all slices together; each worker normalizes its own x with them, and
    its running statistics get the same update as every other worker's. The saved statistics
    (``return_stats=True``) are the whole batch's, for :func:`sync_batch_norm_backward`.

    With ``training=False`` nothing is exchanged: each worker normalizes with its own running
    statistics. All workers must make the same call with the same channels, momentum and eps; a
    mismatch, or bad arguments on any worker, raises on every worker before anything changes.
    """
    group = collectives.communicator(comm)
    try:
        training = checks.boolean(training, "training")
    except TypeError as error:
        _fail_together(group, _FORWARD, error)
    if not training:
        return bn.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps, axis=axis,
                             return_stats=return_stats, out=out, unbiased=unbiased, backend=backend)
    try:
        unbiased = checks.boolean(unbiased, "unbiased")
        library, kernels, axis, _, momentum, eps = bn.check_forward(x, running_mean, running_var, weight, bias, True,
                                                                    momentum, eps, axis, out, backend)
        collectives.check_library(group, library)
        count = bn.count_per_channel(x, axis)
    except Exception as error:  # noqa: BLE001  (whatever stops this worker must stop them all)
        _fail_together(group, _FORWARD, error)
    channels = x.shape[axis]
    counts = _handshake(group, _FORWARD, count=count, channels=channels, momentum=momentum, eps=eps,
                        running_stats=running_mean is not None, unbiased=unbiased)
    total = counts.sum()  # exact: whole numbers in float64
    if total == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got 1 across {group.size} workers "
                         f"(this worker's input size {x.shape})")

    with device_of(x):
        xp = namespace(library)
        dtype = kernel_dtype(x.dtype, kernels)
        layout = views.channel_layout(x, axis)
        y = views.Output(x, out, layout, dtype)
        x3 = views.input3(x, layout, dtype)
        if total == 0:  # as batch_norm on an empty batch: an empty y, nothing updated
            mean = var = xp.full(channels, np.nan)
        else:
            local = xp.zeros((2, channels))
            if x.size:
                local_mean, local_var = kernels.moments(x3)
                local[0], local[1] = local_mean, local_var * count
            mean, var = merge_moments(_all_workers(group, xp, local), counts)
            if x.size:
                kernels.normalize(x3, mean, var, float64_or(xp, weight, channels, 1.0), float64_or(xp, bias, channels, 0.0),
                                  eps, y.view)
            bn.update_running(xp, running_mean, running_var, mean, var, total, momentum, unbiased)
        return bn.finish_forward(y.result(), x, mean, var, eps, return_stats)


def sync_batch_norm_backward(dy, x, stats, weight=None, *, comm, axis=1, out=None, backend=None):
    """Gradients of a training :func:`sync_batch_norm`, each worker calling with its own slice.

    ``stats`` is what the forward returned (the whole batch's statistics). dx is the gradient of the
    whole batch's loss with respect to this worker's x, from the sums of dy and dy * x_hat over all
    workers (one all-reduce); ``dweight`` and ``dbias`` are this worker's own sums, as PyTorch's are:
    the data-parallel gradient all-reduce that sums every parameter's gradient sums them too.

    Returns ``(dx, dweight, dbias)`` as :func:`batch_norm_backward` does.
    """
    group = collectives.communicator(comm)
    try:
        library, kernels, axis = bn.check_backward(dy, x, stats, weight, axis, backend)
        checks.output_array(out, library, x, [("dy", dy), ("x", x)])
        if library == CUPY:
            checks.same_device(x, [("dy", dy), ("stats.mean", stats.mean), ("stats.invstd", stats.invstd),
                                   ("weight", weight), ("out", out)])
        collectives.check_library(group, library)
        count = bn.count_per_channel(x, axis)
    except Exception as error:  # noqa: BLE001  (whatever stops this worker must stop them all)
        _fail_together(group, _BACKWARD, error)
    channels = x.shape[axis]
    total = _handshake(group, _BACKWARD, count=count, channels=channels).sum()

    with device_of(x):
        xp = namespace(library)
        dtype = kernel_dtype(x.dtype, kernels)
        layout = views.channel_layout(x, axis)
        dx = views.Output(x, out, layout, dtype)
        mean = stats.mean.astype(np.float64)
        invstd = stats.invstd.astype(np.float64)
        x3 = views.input3(x, layout, dtype)
        dy3 = views.input3(dy, layout, dtype)
        local = xp.zeros((2, channels))
        if x.size:
            local[0], local[1] = kernels.gradient_sums(dy3, x3, mean)
        if total:
            sum_dy, sum_dy_xmu = _all_workers(group, xp, local).sum(axis=0)  # one order, on every worker
            if x.size:
                kernels.gradient(dy3, x3, mean, invstd, float64_or(xp, weight, channels, 1.0), sum_dy, sum_dy_xmu, total,
                                 dx.view)
        return dx.result(), *bn.gradient_dtype(weight, x, local[1] * invstd, local[0])


class SyncBatchNorm(BatchNorm):
    """:class:`BatchNorm` whose training statistics are those of every worker's batch together,
    like ``torch.nn.SyncBatchNorm``: each worker holds a replica and calls it with its own slice.

    It takes BatchNorm's arguments (its conventions, freezing and checkpoints included) and
    ``comm``, as :func:`sync_batch_norm` does. In training (and not frozen) the forward and
    backward run :func:`sync_batch_norm` and :func:`sync_batch_norm_backward`; the running
    statistics, updated identically on every worker, stay equal when they start equal (load the
    same state dict everywhere). ``grad_weight`` and ``grad_bias`` are the worker's own, for the
    data-parallel all-reduce that sums every parameter gradient. Eval, and frozen statistics, make
    no call.
    """

    def __init__(
        self,
        num_features,
        eps=None,
        momentum=CONVENTION_DEFAULT,
        affine=True,
        track_running_stats=True,
        *,
        comm,
        convention="torch",
        freeze_after=None,
        axis=1,
        dtype=np.float32,
        bias=True,
        backend=None,
    ):
        self.comm = collectives.communicator(comm)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, convention=convention,
                         freeze_after=freeze_after, axis=axis, dtype=dtype, bias=bias, backend=backend)
        self._synced = False

    def _synchronized(self):
        return self.training and not self.frozen

    def forward(self, x):
        if self._synchronized():
            try:
                self._check_input(x, self.axis, self.num_features)
            except Exception as error:  # noqa: BLE001  (whatever stops this worker must stop them all)
                _fail_together(self.comm, _FORWARD, error)
        return super().forward(x)

    def _normalize(self, x, use_batch_stats, momentum, unbiased):
        self._synced = self._synchronized()  # the backward of this forward is synchronized too, whatever comes between
        if not self._synced:
            return super()._normalize(x, use_batch_stats, momentum, unbiased)
        return sync_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, momentum, self.eps,
                               comm=self.comm, axis=self.axis, return_stats=True, unbiased=unbiased, backend=self.backend)

    def _backward(self, dy, x, stats, use_batch_stats):
        if not self._synced:
            return super()._backward(dy, x, stats, use_batch_stats)
        return sync_batch_norm_backward(dy, x, stats, self.weight, comm=self.comm, axis=self.axis, backend=self.backend)
