"""Batch normalization on the Numba CPU backend: the entry points the front calls, on its canonical
view ``(outer, C, inner)`` with per-channel float64 vectors. Each picks a loop family and a path for
the shape and runs its kernels, serial or parallel as :func:`.runtime.entry` decides once per call:

* channels-first (``inner`` > 1) with rows of ``SHORT_ROW`` elements or more:
  :mod:`.batch_norm_channels_first`; with shorter rows (7x7 images), in blocks of channels:
  :mod:`.batch_norm_short_rows`. Statistics and the element pass are fused per channel (or block)
  when there are channels enough for the threads and a slice stays in cache; otherwise the
  statistics and the element passes each run in parallel over fixed chunks.
* channels-last (``inner`` == 1: NHWC and (N, C)): :mod:`.batch_norm_channels_last`.

Statistics are computed per chunk with a shifted two-pass and merged with Chan's formula in chunk
order; chunks and blocks depend only on the shape, so results are bitwise identical run to run and
for any number of threads. Outputs of ``STREAM_MIN_BYTES`` or more are written with streaming
stores. The kernels never validate and never touch running statistics.
"""

import numba
import numpy as np

# The loop files register their kernels with the runtime, as attributes of the kernel twins.
from accelbn.backends.numba_cpu import batch_norm_channels_first, batch_norm_channels_last, batch_norm_short_rows  # noqa: F401
from accelbn.backends.numba_cpu import runtime, tiling
from accelbn.backends.numba_cpu.reductions import merge_moments, sum_parts
from accelbn.backends.numba_cpu.scalars import backward_coefficients, channel_affines, channel_scale, gradient_factors
from accelbn.backends.numba_cpu.tiling import (
    SHORT_ROW,
    Target,
    by_channel,
    channel_block,
    chunking,
    contiguous,
    dense,
    planes,
    row_groups,
    segment_tasks,
    short_rows,
    streams,
)

# The dtypes the kernels read and write directly (Numba has no float16 on the CPU); the front
# converts anything else to float32.
STORAGE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _prepared(z, like):
    """The residual z as the kernels take it, laid out as :func:`.tiling.dense` or
    :func:`.tiling.contiguous` lays out ``like`` (x); None stays None."""
    if z is None:
        return None
    z = contiguous(z) if like.shape[2] == 1 else dense(z)
    return planes(z) if short_rows(like) else z


@runtime.entry
def forward_train(kernels, x, weight, bias, eps, y, renorm=None, residual=None, relu=False):
    """Normalize ``x`` with its own statistics into ``y``; return the per-channel mean and biased var.

    ``renorm`` (renorm_mean, renorm_std, rmin, rmax, dmax) applies Batch Renormalization's
    correction; ``relu`` applies a ReLU to the output, after adding ``residual`` (like x) if given."""
    outer, channels, inner = x.shape
    mean = np.empty(channels)
    var = np.empty(channels)
    eps, relu = float(eps), bool(relu)
    if inner > 1 and by_channel(x, kernels):
        target = Target(y)
        x, stream = dense(x), streams(y)
        z = _prepared(residual, x)
        if short_rows(x):
            block = channel_block(x, True, kernels)
            kernels.forward_train_by_block(planes(x), inner, block, weight, bias, eps, renorm, target.planes(), z, relu, mean, var, stream)
        else:
            kernels.forward_train_by_channel(x, weight, bias, eps, renorm, target.array, z, relu, mean, var, stream)
        target.finish()
        return mean, var
    if inner == 1:
        target = Target(y)
        stream = streams(y)
        z = _prepared(residual, x)
        kernels.forward_train_channels_last(contiguous(x), weight, bias, eps, renorm, target.array, z, relu, mean, var, stream)
        target.finish()
        return mean, var
    x = dense(x)
    _chunked_moments(kernels, x, mean, var)
    _normalize(kernels, x, mean, *channel_affines(mean, var, weight, bias, eps, renorm), y, residual, relu)
    return mean, var


def _chunked_moments(kernels, x, mean, var):
    """The statistics of the dense channels-first x, in parallel over fixed chunks, merged in order."""
    outer, channels, inner = x.shape
    chunks = chunking(outer, inner)[2]
    count = np.empty(chunks)
    part_mean = np.empty((chunks, channels))
    part_m2 = np.empty((chunks, channels))
    if short_rows(x):
        kernels.block_moments_all(planes(x), inner, channel_block(x, False, kernels), count, part_mean, part_m2)
    else:
        kernels.chunk_moments_all(x, count, part_mean, part_m2)
    merge_moments(count, part_mean, part_m2, mean, var)


@runtime.entry
def moments(kernels, x):
    """The per-channel mean and biased variance of x, nothing written: a worker's share of a
    synchronized batch's statistics."""
    channels, inner = x.shape[1:]
    mean = np.empty(channels)
    var = np.empty(channels)
    if inner == 1:
        kernels.moments_channels_last(contiguous(x), mean, var)
    else:
        _chunked_moments(kernels, dense(x), mean, var)
    return mean, var


def _normalize(kernels, x, mean, scale, shift, y, residual=None, relu=False):
    inner = x.shape[2]
    target = Target(y)
    stream = streams(y)
    if inner == 1:
        z = _prepared(residual, x)
        kernels.normalize_channels_last(contiguous(x), mean, scale, shift, target.array, z, relu, stream)
    else:
        x = dense(x)
        z = _prepared(residual, x)
        if short_rows(x):
            block = channel_block(x, False, kernels)
            kernels.normalize_blocks(planes(x), inner, block, row_groups(x, block, kernels), mean, scale, shift, target.planes(), z, relu, stream)
        else:
            kernels.normalize_channels_first(x, mean, scale, shift, target.array, z, relu, segment_tasks(x, kernels), stream)
    target.finish()


@runtime.entry
def normalize(kernels, x, mean, var, weight, bias, eps, y, residual=None, relu=False):
    """y = (x - mean) * weight / sqrt(var + eps) + bias per channel: the eval forward (then the
    residual and ReLU as in :func:`forward_train`)."""
    _normalize(kernels, x, mean, channel_scale(var, weight, float(eps)), bias, y, residual, bool(relu))


def _masked(relu, x, dx_target, scratch=False):
    """For the fused ReLU's backward, ``relu`` = (scale, shift, residual, g): the target of the masked
    gradient g, and the kernels' ``relu`` argument (z, g, scale, shift), z and g laid out as the
    kernels take x. g is dx itself (computed in place) when the caller wants no residual gradient,
    or None then for kernels that mask in registers or into a ``scratch`` of their own."""
    if relu is None:
        return None, None
    scale, shift, residual, g = relu
    if g is dx_target.y and scratch:
        return None, (_prepared(residual, x), None, scale, shift)
    target = dx_target if g is dx_target.y else Target(g)
    grad = planes(target.array) if x.shape[2] > 1 and short_rows(x) else target.array
    return target, (_prepared(residual, x), grad, scale, shift)


@runtime.entry
def backward(kernels, dy, x, mean, invstd, weight, training, dx, relu=None):
    """Write dx; return the per-channel sums of dy and of dy * (x - mean).

    With ``relu`` = (scale, shift, residual, g), the fused ReLU's backward: dy is first masked where
    the forward's ReLU stopped it (its input recomputed from x, the residual, and the forward's
    per-channel ``scale`` and ``shift``) into g (the residual's gradient, or dx itself), a chunk at
    a time inside the kernels just before they sum it, and batch norm's backward reads g for dy."""
    outer, channels, inner = x.shape
    sum_dy = np.empty(channels)
    sum_dy_xmu = np.empty(channels)
    stream, training = streams(dx), bool(training)
    target = Target(dx)
    if inner == 1:
        dy, x = contiguous(dy), contiguous(x)
        g_target, masked = _masked(relu, x, target, scratch=True)
        kernels.backward_channels_last(dy, x, mean, invstd, weight, training, target.array, sum_dy, sum_dy_xmu, masked, stream)
        _finish(target, g_target)
        return sum_dy, sum_dy_xmu
    dy, x = dense(dy), dense(x)
    fused = by_channel(x, kernels)
    # the chunked long-row kernels mask in registers too, but their frozen element pass does not
    chunked_scratch = not fused and not short_rows(x) and training
    g_target, masked = _masked(relu, x, target, scratch=fused or chunked_scratch)
    if fused:
        if short_rows(x):
            block = channel_block(x, True, kernels)
            kernels.backward_by_block(planes(dy), planes(x), inner, block, mean, invstd, weight, training, target.planes(),
                                      sum_dy, sum_dy_xmu, masked, stream)
        else:
            kernels.backward_by_channel(dy, x, mean, invstd, weight, training, target.array, sum_dy, sum_dy_xmu, masked, stream)
        _finish(target, g_target)
        return sum_dy, sum_dy_xmu
    _chunked_gradient_sums(kernels, dy, x, mean, masked, sum_dy, sum_dy_xmu)
    if g_target is not None:  # the element pass reads the masked gradient
        dy = g_target.array
    if not training:  # frozen statistics: dx = dy * weight * invstd, whatever x holds
        zeros = np.zeros(channels)
        _normalize(kernels, dy, zeros, weight * invstd, zeros, target.array)
        _finish(target, g_target)
        return sum_dy, sum_dy_xmu
    params = _gradient_params(mean, invstd, weight, sum_dy, sum_dy_xmu, outer * inner)
    masking = masked if masked is not None and masked[1] is None else None  # masked again, segment by segment
    _chunked_gradient(kernels, dy, x, params, target, masking, stream)
    _finish(target, g_target)
    return sum_dy, sum_dy_xmu


def _chunked_gradient_sums(kernels, dy, x, mean, masked, sum_dy, sum_dy_xmu):
    """The gradient sums of the dense channels-first dy and x, in parallel over fixed chunks."""
    outer, channels, inner = x.shape
    chunks = chunking(outer, inner)[2]
    part_dy = np.empty((chunks, channels))
    part_dy_xmu = np.empty((chunks, channels))
    if short_rows(x):
        block = channel_block(x, False, kernels)
        kernels.block_gradient_sums_all(planes(dy), planes(x), inner, block, mean, part_dy, part_dy_xmu, masked)
    else:
        kernels.chunk_gradient_sums_all(dy, x, mean, part_dy, part_dy_xmu, masked)
    sum_parts(part_dy, sum_dy)
    sum_parts(part_dy_xmu, sum_dy_xmu)


def _gradient_params(mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    """The element pass's per-channel rows: mean and the factors of dx = a * dy + b * (x - mean) + c,
    in float64 (the gradient computes in float64)."""
    return np.array((mean, *gradient_factors(*backward_coefficients(sum_dy, sum_dy_xmu, invstd, weight, count))))


def _chunked_gradient(kernels, dy, x, params, target, masking, stream):
    """The training gradient's element pass over the dense channels-first dy and x."""
    inner = x.shape[2]
    if short_rows(x):
        block = channel_block(x, False, kernels)
        kernels.gradient_blocks(planes(dy), planes(x), inner, block, row_groups(x, block, kernels), params, target.planes(), stream)
    else:
        kernels.gradient_channels_first(dy, x, params, target.array, segment_tasks(x, kernels), masking, stream)


@runtime.entry
def gradient_sums(kernels, dy, x, mean):
    """The per-channel sums of dy and of dy * (x - mean), nothing written: a worker's share of a
    synchronized batch's gradient sums."""
    channels, inner = x.shape[1:]
    sum_dy = np.empty(channels)
    sum_dy_xmu = np.empty(channels)
    if inner == 1:
        kernels.gradient_sums_channels_last(contiguous(dy), contiguous(x), mean, sum_dy, sum_dy_xmu)
    else:
        _chunked_gradient_sums(kernels, dense(dy), dense(x), mean, None, sum_dy, sum_dy_xmu)
    return sum_dy, sum_dy_xmu


@runtime.entry
def gradient(kernels, dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, dx):
    """The training gradient into dx from given channel sums over ``count`` elements: a synchronized
    batch's, of which dy and x are a worker's part."""
    params = _gradient_params(mean, invstd, weight, sum_dy, sum_dy_xmu, float(count))
    target = Target(dx)
    stream = streams(dx)
    if x.shape[2] == 1:
        kernels.gradient_channels_last(contiguous(dy), contiguous(x), params, target.array, stream)
    else:
        _chunked_gradient(kernels, dense(dy), dense(x), params, target, None, stream)
    target.finish()


def _finish(target, g_target):
    """Copy scratch results into the caller's arrays: g's first, when it is not dx."""
    if g_target is not None and g_target is not target:
        g_target.finish()
    target.finish()


def precompile(dtype, serial):
    """Compile, or load from Numba's cache, every kernel that the entry points can call on C-ordered
    ``dtype`` arrays: each layout family (long rows, short rows, channels-last), each path (fused
    per channel or block, and chunked), train, eval and both backwards, with the serial or the
    parallel kernels, Batch Renormalization's, the fused ReLU's and the synchronized batch's included. Views in other memory
    orders compile their own variants on first use.

    The path thresholds are changed for the length of the call, so it is for a process of its own
    (``python -m accelbn compile``), not one that is running accelbn meanwhile."""
    saved_slice, saved_serial = tiling.CACHED_SLICE_BYTES, runtime.SERIAL_MAX_ELEMENTS
    runtime.SERIAL_MAX_ELEMENTS = (1 << 62) if serial else 0
    channels = 4 * numba.get_num_threads()  # enough for the fused paths
    weight, zero = np.ones(channels), np.zeros(channels)
    try:
        for cached_slice in (saved_slice, 0):  # fused where slices fit, then chunked
            tiling.CACHED_SLICE_BYTES = cached_slice
            for inner in (SHORT_ROW, SHORT_ROW - 1, 1):
                x = np.ones((2, channels, inner), dtype)
                x[1] = 2.0
                out = np.empty_like(x)
                mean, var = forward_train(x, weight, zero, 1e-5, out)
                normalize(x, mean, var, weight, zero, 1e-5, out)
                mean, var = moments(x)
                gradient(x, x, mean, weight, weight, *gradient_sums(x, x, mean), 2 * inner, out)
                for training in (True, False):
                    backward(x, x, mean, weight, weight, training, out)
                renorm = (zero, weight, 0.5, 2.0, 1.0)
                for residual in (None, x):
                    forward_train(x, weight, zero, 1e-5, out, renorm, residual, True)
                    normalize(x, mean, var, weight, zero, 1e-5, out, residual, True)
                    g = out if residual is None else np.empty_like(x)
                    for training in (True, False):
                        backward(x, x, mean, weight, weight, training, out, (weight, zero, residual, g))
    finally:
        tiling.CACHED_SLICE_BYTES, runtime.SERIAL_MAX_ELEMENTS = saved_slice, saved_serial
