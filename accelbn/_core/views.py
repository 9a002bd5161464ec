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
from typing import NamedTuple

from accelbn._core.arrays import CUPY, library_of, namespace


class Layout(NamedTuple):
    """Where the axes of arrays of one shape and strides go in the canonical view."""

    order: tuple  # the axes as (outer..., channel, inner...)
    in_order: bool  # whether ``order`` is the axes' own order, so views need no transpose
    n_outer: int
    shape3: tuple  # (outer, C, inner)
    ordered_shape: tuple  # the shape with its axes in ``order``
    inverse: tuple  # the permutation that undoes ``order``
    strides: tuple  # the strides this layout was found for
    strides3: tuple | None  # their canonical strides, or None when they need a copy


def channel_layout(x, axis):
    """The layout of ``x`` with channel axis ``axis``: its axes ordered as (outer..., axis, inner...),
    each part in decreasing stride order.

    Axes of length 1 carry no data and go to outer; with a single channel everything else is inner.
    """
    return _layout(x.shape, x.strides, axis)


# Remembered per shape, strides and axis: a training loop asks about the same few arrays every step.
@functools.lru_cache(maxsize=256)
def _layout(shape, strides, axis):
    others = sorted((a for a in range(len(shape)) if a != axis), key=lambda a: -abs(strides[a]))
    channel_stride = abs(strides[axis]) if shape[axis] > 1 else math.inf
    outer = [a for a in others if shape[a] == 1 or abs(strides[a]) > channel_stride]
    inner = [a for a in others if a not in outer]
    order = (*outer, axis, *inner)
    n_outer = len(outer)
    ordered = tuple(shape[a] for a in order)
    shape3 = (math.prod(ordered[:n_outer]), ordered[n_outer], math.prod(ordered[n_outer + 1 :]))
    inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
    in_order = order == tuple(range(len(shape)))
    return Layout(order, in_order, n_outer, shape3, ordered, inverse, strides, merged_strides(shape, strides, order, n_outer))


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


def view3(a, layout):
    """The canonical view of ``a`` (an array of the layout's shape) sharing its memory, or None when
    strides forbid one."""
    if a.strides == layout.strides:
        strides3 = layout.strides3
    else:
        strides3 = merged_strides(a.shape, a.strides, layout.order, layout.n_outer)
    if strides3 is None:
        return None
    if library_of(a) == CUPY:  # CuPy's reshape would copy silently; build the view from strides
        return namespace(CUPY).lib.stride_tricks.as_strided(a, layout.shape3, strides3)
    return _in_order(a, layout).reshape(layout.shape3)  # a view: the strides merge


def _in_order(a, layout):
    return a if layout.in_order else a.transpose(layout.order)


def input3(a, layout, dtype):
    """The canonical view of an input, as ``dtype`` in native byte order; copies only when needed."""
    if a.dtype == dtype:
        v = view3(a, layout)
        if v is not None:
            return v
    xp = namespace(library_of(a))
    return xp.ascontiguousarray(_in_order(a, layout), dtype=dtype).reshape(layout.shape3)


class Output:
    """Where a kernel writes: ``out`` itself when it can be viewed, else a scratch array.

    ``view`` is the canonical array the kernel fills; ``result()`` returns the user's array: ``out``,
    after copying the scratch array into it when one was needed, or else a new array of x's dtype.
    """

    __slots__ = ("_out", "_scratch", "_xp", "_dtype", "view")

    def __init__(self, x, out, layout, dtype):
        self._out = out
        self._dtype = x.dtype
        self._scratch = None
        self.view = None
        if out is not None and out.dtype == dtype:
            self.view = view3(out, layout)
        if self.view is None:
            self._xp = namespace(library_of(x))
            self.view = self._xp.empty(layout.shape3, dtype=dtype)
            self._scratch = self.view.reshape(layout.ordered_shape)
            if not layout.in_order:
                self._scratch = self._scratch.transpose(layout.inverse)

    def result(self):
        if self._out is None:
            return self._scratch if self._scratch.dtype == self._dtype else self._scratch.astype(self._dtype)
        if self._scratch is not None:
            self._xp.copyto(self._out, self._scratch, casting="same_kind")
        return self._out
