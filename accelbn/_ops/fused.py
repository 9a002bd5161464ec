"""Batch norm fused with the ReLU that follows it, and with a residual added before that ReLU (a
ResNet block's ``relu(bn(x) + z)``), forward and backward, as cuDNN fuses them: one pass writes y,
and the backward needs nothing the forward's inputs and statistics do not already hold.

The backward recomputes the ReLU's input from x (and z) with the forward's own per-channel numbers,
which the forward saves in float64 for it, so the mask is the forward's bit for bit and no mask or
output is kept. Both go through the batch-norm kernels (``accelbn._ops.batch_norm``), whose element
passes take the ReLU and the residual as an epilogue.
"""

from accelbn._ops import batch_norm as bn


def batch_norm_relu(
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    *,
    residual=None,
    axis=1,
    out=None,
    return_stats=False,
    backend=None,
):
    """``relu(batch_norm(x, ...))``, or ``relu(batch_norm(x, ...) + residual)`` with a residual
    (an array of x's shape and dtype), in one pass over x; exactly the unfused chain's values.

    Arguments and running-statistics updates are :func:`accelbn.batch_norm`'s. ``out`` may be the
    residual itself (computed in place). With ``return_stats=True`` returns ``(y, BatchStats)``,
    whose mean and invstd are float64 whatever x's dtype: :func:`batch_norm_relu_backward`
    recomputes the ReLU's mask from them.
    """
    return bn.forward(x, running_mean, running_var, weight, bias, training, momentum, eps, axis, out, return_stats,
                      True, backend, residual=residual, relu=True, exact_stats=True)


def batch_norm_relu_backward(dy, x, stats, weight=None, bias=None, *, residual=None, training=True, axis=1, out=None,
                             backend=None):
    """Gradients of :func:`batch_norm_relu`: pass the forward's x, ``stats``, weight, bias and
    residual. dy flows where the ReLU's input was positive (as ``torch.relu``'s backward: not where
    it was <= 0), then through batch norm (``training`` as in :func:`accelbn.batch_norm_backward`).

    Returns ``(dx, dweight, dbias)``, or ``(dx, dresidual, dweight, dbias)`` with a residual, where
    dresidual is the masked dy.
    """
    dx, dresidual, dweight, dbias = bn.backward(dy, x, stats, weight, training, axis, out, backend,
                                                relu=True, bias=bias, residual=residual)
    dweight, dbias = bn.gradient_dtype(weight, x, dweight, dbias)
    return (dx, dweight, dbias) if residual is None else (dx, dresidual, dweight, dbias)

