"""Kernels only. Each backend module exposes the same three functions on the canonical view
``(outer, C, inner)`` of the front (:mod:`accelbn._layout`):

``forward_train(x, weight, bias, eps, y) -> (mean, var)``
    Normalize x with its own statistics into y; return the per-channel mean and biased variance.
``normalize(x, mean, var, weight, bias, eps, y)``
    y = (x - mean) * weight / sqrt(var + eps) + bias per channel: the eval forward, with given
    statistics.
``backward(dy, x, mean, invstd, weight, training, dx) -> (sum_dy, sum_dy_xmu)``
    Write dx; return the per-channel sums of dy and dy * (x - mean).

Per-channel vectors are float64. Backends never validate arguments and never update running
statistics; :mod:`accelbn` does both. Backends are imported lazily, by name, from
:mod:`accelbn._backends`.
"""
