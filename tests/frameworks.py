"""The peer frameworks (tf-keras, Keras 3 on TensorFlow, Flax on JAX) run in child processes of
their own: their thread pools must not live in the test process, which other tests fork
(test_threads.py). ``call(name, **arrays)`` runs the function ``name`` below on NumPy inputs and
returns its NumPy results. One child serves every call of a kind (a function and a flavour) for
the whole session, so TensorFlow or JAX is imported once per kind, not once per test."""

import atexit
import os
import pickle
import subprocess
import sys
import tempfile

_SERVER = """
import os, pickle, sys, traceback
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, sys.argv[1])
import frameworks
while True:
    try:
        name, kwargs = pickle.load(sys.stdin.buffer)
    except EOFError:
        break
    try:
        answer = (True, getattr(frameworks, name)(**kwargs))
    except BaseException:
        answer = (False, traceback.format_exc())
    pickle.dump(answer, sys.stdout.buffer)
    sys.stdout.buffer.flush()
"""


_RESULTS = {}  # pickled call -> pickled result: a case's backends share one run of the peer
_SERVERS = {}  # kind -> (child, its stderr file)


def _server(kind):
    if kind not in _SERVERS:
        tests = os.path.dirname(os.path.abspath(__file__))
        stderr = tempfile.TemporaryFile()
        child = subprocess.Popen([sys.executable, "-c", _SERVER, tests], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=stderr)
        _SERVERS[kind] = (child, stderr)
    return _SERVERS[kind]


@atexit.register
def _stop_servers():
    for child, stderr in _SERVERS.values():
        child.stdin.close()
        child.wait(timeout=60)
        stderr.close()


def call(name, **kwargs):
    """``name(**kwargs)`` run in the child for its kind; its error, with the child's traceback or
    stderr, on failure."""
    request = pickle.dumps((name, kwargs))
    if request not in _RESULTS:
        child, stderr = _server((name, kwargs.get("flavour")))
        try:
            child.stdin.write(request)
            child.stdin.flush()
            ok, result = pickle.load(child.stdout)
        except (EOFError, BrokenPipeError, pickle.UnpicklingError) as error:
            stderr.seek(0)
            raise RuntimeError(f"{name}'s child process died:\n{stderr.read().decode(errors='replace')[-4000:]}") from error
        if not ok:
            raise RuntimeError(f"{name} failed in its child process:\n{result}")
        _RESULTS[request] = pickle.dumps(result)
    return pickle.loads(_RESULTS[request])  # a copy of its own for each caller


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
