"""Losses: nodes appended to a training graph after the value they read.

Each loss reads one value of the graph (``output``) and a target fed at run
time, and produces a scalar.  They are ordinary nodes with gradient rules, so
the gradient builder treats them like any other part of the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from onnxgrad.autodiff import BUILDER_OPSET, PRIVATE_DOMAIN, PRIVATE_OPSET
from onnxgrad.errors import ModelError
from onnxgrad.ir import Graph, Node, ValueInfo


@dataclass(frozen=True)
class Loss:
    """A loss that reads one value of the graph and a target fed at run time."""

    #: The name ``Trainer(loss=...)`` and the command line use.
    name: ClassVar[str] = ""
    #: "class": integer class indices; "same": a float tensor of the output's shape.
    target: ClassVar[str] = "same"
    doc: ClassVar[str] = ""

    def class_axis_of(self, rank: int | None) -> int:  # pragma: no cover - class losses only
        raise NotImplementedError


@dataclass(frozen=True)
class CrossEntropy(Loss):
    """Softmax cross-entropy of logits with integer class targets, averaged.

    The classes lie on ``class_axis`` of the output (1 for N×C or N×C×d…;
    -1 for a language model's N×T×V).  ``weight`` gives one weight per class;
    targets equal to ``ignore_index`` count for nothing, as in PyTorch.
    """

    weight: tuple[float, ...] | None = None
    ignore_index: int | None = None
    class_axis: int = 1
    name: ClassVar[str] = "cross_entropy"
    target: ClassVar[str] = "class"
    doc: ClassVar[str] = ("softmax cross-entropy of logits N×C (or N×C×d…, or classes on "
                          "class_axis) with int64 class targets, averaged")
    op_type: ClassVar[str] = "SoftmaxCrossEntropyLoss"

    def class_axis_of(self, rank: int | None) -> int:
        axis = self.class_axis
        if axis < 0:
            if rank is None:
                raise ModelError(f"loss {self.name!r}: class_axis={axis} needs the output's rank, "
                                 "which shape inference did not find")
            axis += rank
        if rank is not None and not 0 < axis < rank:
            raise ModelError(f"loss {self.name!r}: class_axis={self.class_axis} does not fit an "
                             f"output of rank {rank}; the classes lie on an axis from 1 to "
                             f"{rank - 1} (or -1 for the last)")
        return axis


@dataclass(frozen=True)
class NLL(CrossEntropy):
    """Negative log-likelihood of log-probabilities with integer class targets."""

    name: ClassVar[str] = "nll"
    doc: ClassVar[str] = ("negative log-likelihood of log-probabilities N×C (or N×C×d…) with "
                          "int64 class targets, averaged")
    op_type: ClassVar[str] = "NegativeLogLikelihoodLoss"


@dataclass(frozen=True)
class MSE(Loss):
    name: ClassVar[str] = "mse"
    doc: ClassVar[str] = "mean squared error against a target of the output's shape"


@dataclass(frozen=True)
class L1(Loss):
    name: ClassVar[str] = "l1"
    doc: ClassVar[str] = "mean absolute error against a target of the output's shape"


@dataclass(frozen=True)
class BCEWithLogits(Loss):
    name: ClassVar[str] = "bce_with_logits"
    doc: ClassVar[str] = "binary cross-entropy of logits against targets in [0, 1], averaged"


LOSSES: dict[str, type[Loss]] = {cls.name: cls for cls in (CrossEntropy, NLL, MSE, L1, BCEWithLogits)}


def resolve_loss(loss: "str | Loss | None") -> Loss | None:
    """A Loss instance for a name, an instance, or None."""
    if loss is None or isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss in LOSSES:
        return LOSSES[loss]()
    raise ModelError(f"unknown loss {loss!r}; expected one of {sorted(LOSSES)} or None")


def add_loss(graph: Graph, loss: Loss | None, output: str, taken: set[str]) -> tuple[str, str | None]:
    """Append the nodes of ``loss`` reading ``output``; returns (loss value, target input).

    With ``loss=None`` the output itself is the loss and must be a scalar;
    no target input is added.
    """
    if loss is None:
        shape = graph.shape(output)
        if shape is not None and any(d != 1 for d in shape):
            raise ModelError(f"loss=None needs {output!r} to be a scalar loss; its shape is "
                             f"{list(shape)}")
        return output, None
    out_dtype = graph.dtype(output)
    if out_dtype is not None and not np.issubdtype(out_dtype, np.floating):
        raise ModelError(f"loss {loss.name!r} reads {output!r}, which has element type {out_dtype}; "
                         "expected a floating-point value")
    target = graph.unique_name("target", taken)
    graph.inputs.append(target)
    target_dtype = np.dtype(np.int64) if loss.target == "class" else out_dtype
    graph.info[target] = ValueInfo(target_dtype, None)

    def emit(op_type, inputs, n_out=1, domain="", **attrs):
        name = graph.unique_name(f"loss/{op_type}", taken)
        outs = [graph.unique_name(f"{name}_out{i}" if n_out > 1 else f"{name}_out", taken)
                for i in range(n_out)]
        opset = PRIVATE_OPSET if domain == PRIVATE_DOMAIN else BUILDER_OPSET
        graph.nodes.append(Node(op_type, list(inputs), outs, attrs, name, domain, opset))
        for o in outs:
            graph.info[o] = ValueInfo(out_dtype, None)
        return outs if n_out > 1 else outs[0]

    if isinstance(loss, CrossEntropy):
        shape = graph.shape(output)
        rank = None if shape is None else len(shape)
        axis = loss.class_axis_of(rank)
        scores = output
        if axis != 1:  # move the classes to axis 1, where ONNX's loss ops expect them
            if rank is None:
                raise ModelError(f"loss {loss.name!r}: class_axis={loss.class_axis} needs the "
                                 f"rank of {output!r}, which is unknown")
            perm = [0, axis] + [d for d in range(1, rank) if d != axis]
            scores = emit("Transpose", [output], perm=perm)
        inputs = [scores, target]
        if loss.weight is not None:
            wname = graph.unique_name("loss/class_weight", taken)
            graph.initializers[wname] = np.asarray(loss.weight, dtype=out_dtype or np.float32)
            inputs.append(wname)
        attrs = {"reduction": "mean"}
        if loss.ignore_index is not None:
            attrs["ignore_index"] = int(loss.ignore_index)
        n_out = 2 if loss.op_type == "SoftmaxCrossEntropyLoss" else 1
        result = emit(loss.op_type, inputs, n_out=n_out, **attrs)
        value = result[0] if n_out == 2 else result
    elif isinstance(loss, MSE):
        diff = emit("Sub", [output, target])
        value = emit("ReduceMean", [emit("Mul", [diff, diff])], keepdims=0)
    elif isinstance(loss, L1):
        value = emit("ReduceMean", [emit("Abs", [emit("Sub", [output, target])])], keepdims=0)
    elif isinstance(loss, BCEWithLogits):
        value = emit("BinaryCrossEntropyWithLogits", [output, target], domain=PRIVATE_DOMAIN)
    else:
        raise ModelError(f"unsupported loss {loss!r}")
    graph.info[value] = ValueInfo(out_dtype, ())
    return value, target
