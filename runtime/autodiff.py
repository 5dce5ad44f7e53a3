"""The gradient builder: append backward nodes to a graph.

:func:`build_gradients` walks the graph from the loss back to the trainable
parameters in reverse topological order.  For each node on a path it calls the
op's gradient rule, which appends ONNX nodes through a :class:`GradBuilder`
(``g``) and returns one gradient value per input.  Contributions to a value
that feeds several nodes are summed; everything no requested gradient needs is
pruned afterwards, so rules may emit gradients for every input without cost.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, Iterable

import numpy as np

from onnxgrad.errors import ModelError, UnsupportedOpError
from onnxgrad.ir import Graph, Node, ValueInfo
from onnxgrad.ops import lookup
from onnxgrad.ops.registry import canonical_domain
from onnxgrad.ops.shape import ONNX_TYPES, is_float

#: ai.onnx opset of the nodes that gradient rules and losses emit.
BUILDER_OPSET = 21
#: Domain of onnxgrad's private ops (gradient kernels, fused losses).
PRIVATE_DOMAIN = "onnxgrad"
PRIVATE_OPSET = 1


#: Standard ops whose output is boolean, or int64, whatever their inputs.
_BOOL_OUTPUTS = frozenset({"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "IsNaN",
                           "IsInf", "And", "Or", "Xor", "Not"})
_INT64_OUTPUTS = frozenset({"Shape", "Size", "ArgMax", "ArgMin", "NonZero"})


def grad_name(value: str) -> str:
    return f"{value}_grad"


class GradBuilder:
    """Appends nodes to ``graph``; what gradient rules receive as ``g``.

    ``g.Mul(a, b)`` appends a Mul node and returns its output's name; any
    op name that starts with a capital letter works the same way, with
    attributes as keyword arguments.  ``g.op`` gives full control (domain,
    several outputs).  Names of new values and nodes are prefixed with the
    name of the node being differentiated.
    """

    def __init__(self, graph: Graph):
        self.graph = graph
        #: Whether the graph being written runs as a training step only (True: a step
        #: model of :mod:`onnxgrad.convert`), outside training only (False), or either
        #: (None): forms whose semantics follow the kind of run (BatchNormalization's
        #: gradient) read it.
        self.training_run: bool | None = None
        self.taken = graph.all_names()
        self.prefix = "grad"
        self.node: Node | None = None
        self._early: dict[tuple[str, str, str], str] = {}
        self._producer_index = {o: i for i, n in enumerate(graph.nodes) for o in n.outputs if o}

    # -- emitting nodes ------------------------------------------------------------
    def op(self, op_type: str, *inputs: str | None, domain: str = "", num_outputs: int = 1,
           dtype: Any = None, **attrs: Any) -> str | list[str]:
        """Append one node; returns its output name (a list if ``num_outputs`` > 1)."""
        base = f"{self.prefix}/{op_type}"
        name = self.graph.unique_name(base, self.taken)
        outs = [self.graph.unique_name(f"{name}_out{i}" if num_outputs > 1 else f"{name}_out",
                                       self.taken) for i in range(num_outputs)]
        opset = PRIVATE_OPSET if domain == PRIVATE_DOMAIN else BUILDER_OPSET
        node = Node(op_type, ["" if i is None else i for i in inputs], outs, attrs, name, domain, opset)
        self.graph.nodes.append(node)
        out_dtype = np.dtype(dtype) if dtype is not None else self._output_dtype(op_type, inputs, attrs)
        for o in outs:
            self.graph.info[o] = ValueInfo(out_dtype, None)
        return outs[0] if num_outputs == 1 else outs

    def _output_dtype(self, op_type: str, inputs, attrs) -> np.dtype | None:
        """The element type of a standard node's output, where ``dtype`` is not given:
        the first input's, except for the ops whose output type is another (a wrong
        type here would hide a float value from the gradient builder)."""
        if op_type in _BOOL_OUTPUTS:
            return np.dtype(bool)
        if op_type in _INT64_OUTPUTS:
            return np.dtype(np.int64)
        if op_type == "Cast" and "to" in attrs:
            to = ONNX_TYPES.get(int(attrs["to"]))
            return None if to is None else np.dtype(to)
        source = inputs[1] if op_type in ("Where", "CastLike") and len(inputs) > 1 else \
            next((i for i in inputs if i), None)
        return self.graph.dtype(source) if source else None

    def private(self, op_type: str, *inputs: str | None, **kw: Any) -> str | list[str]:
        """Append a node of onnxgrad's private domain (e.g. ``ReluGrad``)."""
        return self.op(op_type, *inputs, domain=PRIVATE_DOMAIN, **kw)

    def __getattr__(self, op_type: str):
        if op_type[:1].isupper():
            return functools.partial(self.op, op_type)
        raise AttributeError(op_type)

    # -- constants -----------------------------------------------------------------
    def const(self, value: Any, dtype: Any = None, name: str = "const") -> str:
        """A constant tensor (an initializer that no optimizer touches)."""
        array = np.array(value, dtype=dtype)
        base = f"{self.prefix}/{name}" if self.prefix else name
        cname = self.graph.unique_name(base, self.taken)
        self.graph.initializers[cname] = array
        return cname

    def scalar(self, value: float, like: str) -> str:
        """A 0-d constant with the element type of value ``like``."""
        return self.const(value, dtype=self.dtype(like))

    def ints(self, values: Iterable[int]) -> str:
        """A 1-D int64 constant (axes, shapes, starts…)."""
        return self.const(list(values), dtype=np.int64)

    # -- static information -----------------------------------------------------------
    def dtype(self, value: str) -> np.dtype:
        dt = self.graph.dtype(value)
        if dt is None:
            raise ModelError(f"element type of value {value!r} is unknown; "
                             "run shape inference or give the model value_info")
        return dt

    def shape(self, value: str) -> tuple | None:
        """The static shape of ``value`` (dims may be symbolic), or None."""
        return self.graph.shape(value)

    def rank(self, value: str) -> int | None:
        shape = self.shape(value)
        return None if shape is None else len(shape)

    # -- helpers shared by many rules ----------------------------------------------------
    def shape_of(self, value: str) -> str:
        """The shape of ``value`` as an int64 value: a constant for an initializer,
        else a Shape node placed right after the value's producer (which a plan
        specialised to the input shapes folds into a constant).

        Running that node early lets the planner free ``value`` after the forward pass
        when only its shape is needed in the backward pass.
        """
        if value in self.graph.initializers:  # known exactly; inferred shapes are not trusted
            return self.ints(self.graph.initializers[value].shape)
        return self.early("Shape", value, ValueInfo(np.dtype(np.int64), (self.rank(value),)),
                          suffix="shape")

    def early(self, op_type: str, value: str, info: ValueInfo, *, suffix: str,
              domain: str = "") -> str:
        """The output (typed ``info``, named ``<value>_<suffix>``) of a node ``op_type`` that
        reads ``value`` alone, placed right after the value's producer and made once per
        op and value: what a rule needs of a forward value (its shape, a sequence's length
        or element shapes) without keeping the value alive until the backward pass."""
        key = (domain, op_type, value)
        if key not in self._early:
            out = self.graph.unique_name(f"{value}_{suffix}", self.taken)
            opset = PRIVATE_OPSET if domain == PRIVATE_DOMAIN else BUILDER_OPSET
            node = Node(op_type, [value], [out], {}, out, domain, opset)
            at = self._producer_index.get(value, -1) + 1
            self.graph.nodes.insert(at, node)
            self._producer_index = {o: i for i, n in enumerate(self.graph.nodes)
                                    for o in n.outputs if o}
            self.graph.info[out] = info
            self._early[key] = out
        return self._early[key]

    def unbroadcast(self, grad: str, like: str) -> str:
        """Sum ``grad`` down to the shape of ``like``: undoes NumPy broadcasting.

        Emits nothing where the node being differentiated provably did not
        broadcast (all its inputs and its output share one static shape).
        """
        if self._no_broadcast():
            return grad
        return self.private("SumToShape", grad, self.shape_of(like))

    def _no_broadcast(self) -> bool:
        node = self.node
        if node is None:
            return False
        shapes = [self.shape(v) for v in list(node.inputs) + node.outputs[:1] if v]
        first = shapes[0]
        if first is None or any(d is None for d in first):
            return False
        return all(s == first for s in shapes)


def add_training_outputs(graph: Graph) -> None:
    """Give each node the optional outputs its gradient rule needs (in place)."""
    taken = graph.all_names()
    for node in graph.nodes:
        want = _definition(node).train_outputs
        outputs = list(node.outputs) + [""] * max(0, want - len(node.outputs))
        for i in range(want):
            if not outputs[i]:
                outputs[i] = graph.unique_name(f"{node.name}_out{i}", taken)
        node.outputs = outputs


#: Inputs that are state a training step overwrites, not weights it trains:
#: BatchNormalization's running mean and variance, by (domain, op) and input index.  They
#: are not among the op's declared differentiable inputs, so they are no
#: :func:`differentiable_ancestors` and the Trainer never picks them; a gradient flows
#: into them only when asked for by name (``params`` here, the Gradient operator's
#: ``xs``), through the op's rule.
RUNNING_STATISTICS = {("", "BatchNormalization"): (3, 4)}


def _flows(definition, node: Node, index: int) -> bool:
    """Whether a gradient asked for flows through input ``index`` of ``node``: a declared
    differentiable input, or a running statistic."""
    return definition.is_differentiable(index) or \
        index in RUNNING_STATISTICS.get((canonical_domain(node.domain), node.op_type), ())


def requires_grad(graph: Graph, params: Iterable[str]) -> set[str]:
    """Values that depend on ``params`` through differentiable inputs (and running
    statistics, see :data:`RUNNING_STATISTICS`)."""
    needs = set(params)
    for node in graph.toposort():
        definition = _definition(node)
        if any(x in needs and _flows(definition, node, i) for i, x in enumerate(node.inputs)):
            for o in node.outputs:
                dt = graph.dtype(o)
                if o and (dt is None or is_float(dt) or np.issubdtype(dt, np.complexfloating)):
                    needs.add(o)
    return needs


def _definition(node: Node):
    return lookup(node.op_type, node.domain, node.opset, node.name)


def build_gradients(graph: Graph, loss: str, params: Iterable[str],
                    seed: str | None = None) -> dict[str, str]:
    """Append the backward pass of ``loss`` to ``graph`` (in place).

    ``seed`` is the value that flows back from ``loss`` (default: 1 for a
    scalar loss).  Returns ``{param: gradient value}`` for every parameter
    that reaches the loss; the caller decides what to do with the others.
    """
    params = list(params)
    expand_for_higher_order(graph, loss, params)
    needs = requires_grad(graph, params)
    if loss not in needs:
        return {}
    order = graph.toposort()
    reaches_loss = _reaching(order, loss)

    g = GradBuilder(graph)
    g.prefix = ""
    if seed is None:
        seed = g.const(np.ones((), dtype=g.dtype(loss)), name=grad_name(loss))
    contributions: dict[str, list[str]] = {loss: [seed]}
    grads: dict[str, str] = {}

    for node in reversed(order):
        if not any(o in contributions for o in node.outputs):
            continue
        wanted = [i for i, x in enumerate(node.inputs)
                  if x and x in needs and x in reaches_loss]
        definition = _definition(node)
        wanted = [i for i in wanted if _flows(definition, node, i)]
        if not wanted:
            continue
        if definition.rule is None:
            raise UnsupportedOpError(node.op_type, node.domain, node.opset, node.name,
                                     what="gradient rule")
        douts = [_total(g, o, contributions, grads) if o in contributions else None
                 for o in node.outputs]
        g.prefix = node.name or node.op_type
        g.node = replace(node, attrs=definition.resolve_attrs(node.attrs, node.name))
        result = definition.rule(g, g.node, *douts)
        g.node = None
        if len(result) != len(node.inputs):
            raise AssertionError(f"gradient rule of {node.op_type} returned {len(result)} "
                                 f"gradients for {len(node.inputs)} inputs")
        for i in wanted:
            if result[i] is None:
                raise UnsupportedOpError(
                    node.op_type, node.domain, node.opset, node.name,
                    what=f"gradient for input {i} ({definition.input_name(i)!r})")
            contributions.setdefault(node.inputs[i], []).append(result[i])

    return {p: _total(g, p, contributions, grads) for p in params if p in contributions}


def _reaching(order: list[Node], value: str) -> set[str]:
    """The values ``value`` depends on (``order``: the graph's nodes, topologically)."""
    reach = {value}
    for node in reversed(order):
        if any(o in reach for o in node.outputs):
            reach.update(x for x in node.inputs if x)
    return reach


def replace_node(g: GradBuilder, node: Node, values: Iterable[str | None]) -> None:
    """Remove ``node`` from ``g.graph``; its outputs become Identities of ``values``."""
    g.graph.nodes.remove(node)
    for out, value in zip(node.outputs, values):
        if out and value:
            g.graph.nodes.append(Node("Identity", [value], [out], {}, f"{out}/Identity", "",
                                      BUILDER_OPSET))


def expand_in_standard_ops(g: GradBuilder, node: Node) -> bool:
    """Replace ``node`` (one of onnxgrad's private ops) in ``g.graph`` by its standard-op
    form; False, and nothing changed, where it has none for these attributes."""
    definition = _definition(node)
    if definition.standard is None:
        return False
    g.prefix, g.node = node.name, None
    values = definition.standard(g, node)
    if values is None:
        return False
    replace_node(g, node, values)
    return True


def expand_for_higher_order(graph: Graph, loss: str, params: list[str]) -> None:
    """Differentiating a gradient again (in place): each of onnxgrad's gradient kernels
    that a gradient of ``loss`` must pass through, and that has no rule of its own, is
    replaced by its standard-op form (``in_standard_ops``), whose ops have rules.  A
    kernel without that form stays, and :func:`build_gradients` refuses it by name."""
    for _ in range(100):  # standard forms may hold private nodes, expanded in turn
        needs = requires_grad(graph, params)
        if loss not in needs:
            return
        reach = _reaching(graph.toposort(), loss)
        todo = []
        for node in graph.nodes:
            if node.domain != PRIVATE_DOMAIN or not any(o in reach for o in node.outputs):
                continue
            definition = _definition(node)
            if definition.rule is None and definition.standard is not None and any(
                    x in needs and definition.is_differentiable(i)
                    for i, x in enumerate(node.inputs)):
                todo.append(node)
        g = GradBuilder(graph)
        expanded = [expand_in_standard_ops(g, node) for node in todo]
        if not any(expanded):
            return
    raise AssertionError("private ops keep expanding into private ops")  # pragma: no cover


def _total(g: GradBuilder, value: str, contributions: dict[str, list[str]],
           grads: dict[str, str]) -> str:
    """The gradient of ``value``: its single contribution, or their sum (element by element
    for a sequence, see :mod:`onnxgrad.ops.sequence`)."""
    if value not in grads:
        parts = contributions[value]
        g.prefix = value
        info = gradient_info(g.graph, value, parts)
        if len(parts) == 1:
            grads[value] = parts[0]
        elif info.kind == "sequence":
            grads[value] = g.private("SequenceGradSum", *parts)
        else:
            grads[value] = g.op("Sum", *parts)
        g.graph.info[grads[value]] = info
    return grads[value]


def gradient_info(graph: Graph, value: str, parts: Iterable[str] = ()) -> ValueInfo:
    """What is known of the gradient of ``value`` (``parts``: gradient values that sum to
    it): the value's own type and shape for a tensor; for a sequence, a sequence of the
    same elements; an optional's gradient is that of its content."""
    info = graph.info.get(value)
    if info is not None and info.kind == "optional" and info.element is not None:
        info = info.element
    if info is not None and info.kind == "sequence":
        return ValueInfo(kind="sequence", element=info.element)
    sequences = [graph.info[p] for p in parts if p in graph.info
                 and graph.info[p].kind == "sequence"]
    if sequences:
        if len(sequences) < len(list(parts)):
            raise AssertionError(f"gradients of {value!r} mix sequences and tensors")
        return ValueInfo(kind="sequence", element=sequences[0].element)
    if info is None or value in graph.initializers:
        return ValueInfo(graph.dtype(value), graph.shape(value))
    return ValueInfo(info.dtype, info.shape)


def prune(graph: Graph, keep: Iterable[str]) -> None:
    """Remove (in place) every node and initializer that no value in ``keep`` depends on."""
    keep = list(keep)
    graph.nodes = graph.live_nodes(keep)
    used = set(keep) | {x for n in graph.nodes for x in n.inputs}
    graph.initializers = {k: v for k, v in graph.initializers.items() if k in used}


def rename_gradients(graph: Graph, grads: dict[str, str]) -> dict[str, str]:
    """Give each parameter's gradient the name ``<param>_grad`` where possible."""
    claimed = {}
    for param, value in grads.items():
        claimed.setdefault(value, []).append(param)
    producers = graph.producers()
    rename = {}
    for value, owners in claimed.items():
        target = grad_name(owners[0])
        if len(owners) == 1 and value in producers and value not in graph.inputs \
                and target not in graph.all_names():
            rename[value] = target
    for node in graph.nodes:
        node.inputs = [rename.get(x, x) for x in node.inputs]
        node.outputs = [rename.get(x, x) for x in node.outputs]
    graph.outputs = [rename.get(x, x) for x in graph.outputs]
    for old, new in rename.items():
        if old in graph.info:
            graph.info[new] = graph.info.pop(old)
    return {p: rename.get(v, v) for p, v in grads.items()}


def differentiable_ancestors(graph: Graph, value: str, strict: bool = True) -> set[str]:
    """Values from which ``value`` is reachable through differentiable inputs.

    With ``strict=False`` an op onnxgrad does not implement counts as
    differentiable in every input (for reports on models it cannot train yet);
    otherwise it raises UnsupportedOpError.
    """
    reach = {value}
    for node in reversed(graph.toposort()):
        if not any(o in reach for o in node.outputs):
            continue
        try:
            definition = _definition(node)
        except UnsupportedOpError:
            if strict:
                raise
            definition = None
        reach.update(x for i, x in enumerate(node.inputs)
                     if x and (definition is None or definition.is_differentiable(i)))
    return reach


#: Domain of ONNX's training operators (Gradient, Momentum, Adagrad, Adam).
PREVIEW_TRAINING = "ai.onnx.preview.training"


def expand_gradient_ops(graph: Graph) -> None:
    """Replace each ``ai.onnx.preview.training.Gradient`` node by backward nodes (in place).

    ``Gradient(xs=[…], zs=[…], y=…)`` outputs dy/dx for each x in ``xs``: the
    gradient of the sum of ``y``'s elements, built by the same rules that
    training uses.  An x that ``y`` does not depend on gets zeros.
    """
    gradient_nodes = [n for n in graph.nodes
                      if n.op_type == "Gradient" and n.domain == PREVIEW_TRAINING]
    if not gradient_nodes:
        return
    graph.nodes = [n for n in graph.nodes if n not in gradient_nodes]
    known = graph.all_names() | {o for n in gradient_nodes for o in n.outputs}
    for node in gradient_nodes:
        xs, y = list(node.attrs.get("xs", [])), node.attrs.get("y")
        if not y or y not in known:
            raise ModelError(f"Gradient node {node.name!r}: y={y!r} is not a value of the graph")
        missing = [x for x in xs if x not in known]
        if missing:
            raise ModelError(f"Gradient node {node.name!r}: xs {missing} are not values of the graph")
        g = GradBuilder(graph)
        g.prefix = node.name
        seed = g.private("OnesLike", y)
        grads = build_gradients(graph, y, xs, seed=seed)
        g.prefix = node.name
        for x, out in zip(xs, node.outputs):
            if not out:
                continue
            value = grads[x] if x in grads else g.private("ZerosLike", x)
            graph.nodes.append(Node("Identity", [value], [out], {}, f"{node.name}/{out}", "",
                                    BUILDER_OPSET))
            graph.info[out] = ValueInfo(graph.dtype(x), graph.shape(x))
