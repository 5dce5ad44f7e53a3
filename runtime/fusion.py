"""Steps of a CPU plan merged so that a pass over memory does several ops' work.

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
runs the activation's own kernel.

Transformers exported by torch.onnx before opset 20 write GELU as five nodes,
Mul(Mul(x, Add(Erf(Div(x, √2)), 1)), 0.5), whose gradient the rules make of
nine; each chain runs as one step, and its gradient as another
(:func:`onnxgrad.ops.nonlinear.gelu_erf_forward` and ``gelu_erf_grad``), with
the nodes' operations in the nodes' order.

The training program is unchanged (the merge is the plan's), so ``convert``,
the profile's graph and exported models see the ops as they are.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

#: Whether CPU plans merge steps (BatchNormalization with its activation, GELU's
#: chain; tests and benchmarks switch it off to compare).
ENABLED = True

_STANDARD = ("", "ai.onnx")


def fuse_activations(steps: list, definitions: list, keep: set[str],
                     scalars: frozenset[str] = frozenset()) -> tuple[list, list]:
    """``steps`` (with their op ``definitions``) with each BatchNormalization whose
    output only a Relu or Clip reads merged with it, and where the gradient of that
    activation only feeds the node's BatchNormalizationGrad, the two gradient steps
    merged too; and likewise GELU's chain as exporters write it, and its gradient.
    ``keep``: values the plan returns, which stay as they are; ``scalars``: weights
    that hold one number (no axes), read in the run.  A merged step's definition is
    None (its kernel takes no storage of its inputs)."""
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
        merge = (_merge_normalization(steps, index, readers, made, keep, names)
                 or _merge_gelu(steps, index, readers, made, keep, scalars, names))
        if merge is not None and not set(merge) & set(replaced):
            replaced.update(merge)
    if not replaced:
        return steps, definitions
    kept = [(replaced[i], None) if i in replaced else (step, definition)
            for i, (step, definition) in enumerate(zip(steps, definitions))
            if replaced.get(i, step) is not None]
    return [step for step, _ in kept], [definition for _, definition in kept]


def _merge_normalization(steps, index, readers, made, keep, names) -> dict[int, Any] | None:
    """The steps that replace (a new step) or disappear (None) when the step at
    ``index`` takes the activation after it; None where it cannot.  ``readers``:
    the steps that read each value; ``made``: the step that computes it."""
    from onnxgrad.executor import device_args  # noqa: PLC0415 - the executor imports this module
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
                             donors=(), device_args=device_args(args, bn.host_args)),
              forward[0]: None}
    if chain is not None:
        grad_index, bn_grad_index = chain
        grad, bn_grad = steps[grad_index], steps[bn_grad_index]
        args = [grad.args[0], z if relu else mask] + list(bn_grad.args[1:])
        host = tuple(i + 1 for i in bn_grad.host_args)
        merged[bn_grad_index] = replace(
            bn_grad, node=replace(bn_grad.node, op_type=f"{bn_grad.node.op_type}+{grad.node.op_type}"),
            kernel=normalization.fused_grad(2 if relu else 1), args=args, host_args=host,
            device_args=device_args(args, host), free=(), donors=())
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


# -- GELU as torch.onnx writes it ----------------------------------------------------------


def _merge_gelu(steps, index, readers, made, keep, scalars, names) -> dict[int, Any] | None:
    """Where the step at ``index`` starts Mul(Mul(x, Add(Erf(Div(x, c1)), c2)), c3)
    (scalar constants; onnxgrad.ops.nonlinear.gelu_erf_forward), the chain as one
    step, and where its gradient is the steps the gradient rules make, read by
    nothing else, those as one step too; None where it is not so."""
    from onnxgrad.executor import device_args  # noqa: PLC0415 - the executor imports this module
    from onnxgrad.ops import nonlinear  # noqa: PLC0415

    div = steps[index]
    if not _op(div, "Div") or len(div.args) != 2 or type(div.args[0]) is not str:
        return None
    x, d, c1 = div.args[0], div.outputs[0], _scalar(div.args[1], scalars)
    erf = _sole_reader(steps, readers, d, "Erf", besides="ErfGrad")
    if c1 is None or erf is None:
        return None
    e = steps[erf].outputs[0]
    add = _sole_reader(steps, readers, e, "Add")
    c2 = None if add is None else _scalar(_other(steps[add], e), scalars)
    if c2 is None:
        return None
    a = steps[add].outputs[0]
    muls = [j for j in readers.get(a, ()) if _op(steps[j], "Mul") and _other(steps[j], a) == x]
    if len(muls) != 1:
        return None
    m = steps[muls[0]].outputs[0]
    last = _sole_reader(steps, readers, m, "Mul")
    c3 = None if last is None else _scalar(_other(steps[last], m), scalars)
    if c3 is None or any(v in keep for v in (d, e, a, m)):
        return None
    chain = [index, erf, add, muls[0], last]
    grad = _gelu_gradient(steps, readers, made, keep, scalars, x, d, a, c1, c3, chain)
    if grad is None and any(j not in chain for v in (d, a) for j in readers.get(v, ())):
        return None  # d or a read by steps that are not the chain's gradient
    y = steps[last].outputs[0]
    q = _fresh(f"{d}/negated_square", names) if grad is not None else None
    outputs = ([q, a] if grad is not None else []) + [y]
    merged = {i: None for i in chain}
    merged[index] = replace(
        steps[last], node=replace(steps[last].node, op_type="Gelu(Div,Erf,Add,Mul,Mul)",
                                  outputs=outputs),
        kernel=nonlinear.gelu_erf_forward(grad is not None), attrs={},
        args=[x, c1, c2, c3], host_args=(), device_args=device_args([x, c1, c2, c3]),
        outputs=outputs, free=(), donors=())
    if grad is not None:
        total, drop, g = grad
        dx = steps[total].outputs[0]
        merged.update({i: None for i in drop})
        merged[total] = replace(
            steps[total], node=replace(steps[total].node, outputs=[dx],
                                       op_type="GeluGrad(Div,Erf,Add,Mul,Mul)"),
            kernel=nonlinear.gelu_erf_grad, attrs={}, args=[g, x, q, a, c1, c3], host_args=(),
            device_args=device_args([g, x, q, a, c1, c3]),
            outputs=[dx], free=(), donors=())
    return merged


def _gelu_gradient(steps, readers, made, keep, scalars, x, d, a, c1, c3, chain):
    """The chain's gradient steps as the rules of Mul, Add, Erf and Div make them:
    ``g1 = Mul(g, c3)``, ``Mul(g1, a)``, ``Mul(g1, x)``, ``ErfGrad(…, d)``, ``Div(…, c1)``
    and the ``Sum`` of the two contributions to x, with SumToShape steps between
    them (identities: every constant is a scalar); each value read by the next step
    alone.  Returns (the Sum's index, the other steps' indices, g), or None."""
    b1 = [j for j in readers.get(a, ()) if j not in chain]
    if len(b1) != 1 or not _op(steps[b1[0]], "Mul"):
        return None
    b1 = b1[0]
    g1 = _other(steps[b1], a)
    b2 = [j for j in readers.get(g1, ()) if j != b1]
    if len(b2) != 1 or not _op(steps[b2[0]], "Mul") or _other(steps[b2[0]], g1) != x:
        return None
    b2 = b2[0]
    de, s2 = _through_identity(steps, readers, steps[b2].outputs[0])
    eg = _sole_reader(steps, readers, de, "ErfGrad", domain="onnxgrad")
    if eg is None or steps[eg].args != [de, d]:
        return None
    dv = _sole_reader(steps, readers, steps[eg].outputs[0], "Div")
    if (dv is None or steps[dv].args[0] != steps[eg].outputs[0]
            or not _same(_scalar(steps[dv].args[1], scalars), c1)):
        return None
    dx2, s3 = _through_identity(steps, readers, steps[dv].outputs[0])
    dx1 = steps[b1].outputs[0]
    total = _sole_reader(steps, readers, dx2, "Sum")
    if (total is None or sorted(steps[total].args) != sorted([dx1, dx2])
            or readers.get(dx1) != [total]):
        return None
    s1 = made.get(g1)
    if s1 is not None and _op(steps[s1], "SumToShape", "onnxgrad"):
        source = steps[s1].args[0]
        if readers.get(source) != [s1]:
            return None
    else:
        s1, source = None, g1
    mul = made.get(source)
    if mul is None or not _op(steps[mul], "Mul") or len(steps[mul].args) != 2:
        return None
    g = next((v for v in steps[mul].args if not _same(v, c3)), None)
    if g is None or type(g) is not str or not _same(_scalar(_other(steps[mul], g), scalars), c3):
        return None
    drop = [mul, b1, b2, eg, dv] + [i for i in (s1, s2, s3) if i is not None]
    if any(o in keep for i in drop for o in steps[i].outputs):
        return None
    return total, drop, g


def _op(step, op_type: str, domain: str = "") -> bool:
    return step.node.op_type == op_type and step.node.domain in (
        (domain,) if domain else _STANDARD)


def _scalar(arg, scalars):
    """``arg`` where it is a scalar (no axes): a bound constant, or one of ``scalars``
    (weights of one number); else None."""
    if type(arg) is str:
        return arg if arg in scalars else None
    value = getattr(arg, "value", None)
    return arg if value is not None and getattr(value, "ndim", None) == 0 else None


def _same(a, b) -> bool:
    """Whether two scalar arguments are the same value (the same weight, or bound
    constants that hold the same number)."""
    if a is None or b is None or type(a) is str or type(b) is str:
        return a is not None and a == b
    return a.value.item() == b.value.item()


def _other(step, value):
    """The other argument of a step of two arguments, one of them ``value``."""
    if len(step.args) != 2 or value not in step.args:
        return None
    return step.args[1] if step.args[0] == value else step.args[0]


def _sole_reader(steps, readers, value, op_type, domain="", besides=None):
    """The step of ``op_type`` that reads ``value``, where no other step does (but steps
    of ``besides``, an onnxgrad op); else None."""
    users = [j for j in readers.get(value, ())
             if besides is None or not _op(steps[j], besides, "onnxgrad")]
    if len(users) != 1 or not _op(steps[users[0]], op_type, domain):
        return None
    return users[0]


def _through_identity(steps, readers, value):
    """``value``, or the output of the SumToShape that alone reads it, and that step's
    index (None where there is none)."""
    users = readers.get(value, ())
    if len(users) == 1 and _op(steps[users[0]], "SumToShape", "onnxgrad") \
            and steps[users[0]].args[0] == value:
        return steps[users[0]].outputs[0], users[0]
    return value, None
