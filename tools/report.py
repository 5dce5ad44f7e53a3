"""What ``onnxgrad inspect`` prints: interface, parameters, ops and their support."""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass

import numpy as np

from onnxgrad.errors import DataError, UnsupportedOpError
from onnxgrad.model import trained_by_default


def fmt_shape(shape) -> str:
    if shape is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def fmt_dtype(dtype) -> str:
    return "?" if dtype is None else str(np.dtype(dtype))


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n:,} bytes ({n / size:.1f} {unit})"
    return f"{n:,} bytes"


def is_float(arr: np.ndarray) -> bool:
    return np.asarray(arr).dtype.kind == "f"


def feed_inputs(graph) -> list[str]:
    """The graph inputs a caller feeds (inputs that are not also initializers)."""
    return [name for name in graph.inputs if name not in graph.initializers]


def select_trainable(params: dict[str, np.ndarray], trainable=(), freeze=(),
                     reach: set[str] | None = None) -> list[str]:
    """Names of the parameters to train: those matching ``trainable`` (names or
    shell globs such as ``fc1.*``; default: what the Trainer trains by default,
    weights of more than one element with a gradient path to the loss, ``reach``)
    minus those matching
    ``freeze``.  A pattern that matches nothing usable is an error."""
    floats = [k for k, v in params.items() if is_float(v)]
    usable = [k for k in floats if reach is None or k in reach]

    def matches(pattern: str, option: str) -> list[str]:
        def hit(k):
            return k == pattern or fnmatch.fnmatchcase(k, pattern)

        hits = [k for k in usable if hit(k)]
        if hits:
            return hits
        unreachable = [k for k in floats if hit(k)]
        if unreachable:
            raise DataError(f"{option} {pattern!r} matches only parameters without a gradient "
                            f"path to the loss ({', '.join(unreachable[:5])})")
        others = [k for k in params if hit(k)]
        if others:
            raise DataError(f"{option} {pattern!r} matches only non-floating-point initializers "
                            f"({', '.join(others[:5])}), which cannot be trained")
        shown = ", ".join(floats[:8]) + (", ..." if len(floats) > 8 else "")
        raise DataError(f"{option} {pattern!r} matches no parameter of the model "
                        f"(parameters: {shown or 'none'})")

    if trainable:
        chosen = set()
        for p in trainable:
            chosen.update(matches(p, "--trainable"))
    else:
        chosen = {k for k in usable if trained_by_default(params[k])}
    for p in freeze:
        chosen.difference_update(matches(p, "--freeze"))
    return [k for k in usable if k in chosen]


@dataclass
class OpRow:
    domain: str
    op_type: str
    opset: int
    count: int
    forward: bool
    gradient: str  # "yes", "no", "n/a" (no differentiable input), "?" (no kernel)


def op_support(graph, lookup) -> list[OpRow]:
    """One row per (domain, op type, opset) in the graph, in order of first use."""
    counts: Counter = Counter()
    for node in graph.nodes:
        counts[(node.domain or "", node.op_type, _opset(graph, node))] += 1
    rows = []
    for (domain, op_type, opset), count in counts.items():
        try:
            definition = lookup(op_type, domain, opset)
        except UnsupportedOpError:
            rows.append(OpRow(domain, op_type, opset, count, False, "?"))
            continue
        if not definition.differentiable:
            grad = "n/a"
        else:
            grad = "yes" if definition.rule is not None else "no"
        rows.append(OpRow(domain, op_type, opset, count, True, grad))
    return rows


def _opset(graph, node) -> int:
    opset = getattr(node, "opset", None)
    if opset:
        return int(opset)
    return int(graph.opsets.get(node.domain or "", graph.opsets.get("ai.onnx", 1)))


def blocking_nodes(graph, lookup, trainable: list[str], output: str) -> list:
    """Nodes without a gradient rule through which a gradient from ``output`` to
    a trainable parameter would have to flow (training would fail on them)."""
    depends = set(trainable)
    for node in graph.toposort():
        if any(i in depends for i in node.inputs if i):
            depends.update(o for o in node.outputs if o)
    producer = graph.producers()
    needed, stack = set(), [output]
    while stack:
        value = stack.pop()
        if value in needed:
            continue
        needed.add(value)
        node = producer.get(value)
        if node is not None:
            stack.extend(i for i in node.inputs if i)
    blocked = []
    for node in graph.nodes:
        if not any(o in needed for o in node.outputs):
            continue
        try:
            definition = lookup(node.op_type, node.domain or "", _opset(graph, node))
        except UnsupportedOpError:
            continue
        if definition.rule is not None:
            continue
        for index, value in enumerate(node.inputs):
            if value and value in depends and definition.is_differentiable(index):
                blocked.append(node)
                break
    return blocked
