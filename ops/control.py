"""Control flow: If, Loop, Scan and SequenceMap, whose bodies are ONNX graphs.

A body (an ``onnx.GraphProto`` attribute) is turned into an onnxgrad graph
with :func:`onnxgrad.loader.build_graph` and run by its own
:class:`onnxgrad.executor.Plan`, made once per node and run state.  Values the
body reads from enclosing scopes ("captured" values) reach the kernel as extra
inputs after the op's own: :func:`add_captured_inputs` (which the loader calls
on every graph it builds) appends their names to the nodes, and the kernel
feeds the body every outer value it reads by name, the node's own inputs
included (a body may read, say, the Loop's trip count or the If's condition).

If, Loop, Scan (opset 8 and 9+) and SequenceMap have gradients, for their float
inputs and the float outer values their bodies read; a sequence of float tensors
counts as float (a Loop may carry one, a body may read one, If may output one), its
gradient being a sequence gradient (see :mod:`onnxgrad.ops.sequence`).  The rule
builds each body's backward graph with the gradient builder
(:func:`_body_gradient`), so a body that needs a missing rule raises
UnsupportedOpError naming the node when the gradient is built; private ops run it
(see "gradients" below).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import onnx

from onnxgrad.errors import ModelError, UnsupportedOpError
from onnxgrad.ir import ValueInfo
from onnxgrad.ops.registry import op
from onnxgrad.ops.sequence import (add_gradients, element_code, element_shapes, shapes_of,
                                   zero_gradient)
from onnxgrad.ops.shape import element_dtype, is_float

_GRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


# -- captured values ------------------------------------------------------------------------
def free_names(graph: onnx.GraphProto) -> list[str]:
    """Names ``graph`` (and the bodies nested in it) read but does not define."""
    bound = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    bound |= {t.values.name for t in graph.sparse_initializer}
    bound |= {o for n in graph.node for o in n.output if o}
    free: list[str] = []

    def use(name: str) -> None:
        if name and name not in bound and name not in free:
            free.append(name)

    for node in graph.node:
        for name in node.input:
            use(name)
        for sub in _subgraphs(node.attribute):
            for name in free_names(sub):
                use(name)
    for vi in graph.output:
        use(vi.name)
    return free


def _subgraphs(attributes) -> list[onnx.GraphProto]:
    out = []
    for attr in attributes:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def captured_names(attrs: dict[str, Any], inputs: list[str]) -> list[str]:
    """The outer-scope names the graph attributes in ``attrs`` read, minus ``inputs``."""
    out: list[str] = []
    for value in attrs.values():
        graphs = [value] if isinstance(value, onnx.GraphProto) else (
            [v for v in value if isinstance(v, onnx.GraphProto)] if isinstance(value, list) else [])
        for g in graphs:
            for name in free_names(g):
                if name not in out and name not in inputs:
                    out.append(name)
    return out


def add_captured_inputs(graph) -> None:
    """Append to each node with a body the outer-scope values its body reads (in place).

    ``graph`` is an :class:`onnxgrad.ir.Graph`.  Afterwards the planner
    schedules such a node after the producers of those values and keeps them
    alive until it ran; the kernel receives them after its own inputs.
    """
    for node in graph.nodes:
        if any(isinstance(v, onnx.GraphProto) for v in node.attrs.values()):
            node.inputs = list(node.inputs) + captured_names(node.attrs, node.inputs)


# -- bodies ---------------------------------------------------------------------------------
def _body_graph(proto: onnx.GraphProto, node, attr: str, opset: int | None = None):
    """Body ``attr`` of ``node`` as an :class:`onnxgrad.ir.Graph` whose inputs are the body's
    own (the callers add the outer-scope values it reads).  ``opset``: the body's ai.onnx
    opset (default: the node's own, for an ai.onnx node)."""
    from onnxgrad.loader import build_graph  # noqa: PLC0415 - runtime imports ops

    where = f"node {node.name!r} ({node.op_type}) attribute {attr!r}"
    model = onnx.ModelProto()
    model.graph.CopyFrom(proto)
    domains = {n.domain or "" for n in _all_nodes(proto)} - {"", "ai.onnx"}
    if opset is None:
        opset = node.opset if node.domain in ("", "ai.onnx") else onnx.defs.onnx_opset_version()
    model.opset_import.add(domain="", version=opset)
    for domain in sorted(domains):
        # The body's node of another domain: the newest version onnxgrad declares.
        model.opset_import.add(domain=domain, version=node.opset if domain == node.domain
                               else 1000)
    graph = build_graph(model, where)  # nested bodies get their captured inputs there
    graph.inputs = [vi.name for vi in proto.input if vi.name not in graph.initializers]
    return graph


class Body:
    """A body graph compiled into a plan; :meth:`run` maps inputs to outputs.

    ``inputs`` are fed by position, ``captured`` (outer-scope names) by name.
    """

    def __init__(self, xp, graph, inputs: list[str], captured: list[str], state):
        from onnxgrad.backend import get_backend  # noqa: PLC0415 - runtime imports ops
        from onnxgrad.executor import Plan  # noqa: PLC0415

        self.inputs, self.captured, self.outputs = inputs, captured, list(graph.outputs)
        self.output_dtypes = [graph.dtype(n) for n in self.outputs]
        backend = get_backend("cpu" if xp.__name__ == "numpy" else "cuda")
        self.plan = Plan(graph, backend, constants=dict(graph.initializers), fetch=self.outputs,
                         state=state)

    def run(self, values: list, outer: dict[str, Any]) -> list:
        if len(values) != len(self.inputs):
            raise ModelError(f"body of node expects {len(self.inputs)} inputs, got {len(values)}")
        env = {n: outer[n] for n in self.captured}
        env.update(zip(self.inputs, values))
        result = self.plan.run(env)
        return [result[n] for n in self.outputs]


def _forward_body(xp, ctx, attr: str, proto: onnx.GraphProto, captured: list[str],
                  opset: int | None) -> Body:
    graph = _body_graph(proto, ctx.node, attr, opset)
    free = free_names(proto)
    missing = [n for n in free if n not in captured]
    if missing:
        raise ModelError(f"node {ctx.node.name!r} ({ctx.node.op_type}) attribute {attr!r} reads "
                         f"outer-scope value(s) {missing} that the node does not receive (the "
                         "loader passes them as extra inputs)")
    used = [n for n in captured if n in free]
    graph.inputs += used
    return Body(xp, graph, [vi.name for vi in proto.input], used, ctx.state)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for sub in _subgraphs(node.attribute):
            yield from _all_nodes(sub)


_BODIES: OrderedDict[tuple, tuple] = OrderedDict()
_BODY_LIMIT = 512


def _compiled(ctx, attr: str, source, make) -> Body:
    """``make()``, made once per node, body (``source``) and run state."""
    key = (id(ctx.node), id(source), id(ctx.state), attr)
    entry = _BODIES.get(key)
    if entry is not None and entry[0] is ctx.node and entry[1] is source \
            and entry[2] is ctx.state:
        _BODIES.move_to_end(key)
        return entry[3]
    body = make()
    _BODIES[key] = (ctx.node, source, ctx.state, body)
    if len(_BODIES) > _BODY_LIMIT:
        _BODIES.popitem(last=False)
    return body


def body_of(xp, ctx, attr: str, proto: onnx.GraphProto, captured: list[str],
            opset: int | None = None) -> Body:
    """The compiled body ``attr`` of ``ctx.node`` (made once per node, body and run state);
    ``opset`` as for :func:`_body_graph`."""
    return _compiled(ctx, attr, proto,
                     lambda: _forward_body(xp, ctx, attr, proto, captured, opset))


def scope(ctx, args: tuple) -> dict[str, Any]:
    """Every input of the node by name (``args``: all of them, in order), captured values
    included: what its bodies may read from the enclosing scope."""
    return {name: value for name, value in zip(ctx.node.inputs, args) if name}


def _truth(xp, cond) -> bool:
    if cond is None:
        return True
    return bool(xp.asarray(cond).reshape(-1)[0])


def _stack(xp, parts: list, dtype) -> Any:
    if parts:
        return xp.stack([xp.asarray(p) for p in parts])
    return xp.zeros((0,), dtype=dtype or "float32")


# -- If -------------------------------------------------------------------------------------
@op("If", since=1, differentiable=("captured",))
def If(xp, cond, *captured, ctx, then_branch, else_branch):
    outer = scope(ctx, (cond,) + captured)
    if _truth(xp, cond):
        chosen, attr = then_branch, "then_branch"
    else:
        chosen, attr = else_branch, "else_branch"
    body = body_of(xp, ctx, attr, chosen, list(outer))
    outs = body.run([], outer)
    if len(outs) != ctx.num_outputs:
        raise ModelError(f"If node {ctx.node.name!r}: {attr} gives {len(outs)} outputs, the node "
                         f"has {ctx.num_outputs}")
    return tuple(outs)


# -- Loop -----------------------------------------------------------------------------------
def _run_loop(xp, ctx, compiled: Body, M, cond, carried: list, outer: dict, keep: bool = False):
    """Run a Loop body; returns the final carried values, the per-iteration scan outputs and
    (with ``keep``) each iteration's carried inputs."""
    n_carried = len(carried)
    limit = None if M is None else int(xp.asarray(M).reshape(-1)[0])
    go = _truth(xp, cond)
    scans: list[list] = [[] for _ in range(len(compiled.outputs) - 1 - n_carried)]
    history = []
    i = 0
    while go and (limit is None or i < limit):
        if keep:
            history.append(carried)
        outs = compiled.run([xp.asarray(i, dtype=xp.int64), xp.asarray(go)] + carried, outer)
        go = _truth(xp, outs[0])
        carried = outs[1:1 + n_carried]
        for k, value in enumerate(outs[1 + n_carried:]):
            scans[k].append(value)
        i += 1
        if limit is None and i > 10_000_000:
            raise ModelError(f"Loop node {ctx.node.name!r}: no trip count and still running "
                             "after 10,000,000 iterations")
    return carried, scans, history


@op("Loop", since=1, differentiable=("v_initial",))
def Loop(xp, M=None, cond=None, *v_initial, ctx, body):
    n_carried = len(body.input) - 2
    if n_carried < 0:
        raise ModelError(f"Loop node {ctx.node.name!r}: its body must take the iteration number "
                         "and the condition first")
    outer = scope(ctx, (M, cond) + v_initial)
    compiled = body_of(xp, ctx, "body", body, list(outer))
    carried, scans, _ = _run_loop(xp, ctx, compiled, M, cond, list(v_initial[:n_carried]), outer)
    dtypes = compiled.output_dtypes[1 + n_carried:]
    return tuple(carried) + tuple(_stack(xp, s, d) for s, d in zip(scans, dtypes))


# -- Scan -----------------------------------------------------------------------------------
def _scan_length(ctx, scans, in_axes) -> int:
    length = None
    for x, axis in zip(scans, in_axes):
        n = x.shape[axis]
        if length is not None and n != length:
            raise ModelError(f"Scan node {ctx.node.name!r}: scan inputs differ in length "
                             f"({length} and {n})")
        length = n
    return length or 0


def _slices(xp, scans, t: int, length: int, in_axes, in_dirs) -> list:
    """Iteration ``t``'s slices of the scan inputs."""
    return [xp.take(x, length - 1 - t if d else t, axis=a)
            for x, a, d in zip(scans, in_axes, in_dirs)]


def _scan(xp, ctx, compiled: Body, states, scans, outer, in_axes, in_dirs, out_axes, out_dirs,
          keep: bool = False):
    """Run a Scan body; returns the final states, the stacked scan outputs and (with ``keep``)
    each iteration's input states."""
    n_states = len(states)
    length = _scan_length(ctx, scans, in_axes)
    outputs: list[list] = [[] for _ in range(len(compiled.outputs) - n_states)]
    history = []
    for t in range(length):
        if keep:
            history.append(list(states))
        outs = compiled.run(list(states) + _slices(xp, scans, t, length, in_axes, in_dirs), outer)
        states = outs[:n_states]
        for k, value in enumerate(outs[n_states:]):
            outputs[k].append(value)
    stacked = []
    for k, parts in enumerate(outputs):
        if out_dirs[k]:
            parts = parts[::-1]
        y = _stack(xp, parts, compiled.output_dtypes[n_states + k])
        if parts and out_axes[k] != 0:
            y = xp.moveaxis(y, 0, out_axes[k] % y.ndim)
        stacked.append(y)
    return list(states), stacked, history


def _axes(values, n: int, rank_of=None) -> list[int]:
    if values is None:
        return [0] * n
    values = [int(v) for v in values]
    if rank_of is not None:
        values = [v % rank_of(i) if v < 0 else v for i, v in enumerate(values)]
    return values


def _layout(body, n_states: int, scans: list, scan_input_axes=None, scan_input_directions=None,
            scan_output_axes=None, scan_output_directions=None, directions=None, batched=0):
    """``(in_axes, in_dirs, out_axes, out_dirs)`` of a Scan, axes made non-negative; with
    ``batched`` (opset 8) the layout within one batch element."""
    n_in, n_out = len(scans), len(body.output) - n_states
    if batched:
        return [0] * n_in, _axes(directions, n_in), [0] * n_out, [0] * n_out
    in_axes = _axes(scan_input_axes, n_in, lambda i: scans[i].ndim)
    out_axes = [a % (len(body.output[n_states + k].type.tensor_type.shape.dim) + 1) if a < 0
                else a for k, a in enumerate(_axes(scan_output_axes, n_out))]
    return in_axes, _axes(scan_input_directions, n_in), out_axes, _axes(scan_output_directions,
                                                                        n_out)


@op("Scan", since=9, differentiable=("initial_state_and_scan_inputs",))
def Scan(xp, *initial_state_and_scan_inputs, ctx, body, num_scan_inputs,
         scan_input_axes=None, scan_input_directions=None, scan_output_axes=None,
         scan_output_directions=None):
    n_own = len(body.input)  # states, then scan inputs
    own = list(initial_state_and_scan_inputs[:n_own])
    outer = scope(ctx, initial_state_and_scan_inputs)
    n_states = n_own - num_scan_inputs
    states, scans = own[:n_states], own[n_states:]
    layout = _layout(body, n_states, scans, scan_input_axes, scan_input_directions,
                     scan_output_axes, scan_output_directions)
    compiled = body_of(xp, ctx, "body", body, list(outer))
    final, stacked, _ = _scan(xp, ctx, compiled, states, scans, outer, *layout)
    return tuple(final) + tuple(stacked)


@op("Scan", since=8, differentiable=("initial_state_and_scan_inputs",))
def Scan8(xp, sequence_lens=None, *initial_state_and_scan_inputs, ctx, body, num_scan_inputs,
          directions=None):
    """Opset 8: every input has a batch axis first; the scan axis is the next one."""
    n_own = len(body.input)
    own = list(initial_state_and_scan_inputs[:n_own])
    outer = scope(ctx, (sequence_lens,) + initial_state_and_scan_inputs)
    n_states = n_own - num_scan_inputs
    states, scans = own[:n_states], own[n_states:]
    batch = (states + scans)[0].shape[0]
    layout = _layout(body, n_states, scans, directions=directions, batched=1)
    n_out = len(body.output) - n_states
    finals: list[list] = [[] for _ in range(n_states)]
    outs: list[list] = [[] for _ in range(n_out)]
    compiled = body_of(xp, ctx, "body", body, list(outer))
    for b in range(batch):
        n = None if sequence_lens is None else int(sequence_lens[b])
        sl = [x[b] if n is None else x[b][:n] for x in scans]
        final, stacked, _ = _scan(xp, ctx, compiled, [s[b] for s in states], sl, outer, *layout)
        for k, v in enumerate(final):
            finals[k].append(v)
        for k, v in enumerate(stacked):
            outs[k].append(v)
    return tuple(xp.stack(f) for f in finals) + tuple(xp.stack(o) for o in outs)


# -- SequenceMap ----------------------------------------------------------------------------
@op("SequenceMap", since=17, differentiable=("input_sequence", "additional_inputs"))
def SequenceMap(xp, input_sequence, *additional_inputs, ctx, body):
    own = list(additional_inputs[:len(body.input) - 1])
    outer = scope(ctx, (input_sequence,) + additional_inputs)
    compiled = body_of(xp, ctx, "body", body, list(outer))
    results: list[list] = [[] for _ in compiled.outputs]
    for i, item in enumerate(input_sequence):
        extra = []
        for x in own:
            if isinstance(x, list):
                if len(x) != len(input_sequence):
                    raise ModelError(f"SequenceMap node {ctx.node.name!r}: sequences of lengths "
                                     f"{len(input_sequence)} and {len(x)}")
                extra.append(x[i])
            else:
                extra.append(x)
        for k, value in enumerate(compiled.run([item] + extra, outer)):
            results[k].append(value)
    return tuple(results)


# -- gradients ------------------------------------------------------------------------------
# A body's gradient is a graph built with the gradient builder when the outer gradient is:
# the body's forward nodes, then backward nodes from the gradients of its outputs ("seeds")
# to those of its float inputs and of the outer values it reads.  Private ops run it: IfGrad
# for the branch taken, LoopGrad and ScanGrad once per iteration, last iteration first, after
# running the loop again to recover each iteration's carried values, SequenceMapGrad once per
# element.
@dataclass(eq=False)
class BodyGradient:
    """The backward graph of a body: it takes ``inputs`` by position (the body's own inputs,
    then the gradients of the seeded outputs) and ``captured`` outer values by name, and
    returns the gradients of ``wrt`` (body inputs, then outer values), in that order."""

    graph: Any
    inputs: list[str]
    captured: list[str]
    wrt: list[str]

    def __repr__(self) -> str:
        return f"<BodyGradient of {self.graph.name!r}: d{self.wrt}>"


@op("InnerProduct", domain="onnxgrad")
def InnerProduct(xp, *pairs):
    """Σ_k sum(Y_k · S_k) over ``pairs`` = Y_1…Y_n, S_1…S_n: the scalar whose gradient in Y_k
    is S_k, from which a body's backward graph starts.  A sequence Y_k pairs with a sequence
    gradient S_k: the sum over its elements (``None`` in S_k: zero)."""
    n = len(pairs) // 2
    terms = []
    for y, s in zip(pairs[:n], pairs[n:]):
        if isinstance(y, list):
            terms += [xp.sum(a * b) for a, b in zip(y, s) if b is not None]
        else:
            terms.append(xp.sum(y * s))
    return (sum(terms),)


@InnerProduct.gradient
def _(g, node, dZ):
    n = len(node.inputs) // 2
    ys, seeds = node.inputs[:n], node.inputs[n:]

    def scaled(value, like):
        info = g.graph.info.get(like)
        if info is not None and info.kind == "sequence":
            out = g.private("SequenceGradScale", value, dZ)
            g.graph.info[out] = ValueInfo(kind="sequence", element=info.element)
            return out
        return g.Mul(value, dZ)

    return tuple(scaled(s, y) for s, y in zip(seeds, ys)) + \
        tuple(scaled(y, y) for y in ys)


def _body_gradient(g, attr: str, proto: onnx.GraphProto, seeded: list[int],
                   wrt: list[str]) -> BodyGradient:
    """The backward graph of body ``attr`` of the node ``g`` differentiates, from the
    gradients of body outputs ``seeded`` (indices) to those of ``wrt`` (zeros for a value
    those outputs do not depend on)."""
    from onnxgrad.autodiff import (  # noqa: PLC0415 - runtime imports ops
        GradBuilder, add_training_outputs, build_gradients, grad_name, gradient_info, prune)

    node = g.node
    graph = _body_graph(proto, node, attr)
    own = [vi.name for vi in proto.input]
    free = free_names(proto)
    captured = free + [w for w in wrt if w not in own and w not in free]
    for name in captured:
        known = g.graph.info.get(name)
        graph.info.setdefault(name, known if known is not None and known.kind == "sequence"
                              else ValueInfo(g.graph.dtype(name), g.graph.shape(name)))
    add_training_outputs(graph)
    builder = GradBuilder(graph)
    builder.prefix = attr
    ys = [graph.outputs[k] for k in seeded]
    for y in ys:
        if graph.info.get(y) is not None and graph.info[y].kind == "optional":
            raise UnsupportedOpError(node.op_type, node.domain, node.opset, node.name,
                                     what=f"gradient through optional output {y!r} of "
                                          f"attribute {attr!r}")
    seeds = [graph.unique_name(grad_name(y), builder.taken) for y in ys]
    for y, s in zip(ys, seeds):
        graph.info[s] = gradient_info(graph, y)
    loss = builder.private("InnerProduct", *ys, *seeds,
                           dtype=element_dtype(element_code(builder, ys[0])))
    try:
        grads = build_gradients(graph, loss, wrt)
    except UnsupportedOpError as exc:
        raise UnsupportedOpError(node.op_type, node.domain, node.opset, node.name,
                                 what=f"gradient through attribute {attr!r} [{exc}]") from exc
    builder = GradBuilder(graph)
    builder.prefix = attr
    graph.outputs = [grads[w] if w in grads else builder.private(
        "SequenceZerosLike" if _is_sequence(graph, w) else "ZerosLike", w) for w in wrt]
    prune(graph, graph.outputs)
    graph.inputs = own + captured + seeds
    return BodyGradient(graph, own + seeds, captured, list(wrt))


def _backward_body(xp, ctx, attr: str, backward: BodyGradient) -> Body:
    return _compiled(ctx, attr, backward, lambda: Body(xp, backward.graph, backward.inputs,
                                                       backward.captured, ctx.state))


def _is_sequence(graph, name: str) -> bool:
    info = graph.info.get(name)
    return info is not None and info.kind == "sequence"


def _is_float_value(g, name: str) -> bool:
    """Whether ``name`` is a float tensor, or a sequence of float tensors (or of tensors of
    a type not known: its gradient is then asked for rather than dropped)."""
    if name and _is_sequence(g.graph, name):
        element = g.graph.info[name].element
        return element is None or element.dtype is None or is_float(element.dtype)
    return bool(name) and is_float(g.graph.dtype(name))


def _outer_wrt(g, node, start: int, bodies: list) -> list[str]:
    """The float outer values the node's bodies read: its inputs from ``start`` on (the
    captured ones), and any of its own inputs a body also reads by name."""
    free = {n for body in bodies for n in free_names(body)}
    names = [x for i, x in enumerate(node.inputs) if x and (i >= start or x in free)]
    return [x for x in dict.fromkeys(names) if _is_float_value(g, x)]


def _emit(g, op_type: str, inputs: list, of: list[str], **attrs) -> list[str]:
    """Append private gradient node ``op_type``; one output per value in ``of``, typed like it."""
    from onnxgrad.autodiff import gradient_info  # noqa: PLC0415 - runtime imports ops

    outs = g.private(op_type, *inputs, num_outputs=len(of), **attrs)
    outs = [outs] if isinstance(outs, str) else outs
    for out, value in zip(outs, of):
        g.graph.info[out] = gradient_info(g.graph, value)
    return outs


def _by_input(g, node, pairs: list[tuple[int, str]]) -> tuple:
    """One gradient per input of ``node`` from ``(input index, gradient)`` pairs (summed where
    an input gets several)."""
    result: list = [None] * len(node.inputs)
    for index, grad in pairs:
        if result[index] is None:
            result[index] = grad
        elif _is_sequence(g.graph, grad):
            info = g.graph.info[grad]
            result[index] = g.private("SequenceGradSum", result[index], grad)
            g.graph.info[result[index]] = info
        else:
            result[index] = g.Add(result[index], grad)
    return tuple(result)


def _sum_into(total: list | None, grads: list) -> list:
    """Gradients summed over iterations (sequence gradients element by element)."""
    return list(grads) if total is None else [add_gradients(a, b) for a, b in zip(total, grads)]


@If.gradient
def _(g, node, *douts):
    seeded = [k for k, d in enumerate(douts) if d is not None]
    branches = [node.attrs["then_branch"], node.attrs["else_branch"]]
    wrt = _outer_wrt(g, node, 1, branches)
    if not wrt:
        return (None,) * len(node.inputs)
    backward = {attr: _body_gradient(g, attr, node.attrs[attr], seeded, wrt)
                for attr in ("then_branch", "else_branch")}
    outs = _emit(g, "IfGrad", list(node.inputs) + [douts[k] for k in seeded], wrt,
                 num_outer=len(node.inputs), **backward)
    return _by_input(g, node, [(node.inputs.index(w), o) for w, o in zip(wrt, outs)])


@op("IfGrad", domain="onnxgrad")
def IfGrad(xp, cond, *values, ctx, then_branch, else_branch, num_outer):
    """Gradients of an If node's float outer values (``values``: the If's other inputs, then
    the gradients of its seeded outputs): the backward graph of the branch taken."""
    outer = scope(ctx, (cond,) + values)
    attr = "then_branch" if _truth(xp, cond) else "else_branch"
    backward = then_branch if attr == "then_branch" else else_branch
    return tuple(_backward_body(xp, ctx, attr, backward).run(list(values[num_outer - 1:]), outer))


@Loop.gradient
def _(g, node, *douts):
    body = node.attrs["body"]
    n_carried = len(body.input) - 2
    own = [vi.name for vi in body.input]
    carried = [k for k in range(n_carried) if _is_float_value(g, node.inputs[2 + k])]
    for k in range(n_carried):
        if douts[k] is not None and k not in carried:
            raise UnsupportedOpError(node.op_type, node.domain, node.opset, node.name,
                                     what=f"gradient through carried value {node.outputs[k]!r}, "
                                          "neither a float tensor nor a sequence of them")
    scanned = [n_carried + j for j in range(len(body.output) - 1 - n_carried)
               if douts[n_carried + j] is not None]
    outer = _outer_wrt(g, node, 2 + n_carried, [body])
    seeded = [1 + k for k in carried] + [1 + k for k in scanned]
    if not seeded or not carried + outer:
        return (None,) * len(node.inputs)
    backward = _body_gradient(g, "body", body, seeded, [own[2 + k] for k in carried] + outer)
    outs = _emit(g, "LoopGrad", list(node.inputs) + [douts[k] for k in carried + scanned],
                 [node.inputs[2 + k] for k in carried] + outer, body=body, backward=backward,
                 num_outer=len(node.inputs), carried=carried, opset=node.opset)
    return _by_input(g, node, [(2 + k, o) for k, o in zip(carried, outs)] + [
        (node.inputs.index(w), o) for w, o in zip(outer, outs[len(carried):])])


@op("LoopGrad", domain="onnxgrad")
def LoopGrad(xp, M=None, cond=None, *values, ctx, body, backward, num_outer, carried, opset):
    """Gradients of a Loop node's float initial values (those at indices ``carried``: tensors
    or sequences) and float outer values.  ``values``: the Loop's other inputs, then the
    gradients of those final values (None: zero) and of its seeded scan outputs.  Runs the
    loop again keeping each iteration's carried values, then the body's backward graph from
    the last iteration to the first, passing the carried values' gradients back and summing
    the outer values'.  ``opset``: the Loop's."""
    n_carried = len(body.input) - 2
    outer = scope(ctx, (M, cond) + values)
    compiled = body_of(xp, ctx, "body", body, list(outer), opset)
    final, _, history = _run_loop(xp, ctx, compiled, M, cond, list(values[:n_carried]), outer,
                                  keep=True)
    seeds = values[num_outer - 2:]
    dcarried = [zero_gradient(xp, final[k]) if d is None else d for k, d in zip(carried, seeds)]
    dscans = seeds[len(carried):]
    back = _backward_body(xp, ctx, "backward", backward)
    total = None
    for i in reversed(range(len(history))):
        grads = back.run([xp.asarray(i, dtype=xp.int64), xp.asarray(True)] + history[i]
                         + dcarried + [d[i] for d in dscans], outer)
        dcarried = grads[:len(carried)]
        total = _sum_into(total, grads[len(carried):])
    if total is None:
        total = [zero_gradient(xp, outer[w]) for w in backward.wrt[len(carried):]]
    return tuple(dcarried) + tuple(total)


def _scan_rule(g, node, *douts):
    body = node.attrs["body"]
    first = 1 if node.opset < 9 else 0  # opset 8: sequence_lens first
    n_own = len(body.input)
    n_states = n_own - node.attrs["num_scan_inputs"]
    own = [vi.name for vi in body.input]
    floats = [i for i in range(n_own) if _is_float_value(g, node.inputs[first + i])]
    states = [i for i in floats if i < n_states]
    scanned = [k for k in range(n_states, len(body.output)) if douts[k] is not None]
    outer = _outer_wrt(g, node, first + n_own, [body])
    if not states + scanned or not floats + outer:
        return (None,) * len(node.inputs)
    backward = _body_gradient(g, "body", body, states + scanned, [own[i] for i in floats] + outer)
    attrs = {k: v for k, v in node.attrs.items() if v is not None and k != "body"}
    outs = _emit(g, "ScanGrad", list(node.inputs) + [douts[k] for k in states + scanned],
                 [node.inputs[first + i] for i in floats] + outer, body=body, backward=backward,
                 num_outer=len(node.inputs), states=states,
                 scans=[i - n_states for i in floats if i >= n_states],
                 scanned=[k - n_states for k in scanned], batched=first, opset=node.opset,
                 **attrs)
    return _by_input(g, node, [(first + i, o) for i, o in zip(floats, outs)] + [
        (node.inputs.index(w), o) for w, o in zip(outer, outs[len(floats):])])


Scan.gradient(_scan_rule)
Scan8.gradient(_scan_rule)


def _scan_backward(xp, ctx, compiled: Body, back: Body, states, scans, outer, layout, which,
                   dfinals, dys):
    """The gradients of one run of a Scan body over ``scans``: of the states and scan inputs
    ``which`` = (state indices, scan input indices), and of the outer values ``back``
    differentiates (None when there is no iteration); ``dfinals`` are the final states'
    gradients (None: zero), ``dys`` those of the seeded scan outputs ``which[2]``."""
    in_axes, in_dirs, out_axes, out_dirs = layout
    float_states, float_scans, scanned = which
    final, _, history = _scan(xp, ctx, compiled, states, scans, outer, *layout, keep=True)
    length = len(history)
    dstates = [xp.zeros_like(final[i]) if d is None else d for i, d in zip(float_states, dfinals)]
    dscans = [xp.zeros_like(scans[i]) for i in float_scans]
    total = None
    for t in reversed(range(length)):
        seeds = [xp.take(dy, length - 1 - t if out_dirs[k] else t, axis=out_axes[k] % dy.ndim)
                 for k, dy in zip(scanned, dys)]
        grads = back.run(history[t] + _slices(xp, scans, t, length, in_axes, in_dirs)
                         + dstates + seeds, outer)
        dstates = grads[:len(float_states)]
        for j, i in enumerate(float_scans):
            index = [slice(None)] * scans[i].ndim
            index[in_axes[i]] = length - 1 - t if in_dirs[i] else t
            dscans[j][tuple(index)] = grads[len(float_states) + j]
        total = _sum_into(total, grads[len(float_states) + len(float_scans):])
    return dstates, dscans, total


@op("ScanGrad", domain="onnxgrad")
def ScanGrad(xp, *values, ctx, body, backward, num_outer, states, scans, scanned, batched, opset,
             num_scan_inputs, scan_input_axes=None, scan_input_directions=None,
             scan_output_axes=None, scan_output_directions=None, directions=None):
    """Gradients of a Scan node's float states (indices ``states``), float scan inputs
    (``scans``) and float outer values.  ``values``: the Scan's inputs, then the gradients of
    its final states (None: zero) and of its scan outputs ``scanned``.  ``batched``: opset 8,
    where each batch element (up to its sequence length) is a scan of its own.  ``opset``:
    the Scan's."""
    outer = scope(ctx, values)
    n_own = len(body.input)
    n_states = n_own - num_scan_inputs
    own = list(values[batched:batched + n_own])
    init, xs = own[:n_states], own[n_states:]
    seeds = values[num_outer:]
    dfinals, dys = seeds[:len(states)], seeds[len(states):]
    compiled = body_of(xp, ctx, "body", body, list(outer), opset)
    back = _backward_body(xp, ctx, "backward", backward)
    layout = _layout(body, n_states, xs, scan_input_axes, scan_input_directions,
                     scan_output_axes, scan_output_directions, directions, batched)
    which = (states, scans, scanned)
    zeros = [zero_gradient(xp, outer[w]) for w in backward.wrt[len(states) + len(scans):]]
    if not batched:
        dstates, dscans, total = _scan_backward(xp, ctx, compiled, back, init, xs, outer, layout,
                                                which, dfinals, dys)
        return tuple(dstates) + tuple(dscans) + tuple(zeros if total is None else total)
    lens = values[0]
    dstates = [xp.zeros_like(init[i]) for i in states]
    dscans = [xp.zeros_like(xs[i]) for i in scans]
    total = zeros
    for b in range(init[0].shape[0] if init else xs[0].shape[0]):
        n = xs[0].shape[1] if lens is None else int(lens[b])
        part = _scan_backward(xp, ctx, compiled, back, [s[b] for s in init],
                              [x[b][:n] for x in xs], outer, layout, which,
                              [None if d is None else d[b] for d in dfinals],
                              [dy[b] for dy in dys])
        for j, d in enumerate(part[0]):
            dstates[j][b] = d
        for j, d in enumerate(part[1]):
            dscans[j][b, :n] = d
        if part[2] is not None:
            total = _sum_into(total, part[2])
    return tuple(dstates) + tuple(dscans) + tuple(total)


@SequenceMap.gradient
def _(g, node, *douts):
    body = node.attrs["body"]
    n_own = len(body.input)  # the sequence, then the additional inputs
    own = [vi.name for vi in body.input]
    floats = [i for i in range(n_own) if _is_float_value(g, node.inputs[i])]
    seeded = [k for k, d in enumerate(douts) if d is not None]
    outer = _outer_wrt(g, node, n_own, [body])
    if not seeded or not floats + outer:
        return (None,) * len(node.inputs)
    backward = _body_gradient(g, "body", body, seeded, [own[i] for i in floats] + outer)
    # Where one output's gradient misses an element and another's has it, the first is
    # written as zeros of the element's shape: recorded when the outputs are made.
    shapes = [shapes_of(g, node.outputs[k]) for k in seeded] if len(seeded) > 1 else []
    outs = _emit(g, "SequenceMapGrad", list(node.inputs) + [douts[k] for k in seeded] + shapes,
                 [node.inputs[i] for i in floats] + outer, body=body, backward=backward,
                 num_outer=len(node.inputs), floats=floats,
                 to=[body.output[k].type.tensor_type.elem_type or element_code(g, node.outputs[k])
                     for k in seeded])
    return _by_input(g, node, [(i, o) for i, o in zip(floats, outs)] + [
        (node.inputs.index(w), o) for w, o in zip(outer, outs[len(floats):])])


@op("SequenceMapGrad", domain="onnxgrad")
def SequenceMapGrad(xp, *values, ctx, body, backward, num_outer, floats, to):
    """Gradients of a SequenceMap node's float inputs (indices ``floats``: the sequence and
    additional inputs, sequences or tensors) and float outer values.  ``values``: the
    node's inputs, the gradients of its seeded outputs (sequence gradients, of element type
    ``to``), then, with more than one seeded output, their element shapes.  The body's
    backward graph runs once per element that any seed reaches; a sequence input gets its
    elements' gradients, a tensor input and an outer value the sum over the elements."""
    own = list(values[:len(body.input)])
    outer = scope(ctx, values[:num_outer])
    seeds = values[num_outer:num_outer + len(to)]
    shapes = [element_shapes(v) for v in values[num_outer + len(to):]]
    n = len(own[0])
    for x in own[1:]:
        if isinstance(x, list) and len(x) != n:
            raise ModelError(f"SequenceMap node {ctx.node.name!r}: sequences of lengths {n} "
                             f"and {len(x)}")
    for seed in seeds:
        if not isinstance(seed, list) or len(seed) != n:
            raise ModelError(f"SequenceMapGrad node {ctx.node.name!r}: an output gradient is "
                             f"not a sequence of {n}")
    back = _backward_body(xp, ctx, "backward", backward)
    dtypes = [element_dtype(code) for code in to]
    grads: list = [[None] * n if isinstance(own[i], list) else None for i in floats]
    total = None
    for t in range(n):
        step = [seed[t] for seed in seeds]
        if all(d is None for d in step):
            continue  # no gradient reaches this element
        step = [xp.zeros(shapes[k][t], dtype=dtypes[k]) if d is None else d
                for k, d in enumerate(step)]
        result = back.run([x[t] if isinstance(x, list) else x for x in own] + step, outer)
        for j, i in enumerate(floats):
            if isinstance(own[i], list):
                grads[j][t] = result[j]
            else:
                grads[j] = result[j] if grads[j] is None else grads[j] + result[j]
        total = _sum_into(total, result[len(floats):])
    grads = [zero_gradient(xp, own[i]) if d is None else d for d, i in zip(grads, floats)]
    if total is None:
        total = [zero_gradient(xp, outer[w]) for w in backward.wrt[len(floats):]]
    return tuple(grads) + tuple(total)
