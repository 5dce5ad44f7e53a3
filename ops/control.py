"""Control flow: If, Loop, Scan and SequenceMap, whose bodies are ONNX graphs.

A body (an ``onnx.GraphProto`` attribute) is turned into an onnxgrad graph
with :func:`onnxgrad.loader.build_graph` and run by its own
:class:`onnxgrad.executor.Plan`, made once per node and run state.  Values the
body reads from enclosing scopes ("captured" values) reach the kernel as extra
inputs after the op's own: :func:`add_captured_inputs` (which the loader calls
on every graph it builds) appends their names to the nodes, and the kernel
feeds the body every outer value it reads by name, the node's own inputs
included (a body may read, say, the Loop's trip count or the If's condition).

These ops run forward only: their data inputs (captured values included) are
declared differentiable without a rule, so asking for a gradient through them
raises UnsupportedOpError rather than giving zero.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import onnx

from onnxgrad.errors import ModelError
from onnxgrad.ops.registry import op

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
class Body:
    """A graph attribute compiled into a plan; :meth:`run` maps inputs to outputs."""

    def __init__(self, xp, proto: onnx.GraphProto, ctx, attr: str, captured: list[str]):
        from onnxgrad.backend import get_backend  # noqa: PLC0415 - runtime imports ops
        from onnxgrad.executor import Plan  # noqa: PLC0415
        from onnxgrad.loader import build_graph  # noqa: PLC0415

        node = ctx.node
        where = f"node {node.name!r} ({node.op_type}) attribute {attr!r}"
        model = onnx.ModelProto()
        model.graph.CopyFrom(proto)
        domains = {n.domain or "" for n in _all_nodes(proto)} - {"", "ai.onnx"}
        model.opset_import.add(domain="", version=node.opset if node.domain in ("", "ai.onnx")
                               else onnx.defs.onnx_opset_version())
        for domain in sorted(domains):
            # The body's node of another domain: the newest version onnxgrad declares.
            model.opset_import.add(domain=domain, version=node.opset if domain == node.domain
                                   else 1000)
        graph = build_graph(model, where)  # nested bodies get their captured inputs there
        free = free_names(proto)
        missing = [n for n in free if n not in captured]
        if missing:
            raise ModelError(f"{where} reads outer-scope value(s) {missing} that the node does "
                             "not receive (the loader passes them as extra inputs)")
        self.inputs = [vi.name for vi in proto.input]
        self.outputs = [vi.name for vi in proto.output]
        self.captured = [n for n in captured if n in free]
        graph.inputs = [n for n in self.inputs if n not in graph.initializers] + \
            [n for n in captured if n not in graph.initializers]
        self.output_dtypes = [graph.dtype(n) for n in self.outputs]
        self.graph = graph
        backend = get_backend("cpu" if xp.__name__ == "numpy" else "cuda")
        self.plan = Plan(graph, backend, constants=dict(graph.initializers), fetch=self.outputs,
                         state=ctx.state)

    def run(self, values: list, outer: dict[str, Any]) -> list:
        if len(values) != len(self.inputs):
            raise ModelError(f"body of node expects {len(self.inputs)} inputs, got {len(values)}")
        env = {n: outer[n] for n in self.captured}
        env.update(zip(self.inputs, values))
        result = self.plan.run(env)
        return [result[n] for n in self.outputs]


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for sub in _subgraphs(node.attribute):
            yield from _all_nodes(sub)


_BODIES: OrderedDict[tuple, tuple] = OrderedDict()
_BODY_LIMIT = 512


def body_of(xp, ctx, attr: str, proto: onnx.GraphProto, captured: list[str]) -> Body:
    """The compiled body ``attr`` of ``ctx.node`` (made once per node, body and run state)."""
    key = (id(ctx.node), id(proto), id(ctx.state), attr)
    entry = _BODIES.get(key)
    if entry is not None and entry[0] is ctx.node and entry[1] is proto and entry[2] is ctx.state:
        _BODIES.move_to_end(key)
        return entry[3]
    body = Body(xp, proto, ctx, attr, captured)
    _BODIES[key] = (ctx.node, proto, ctx.state, body)
    if len(_BODIES) > _BODY_LIMIT:
        _BODIES.popitem(last=False)
    return body


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
@op("Loop", since=1, differentiable=("v_initial",))
def Loop(xp, M=None, cond=None, *v_initial, ctx, body):
    n_carried = len(body.input) - 2
    if n_carried < 0:
        raise ModelError(f"Loop node {ctx.node.name!r}: its body must take the iteration number "
                         "and the condition first")
    carried = list(v_initial[:n_carried])
    outer = scope(ctx, (M, cond) + v_initial)
    compiled = body_of(xp, ctx, "body", body, list(outer))
    limit = None if M is None else int(xp.asarray(M).reshape(-1)[0])
    go = _truth(xp, cond)
    n_scan = len(compiled.outputs) - 1 - n_carried
    scans: list[list] = [[] for _ in range(n_scan)]
    i = 0
    while go and (limit is None or i < limit):
        outs = compiled.run([xp.asarray(i, dtype=xp.int64), xp.asarray(go)] + carried, outer)
        go = _truth(xp, outs[0])
        carried = outs[1:1 + n_carried]
        for k, value in enumerate(outs[1 + n_carried:]):
            scans[k].append(value)
        i += 1
        if limit is None and i > 10_000_000:
            raise ModelError(f"Loop node {ctx.node.name!r}: no trip count and still running "
                             "after 10,000,000 iterations")
    dtypes = compiled.output_dtypes[1 + n_carried:]
    return tuple(carried) + tuple(_stack(xp, s, d) for s, d in zip(scans, dtypes))


# -- Scan -----------------------------------------------------------------------------------
def _scan(xp, ctx, body, states, scans, outer, in_axes, in_dirs, out_axes, out_dirs):
    compiled = body_of(xp, ctx, "body", body, list(outer))
    n_states = len(states)
    length = None
    for x, axis in zip(scans, in_axes):
        n = x.shape[axis]
        if length is not None and n != length:
            raise ModelError(f"Scan node {ctx.node.name!r}: scan inputs differ in length "
                             f"({length} and {n})")
        length = n
    length = length or 0
    outputs: list[list] = [[] for _ in range(len(compiled.outputs) - n_states)]
    for t in range(length):
        slices = [xp.take(x, length - 1 - t if d else t, axis=a)
                  for x, a, d in zip(scans, in_axes, in_dirs)]
        outs = compiled.run(list(states) + slices, outer)
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
    return list(states), stacked


def _axes(values, n: int, rank_of=None) -> list[int]:
    if values is None:
        return [0] * n
    values = [int(v) for v in values]
    if rank_of is not None:
        values = [v % rank_of(i) if v < 0 else v for i, v in enumerate(values)]
    return values


@op("Scan", since=9, differentiable=("initial_state_and_scan_inputs",))
def Scan(xp, *initial_state_and_scan_inputs, ctx, body, num_scan_inputs,
         scan_input_axes=None, scan_input_directions=None, scan_output_axes=None,
         scan_output_directions=None):
    n_own = len(body.input)  # states, then scan inputs
    own = list(initial_state_and_scan_inputs[:n_own])
    outer = scope(ctx, initial_state_and_scan_inputs)
    n_states = n_own - num_scan_inputs
    states, scans = own[:n_states], own[n_states:]
    n_out = len(body.output) - n_states
    in_axes = _axes(scan_input_axes, num_scan_inputs, lambda i: scans[i].ndim)
    in_dirs = _axes(scan_input_directions, num_scan_inputs)
    out_axes = _axes(scan_output_axes, n_out)
    out_axes = [a % (len(body.output[n_states + k].type.tensor_type.shape.dim) + 1) if a < 0 else a
                for k, a in enumerate(out_axes)]
    out_dirs = _axes(scan_output_directions, n_out)
    final, stacked = _scan(xp, ctx, body, states, scans, outer, in_axes, in_dirs, out_axes,
                           out_dirs)
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
    dirs = _axes(directions, num_scan_inputs)
    n_out = len(body.output) - n_states
    finals: list[list] = [[] for _ in range(n_states)]
    outs: list[list] = [[] for _ in range(n_out)]
    for b in range(batch):
        n = None if sequence_lens is None else int(sequence_lens[b])
        sl = [x[b] if n is None else x[b][:n] for x in scans]
        final, stacked = _scan(xp, ctx, body, [s[b] for s in states], sl, outer,
                               [0] * num_scan_inputs, dirs, [0] * n_out, [0] * n_out)
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
