"""Steps of a CPU plan merged so that a pass over memory does two ops' work.

A CNN normalises and then activates: BatchNormalization, then Relu or Clip
(ReLU6), and in the backward pass ReluGrad or ClipGrad, then
BatchNormalizationGrad.  Run as they are, each activation reads and writes
every value once more, and ClipGrad reads BatchNormalization's output, which
must then be kept from the forward pass to the backward one.

Where nothing else reads the normalised values, :func:`fuse_activations`
makes the BatchNormalization step apply the activation in its own pass (and,
for Clip, keep a one-byte mask of where its gradient passes in place of the
normalised values), and the BatchNormalizationGrad step take the gradient
back through the activation in its passes
(:func:`onnxgrad.ops.normalization.fused_forward` and ``fused_grad``).  The
results are those of the steps run one by one, bit for bit: the compiled
kernels apply the same operations in the same order, and every other path
runs the activation's own kernel.  The training program is unchanged (the
merge is the plan's), so ``convert``, the profile's graph and exported models
see the ops as they are.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

#: Whether CPU plans merge activations into BatchNormalization (tests and
#: benchmarks switch it off to compare).
ENABLED = True

_STANDARD = ("", "ai.onnx")


def fuse_activations(steps: list, definitions: list, keep: set[str]) -> tuple[list, list]:
    """``steps`` (with their op ``definitions``) with each BatchNormalization whose
    output only a Relu or Clip reads merged with it, and where the gradient of that
    activation only feeds the node's BatchNormalizationGrad, the two gradient steps
    merged too.  ``keep``: values the plan returns, which stay as they are."""
    if not ENABLED:
        return steps, definitions
    readers: dict[str, list[int]] = {}
    made: dict[str, int] = {}
    for index, step in enumerate(steps):
        for a in step.args:
            if type(a) is str:
                readers.setdefault(a, []).append(index)
        made.update((o, index) for o in step.outputs if o)
    names = set(made) | set(readers)
    replaced: dict[int, Any] = {}  # index -> the step in its place, or None
    for index, step in enumerate(steps):
        merge = _merge(steps, index, readers, made, keep, names)
        if merge is not None:
            replaced.update(merge)
    if not replaced:
        return steps, definitions
    kept = [(replaced.get(i, step), definition)
            for i, (step, definition) in enumerate(zip(steps, definitions))
            if replaced.get(i, step) is not None]
    return [step for step, _ in kept], [definition for _, definition in kept]


def _merge(steps, index, readers, made, keep, names) -> dict[int, Any] | None:
    """The steps that replace (a new step) or disappear (None) when the step at
    ``index`` takes the activation after it; None where it cannot.  ``readers``:
    the steps that read each value; ``made``: the step that computes it."""
    from onnxgrad.ops import normalization  # noqa: PLC0415

    bn = steps[index]
    if bn.node.op_type != "BatchNormalization" or bn.node.domain not in _STANDARD:
        return None
    y = bn.outputs[0] if bn.outputs else ""
    if not y or y in keep:
        return None
    forward = [j for j in readers.get(y, ()) if _is_activation(steps[j], y)]
    if len(forward) != 1:
        return None
    act = steps[forward[0]]
    bounds = _bounds(act)
    if all(getattr(b, "value", "") is None for b in bounds):
        return None  # a Clip without bounds copies; its gradient passes even NaN positions
    if any(type(b) is str and made.get(b, -1) > index for b in bounds):
        return None  # a bound computed after the normalisation
    z = act.outputs[0]
    relu = act.node.op_type == "Relu"
    others = [j for j in readers.get(y, ()) if j != forward[0]]
    if relu and others:
        return None
    # The gradient steps: ClipGrad reads y, ReluGrad reads z; each feeds this node's
    # BatchNormalizationGrad alone.
    grads = [j for j in (readers.get(z, ()) if relu else others)
             if steps[j].node.op_type == ("ReluGrad" if relu else "ClipGrad")
             and steps[j].args[1] == (z if relu else y)]
    if not relu and len(grads) != len(others):
        return None  # y read by a step that would lose it
    chain = _gradient_chain(steps, grads, readers, keep, bn.node.name) if len(grads) == 1 else None
    if not relu and grads and chain is None:
        return None
    keep_mask = chain is not None and not relu
    mask = _fresh(f"{y}/clip_mask", names) if keep_mask else None
    opset14 = "training_mode" in bn.attrs  # the form of opset 14 on
    outputs = [z] + list(bn.outputs[1:]) + ([mask] if keep_mask else [])
    node = replace(bn.node, op_type=f"{bn.node.op_type}+{act.node.op_type}", outputs=outputs)
    kernel = normalization.fused_forward(act.node.op_type, keep_mask, opset14)
    args = list(bn.args) + bounds
    merged = {index: replace(bn, node=node, kernel=kernel, args=args, outputs=outputs, free=(),
                             donors=(), device_args=tuple(
                                 i for i, a in enumerate(args) if type(a) is str and i not in bn.host_args)),
              forward[0]: None}
    if chain is not None:
        grad_index, bn_grad_index = chain
        grad, bn_grad = steps[grad_index], steps[bn_grad_index]
        args = [grad.args[0], z if relu else mask] + list(bn_grad.args[1:])
        host = tuple(i + 1 for i in bn_grad.host_args)
        merged[bn_grad_index] = replace(
            bn_grad, node=replace(bn_grad.node, op_type=f"{bn_grad.node.op_type}+{grad.node.op_type}"),
            kernel=normalization.fused_grad(2 if relu else 1), args=args, host_args=host,
            device_args=tuple(i for i, a in enumerate(args) if type(a) is str and i not in host),
            free=(), donors=())
        merged[grad_index] = None
    return merged


def _is_activation(step, y: str) -> bool:
    return (step.node.op_type in ("Relu", "Clip") and step.node.domain in _STANDARD
            and step.args and step.args[0] == y and len(step.outputs) == 1 and step.outputs[0] != "")


def _bounds(step) -> list:
    """The arguments that give the merged step Relu's or Clip's bounds: Clip's own
    inputs (opset 11 on), else constants (absent: None)."""
    from onnxgrad.executor import _Bound  # noqa: PLC0415 - the executor imports this module

    if step.node.op_type == "Relu":
        return [_Bound(0.0), _Bound(None)]
    if step.node.opset < 11:
        return [_Bound(step.attrs["min"]), _Bound(step.attrs["max"])]
    return (list(step.args[1:3]) + [_Bound(None), _Bound(None)])[:2]


def _gradient_chain(steps, grads, readers, keep, forward_node) -> tuple[int, int] | None:
    """The indices of the activation's gradient step and of the node's
    BatchNormalizationGrad, where the one's output feeds only the other."""
    grad = steps[grads[0]]
    dz = grad.outputs[0] if grad.outputs else ""
    users = readers.get(dz, ())
    if not dz or dz in keep or len(users) != 1:
        return None
    bn_grad = steps[users[0]]
    if (bn_grad.node.op_type != "BatchNormalizationGrad" or bn_grad.args[0] != dz
            or bn_grad.attrs.get("forward_node") != forward_node or dz in bn_grad.args[1:]):
        return None
    return grads[0], users[0]


def _fresh(name: str, names: set[str]) -> str:
    while name in names:
        name += "_"
    names.add(name)
    return name
