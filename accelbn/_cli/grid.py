"""The grids of shapes that ``python -m accelbn bench`` and the asv suite (benchmarks/) time."""

from typing import NamedTuple

import numpy as np

MOMENTUM = 0.1
EPS = 1e-5


class Case(NamedTuple):
    """One benchmarked array: its shape, its memory layout ("NCHW", "NHWC" or "NC") and dtype."""

    shape: tuple
    layout: str
    dtype: type = np.float32

    @property
    def axis(self):
        return -1 if self.layout == "NHWC" else 1

    @property
    def label(self):
        return "x".join(map(str, self.shape))


FULL_GRID = (
    Case((64, 256, 56, 56), "NCHW"),
    Case((64, 56, 56, 256), "NHWC"),
    Case((256, 2048, 7, 7), "NCHW"),
    Case((8192, 1024), "NC"),
    Case((65536, 64), "NC"),
    Case((16, 3, 512, 512), "NCHW"),
    Case((4, 8, 4, 4), "NCHW"),
    Case((32, 64, 56, 56), "NCHW", np.float64),
)
QUICK_GRID = (
    Case((32, 64, 56, 56), "NCHW"),
    Case((32, 56, 56, 64), "NHWC"),
    Case((4096, 256), "NC"),
    Case((4, 8, 4, 4), "NCHW"),
)

# Layer, RMS, group and instance norm (`bench --op NAME`), per operation: transformer activations,
# 56x56 images (group norm in GROUPS groups), a channels-last case; then the quick grid.
GROUPS = 32
FAMILY_GRID = {
    "layer_norm": (Case((8192, 1024), "NC"), Case((64, 512, 768), "NLC")),
    "rms_norm": (Case((8192, 1024), "NC"), Case((64, 512, 768), "NLC")),
    "group_norm": (Case((32, 256, 56, 56), "NCHW"), Case((32, 56, 56, 256), "NHWC")),
    "instance_norm": (Case((32, 64, 56, 56), "NCHW"), Case((32, 56, 56, 64), "NHWC")),
}
FAMILY_QUICK_GRID = {
    "layer_norm": (Case((1024, 512), "NC"),),
    "rms_norm": (Case((1024, 512), "NC"),),
    "group_norm": (Case((8, 64, 28, 28), "NCHW"), Case((8, 28, 28, 64), "NHWC")),
    "instance_norm": (Case((8, 32, 28, 28), "NCHW"),),
}
