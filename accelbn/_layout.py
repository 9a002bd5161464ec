"""The canonical ``(outer, C, inner)`` view that every kernel works on.

The axes of an N-d array are ordered by where they sit in memory, not by the ``axis`` argument:
the non-channel axes laid out slower than the channel axis (larger stride) form ``outer``, the
faster ones form ``inner``. So NCHW memory becomes ``(N, C, H*W)``, NHWC memory becomes
``(N*H*W, C, 1)`` whichever axis order it is indexed in, and a Fortran-ordered (N, C) array
becomes ``(1, C, N)``; kernels pick their loop family from ``inner``.

The view shares memory whenever strides allow; only inputs whose strides cannot be merged
(e.g. ``x[:, :, ::2, ::2]``) are copied. Outputs that cannot be viewed are computed in a scratch
array and copied into ``out`` at the end.
"""

import functools
import math

from accelbn._arrays import CUPY, library_of, namespace


def channel_order(x, axis):
    """The axes of ``x`` as (outer..., axis, inner...), each part in decreasing stride order.

    Axes of length 1 carry no data and go to outer; with a single channel everything else is inner.
    """
    return _order(x.shape, x.strides, axis)


# Remembered per shape, strides and axis: a training loop asks about the same few arrays every step.
@functools.lru_cache(maxsize=256)
def _order(shape, strides, axis):
    others = sorted((a for a in range(len(shape)) if a != axis), key=lambda a: -abs(strides[a]))
    channel_stride = abs(strides[axis]) if shape[axis] > 1 else math.inf
    outer = [a for a in others if shape[a] == 1 or abs(strides[a]) > channel_stride]
    inner = [a for a in others if a not in outer]
    return (*outer, axis, *inner), len(outer)


@functools.lru_cache(maxsize=256)
def _inverse(order):
    return tuple(sorted(range(len(order)), key=order.__getitem__))


def _shape3(shape, order, n_outer):
    sizes = [shape[a] for a in order]
    return (math.prod(sizes[:n_outer]), sizes[n_outer], math.prod(sizes[n_outer + 1 :]))


def merged_strides(shape, strides, order, n_outer):
    """Strides of the canonical view of an array of ``shape``/``strides`` (bytes), or None when
    its outer or inner axes cannot be merged into one without a copy. Axes of length 1 are free."""
    merged = []
    for group in (order[:n_outer], order[n_outer : n_outer + 1], order[n_outer + 1 :]):
        axes = [a for a in group if shape[a] != 1]
        for slow, fast in zip(axes, axes[1:]):
            if strides[slow] != strides[fast] * shape[fast]:
                return None
        merged.append(strides[axes[-1]] if axes else 0)
    return tuple(merged)


def view3(a, order, n_outer):
    """The canonical view of ``a`` sharing its memory, or None when strides forbid one."""
    shape3 = _shape3(a.shape, order, n_outer)
    if library_of(a) == CUPY:  # CuPy's reshape would copy silently; build the view from strides
        strides3 = merged_strides(a.shape, a.strides, order, n_outer)
        return None if strides3 is None else namespace(CUPY).lib.stride_tricks.as_strided(a, shape3, strides3)
    try:
        return a.transpose(order).reshape(shape3, copy=False)
    except ValueError:
        return None


def input3(a, order, n_outer, dtype):
    """The canonical view of an input, as ``dtype`` in native byte order; copies only when needed."""
    if a.dtype == dtype:
        v = view3(a, order, n_outer)
        if v is not None:
            return v
    xp = namespace(library_of(a))
    return xp.ascontiguousarray(a.transpose(order), dtype=dtype).reshape(_shape3(a.shape, order, n_outer))


class Output:
    """Where a kernel writes: ``out`` itself when it can be viewed, else a scratch array.

    ``view`` is the canonical array the kernel fills; ``result()`` returns the user's array,
    copying the scratch array into ``out`` first when one was needed.
    """

    def __init__(self, x, out, order, n_outer, dtype):
        shape = x.shape
        self._xp = namespace(library_of(x))
        self._out = out
        self._scratch = None
        self.view = None
        if out is not None and out.dtype == dtype:
            self.view = view3(out, order, n_outer)
        if self.view is None:
            self.view = self._xp.empty(_shape3(shape, order, n_outer), dtype=dtype)
            permuted = self.view.reshape([shape[a] for a in order])
            self._scratch = permuted.transpose(_inverse(order))

    def result(self):
        if self._out is None:
            return self._scratch
        if self._scratch is not None:
            self._xp.copyto(self._out, self._scratch, casting="same_kind")
        return self._out
