"""Other frameworks' conventions on ``BatchNorm`` (``convention=`` and checkpoint ``layout=``),
tested against the real packages: Keras 3's BatchNormalization, Flax's nn.BatchNorm and ONNX's own
BatchNormalization test cases in training mode (run through ONNX's reference evaluator too); and the
switch that freezes the statistics after a warmup."""

import frameworks
import numpy as np
import pytest
from support import random_array, rel_error

import accelbn as abn


def _train_steps(layer, batches):
    for x in batches:
        layer(x)
    return layer


@pytest.mark.parametrize("convention, eps, momentum", [("keras", 1e-3, 0.99), ("flax", 1e-5, 0.99), ("onnx", 1e-5, 0.9),
                                                        ("torch", 1e-5, 0.1)])
def test_defaults_are_the_conventions(convention, eps, momentum):
    layer = abn.BatchNorm(4, convention=convention)
    assert (layer.eps, layer.momentum) == (eps, momentum)
    assert (convention == "torch") == ("convention" not in repr(layer))


@pytest.mark.parametrize("axis", [-1, 1])
def test_keras_convention_matches_keras_over_training_steps(backend, axis):
    rng = np.random.default_rng(0)
    shape = (8, 5, 5, 3) if axis == -1 else (8, 3, 5, 5)
    batches = [(rng.standard_normal(shape) * 3 + 1).astype(np.float32) for _ in range(3)]
    x_eval = rng.standard_normal(shape).astype(np.float32)
    steps, their_eval, _ = frameworks.call("keras_steps", flavour="keras", layer_kwargs={"axis": axis, "momentum": 0.7},
                                           batches=batches, dys=batches, x_eval=x_eval)
    ours = abn.BatchNorm(3, momentum=0.7, convention="keras", axis=axis, backend=backend)
    for x, (y, _, _, _, theirs) in zip(batches, steps):
        assert rel_error(ours(x), y) < 1e-5
        for name, value in ours.state_dict(layout="keras").items():
            assert rel_error(value, theirs[name]) < 1e-6, name
    assert rel_error(ours.eval()(x_eval), their_eval) < 1e-6
    # The biased variance is the convention: torch's rule would differ by n / (n - 1).
    torch_rule = _train_steps(abn.BatchNorm(3, eps=1e-3, momentum=0.3, axis=axis), batches)
    assert rel_error(torch_rule.running_var, ours.running_var) > 1e-3


def test_flax_convention_matches_flax_batch_norm(backend):
    rng = np.random.default_rng(1)
    params = {"params": {"scale": rng.uniform(0.5, 2, 6).astype(np.float32),
                         "bias": rng.standard_normal(6).astype(np.float32)},
              "batch_stats": {"mean": np.zeros(6, np.float32), "var": np.ones(6, np.float32)}}
    batches = [(rng.standard_normal((16, 6)) * (step + 1) + step).astype(np.float32) for step in range(3)]
    steps = frameworks.call("flax_steps", momentum=0.8, params=params, batches=batches)
    ours = abn.BatchNorm(6, momentum=0.8, convention="flax", axis=-1, backend=backend)
    ours.load_state_dict(params, layout="flax")
    for x, (y, theirs) in zip(batches, steps):
        assert rel_error(ours(x), y) < 1e-5
        state = ours.state_dict(layout="flax")
        for collection in ("params", "batch_stats"):
            for name, value in state[collection].items():
                assert rel_error(value, theirs[collection][name]) < 1e-6, (collection, name)


def _onnx_training_cases(monkeypatch):
    """ONNX's own BatchNormalization test cases in training mode (onnx/backend/test/case/node),
    as (node, inputs, outputs): export_train() hands each to ``expect``, captured here."""
    from onnx.backend.test.case.node import batch_normalization

    cases = []
    monkeypatch.setattr(batch_normalization, "expect", lambda node, inputs, outputs, name: cases.append((node, inputs, outputs)))
    np.random.seed(0)
    batch_normalization.BatchNormalization.export_train()
    assert len(cases) == 2
    return cases


def test_onnx_convention_passes_onnx_training_mode_test_cases(monkeypatch, backend):
    import onnx
    from onnx.reference import ReferenceEvaluator

    for node, (x, scale, bias, mean, var), (y, output_mean, output_var) in _onnx_training_cases(monkeypatch):
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        layer = abn.BatchNorm(3, eps=attributes.get("epsilon", 1e-5), momentum=attributes.get("momentum", 0.9),
                              convention="onnx", backend=backend)
        layer.load_state_dict({"scale": scale, "B": bias, "input_mean": mean, "input_var": var}, layout="onnx")
        got = layer(x)
        assert rel_error(got, y) < 1e-6
        state = layer.state_dict(layout="onnx")
        assert rel_error(state["input_mean"], output_mean) < 1e-6
        assert rel_error(state["input_var"], output_var) < 1e-6
        # and ONNX's reference evaluator agrees with its own expected outputs on the same node
        graph = onnx.helper.make_graph(
            [node], "bn", [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in node.input],
            [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in node.output])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 15)])
        evaluated = ReferenceEvaluator(model).run(None, dict(zip(node.input, (x, scale, bias, mean, var))))
        assert rel_error(got, evaluated[0]) < 1e-6 and rel_error(state["input_var"], evaluated[2]) < 1e-6


def test_layouts_round_trip_and_reject_unknown_names():
    layer = abn.BatchNorm(3)
    layer(random_array((10, 3)))
    for layout in ("keras", "flax", "onnx"):
        other = abn.BatchNorm(3)
        other.load_state_dict(layer.state_dict(layout=layout), layout=layout)
        for name in ("weight", "bias", "running_mean", "running_var"):
            np.testing.assert_array_equal(getattr(other, name), getattr(layer, name))
        assert other.num_batches_tracked == 0  # their checkpoints have no counter: it stays
    with pytest.raises(ValueError, match="layout must be one of"):
        layer.state_dict(layout="caffe")
    with pytest.raises(KeyError, match="unexpected"):
        layer.load_state_dict({"gamma": np.ones(3), "beta": np.zeros(3), "moving_mean": np.zeros(3),
                               "moving_variance": np.ones(3), "moving_stddev": np.ones(3)}, layout="keras")
    with pytest.raises(ValueError, match="convention must be one of"):
        abn.BatchNorm(3, convention="caffe")
    with pytest.raises(ValueError, match="momentum=None"):
        abn.BatchNorm(3, momentum=None, convention="keras")


def test_freeze_after_a_warmup(backend):
    """After freeze_after batches, train mode normalizes with the running statistics, updates
    nothing, and backward treats them as constants: as eval, whatever the mode says."""
    layer = abn.BatchNorm(4, freeze_after=2, backend=backend)
    batches = [random_array((16, 4, 3, 3), seed=s, loc=s) for s in range(4)]
    layer(batches[0])
    assert not layer.frozen
    layer(batches[1])
    assert layer.frozen and layer.num_batches_tracked == 2
    running = layer.state_dict()
    y = layer(batches[2])
    for name, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, running[name])
    np.testing.assert_array_equal(y, abn.batch_norm(batches[2], layer.running_mean, layer.running_var,
                                                    layer.weight, layer.bias, backend=backend))
    dy = random_array(batches[2].shape, seed=9)
    dx = layer.backward(dy)
    stats = abn.batch_norm(batches[2], layer.running_mean, layer.running_var, return_stats=True)[1]
    np.testing.assert_array_equal(dx, abn.batch_norm_backward(dy, batches[2], stats, layer.weight, training=False,
                                                              backend=backend)[0])
    assert layer.training  # the mode is the user's; only the statistics froze


def test_freeze_now_and_its_errors():
    layer = abn.BatchNorm(3).freeze()
    x = random_array((5, 3))
    np.testing.assert_array_equal(layer(x), abn.batch_norm(x, np.zeros(3, np.float32), np.ones(3, np.float32)))
    assert layer.num_batches_tracked == 0
    assert abn.BatchNorm(3, freeze_after=0).frozen
    with pytest.raises(ValueError, match="freeze\\(\\) needs running statistics"):
        abn.BatchNorm(3, track_running_stats=False).freeze()
    with pytest.raises(ValueError, match="freeze_after needs"):
        abn.BatchNorm(3, freeze_after=-1)
    with pytest.raises(TypeError, match="freeze_after"):
        abn.BatchNorm(3, freeze_after=1.5)
