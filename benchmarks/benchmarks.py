"""airspeed velocity benchmarks: train, eval and backward per backend and layout, float32."""

import numpy as np

import accelbn as abn

SHAPES = {
    "NCHW 32x64x56x56": ((32, 64, 56, 56), 1),
    "NHWC 32x56x56x64": ((32, 56, 56, 64), -1),
    "NC 4096x256": ((4096, 256), 1),
}


class BatchNorm:
    params = (["numba", "numpy"], list(SHAPES), ["train", "eval", "backward"])
    param_names = ["backend", "shape", "pass"]

    def setup(self, backend, shape, pass_):
        dims, axis = SHAPES[shape]
        channels = dims[axis]
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal(dims, dtype=np.float32)
        self.dy = rng.standard_normal(dims, dtype=np.float32)
        self.out = np.empty_like(self.x)
        self.running_mean = np.zeros(channels, np.float32)
        self.running_var = np.ones(channels, np.float32)
        self.run = getattr(self, f"_{pass_}")
        self.backend, self.axis = backend, axis
        _, self.stats = abn.batch_norm(self.x, None, None, training=True, axis=axis, return_stats=True)
        self.run()  # compiles (or loads) the kernels outside the timed body

    def _train(self):
        abn.batch_norm(
            self.x, self.running_mean, self.running_var, training=True, axis=self.axis, out=self.out, backend=self.backend
        )

    def _eval(self):
        abn.batch_norm(self.x, self.running_mean, self.running_var, axis=self.axis, out=self.out, backend=self.backend)

    def _backward(self):
        abn.batch_norm_backward(self.dy, self.x, self.stats, axis=self.axis, out=self.out, backend=self.backend)

    def time_batch_norm(self, backend, shape, pass_):
        self.run()

    def peakmem_batch_norm(self, backend, shape, pass_):
        self.run()


def timeraw_import_and_first_call():
    """A fresh process: import accelbn and run one small train forward (kernels from the cache)."""
    return """
    import numpy as np
    import accelbn
    accelbn.batch_norm(np.ones((8, 4, 3, 3), np.float32), None, None, training=True)
    """
