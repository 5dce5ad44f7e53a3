"""The training program: a model's graph with its loss and gradients as nodes.

One builder makes it; the :class:`~onnxgrad.trainer.Trainer` plans and runs it,
and :mod:`onnxgrad.convert` writes it (with the optimizer as nodes) into a
standard ONNX model.  No gradient or loss is implemented twice.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from onnxgrad.autodiff import (
    add_training_outputs,
    build_gradients,
    differentiable_ancestors,
    prune,
    rename_gradients,
    requires_grad,
)
from onnxgrad.errors import ModelError, OnnxgradError
from onnxgrad.ir import Graph, Node, ValueInfo
from onnxgrad.losses import Loss, add_loss
from onnxgrad.model import Model, is_weight, trained_by_default
from onnxgrad.precision import AUTOCAST_OPS, autocast, check_precision


@dataclass
class TrainingProgram:
    """Forward pass, loss and gradients of one model as one graph."""

    #: The graph: the model's nodes, the loss, and a ``<param>_grad`` value per parameter.
    graph: Graph
    #: The value the loss reads.
    output: str
    #: The scalar loss.
    loss_value: str
    #: The graph input the loss's target is fed to (None for ``loss=None``).
    target_input: str | None
    #: The trained parameters (initializer names), in graph order.
    trainable: list[str]
    #: Parameter -> the value holding its gradient.
    grads: dict[str, str]
    #: BatchNormalization nodes that run as in inference (``frozen_batchnorm="eval"``).
    inference_nodes: frozenset[str]
    #: "fp32", or the mixed precision the products run in (see :mod:`onnxgrad.precision`).
    precision: str = "fp32"
    #: The Cast nodes that :func:`~onnxgrad.precision.autocast` added to the forward pass.
    autocast_nodes: tuple[str, ...] = ()
    #: With loss scaling, the scalar graph input the backward pass starts from (the loss
    #: scale, fed in the loss's element type each step): every gradient is scaled by it.
    scale_input: str | None = None


def tied_weights(graph: Graph) -> dict[str, tuple[str, bool]]:
    """Floating-point initializers (of more than one element) that repeat another bit for
    bit, as exporters write a tied embedding and output matrix: ``{copy: (the first,
    transposed?)}``, transposed for a 2-D copy that equals the first one's transpose."""
    seen: dict[tuple, str] = {}
    ties: dict[str, tuple[str, bool]] = {}
    for name, value in graph.initializers.items():
        if not is_weight(value) or value.size < 2:
            continue
        key = (value.dtype.str, value.shape, value.tobytes())
        if key in seen:
            ties[name] = (seen[key], False)
            continue
        if value.ndim == 2:
            flipped = (value.dtype.str, value.shape[::-1], np.ascontiguousarray(value.T).tobytes())
            if flipped in seen:
                ties[name] = (seen[flipped], True)
                continue
        seen[key] = name
    return ties


def _tie(graph: Graph, ties: dict[str, tuple[str, bool]]) -> None:
    """Make every reader of a tied copy read the first weight (or its transpose)."""
    taken = graph.all_names()
    for copy, (first, transposed) in ties.items():
        source = first
        if transposed:
            source = graph.unique_name(f"{copy}/tied", taken)
            graph.nodes.insert(0, Node("Transpose", [first], [source], {"perm": [1, 0]},
                                       f"{copy}/Transpose", "", graph.opsets.get("", 13)))
            graph.info[source] = ValueInfo(graph.initializers[copy].dtype,
                                           tuple(graph.initializers[copy].shape))
        for node in graph.nodes:
            node.inputs = [source if x == copy else x for x in node.inputs]
        graph.outputs = [source if x == copy else x for x in graph.outputs]
        del graph.initializers[copy]


def build_program(model: Model, loss: Loss | None, output: str | None = None,
                  trainable: str | Iterable[str] | None = None,
                  frozen_batchnorm: str = "train",
                  ties: dict[str, tuple[str, bool]] | None = None,
                  precision: str = "fp32", scale_loss: bool = False,
                  autocast_ops: frozenset[str] = AUTOCAST_OPS) -> TrainingProgram:
    """The training program of ``model`` for ``loss`` reading ``output`` (default: the
    first graph output), training ``trainable`` (see :func:`select_trainable`); with
    ``ties`` (see :func:`tied_weights`) each tied copy's readers read the first weight,
    which then gets the sum of their gradients.  With ``precision`` "bf16" or "fp16" the
    model's products (the op types ``autocast_ops``) run in that type
    (:func:`onnxgrad.precision.autocast`, applied to the model's nodes before the loss
    and the gradients are added); with
    ``scale_loss`` the backward pass starts from a scalar graph input instead of 1
    (the loss scale, :attr:`TrainingProgram.scale_input`)."""
    graph, where = model.graph, model.where
    if output is None:
        if not graph.outputs:
            raise ModelError(f"{where}: the graph has no outputs; name the value the loss "
                             "reads with output=...")
        output = graph.outputs[0]
    if output not in graph.all_names():
        raise ModelError(f"{where}: output {output!r} is not a value of the graph; "
                         f"graph outputs are {graph.outputs}")
    _check_tensor_output(graph, output, where)
    _check_loss_input(graph, loss, output, where)
    if frozen_batchnorm not in ("train", "eval"):
        raise OnnxgradError(f"frozen_batchnorm must be 'train' or 'eval', got {frozen_batchnorm!r}")
    precision = check_precision(precision)
    train = graph.copy()
    if ties:
        _tie(train, ties)
    casts = autocast(train, precision, autocast_ops)
    add_training_outputs(train)
    loss_value, target_input = add_loss(train, loss, output, train.all_names())
    chosen = select_trainable(train, loss_value, output, trainable, where)
    scale = None
    if scale_loss:
        scale = train.unique_name("loss_scale", train.all_names())
        train.inputs.append(scale)
        train.info[scale] = ValueInfo(train.dtype(loss_value) or np.dtype(np.float32), ())
    grads = build_gradients(train, loss_value, chosen, seed=scale)
    train.outputs = [loss_value]
    grads = rename_gradients(train, grads)
    prune(train, [loss_value, *grads.values()])
    inference = frozen_batchnorms(train, chosen) if frozen_batchnorm == "eval" else frozenset()
    live = {n.name for n in train.nodes}
    return TrainingProgram(train, output, loss_value, target_input, chosen, grads, inference,
                           precision, tuple(c for c in casts if c in live), scale)


#: Loss -> ops whose output that loss should not read (it applies them itself).
_APPLIED_BY_LOSS = {"cross_entropy": ("Softmax", "LogSoftmax"), "bce_with_logits": ("Sigmoid",),
                    "nll": ("Softmax",)}


def _check_loss_input(graph: Graph, loss: Loss | None, output: str, where: str) -> None:
    """Warn when ``loss`` reads the output of an op it applies itself (cross-entropy on
    probabilities, say): the gradient is that of a different, flatter loss."""
    if loss is None:
        return
    producer = next((n for n in graph.nodes if output in n.outputs), None)
    if producer is None or producer.op_type not in _APPLIED_BY_LOSS.get(loss.name, ()):
        return
    warnings.warn(f"{where}: loss {loss.name!r} reads {output!r}, the output of "
                  f"{producer.op_type} node {producer.name!r}; the loss applies "
                  f"{'log-softmax' if loss.name != 'bce_with_logits' else 'the sigmoid'} itself, "
                  f"so give it that node's input: output={producer.inputs[0]!r}",
                  LossInputWarning, stacklevel=3)


def _check_tensor_output(graph: Graph, output: str, where: str) -> None:
    """Refuse a map, or a sequence of maps (ZipMap's output), as the value a loss reads."""
    info = graph.info.get(output)
    inner = info.element if info is not None and info.kind == "sequence" else info
    if inner is None or inner.kind != "map":
        return
    producer = next((n for n in graph.nodes if output in n.outputs), None)
    made = "" if producer is None else f" (made by {producer.op_type} node {producer.name!r})"
    hint = ""
    if producer is not None and producer.op_type == "ZipMap" and producer.inputs[0]:
        hint = (f"; train on the tensor the ZipMap reads: output={producer.inputs[0]!r} "
                "(or on the scores before it)")
    raise ModelError(f"{where}: output {output!r} is a {info.type_str()}{made}, not a tensor; "
                     f"a loss reads a tensor and no gradient flows through maps{hint}")


class LossInputWarning(UserWarning):
    """A built-in loss reads a value that already went through the function it applies."""


def select_trainable(graph: Graph, loss_value: str, output: str,
                     trainable: str | Iterable[str] | None, where: str) -> list[str]:
    """The trained parameters: with ``trainable=None`` every floating-point initializer
    of more than one element with a gradient path to the loss; else the weights that
    the names and glob patterns of ``trainable`` match."""
    weights = [k for k, v in graph.initializers.items() if is_weight(v)]
    reach = differentiable_ancestors(graph, loss_value)
    if trainable is None:
        chosen = [w for w in weights if w in reach and trained_by_default(graph.initializers[w])]
    else:
        patterns = [trainable] if isinstance(trainable, str) else list(trainable)
        chosen = []
        for pattern in patterns:
            matched = [k for k in graph.initializers if fnmatch.fnmatchcase(k, pattern)]
            if not matched:
                raise ModelError(f"{where}: trainable pattern {pattern!r} matches no "
                                 f"initializer; initializers are {_preview(graph.initializers)}")
            usable = [k for k in matched if is_weight(graph.initializers[k]) and k in reach]
            if not usable:
                raise ModelError(
                    f"{where}: trainable pattern {pattern!r} matches {_preview(matched)}, but "
                    f"none is a floating-point weight with a gradient path to the loss")
            chosen.extend(k for k in usable if k not in chosen)
    if not chosen:
        raise ModelError(f"{where}: no weight has a gradient path from {output!r} "
                         "to the loss; nothing to train")
    return chosen


def frozen_batchnorms(graph: Graph, trainable: Iterable[str]) -> frozenset[str]:
    """BatchNormalization nodes with untrained scale and bias that no trained weight feeds."""
    fed = requires_grad(graph, trainable)
    return frozenset(
        n.name for n in graph.nodes
        if n.op_type == "BatchNormalization" and n.domain == ""
        and not any(x in fed for x in n.inputs[:3] if x))


def updated_statistics(graph: Graph, inference_nodes: frozenset[str] = frozenset()) -> list[str]:
    """The running statistics that training steps update (BatchNormalization's)."""
    found: list[str] = []
    for node in graph.nodes:
        if (node.op_type == "BatchNormalization" and node.domain == ""
                and node.name not in inference_nodes):
            found += [name for name in node.inputs[3:5] if name and name not in found]
    return found


def _preview(names, limit: int = 8) -> str:
    names = list(names)
    more = f" … ({len(names) - limit} more)" if len(names) > limit else ""
    return "[" + ", ".join(repr(n) for n in names[:limit]) + more + "]"
