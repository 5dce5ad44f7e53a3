"""Dropout: active in training runs, the identity in inference.

In a training run (``ctx.training``), or where the opset-12 ``training_mode``
input is true, each element is kept with probability ``1 - ratio`` and kept
values are scaled by ``1 / (1 - ratio)``, as in PyTorch.  The mask comes from
``ctx.uniform``, the run's seeded generator (on a GPU one whose position lives in
device memory, so that recorded steps draw new masks), so a Trainer made with a
seed draws the same masks; the ``seed`` attribute is not used (it would draw the
same mask at every step).

The node is declared with ``train_outputs=2``: training graphs always carry
the mask, and the gradient is ``dY * mask / (1 - ratio)`` (private
``onnxgrad::DropoutGrad``).  The mask is bool from opset 10 on, of the data's
type before.
"""

from __future__ import annotations

from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op


def _active(ctx, training_mode):
    return bool(ctx.training) or (training_mode is not None and bool(training_mode))


def _dropout(xp, data, ratio, active, ctx, bool_mask):
    ratio = float(ratio)
    if not 0 <= ratio <= 1:
        raise ValueError(f"Dropout ratio must lie in [0, 1], got {ratio}")
    if not active or ratio == 0:
        mask = xp.ones(data.shape, dtype=bool)
        out = data
    elif ratio == 1:
        mask = xp.zeros(data.shape, dtype=bool)
        out = xp.zeros_like(data)
    else:
        dtype = xp.float32 if data.dtype.itemsize <= 4 else xp.float64
        mask = ctx.uniform(data.shape, dtype) >= ratio
        out = data * mask.astype(data.dtype) * data.dtype.type(1 / (1 - ratio))
    return xp.asarray(out), (mask if bool_mask else mask.astype(data.dtype))


def _scale(ratio, active):
    ratio = float(ratio)
    return 1 / (1 - ratio) if active and 0 < ratio < 1 else 1.0


@op("Dropout", since=1, differentiable=("data",), train_outputs=2)
def Dropout(xp, data, *, consumed_inputs=None, is_test=0, ratio=0.5, ctx):
    return _dropout(xp, data, ratio, _active(ctx, None), ctx, bool_mask=False)


@op("Dropout", since=10, differentiable=("data",), train_outputs=2)
def Dropout10(xp, data, *, ratio=0.5, ctx):
    return _dropout(xp, data, ratio, _active(ctx, None), ctx, bool_mask=True)


@op("Dropout", since=12, differentiable=("data",), host_inputs=("ratio", "training_mode"),
    train_outputs=2)
def Dropout12(xp, data, ratio=None, training_mode=None, *, seed=None, ctx):
    ratio = 0.5 if ratio is None else ratio
    return _dropout(xp, data, ratio, _active(ctx, training_mode), ctx, bool_mask=True)


def _attr_rule(g, node, dY, dmask=None):
    return (g.private("DropoutGrad", dY, node.outputs[1], ratio=node.attrs["ratio"]),)


Dropout.gradient(_attr_rule)
Dropout10.gradient(_attr_rule)


@Dropout12.gradient
def _(g, node, dY, dmask=None):
    ins = list(node.inputs) + ["", ""]
    grad = g.private("DropoutGrad", dY, node.outputs[1], ins[1] or None, ins[2] or None)
    return (grad,) + (None,) * (len(node.inputs) - 1)


@op("DropoutGrad", domain="onnxgrad", host_inputs=("ratio_input", "training_mode"))
def DropoutGrad(xp, dY, mask, ratio_input=None, training_mode=None, *, ratio=0.5, ctx):
    """``dY * mask / (1 - ratio)`` where the forward node was active, else ``dY``."""
    if ratio_input is not None:
        ratio = ratio_input
    scale = _scale(ratio, _active(ctx, training_mode))
    dX = dY * mask.astype(dY.dtype)
    if scale != 1.0:
        dX *= dY.dtype.type(scale)
    return (xp.asarray(dX),)


@DropoutGrad.in_standard_ops
def _(g, node):
    # In a step model the forward Dropout trains (see onnxgrad.convert); its ratio must
    # be a constant here.
    dY, mask, *rest = node.inputs
    ratio = node.attrs.get("ratio", 0.5)
    if rest and rest[0]:
        if rest[0] not in g.graph.initializers:
            return None
        ratio = float(g.graph.initializers[rest[0]])
    dX = g.Mul(dY, std.cast_like(g, mask, dY))
    scale = _scale(ratio, True)
    return (g.Mul(dX, std.like(g, scale, dY)) if scale != 1.0 else dX,)
