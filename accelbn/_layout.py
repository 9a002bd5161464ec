"""The canonical ``(outer, C, inner)`` view that every kernel works on.

An N-d array with channel axis ``axis`` is viewed in one of two forms, chosen by where the channel
sits in memory, not by the ``axis`` argument:

* channels-first: ``(prod(shape[:axis]), C, prod(shape[axis+1:]))``, for NCHW-like memory;
* channels-last: the channel axis moved last, then ``(prod(other axes), C, 1)``, for NHWC-like
  memory and for (N, C) arrays.

A view is taken without copying whenever strides allow; only arrays whose strides cannot be merged
(e.g. ``x[:, :, ::2, ::2]``) are copied. Outputs that cannot be viewed are computed in a scratch
array and copied into ``out`` at the end.
"""

import math

import numpy as np

CHANNELS_FIRST = "channels-first"
CHANNELS_LAST = "channels-last"


def choose_form(x, axis):
    """Channels-last when the channel axis has the smallest stride of the non-trivial axes."""
    strides = [abs(s) for s, n in zip(x.strides, x.shape) if n > 1]
    if x.shape[axis] > 1 and abs(x.strides[axis]) == min(strides):
        return CHANNELS_LAST
    return CHANNELS_FIRST


def _in_form_order(a, axis, form):
    return (np.moveaxis(a, axis, -1), a.ndim - 1) if form == CHANNELS_LAST else (a, axis)


def _shape3(shape, axis):
    return (math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]))


def view3(a, axis, form):
    """The canonical view of ``a`` sharing its memory, or None when strides forbid one."""
    a, axis = _in_form_order(a, axis, form)
    try:
        return a.reshape(_shape3(a.shape, axis), copy=False)
    except ValueError:
        return None


def input3(a, axis, form, dtype):
    """The canonical view of an input, as ``dtype`` in native byte order; copies only when needed."""
    if a.dtype == dtype:
        v = view3(a, axis, form)
        if v is not None:
            return v
    a, axis = _in_form_order(a, axis, form)
    return np.ascontiguousarray(a, dtype=dtype).reshape(_shape3(a.shape, axis))


class Output:
    """Where a kernel writes: ``out`` itself when it can be viewed, else a scratch array.

    ``view`` is the canonical array the kernel fills; ``result()`` returns the user's array,
    copying the scratch array into ``out`` first when one was needed.
    """

    def __init__(self, out, like, axis, form, dtype):
        self._out = out
        self._scratch = None
        self.view = None
        if out is not None and out.dtype == dtype:
            self.view = view3(out, axis, form)
        if self.view is None:
            moved, moved_axis = _in_form_order(like, axis, form)
            self.view = np.empty(_shape3(moved.shape, moved_axis), dtype=dtype)
            scratch = self.view.reshape(moved.shape)
            self._scratch = np.moveaxis(scratch, -1, axis) if form == CHANNELS_LAST else scratch

    def result(self):
        if self._out is None:
            return self._scratch
        if self._scratch is not None:
            np.copyto(self._out, self._scratch, casting="same_kind")
        return self._out
