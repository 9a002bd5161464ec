"""The canonical view's stride merging and the address-only overlap view, checked on NumPy arrays
(the GPU path builds its views and overlap tests from exactly these)."""

import numpy as np
import pytest
from support import LAYOUTS

from accelbn._core import checks, views
from accelbn._core.arrays import address_view


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_merged_strides_agree_with_numpy_reshape(name):
    make, axis = LAYOUTS[name]
    x = make()
    layout = views.channel_layout(x, axis % x.ndim)
    strides = views.merged_strides(x.shape, x.strides, layout.order, layout.n_outer)
    try:
        reshaped = x.transpose(layout.order).reshape(layout.shape3, copy=False)
    except ValueError:
        reshaped = None
    assert (strides is None) == (reshaped is None)
    view = views.view3(x, layout)
    assert (view is None) == (reshaped is None)
    if view is not None:
        built = np.lib.stride_tricks.as_strided(x, view.shape, strides)
        np.testing.assert_array_equal(built, reshaped)
        np.testing.assert_array_equal(view, reshaped)
        assert np.shares_memory(built, x) and np.shares_memory(view, x)


class _DeviceArrayStandIn:
    """What address_view reads from a CuPy array: shape, strides, dtype and data.ptr."""

    def __init__(self, a):
        self.shape, self.strides, self.dtype = a.shape, a.strides, a.dtype
        self.data = type("Pointer", (), {"ptr": a.__array_interface__["data"][0]})()


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        (np.s_[:, 0::2], np.s_[:, 1::2], False),
        (np.s_[:, 0::2], np.s_[1:, 0::2], True),
        (np.s_[::-1], np.s_[:], True),
        (np.s_[:2], np.s_[2:], False),
    ],
)
def test_address_view_gives_numpy_overlap_answers(a, b, overlap):
    base = np.zeros((4, 6), np.float32)
    first, second = (address_view(_DeviceArrayStandIn(base[s])) for s in (a, b))
    assert np.shares_memory(first, second) == overlap == np.shares_memory(base[a], base[b])
    assert checks._same_elements(_DeviceArrayStandIn(base[a]), _DeviceArrayStandIn(base[a]))
