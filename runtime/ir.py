"""onnxgrad's internal graph: named values and the nodes between them.

Values are identified by their names, exactly as in ONNX; the empty name marks
an omitted optional input.  A :class:`Graph` is plain data: the loader fills
it from a ``ModelProto``, the gradient builder appends to a copy of it, and
the planner turns it into an executable schedule.
"""

from __future__ import annotations

import copy
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from onnxgrad.errors import ModelError


@dataclass
class ValueInfo:
    """What is known statically about a value: element type and shape.

    ``shape`` is ``None`` when unknown; a dimension is an ``int``, a symbolic
    name (``"N"``) or ``None``.  ``kind`` is ``"tensor"``, ``"sequence"``,
    ``"optional"`` or ``"map"``; a sequence, an optional or a map has no dtype or
    shape of its own (both ``None``, as for a tensor of unknown type), and
    ``element`` describes what it holds, where known: for a map, its values, with
    ``key`` the element type of its keys (int64 or a string type).  At run time a
    map is a Python dict and a sequence a list.
    """

    dtype: np.dtype | None = None
    shape: tuple[int | str | None, ...] | None = None
    kind: str = "tensor"
    element: "ValueInfo | None" = None
    key: np.dtype | None = None

    @property
    def fully_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def type_str(self) -> str:
        """The type in ONNX's notation with NumPy element names: ``float32`` for a
        tensor, ``seq(map(int64, float32))`` for ZipMap's output; ``?`` where unknown."""
        if self.kind == "tensor":
            return _element_name(self.dtype)
        inner = "?" if self.element is None else self.element.type_str()
        if self.kind == "map":
            return f"map({_element_name(self.key)}, {inner})"
        return f"{'seq' if self.kind == 'sequence' else self.kind}({inner})"


def _element_name(dtype: np.dtype | None) -> str:
    if dtype is None:
        return "?"
    return "string" if np.dtype(dtype).kind in "OSU" else np.dtype(dtype).name


@dataclass
class Node:
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    domain: str = ""
    opset: int = 1

    def __repr__(self) -> str:
        ins = ", ".join(self.inputs)
        outs = ", ".join(self.outputs)
        return f"<{self.op_type} {self.name!r}: ({ins}) -> ({outs})>"


@dataclass
class Graph:
    """A computation graph.

    ``inputs`` are the values the caller feeds; ``initializers`` hold the
    weights and constants (host NumPy arrays); ``outputs`` are what a run
    returns.  ``opsets`` maps each domain ("" for ai.onnx) to its version.
    """

    nodes: list[Node] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, ValueInfo] = field(default_factory=dict)
    opsets: dict[str, int] = field(default_factory=dict)
    name: str = "graph"

    # -- naming ------------------------------------------------------------------
    def all_names(self) -> set[str]:
        names = set(self.inputs) | set(self.initializers)
        for n in self.nodes:
            names.update(n.inputs)
            names.update(n.outputs)
            if n.name:
                names.add(n.name)
        names.discard("")
        return names

    def unique_name(self, base: str, taken: set[str]) -> str:
        """``base``, or ``base_1``, ``base_2``… whichever is not in ``taken``; adds it."""
        if base not in taken:
            taken.add(base)
            return base
        for i in itertools.count(1):
            cand = f"{base}_{i}"
            if cand not in taken:
                taken.add(cand)
                return cand
        raise AssertionError  # pragma: no cover

    # -- structure -----------------------------------------------------------------
    def producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs if o}

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    out.setdefault(i, []).append(n)
        return out

    def dtype(self, name: str) -> np.dtype | None:
        if name in self.initializers:
            return self.initializers[name].dtype
        vi = self.info.get(name)
        return vi.dtype if vi else None

    def shape(self, name: str) -> tuple | None:
        if name in self.initializers:
            return tuple(self.initializers[name].shape)
        vi = self.info.get(name)
        return vi.shape if vi else None

    def copy(self) -> "Graph":
        """A copy whose node list and dicts can change freely; arrays are shared."""
        return Graph(
            nodes=[copy.copy(n) for n in self.nodes],
            inputs=list(self.inputs),
            outputs=list(self.outputs),
            initializers=dict(self.initializers),
            info=dict(self.info),
            opsets=dict(self.opsets),
            name=self.name,
        )

    def live_nodes(self, keep: Iterable[str]) -> list[Node]:
        """The nodes that values ``keep`` depend on, in topological order."""
        live = set(keep)
        kept = []
        for node in reversed(self.toposort()):
            if any(o in live for o in node.outputs):
                kept.append(node)
                live.update(x for x in node.inputs if x)
        kept.reverse()
        return kept

    def toposort(self, nodes: Iterable[Node] | None = None) -> list[Node]:
        """The nodes in an order where each runs after the producers of its inputs."""
        nodes = list(self.nodes if nodes is None else nodes)
        producer = {o: i for i, n in enumerate(nodes) for o in n.outputs if o}
        indeg = [0] * len(nodes)
        users: list[list[int]] = [[] for _ in nodes]
        for i, n in enumerate(nodes):
            deps = {producer[x] for x in n.inputs if x in producer}
            indeg[i] = len(deps)
            for d in deps:
                users[d].append(i)
        # A heap keeps the file's order wherever the dependencies allow it.
        ready = [i for i, d in enumerate(indeg) if d == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            i = heapq.heappop(ready)
            order.append(nodes[i])
            for u in users[i]:
                indeg[u] -= 1
                if indeg[u] == 0:
                    heapq.heappush(ready, u)
        if len(order) != len(nodes):
            stuck = [nodes[i].name or nodes[i].op_type for i, d in enumerate(indeg) if d > 0]
            raise ModelError(f"graph {self.name!r} has a cycle through nodes {stuck[:5]}")
        return order
