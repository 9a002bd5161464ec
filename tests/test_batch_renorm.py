"""Batch Renormalization (``batch_renorm``, ``BatchRenorm``): against its formula with PyTorch's
autograd (r and d detached) on every backend, against the real Keras layers (tf-keras, Keras 2,
and Keras 3) over training steps and through their checkpoints, its schedules, and its errors."""

import math

import frameworks
import numpy as np
import pytest
import torch
from support import LAYOUTS, assert_matches_reference, channel_params, random_array, rel_error

import accelbn as abn

EPS = 1e-3


def _moving(channels, dtype, seed=3):
    """running_mean, running_var, running_std, renorm_mean, renorm_std, away from their defaults."""
    rng = np.random.default_rng(seed)
    running_var = rng.uniform(0.5, 2.0, channels)
    return [a.astype(dtype) for a in (rng.standard_normal(channels), running_var, np.sqrt(running_var + EPS),
                                      rng.standard_normal(channels) * 0.5, rng.uniform(0.5, 2.0, channels))]


def _oracle(x, moving, weight, bias, axis, momentum, renorm_momentum, rmin, rmax, dmax, dy):
    """The paper's Algorithm 1 with Keras's moving statistics, in float64 torch with autograd:
    (y, updated moving statistics, r, d, dx, dweight, dbias)."""
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    xm = np.moveaxis(x, axis, -1)
    tx = t(xm).requires_grad_()
    tw, tb = t(weight).requires_grad_(), t(bias).requires_grad_()
    rm, rv, rs, nm, ns = (t(m) for m in moving)
    dims = tuple(range(tx.ndim - 1))
    mean = tx.mean(dims)
    var = ((tx - mean) ** 2).mean(dims)
    std = torch.sqrt(var + EPS)
    std_ref = torch.clamp(ns, min=math.sqrt(EPS))
    r = torch.clamp(std / std_ref, rmin, rmax).detach()
    d = torch.clamp((mean - nm) / std_ref, -dmax, dmax).detach()
    y = ((tx - mean) / std * r + d) * tw + tb
    y.backward(t(np.moveaxis(dy, axis, -1)))
    new_std = rs + momentum * (std.detach() - rs)
    updated = [rm + momentum * (mean.detach() - rm), torch.clamp(new_std ** 2 - EPS, min=0), new_std,
               nm + renorm_momentum * (mean.detach() - nm), ns + renorm_momentum * (std.detach() - ns)]
    back = lambda a: np.moveaxis(a.detach().numpy(), -1, axis)  # noqa: E731
    return back(y), [u.numpy() for u in updated], r.numpy(), d.numpy(), back(tx.grad), tw.grad.numpy(), tb.grad.numpy()


@pytest.mark.parametrize("clip", [(1 / 1.5, 1.5, 0.5), (0.0, math.inf, math.inf), (0.9, 1.1, 0.0)],
                         ids=["clipped", "unclipped", "tight"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW-chunks", "NHWC-axis-1", "NC-many-rows", "negative-strides"])
def test_matches_the_formula_with_torch_autograd(on, any_backend, layout, dtype, clip):
    make, axis = LAYOUTS[layout]
    x = make().astype(dtype) * 2 + 1
    dy = random_array(x.shape, dtype, seed=4)
    c = x.shape[axis]
    p = channel_params(c, dtype)
    moving = _moving(c, dtype)
    rmin, rmax, dmax = clip
    want = _oracle(x, moving, p["weight"], p["bias"], axis, 0.05, 0.2, rmin, rmax, dmax, dy)
    state = [on.put(m.copy()) for m in moving]
    y, stats = abn.batch_renorm(on.put(x), *state, on.put(p["weight"]), on.put(p["bias"]), True, 0.05, 0.2, rmin=rmin,
                                rmax=rmax, dmax=dmax, axis=axis, return_stats=True, backend=any_backend)
    grads = abn.batch_renorm_backward(on.put(dy), on.put(x), stats, on.put(p["weight"]), axis=axis, backend=any_backend)
    assert_matches_reference(on.get(y), want[0])
    for got, expected in zip(state, want[1]):
        assert_matches_reference(on.get(got), expected)
    assert_matches_reference(on.get(stats.r), want[2])
    assert_matches_reference(on.get(stats.d), want[3])
    for got, expected in zip(grads, want[4:]):
        assert_matches_reference(on.get(got), expected)


def test_without_correction_it_is_batch_norm_bit_for_bit(on, any_backend):
    """rmax = 1 and dmax = 0 (the ramps' start) make r = 1 and d = 0: batch norm's own output."""
    x = random_array((6, 5, 9, 9), loc=2.0)
    p = channel_params(5, np.float32)
    y = abn.batch_renorm(on.put(x), *(on.put(m) for m in _moving(5, np.float32)), on.put(p["weight"]),
                         on.put(p["bias"]), True, rmax=1.0, dmax=0.0, backend=any_backend)
    want = abn.batch_norm(on.put(x), None, None, on.put(p["weight"]), on.put(p["bias"]), True, eps=EPS,
                          backend=any_backend)
    np.testing.assert_array_equal(on.get(y), on.get(want))


def test_eval_is_batch_norm_with_the_moving_statistics_and_needs_no_renorm_state(on, any_backend):
    x = random_array((6, 5, 4))
    rm, rv, *_ = _moving(5, np.float32)
    y, stats = abn.batch_renorm(on.put(x), on.put(rm), on.put(rv), None, None, None, return_stats=True,
                                backend=any_backend)
    want = abn.batch_norm(on.put(x), on.put(rm), on.put(rv), eps=EPS, backend=any_backend)
    np.testing.assert_array_equal(on.get(y), on.get(want))
    np.testing.assert_array_equal(on.get(stats.r), 1.0)
    np.testing.assert_array_equal(on.get(stats.d), 0.0)
    dy = random_array(x.shape, seed=2)
    dx = abn.batch_renorm_backward(on.put(dy), on.put(x), stats, training=False, backend=any_backend)[0]
    np.testing.assert_array_equal(on.get(dx), on.get(abn.batch_norm_backward(
        on.put(dy), on.put(x), abn.BatchStats(stats.mean, stats.invstd), training=False, backend=any_backend)[0]))


def test_ramp_is_the_papers_schedule():
    rmax, dmax = abn.Ramp.paper_rmax(), abn.Ramp.paper_dmax()
    assert [rmax(s) for s in (0, 5000, 22500, 40000, 10**6)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert [dmax(s) for s in (0, 5000, 15000, 25000, 10**6)] == [0.0, 0.0, 2.5, 5.0, 5.0]
    layer = abn.BatchRenorm(4)
    assert layer.rmax == rmax and layer.dmax == dmax and layer.rmin is None
    with pytest.raises(ValueError, match="begin < stop"):
        abn.Ramp(1.0, 3.0, 10, 10)


def test_the_layer_clips_with_the_schedule_at_its_step(backend):
    """Ramp(1, 2, 0, 2): step 0 clips r to exactly 1 (batch norm's output), step 1 to [2/3, 1.5]."""
    layer = abn.BatchRenorm(3, rmax=abn.Ramp(1.0, 2.0, 0, 2), dmax=abn.Ramp(0.0, 1.0, 0, 2), backend=backend)
    layer.renorm_std[:] = 0.01  # r would be far above any bound
    x = random_array((50, 3), scale=3.0)
    y = layer(x)
    np.testing.assert_array_equal(y, abn.batch_norm(x, None, None, training=True, eps=EPS, backend=backend))
    assert layer.num_batches_tracked == 1
    layer(x)
    np.testing.assert_allclose(layer._saved[1].r, 1.5)


# tf-keras (Keras 2, the peer) and Keras 3 (on TensorFlow) keep renorm alike; both run in a
# child process (tests/frameworks.py).
KERAS = ["tf_keras", "keras"]


@pytest.mark.parametrize("clipping", [{"rmin": 0.8, "rmax": 1.5, "dmax": 0.3}, {"rmax": 2.0}, None])
@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("flavour", KERAS)
def test_matches_keras_over_training_steps(flavour, backend, axis, clipping):
    rng = np.random.default_rng(0)
    c = 4
    shape = (16, 5, 5, c) if axis == -1 else (16, c, 5, 5)
    batches = [(rng.standard_normal(shape) * (2 + step) + step).astype(np.float32) for step in range(4)]
    dys = [rng.standard_normal(shape).astype(np.float32) for _ in batches]
    x_eval = rng.standard_normal(shape).astype(np.float32)
    layer_kwargs = dict(axis=axis, renorm=True, renorm_clipping=clipping, momentum=0.8, renorm_momentum=0.9)
    initial = {"gamma": np.full(c, 1.3, np.float32), "beta": np.full(c, 0.2, np.float32)}
    steps, their_eval, _ = frameworks.call("keras_steps", flavour=flavour, layer_kwargs=layer_kwargs, batches=batches,
                                           dys=dys, x_eval=x_eval, initial=initial)
    clip = clipping or {}
    ours = abn.BatchRenorm(c, momentum=0.2, renorm_momentum=0.1, rmax=clip.get("rmax", math.inf),
                           dmax=clip.get("dmax", math.inf), rmin=clip.get("rmin", 0.0), axis=axis, backend=backend)
    ours.load_state_dict({**ours.state_dict(layout="keras"), **initial}, layout="keras")
    for x, dy, (y, gx, gg, gb, theirs) in zip(batches, dys, steps):
        got_y = ours(x)
        got_dx = ours.backward(dy)
        for got, want in [(got_y, y), (got_dx, gx), (ours.grad_weight, gg), (ours.grad_bias, gb)]:
            assert rel_error(got, want) < 1e-5
        for name, value in ours.state_dict(layout="keras").items():
            assert rel_error(value, theirs[name]) < 1e-6, name
    assert rel_error(ours.eval()(x_eval), their_eval) < 1e-6


@pytest.mark.parametrize("flavour", KERAS)
def test_loads_a_keras_checkpoint_and_writes_one_back(flavour, backend):
    rng = np.random.default_rng(1)
    names = ["gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev"]
    initial = {name: rng.uniform(0.5, 2.0, 3).astype(np.float32) for name in names}
    x = rng.standard_normal((8, 3)).astype(np.float32)
    _, their_eval, theirs = frameworks.call("keras_steps", flavour=flavour, layer_kwargs={"renorm": True}, batches=[x],
                                            dys=[x], x_eval=x, initial=initial)
    # one training step moved their state; load it and evaluate as they do
    ours = abn.BatchRenorm(3, backend=backend)
    ours.load_state_dict(theirs, layout="keras")
    state = ours.state_dict(layout="keras")
    assert set(state) == set(theirs) == set(names)
    for name in theirs:
        np.testing.assert_array_equal(state[name], theirs[name])
    assert rel_error(ours.eval()(x), their_eval) < 1e-6
    with pytest.raises(KeyError, match="missing"):
        ours.load_state_dict({k: v for k, v in theirs.items() if k != "moving_stddev"}, layout="keras")


def test_torch_layout_round_trips_with_the_step_counter():
    layer = abn.BatchRenorm(3)
    layer(random_array((10, 3)))
    state = layer.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "running_std", "renorm_mean",
                           "renorm_std", "num_batches_tracked"]
    other = abn.BatchRenorm(3)
    other.load_state_dict(state)
    assert other.num_batches_tracked == 1
    np.testing.assert_array_equal(other.renorm_std, layer.renorm_std)
    with pytest.raises(ValueError, match="layout must be 'torch' or 'keras'"):
        layer.state_dict(layout="flax")


def test_errors_name_the_argument_and_change_nothing(backend):
    x = random_array((8, 3, 4))
    moving = _moving(3, np.float32)
    state = [m.copy() for m in moving]
    for kwargs, error, words in [
        ({"rmax": 0.5}, ValueError, "rmax must be"),
        ({"dmax": -1.0}, ValueError, "dmax must be"),
        ({"rmin": 1.5}, ValueError, "rmin must be at most 1"),
        ({"eps": 0.0}, ValueError, "eps must be positive"),
        ({"renorm_momentum": "a"}, TypeError, "renorm_momentum"),
    ]:
        with pytest.raises(error, match=words):
            abn.batch_renorm(x, *state, training=True, backend=backend, **kwargs)
    with pytest.raises(ValueError, match="renorm_std is required when training"):
        abn.batch_renorm(x, *state[:4], None, training=True, backend=backend)
    with pytest.raises(ValueError, match="running_std must have shape"):
        abn.batch_renorm(x, state[0], state[1], np.ones(2, np.float32), *state[3:], training=True, backend=backend)
    with pytest.raises(ValueError, match="share memory|same array"):
        abn.batch_renorm(x, state[0], state[1], state[2], state[3], state[3], training=True, backend=backend)
    for got, want in zip(state, moving):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(TypeError, match="RenormStats"):
        abn.batch_renorm_backward(x, x, abn.BatchStats(np.zeros(3), np.ones(3)), backend=backend)
    with pytest.raises(ValueError, match="rmax must be"):
        abn.BatchRenorm(3, rmax=0.5)
