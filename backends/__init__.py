"""Kernels only, installed as ``accelbn.backends``: one package per backend, one module per operation
in each, named after the operation (``reference.batch_norm``, ``numba_cpu.batch_norm``,
``cuda.batch_norm``), found by the front's registry (:mod:`accelbn._core.registry`) and imported
lazily. :mod:`.formulas` holds the per-channel formulas that the front and the kernels share.

Backends never validate arguments and never update running statistics; the front does both. They
work on the front's canonical view ``(outer, C, inner)`` (:mod:`accelbn._core.views`), with
per-channel vectors in float64. Every module exposes ``STORAGE_DTYPES`` (the dtypes its kernels read
and write; the front converts anything else) and its operation's functions. Batch norm's:

``forward_train(x, weight, bias, eps, y) -> (mean, var)``
    Normalize x with its own statistics into y; return the per-channel mean and biased variance.
``normalize(x, mean, var, weight, bias, eps, y)``
    y = (x - mean) * weight / sqrt(var + eps) + bias per channel: the eval forward, with given
    statistics.
``backward(dy, x, mean, invstd, weight, training, dx) -> (sum_dy, sum_dy_xmu)``
    Write dx; return the per-channel sums of dy and dy * (x - mean).
"""
