"""Gradient checks in float64 over the ONNX backend node suite.

Each suite case (``onnxgrad.tools.conformance.load_cases()``) is a small model
with its input arrays.  :func:`check_case` turns it into a gradient check:

1. The model goes to float64 (:func:`to_float64`): float32, float16 and
   bfloat16 inputs, outputs, value infos, initializers, constant tensors and
   type attributes (``Cast.to``, ``dtype``…) become double wherever the ops'
   schemas allow ``tensor(double)`` (:func:`float64_blockers`; e.g. Resize's
   ``X`` does, its ``scales`` does not).  Values that must stay float are not
   differentiated nor part of the loss; a case left with no double input or
   output is skipped (the choice: skip, rather than a loose float32 check).
   Integer and bool inputs stay as they are and are not differentiated.
2. The loss is ``Σ_k sum(Y_k * U_k)`` over the double outputs ``Y_k`` that are
   finite at the suite's inputs, with fixed random ``U_k`` (seeded by the case
   name).  As in :mod:`gradcheck` (whose helpers build one-node models from
   op_db samples), the analytic gradients come from ``Trainer.gradients`` on a
   model whose float inputs are initializers and which computes that loss, and
   the numeric ones from central differences of ``onnxgrad.load(model).run``.
3. Each float input with a gradient path to the loss is checked along a random
   direction ``v``: ⟨∂loss/∂x, v⟩ against ``(f(x + εv) - f(x - εv)) / 2ε``,
   within ``RTOL · max(|analytic|, |numeric|, 1)`` plus the loss's rounding.

The suite's inputs often sit exactly where a function is not differentiable
(Relu at 0, Max ties, Floor at integers, a zero norm…).  Such a point is found
from the function itself, not from a list of ops: when a check fails, it is
repeated with ε/8 (a point merely *near* a kink then passes); if the one-sided
differences at ε/8 disagree, or the central differences at ε and ε/8 do (by
more than a quarter of the mismatch), the loss has a kink, jump or pole along
``v`` there and that input is left out as ambiguous.  For a smooth function
whose gradient is wrong, both agree to O(ε).  A failing case is also run as a
training step: where that is random (Dropout) or computes another function
than ``Model.run`` (BatchNormalization's batch statistics), it is skipped.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxgrad
from onnxgrad.autodiff import differentiable_ancestors
from onnxgrad.errors import UnsupportedOpError
from onnxgrad.tools import conformance as C

#: Floating-point element types that the check moves to float64.
TO_DOUBLE = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)

#: Integer attributes that name an element type (``Cast.to``, ``EyeLike.dtype``,
#: ``LayerNormalization.stash_type``…): a float type there becomes double.
TYPE_ATTRS = ("to", "dtype", "output_dtype", "stash_type")

EPS = 1e-6        # central-difference step (float64)
RTOL = 1e-5       # relative tolerance, of max(|analytic|, |numeric|, 1)
#: Rounding of one loss evaluation, relative to Σ|Y * U|: a numeric derivative is
#: uncertain by about ROUNDOFF · Σ|Y * U| / ε on top of RTOL.
ROUNDOFF = 64 * np.finfo(np.float64).eps

#: Prefix of the values the check adds to a case's graph.
PREFIX = "gradcheck__"


class Skip(Exception):
    """The case cannot be checked: ``"<reason>: <details>"``."""

    @property
    def reason(self) -> str:
        return str(self).split(":")[0]


@dataclass
class Check:
    """One input's directional derivative: analytic, numeric and the tolerance."""

    input: str
    analytic: float
    numeric: float
    tol: float
    eps: float = EPS

    @property
    def ok(self) -> bool:
        return bool(abs(self.analytic - self.numeric) <= self.tol)

    def __str__(self) -> str:
        return (f"d/d{self.input}: analytic {self.analytic:.10g} vs numeric {self.numeric:.10g} "
                f"(|diff| {abs(self.analytic - self.numeric):.3g} > tol {self.tol:.3g}, "
                f"eps {self.eps:g})")


@dataclass
class Outcome:
    """A checked case: ``failures`` empty, it passes.  Inputs along which the loss is not
    differentiable at the suite's inputs are left out, with the reason in ``ambiguous``
    (a case with no other input is skipped)."""

    case: str
    checks: list[Check] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)


# -- the case as a float64 model -----------------------------------------------------------------
def _elem_types(tp: onnx.TypeProto):
    """The tensor types inside a (sequence, optional, map…) type, as mutable protos."""
    which = tp.WhichOneof("value")
    if which == "tensor_type":
        yield tp.tensor_type
    elif which == "sparse_tensor_type":
        yield tp.sparse_tensor_type
    elif which == "sequence_type":
        yield from _elem_types(tp.sequence_type.elem_type)
    elif which == "optional_type":
        yield from _elem_types(tp.optional_type.elem_type)
    elif which == "map_type":
        yield from _elem_types(tp.map_type.value_type)


def _is_float(tp: onnx.TypeProto, types=(*TO_DOUBLE, TensorProto.DOUBLE)) -> bool:
    return any(t.elem_type in types for t in _elem_types(tp))


def _tensor_to_double(t: TensorProto) -> None:
    if t.data_type in TO_DOUBLE:
        t.CopyFrom(numpy_helper.from_array(
            numpy_helper.to_array(t).astype(np.float64), t.name))


def _node_to_double(node: onnx.NodeProto) -> None:
    """Make a node's float constants and type attributes double (subgraphs included)."""
    for attr in list(node.attribute):
        if attr.type == onnx.AttributeProto.TENSOR:
            _tensor_to_double(attr.t)
        elif attr.type == onnx.AttributeProto.TENSORS:
            for t in attr.tensors:
                _tensor_to_double(t)
        elif attr.type == onnx.AttributeProto.GRAPH:
            _graph_to_double(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                _graph_to_double(g)
        elif attr.type == onnx.AttributeProto.INT and attr.name in TYPE_ATTRS \
                and attr.i in TO_DOUBLE:
            attr.i = TensorProto.DOUBLE
        elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
            # value_float(s) make float32 constants: write them as a double tensor.
            values = np.array([attr.f] if attr.name == "value_float" else list(attr.floats))
            if attr.name == "value_float":
                values = values.reshape(())
            node.attribute.remove(attr)
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(values)))


def _graph_to_double(graph: onnx.GraphProto, keep=frozenset()) -> None:
    """Every float value of ``graph`` to double but those in ``keep``, with the constants
    and type attributes of the nodes that make them (a node with an output in ``keep``,
    such as LayerNormalization's float ``Mean`` whose type ``stash_type`` sets, keeps its
    attributes)."""
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        for t in _elem_types(vi.type):
            if t.elem_type in TO_DOUBLE and vi.name not in keep:
                t.elem_type = TensorProto.DOUBLE
    for t in graph.initializer:
        if t.name not in keep:
            _tensor_to_double(t)
    for node in graph.node:
        if not any(o in keep for o in node.output):
            _node_to_double(node)


def _schema(node: onnx.NodeProto, opsets: dict[str, int]):
    domain = "" if node.domain == "ai.onnx" else node.domain
    try:
        return onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
    except onnx.defs.SchemaError:
        return None


def _formal(params, index: int):
    if index < len(params):
        return params[index]
    variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    return params[-1] if params and params[-1].option == variadic else None


def float64_blockers(model: onnx.ModelProto) -> dict[str, str]:
    """The float values of ``model``'s graph that cannot become double, and why:
    ``{value: "Resize input 'scales' allows tensor(float)"}``.

    Values that an op's schema ties to one type parameter (``T`` of Add's inputs and
    output, say) go to double together, and only if every op that ties them allows
    ``tensor(double)`` there: Resize's ``X`` becomes double while its ``scales``
    (only ``tensor(float)``) stays float.  A graph with subgraphs (If, Loop, Scan)
    goes to double whole, checked by the ONNX checker alone."""
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in g.node for a in n.attribute):
        return {}
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {vi.name: vi.type for vi in [*inferred.input, *inferred.output, *inferred.value_info]}
    types.update({t.name: helper.make_tensor_type_proto(t.data_type, None)
                  for t in inferred.initializer})
    floats = {n for n, tp in types.items() if _is_float(tp, TO_DOUBLE)}
    parent: dict = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = x = parent[parent[x]]
        return x

    why: dict[str, str] = {}
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    for k, node in enumerate(g.node):
        schema = _schema(node, opsets)
        allowed = {} if schema is None else {
            c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
        for values, params, side in ((node.input, schema.inputs if schema else [], "input"),
                                     (node.output, schema.outputs if schema else [], "output")):
            for i, name in enumerate(values):
                if name not in floats:
                    continue
                param = _formal(params, i)
                if param is None:  # no schema: the node's float values stay together
                    parent[find(name)] = find((k, None))
                    continue
                strs = allowed.get(param.type_str, [param.type_str])
                if param.type_str in allowed:
                    parent[find(name)] = find((k, param.type_str))
                if not any("tensor(double)" in s for s in strs):
                    why[name] = (f"{node.op_type} {side} {param.name!r} allows "
                                 f"{', '.join(sorted(strs))}")
    blocked = {find(n) for n in why}
    for n in floats:
        if n not in why and find(n) in blocked:
            why[n] = next(r for m, r in why.items() if find(m) == find(n))
    return why


def to_float64(model: onnx.ModelProto, keep=frozenset()) -> onnx.ModelProto:
    """A copy of ``model`` with its float32/float16/bfloat16 types and constants in double,
    but for the values in ``keep``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _graph_to_double(out.graph, keep)
    return out


def _as_double(x):
    """A feed in float64 (sequences element by element); other types as they are."""
    if isinstance(x, list):
        return [_as_double(v) for v in x]
    if isinstance(x, np.ndarray) and x.dtype != object and \
            helper.np_dtype_to_tensor_dtype(x.dtype) in TO_DOUBLE:
        return x.astype(np.float64)
    return x


@dataclass
class Prepared:
    """A case as a float64 model, its feeds, and the float tensor inputs to differentiate."""

    name: str
    model: onnx.ModelProto          # every input a graph input
    feeds: dict
    float_inputs: list[str]         # the double tensor inputs
    kept: dict[str, str]            # float values that stay float, and why


def prepare(case) -> Prepared:
    """The case in float64, or :class:`Skip` saying why it cannot be checked."""
    model = case.model
    missing = C.unregistered_ops(model)
    if missing:
        raise Skip("unregistered op: " + ", ".join(missing))
    keep = float64_blockers(model)
    model64 = to_float64(model, keep)
    try:
        onnx.checker.check_model(model64, full_check=True)
    except Exception as exc:  # noqa: BLE001 - a backstop for types the schema walk misses
        raise Skip(f"float64 not allowed: the checker refuses the float64 model: "
                   f"{C._first_line(exc)}") from None
    initializers = {t.name for t in model64.graph.initializer}
    inputs = [vi for vi in model64.graph.input if vi.name not in initializers]
    values = case.data_sets[0][0]
    feeds = {vi.name: C._as_value(x) if vi.name in keep else _as_double(C._as_value(x))
             for vi, x in zip(inputs, values)}
    float_inputs = [vi.name for vi in inputs if vi.type.WhichOneof("value") == "tensor_type"
                    and vi.type.tensor_type.elem_type == TensorProto.DOUBLE]
    if not float_inputs:
        kept = sorted({keep[vi.name] for vi in inputs if vi.name in keep})
        # The choice for ops without float64: skip, rather than a loose float32 check.
        raise Skip("float64 not allowed: " + "; ".join(kept) if kept
                   else "no floating-point tensor input")
    if not any(o.domain in ("", "ai.onnx") for o in model64.opset_import):
        # ai.onnx.ml and training cases: the loss's Mul, ReduceSum and Sum need ai.onnx.
        model64.opset_import.append(helper.make_opsetid("", 17))
        model64.ir_version = max(model64.ir_version, 8)
    return Prepared(case.name, model64, feeds, float_inputs, keep)


# -- loss and gradients ---------------------------------------------------------------------------
def projections(name: str, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fixed random U per floating-point output (seeded by the case name)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return {k: rng.standard_normal(y.shape) for k, y in outputs.items()}


def loss_value(us: dict[str, np.ndarray], outs: dict) -> tuple[float, float]:
    """``Σ sum(Y * U)`` in float64, and ``Σ |Y * U|`` (the loss's scale, for rounding)."""
    terms = [np.asarray(outs[k], np.float64) * u for k, u in us.items()]
    return float(sum(np.sum(t) for t in terms)), float(sum(np.sum(np.abs(t)) for t in terms))


def loss_model(p: Prepared, us: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``p.model`` with float inputs as initializers and ``loss = Σ_k ReduceSum(Y_k * U_k)``
    as its only output (U_k graph inputs)."""
    model = onnx.ModelProto()
    model.CopyFrom(p.model)
    graph = model.graph
    keep = [vi for vi in graph.input if vi.name not in p.float_inputs]
    del graph.input[:]
    graph.input.extend(keep)
    graph.initializer.extend(numpy_helper.from_array(p.feeds[n], n) for n in p.float_inputs)
    model.ir_version = max(model.ir_version, 4)  # initializers that are not inputs
    terms = []
    for i, (name, u) in enumerate(us.items()):
        un, yu, term = (f"{PREFIX}{s}{i}" for s in ("U", "YU", "term"))
        graph.input.append(helper.make_tensor_value_info(un, TensorProto.DOUBLE, u.shape))
        graph.node.extend([helper.make_node("Mul", [name, un], [yu]),
                           helper.make_node("ReduceSum", [yu], [term], keepdims=0)])
        terms.append(term)
    graph.node.append(helper.make_node("Sum", terms, [PREFIX + "loss"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(PREFIX + "loss", TensorProto.DOUBLE, []))
    return model


def _loss_feeds(p: Prepared, us: dict[str, np.ndarray]) -> dict:
    feeds = {k: v for k, v in p.feeds.items() if k not in p.float_inputs}
    feeds.update({f"{PREFIX}U{i}": u for i, u in enumerate(us.values())})
    return feeds


def analytic_gradients(p: Prepared, us: dict[str, np.ndarray]):
    """∂loss/∂x for every float input with a gradient path to the loss, by
    ``Trainer.gradients``, and the trainer (:class:`Skip` when no input has a path)."""
    model = onnxgrad.load(loss_model(p, us))
    reach = differentiable_ancestors(model.graph, PREFIX + "loss")
    wrt = [n for n in p.float_inputs if n in reach]
    if not wrt:
        raise Skip("no gradient path: no float input feeds a differentiable input on the way "
                   "to a float output")
    trainer = onnxgrad.Trainer(model, loss=None, output=PREFIX + "loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=wrt, seed=0)
    return trainer.gradients(_loss_feeds(p, us), None), trainer


def training_differs(p: Prepared, us, trainer, f0: float, scale: float) -> str | None:
    """Why a training step computes another loss than ``Model.run`` (Dropout is active,
    BatchNormalization uses batch statistics: DESIGN decision 5), or None.  Two steps
    at lr=0 give the training loss; they differ from each other when it is random."""
    feeds = _loss_feeds(p, us)
    first, second = trainer.step(feeds, None), trainer.step(feeds, None)
    if abs(first - second) > 1e-9 * scale:
        return f"random in a training step: two training losses {first:.6g}, {second:.6g}"
    if abs(first - f0) > 1e-9 * scale:
        return (f"training step differs from Model.run: training loss {first:.6g}, inference "
                f"loss {f0:.6g} (e.g. batch statistics)")
    return None


# -- the check ------------------------------------------------------------------------------------
def check_case(case) -> Outcome:
    """Check every differentiable float input of ``case``; :class:`Skip` when it cannot."""
    p = prepare(case)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return _check(p)


def _check(p: Prepared) -> Outcome:
    forward = onnxgrad.load(p.model)
    outs = forward.run(dict(p.feeds))
    double = {o.name for o in p.model.graph.output
              if o.type.WhichOneof("value") == "tensor_type"
              and o.type.tensor_type.elem_type == TensorProto.DOUBLE}
    floats = {k: v for k, v in outs.items() if k in double}
    if not floats:
        kept = sorted({p.kept[k] for k in outs if k in p.kept})
        raise Skip("float64 not allowed: " + "; ".join(kept) if kept
                   else "no floating-point output")
    again = forward.run(dict(p.feeds))
    if any(not np.array_equal(again[k], y, equal_nan=True) for k, y in floats.items()):
        raise Skip("random output: two runs with the same inputs differ")
    # Outputs with infinities or NaNs at the suite's inputs (a -inf attention bias, a
    # Cast of inf) stay out of the loss; the others are checked.
    floats = {k: y for k, y in floats.items() if np.isfinite(y).all()}
    if not floats:
        raise Skip("non-finite outputs at the suite's inputs")
    us = projections(p.name, floats)
    f0, scale0 = loss_value(us, floats)
    try:
        grads, trainer = analytic_gradients(p, us)
    except UnsupportedOpError as exc:
        raise Skip(f"no gradient rule: {exc}") from None

    def f(name: str, x: np.ndarray, v: np.ndarray, t: float) -> float:
        feeds = dict(p.feeds)
        feeds[name] = x + t * v
        outs = forward.run(feeds)
        if any(np.shape(outs[k]) != u.shape for k, u in us.items()):
            return float("nan")  # an output's shape jumps here (Range's length): no derivative
        return loss_value(us, outs)[0]

    outcome = Outcome(p.name)
    for i, (name, grad) in enumerate(grads.items()):
        x = p.feeds[name]
        if grad.shape != x.shape or grad.dtype != x.dtype:
            outcome.failures.append(f"gradient of {name}: {grad.dtype}{list(grad.shape)}, "
                                    f"input {x.dtype}{list(x.shape)}")
            continue
        v = np.random.default_rng(zlib.crc32(p.name.encode()) + 1 + i).standard_normal(x.shape)
        analytic = float(np.sum(grad * v))

        def central(eps: float) -> tuple[Check, float, float]:
            fp, fm = f(name, x, v, eps), f(name, x, v, -eps)
            numeric = (fp - fm) / (2 * eps)
            tol = RTOL * max(abs(analytic), abs(numeric), 1.0) + ROUNDOFF * scale0 / eps
            return Check(name, analytic, numeric, tol, eps), fp, fm

        check, fp, fm = central(EPS)
        if not (np.isfinite(fp) and np.isfinite(fm)):
            outcome.ambiguous.append(f"edge of the domain: non-finite loss at x ± εv along "
                                     f"d/d{name}")
            continue
        if check.ok:
            outcome.checks.append(check)
            continue
        if not np.isfinite(analytic):
            outcome.checks.append(check)
            outcome.failures.append(f"non-finite gradient with a finite loss: {check}")
            continue
        # Near a kink, a smaller step passes.  On a kink or a jump (or a pole), the
        # one-sided differences disagree, or the central ones do not settle, however
        # small the step; for a smooth function both agree to O(ε).
        small, fp, fm = central(EPS / 8)
        if small.ok:
            outcome.checks.append(small)
            continue
        unsettled = max(abs((fp - f0) - (f0 - fm)) / small.eps, abs(small.numeric - check.numeric))
        if unsettled > 0.25 * abs(small.analytic - small.numeric):
            outcome.ambiguous.append(
                f"not differentiable at the suite's inputs: kink, jump or pole along d/d{name} "
                f"(one-sided or central differences differ by {unsettled:.3g})")
            continue
        why = training_differs(p, us, trainer, f0, scale0)
        if why:
            raise Skip(why)
        outcome.checks.append(check)
        outcome.failures.append(str(check))
    if not outcome.checks and not outcome.failures:
        raise Skip(outcome.ambiguous[0])
    return outcome


def is_expanded(name: str) -> bool:
    """Whether a case is an ``_expanded`` one (a function body inlined into standard ops)."""
    return bool(C._EXPANDED.match(name))
