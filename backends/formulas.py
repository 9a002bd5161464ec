"""The per-channel formulas of batch normalization, each written once, below the front and kernels.

Every function here works on NumPy (or CuPy) vectors, which is how the front computes whole channel
vectors, and on float scalars inside Numba kernels, which is how the fused kernels use them between
their passes. A kernel and the front therefore cannot disagree on a formula.
"""

import numpy as np


def inverse_std(var, eps):
    """1 / sqrt(var + eps): the factor that turns x - mean into x-hat."""
    return 1.0 / np.sqrt(var + eps)


def backward_coefficients(sum_dy, sum_dy_xmu, invstd, weight, count):
    """Coefficients of the training gradient dx = (dy - mean_dy - (x - mean) * k) * scale.

    ``sum_dy`` and ``sum_dy_xmu`` are the channel sums of dy and dy * (x - mean) over ``count``
    elements; works per channel or on whole channel vectors.
    """
    return sum_dy / count, sum_dy_xmu * invstd * invstd / count, weight * invstd


def gradient_factors(mean_dy, k, scale):
    """The training gradient regrouped as dx = a * dy + b * (x - mean) + c: ``(a, b, c)`` from
    :func:`backward_coefficients`. Two fused multiply-adds per element instead of five operations;
    in float64 the regrouping costs nothing against a float32 dx, even where dx cancels."""
    return scale, -scale * k, -scale * mean_dy


def running_average(running, batch, momentum):
    """The running-statistics update: (1 - momentum) * running + momentum * batch, in float64."""
    return (1.0 - momentum) * running.astype(np.float64) + momentum * batch


def renorm_correction(mean, var, eps, renorm_mean, renorm_std, rmin, rmax, dmax):
    """Batch Renormalization's ``(r, d)``: the batch's std and mean against the moving ones, as
    Keras computes them. r = sqrt(var + eps) / std' clipped to [rmin, rmax] and d = (mean -
    renorm_mean) / std' clipped to [-dmax, dmax], where std' = max(renorm_std, sqrt(eps)) keeps an
    early moving std from dividing by almost nothing."""
    std = np.maximum(renorm_std, np.sqrt(eps))
    r = np.minimum(np.maximum(np.sqrt(var + eps) / std, rmin), rmax)
    d = np.minimum(np.maximum((mean - renorm_mean) / std, -dmax), dmax)
    return r, d


def renorm_affine(mean, var, eps, weight, bias, r, d):
    """The scale and shift that normalize x with its batch statistics and then correct by r and d:
    ((x - mean) / sqrt(var + eps) * r + d) * weight + bias = (x - mean) * scale + shift."""
    return weight * r * (1.0 / np.sqrt(var + eps)), weight * d + bias
