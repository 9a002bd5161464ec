"""``fold_batch_norm``: the weight and bias of a convolution or linear layer with the batch norm that
follows it folded in, for inference, as ``torch.nn.utils.fusion.fuse_conv_bn_weights`` and
``fuse_linear_bn_weights`` compute them (in float64, rounded once to the weights' dtype)."""


import numpy as np

from accelbn._core import checks
from accelbn._core.arrays import device_of, namespace
from accelbn._ops.batch_norm import BatchNorm
from accelbn.backends.formulas import inverse_std

_STATE_KEYS = ("running_mean", "running_var", "weight", "bias")


def _batch_norm_state(bn, eps):
    """(running_mean, running_var, weight, bias, eps) of a BatchNorm layer or a state dict."""
    if isinstance(bn, BatchNorm):
        if bn.running_mean is None:
            raise ValueError("bn has no running statistics (track_running_stats=False): there is nothing to fold")
        return bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps if eps is None else eps
    if not hasattr(bn, "keys"):
        raise TypeError(f"bn must be a BatchNorm or its state dict, got {type(bn).__name__}")
    missing = [k for k in ("running_mean", "running_var") if k not in bn]
    if missing:
        raise KeyError(f"bn must hold running_mean and running_var, missing {missing}")
    values = [bn.get(k) for k in _STATE_KEYS]
    values = [v.detach().cpu().numpy() if hasattr(v, "detach") else v for v in values]  # torch tensors too
    return (*values, 1e-5 if eps is None else eps)


def fold_batch_norm(weight, bias, bn, *, eps=None, transpose=False, groups=1):
    """The ``(weight, bias)`` of a convolution (any rank, any groups) or linear layer followed by the
    batch norm ``bn`` (a :class:`BatchNorm`, or a state dict with ``running_mean``, ``running_var``
    and optionally ``weight`` and ``bias``) in eval mode: ``bn(layer(x)) == folded(x)``.

    ``weight`` has the output channels first (conv: (out, in / groups, *kernel); linear: (out, in)),
    or, with ``transpose=True`` (a transposed convolution), (in, out / groups, *kernel) with
    ``groups`` its groups. ``bias`` may be None. ``eps`` defaults to the layer's (1e-5 for a dict).
    The results have weight's dtype (the bias's, when given)."""
    running_mean, running_var, bn_weight, bn_bias, eps = _batch_norm_state(bn, eps)
    library = checks.array_library(weight, "weight")
    checks.float_array(weight, "weight", library)
    transpose = checks.boolean(transpose, "transpose")
    groups = checks.positive_int(groups, "groups")
    eps = checks.real_number(eps, "eps", minimum=0.0)
    if weight.ndim < 2:
        raise ValueError(f"weight must have at least 2 dimensions (out and in channels), got shape {weight.shape}")
    channels = running_mean.shape[0] if running_mean.ndim == 1 else -1
    outputs = weight.shape[1] * groups if transpose else weight.shape[0]
    if transpose and weight.shape[0] % groups:
        raise ValueError(f"weight's {weight.shape[0]} input channels must be divisible by groups={groups}")
    if channels != outputs:
        raise ValueError(f"bn has {channels} channels but the layer has {outputs} outputs (weight shape {weight.shape})")
    for name, v in (("bias", bias), ("bn weight", bn_weight), ("bn bias", bn_bias), ("running_var", running_var)):
        if v is not None and v.shape != (outputs,):
            raise ValueError(f"{name} must have shape ({outputs},), got {v.shape}")
    with device_of(weight):
        xp = namespace(library)
        as64 = lambda v, fill: xp.full(outputs, fill, np.float64) if v is None else xp.asarray(v, dtype=np.float64)  # noqa: E731
        scale = as64(bn_weight, 1.0) * inverse_std(as64(running_var, 1.0), eps)
        if transpose:
            grouped = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], *weight.shape[2:])
            per_output = scale.reshape(groups, 1, weight.shape[1], *[1] * (weight.ndim - 2))
            folded = (grouped.astype(np.float64) * per_output).reshape(weight.shape)
        else:
            folded = weight.astype(np.float64) * scale.reshape(-1, *[1] * (weight.ndim - 1))
        folded_bias = (as64(bias, 0.0) - as64(running_mean, 0.0)) * scale + as64(bn_bias, 0.0)
        bias_dtype = bias.dtype if bias is not None else weight.dtype
        return folded.astype(weight.dtype), folded_bias.astype(bias_dtype)
