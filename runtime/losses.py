"""Losses: nodes appended to a training graph after the value they read.

Each loss reads one value of the graph (``output``) and a target fed at run
time, and produces a scalar.  They are ordinary nodes with gradient rules, so
the gradient builder treats them like any other part of the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxgrad.autodiff import BUILDER_OPSET, PRIVATE_DOMAIN, PRIVATE_OPSET
from onnxgrad.errors import ModelError
from onnxgrad.ir import Graph, Node, ValueInfo


@dataclass(frozen=True)
class LossSpec:
    name: str
    #: "class": integer class indices over axis 1 of the output;
    #: "same": a float tensor with the output's shape.
    target: str
    doc: str


LOSSES = {
    "cross_entropy": LossSpec("cross_entropy", "class",
                              "softmax cross-entropy of logits N×C (or N×C×d…) with int64 class "
                              "targets N (or N×d…), averaged"),
    "nll": LossSpec("nll", "class",
                    "negative log-likelihood of log-probabilities N×C (or N×C×d…) with int64 "
                    "class targets, averaged"),
    "mse": LossSpec("mse", "same", "mean squared error against a target of the output's shape"),
    "l1": LossSpec("l1", "same", "mean absolute error against a target of the output's shape"),
    "bce_with_logits": LossSpec("bce_with_logits", "same",
                                "binary cross-entropy of logits against targets in [0, 1], "
                                "averaged"),
}


def loss_spec(kind: str) -> LossSpec:
    if kind not in LOSSES:
        raise ModelError(f"unknown loss {kind!r}; expected one of {sorted(LOSSES)} or None")
    return LOSSES[kind]


def add_loss(graph: Graph, kind: str | None, output: str, taken: set[str]) -> tuple[str, str | None]:
    """Append the nodes of loss ``kind`` reading ``output``; returns (loss value, target input).

    With ``kind=None`` the output itself is the loss and must be a scalar;
    no target input is added.
    """
    if kind is None:
        shape = graph.shape(output)
        if shape is not None and any(d != 1 for d in shape):
            raise ModelError(f"loss=None needs {output!r} to be a scalar loss; its shape is "
                             f"{list(shape)}")
        return output, None
    spec = loss_spec(kind)
    out_dtype = graph.dtype(output)
    if out_dtype is not None and not np.issubdtype(out_dtype, np.floating):
        raise ModelError(f"loss {kind!r} reads {output!r}, which has element type {out_dtype}; "
                         "expected a floating-point value")
    target = graph.unique_name("target", taken)
    graph.inputs.append(target)
    target_dtype = np.dtype(np.int64) if spec.target == "class" else out_dtype
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

    if kind == "cross_entropy":
        loss, _ = emit("SoftmaxCrossEntropyLoss", [output, target], n_out=2, reduction="mean")
    elif kind == "nll":
        loss = emit("NegativeLogLikelihoodLoss", [output, target], reduction="mean")
    elif kind == "mse":
        diff = emit("Sub", [output, target])
        loss = emit("ReduceMean", [emit("Mul", [diff, diff])], keepdims=0)
    elif kind == "l1":
        loss = emit("ReduceMean", [emit("Abs", [emit("Sub", [output, target])])], keepdims=0)
    else:  # bce_with_logits
        loss = emit("BinaryCrossEntropyWithLogits", [output, target], domain=PRIVATE_DOMAIN)
    graph.info[loss] = ValueInfo(out_dtype, ())
    return loss, target
