"""Other frameworks' batch-norm conventions: how they blend running statistics, their defaults, and
the names their checkpoints give a layer's state.

PyTorch (accelbn's own): ``running = (1 - momentum) * running + momentum * batch``, the unbiased
batch variance, eps 1e-5, momentum 0.1. Keras, Flax and ONNX give momentum the opposite meaning,
``running = momentum * running + (1 - momentum) * batch``, and keep the biased variance.
"""

from typing import NamedTuple


class Convention(NamedTuple):
    eps: float
    momentum: float  # in the framework's own meaning
    momentum_of_batch: bool  # True: momentum weighs the batch (PyTorch); False: the running value
    unbiased: bool  # whether running_var takes the unbiased batch variance


CONVENTIONS = {
    "torch": Convention(1e-5, 0.1, True, True),
    "keras": Convention(1e-3, 0.99, False, False),  # keras.layers.BatchNormalization, Keras 2 and 3
    "flax": Convention(1e-5, 0.99, False, False),  # flax.linen.BatchNorm
    "onnx": Convention(1e-5, 0.9, False, False),  # ONNX BatchNormalization, training_mode=1
}

# Our state names -> each framework's checkpoint keys. Flax nests its variables by collection.
LAYOUTS = {
    "torch": {},
    "keras": {
        "weight": "gamma",
        "bias": "beta",
        "running_mean": "moving_mean",
        "running_var": "moving_variance",
        "running_std": "moving_stddev",
        "renorm_mean": "renorm_mean",
        "renorm_std": "renorm_stddev",
    },
    "flax": {"weight": ("params", "scale"), "bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
             "running_var": ("batch_stats", "var")},
    "onnx": {"weight": "scale", "bias": "B", "running_mean": "input_mean", "running_var": "input_var"},
}


def convention(name):
    if name not in CONVENTIONS:
        raise ValueError(f"convention must be one of {list(CONVENTIONS)}, got {name!r}")
    return CONVENTIONS[name]


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    return layout


def batch_momentum(momentum, rule):
    """The weight of the batch in the blend, from a momentum in ``rule``'s meaning (None passes)."""
    if momentum is None or rule.momentum_of_batch:
        return momentum
    return 1.0 - momentum


def export(state, layout, counters):
    """A state dict under torch's keys as ``layout``'s checkpoint: renamed (nested for Flax), without
    torch's counters, which the other frameworks do not keep."""
    names = LAYOUTS[check_layout(layout)]
    if not names:
        return state
    result = {}
    for name, value in state.items():
        if name in counters:
            continue
        key = names[name]
        if isinstance(key, tuple):
            result.setdefault(key[0], {})[key[1]] = value
        else:
            result[key] = value
    return result


def import_(state_dict, layout, names_wanted, counters):
    """``layout``'s checkpoint as a state dict under torch's keys (unknown keys kept under their own
    names, so a strict load reports them). Counters it lacks are left out."""
    names = LAYOUTS[check_layout(layout)]
    if not names:
        return state_dict
    if not hasattr(state_dict, "items"):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    flat = {}
    for key, value in state_dict.items():
        if isinstance(value, dict):  # Flax's collections
            flat.update({(key, inner): v for inner, v in value.items()})
        else:
            flat[key] = value
    ours = {}
    for name in names_wanted:
        if name in counters:
            continue
        key = names.get(name)
        if key in flat:
            ours[name] = flat.pop(key)
    ours.update({"/".join(k) if isinstance(k, tuple) else k: v for k, v in flat.items()})
    return ours

