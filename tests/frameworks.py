"""The peer frameworks (tf-keras, Keras 3 on TensorFlow, Flax on JAX) run in a child process of
their own: their thread pools must not live in the test process, which other tests fork
(test_threads.py). ``call(name, **arrays)`` runs the function ``name`` below in a fresh interpreter
on NumPy inputs and returns its NumPy results."""

import os
import pickle
import subprocess
import sys

_CHILD = """
import os, pickle, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, sys.argv[1])
import frameworks
name, kwargs = pickle.load(sys.stdin.buffer)
result = getattr(frameworks, name)(**kwargs)
sys.stdout.buffer.write(pickle.dumps(result))
"""


_RESULTS = {}  # pickled call -> pickled result: a case's backends share one run of the peer


def call(name, **kwargs):
    """``name(**kwargs)`` run in a child interpreter; its error, with the child's stderr, on failure."""
    request = pickle.dumps((name, kwargs))
    if request not in _RESULTS:
        tests = os.path.dirname(os.path.abspath(__file__))
        done = subprocess.run([sys.executable, "-c", _CHILD, tests], input=request, capture_output=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"{name} failed in its child process:\n{done.stderr.decode(errors='replace')[-4000:]}")
        _RESULTS[request] = done.stdout
    return pickle.loads(_RESULTS[request])


def _weights(layer):
    import numpy as np

    return {w.name.split("/")[-1].split(":")[0]: np.asarray(w.numpy()) for w in layer.weights}


def keras_steps(flavour, layer_kwargs, batches, dys, x_eval, initial=None):
    """A Keras BatchNormalization (``flavour`` "tf_keras" or "keras") trained on ``batches``:
    per step its output, the gradients of sum(y * dy) in x, gamma and beta, and its weights by
    name; then its eval output on x_eval. ``initial`` sets weights by name before the first step."""
    import importlib

    import numpy as np
    import tensorflow as tf

    keras = importlib.import_module(flavour)
    layer = keras.layers.BatchNormalization(**layer_kwargs)
    layer.build(batches[0].shape)
    for w in layer.weights:
        name = w.name.split("/")[-1].split(":")[0]
        if initial and name in initial:
            w.assign(initial[name])
    steps = []
    for x, dy in zip(batches, dys):
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
            loss = tf.reduce_sum(y * dy)
        gx, gg, gb = tape.gradient(loss, [xt, layer.gamma, layer.beta])
        steps.append((y.numpy(), gx.numpy(), gg.numpy(), gb.numpy(), _weights(layer)))
    return steps, np.asarray(layer(x_eval, training=False)), _weights(layer)


def flax_steps(momentum, params, batches):
    """Flax's nn.BatchNorm (two-pass variance) trained on ``batches`` from ``params`` (with
    ``batch_stats``): per step its output and all its variables."""
    import flax.linen as nn
    import jax
    import numpy as np

    module = nn.BatchNorm(use_running_average=False, momentum=momentum, epsilon=1e-5, use_fast_variance=False)
    module.init(jax.random.PRNGKey(0), batches[0])
    steps = []
    for x in batches:
        y, updates = module.apply(params, x, mutable=["batch_stats"])
        params = {**params, "batch_stats": updates["batch_stats"]}
        steps.append((np.asarray(y), jax.tree_util.tree_map(np.asarray, params)))
    return steps
