"""The op database: sample inputs and attributes for every op in the elementwise,
activation, linalg, shape, reduce and ml families.  Plain data.

A sample is ``(op, inputs, attrs, opset)`` plus optional fields.  ``inputs`` is
a list of ``(name, spec)`` in the op's input order; ``name`` is the graph
value's name, ``None`` leaves an optional input out.  Specs (made into arrays
by ``tests/gradcheck.py``, in float64 or float32):

* ``("real", shape)``  uniform in [-2, 2]
* ``("pos", shape)``   uniform in [0.5, 2]          (Log, Sqrt, Pow's base)
* ``("away0", shape)`` |x| in [0.3, 2], random sign  (kinks or poles at 0)
* ``("float", values)`` these float values            (ties for ArgMax)
* ``("int64", values)`` / ``("int32", values)``: integer constants (shapes, axes,
  indices, integer operands); never differentiated

``domain`` is the op's domain (default ai.onnx); ``tol`` overrides the
gradient check's ``{"eps", "rtol", "atol"}``; ``ref`` names the forward
reference: ``"onnx"`` (onnx.reference.ReferenceEvaluator) or ``"onnxruntime"``
where the ONNX reference evaluator is known to be wrong (the sample says why).
"""

from __future__ import annotations

from typing import Any, NamedTuple

ML = "ai.onnx.ml"


class Sample(NamedTuple):
    op: str
    inputs: list
    attrs: dict
    opset: int
    domain: str = ""
    tol: dict | None = None
    ref: str = "onnx"

    @property
    def id(self) -> str:
        ins = ",".join("-" if n is None else f"{s[0]}{list(s[1]) if isinstance(s[1], tuple) else s[1]}"
                       for n, s in self.inputs)
        attrs = ",".join(f"{k}={v!r}" for k, v in sorted(self.attrs.items()))
        return f"{self.op}-v{self.opset}({ins}){{{attrs}}}".replace(" ", "")


S = Sample

# Broadcasting pairs for binary elementwise ops.
BROADCAST = [
    ((3, 4), (3, 4)),
    ((3, 4), (4,)),
    ((4,), (3, 4)),
    ((2, 3, 4), (3, 1)),
    ((1, 4), (3, 1)),
    ((), (2, 3)),
    ((5,), ()),
    ((2, 1, 4), (1, 3, 1)),
]
UNARY_SHAPES = [(3, 4), (), (2, 3, 4)]

SAMPLES: list[Sample] = []

# -- elementwise ----------------------------------------------------------------------
for _op, _b in [("Add", "real"), ("Sub", "real"), ("Mul", "real"), ("Div", "away0")]:
    for _opset in (7, 13, 14):
        for _sa, _sb in BROADCAST:
            SAMPLES.append(S(_op, [("A", ("real", _sa)), ("B", (_b, _sb))], {}, _opset))
SAMPLES += [
    S("Div", [("A", ("int64", [[7, -7, 7, -7, 0, 9]])), ("B", ("int64", [2, 2, -2, -2, 3, 3]))], {}, 14),
    S("Div", [("A", ("int32", [7, -8, 1])), ("B", ("int32", [-3]))], {}, 14),
    S("Add", [("A", ("int64", [[1, 2, 3]])), ("B", ("int64", [[10], [20]]))], {}, 14),
    S("Mul", [("A", ("int32", [1, -2, 3])), ("B", ("int32", [4]))], {}, 14),
]
for _opset in (7, 12, 13, 15):
    for _sa, _sb in BROADCAST:
        SAMPLES.append(S("Pow", [("X", ("pos", _sa)), ("Y", ("real", _sb))], {}, _opset))
SAMPLES += [
    S("Pow", [("X", ("real", (3, 2))), ("Y", ("int64", [2, 3]))], {}, 15),
    S("Pow", [("X", ("real", (4,))), ("Y", ("int64", 2))], {}, 13),
    S("Pow", [("X", ("int64", [1, 2, 3])), ("Y", ("int64", [3, 2, 1]))], {}, 15),
]
for _opset in (8, 13):
    SAMPLES += [
        S("Sum", [("a", ("real", (3, 4)))], {}, _opset),
        S("Sum", [("a", ("real", (3, 4))), ("b", ("real", (3, 4)))], {}, _opset),
        S("Sum", [("a", ("real", (3, 4))), ("b", ("real", (4,))), ("c", ("real", (2, 1, 1)))], {}, _opset),
        S("Sum", [("a", ("real", ())), ("b", ("real", (2, 3))), ("c", ("real", (2, 3))),
                  ("d", ("real", (1, 3)))], {}, _opset),
    ]
for _op, _dom, _opsets in [("Neg", "real", (6, 13)), ("Abs", "away0", (6, 13)),
                           ("Exp", "real", (6, 13)), ("Log", "pos", (6, 13)),
                           ("Sqrt", "pos", (6, 13)), ("Reciprocal", "away0", (6, 13)),
                           ("Sign", "away0", (9, 13))]:
    for _opset in _opsets:
        for _s in UNARY_SHAPES:
            SAMPLES.append(S(_op, [("X", (_dom, _s))], {}, _opset))
SAMPLES += [
    S("Abs", [("X", ("int64", [-3, 0, 4]))], {}, 13),
    S("Neg", [("X", ("int32", [-3, 0, 4]))], {}, 13),
    S("Sign", [("X", ("float", [-2.0, 0.0, 3.0]))], {}, 13),
]

# -- activations -----------------------------------------------------------------------
for _op, _opsets in [("Relu", (6, 13, 14)), ("Sigmoid", (6, 13)), ("Tanh", (6, 13))]:
    for _opset in _opsets:
        for _s in UNARY_SHAPES:
            SAMPLES.append(S(_op, [("X", ("away0", _s))], {}, _opset))
SAMPLES += [S("Sigmoid", [("X", ("float", [-100.0, -20.0, 0.0, 20.0, 100.0]))], {}, 13)]
for _opset in (6, 16):
    for _attrs in ({}, {"alpha": 0.2}, {"alpha": -1.5}):
        for _s in UNARY_SHAPES:
            SAMPLES.append(S("LeakyRelu", [("X", ("away0", _s))], _attrs, _opset))
# The ONNX reference evaluator ignores opset 1-12's coerce-to-2-D semantics (it
# normalises along `axis` alone) and computes LogSoftmax as log(Softmax), which is
# -inf where Softmax underflows: those samples are compared with onnxruntime.
for _op in ("Softmax", "LogSoftmax"):
    for _opset, _axes, _ref in [(11, [None, 0, 1, 2, -1, -2], "onnxruntime"),
                                (13, [None, 0, 1, 2, -1, -3], "onnx")]:
        for _axis in _axes:
            _attrs = {} if _axis is None else {"axis": _axis}
            SAMPLES.append(S(_op, [("X", ("real", (2, 3, 4)))], _attrs, _opset, ref=_ref))
        SAMPLES.append(S(_op, [("X", ("real", (3, 5)))], {}, _opset, ref=_ref))
        SAMPLES.append(S(_op, [("X", ("real", (5,)))], {"axis": 0}, _opset, ref=_ref))
    SAMPLES.append(S(_op, [("X", ("float", [[1000.0, 0.0, -1000.0], [3.0, 3.0, 3.0]]))], {}, 13,
                     ref="onnxruntime"))

# -- linalg ----------------------------------------------------------------------------------
_GEMM_AB = {  # (transA, transB) -> shapes of A and B for M=3, K=4, N=5
    (0, 0): ((3, 4), (4, 5)), (1, 0): ((4, 3), (4, 5)),
    (0, 1): ((3, 4), (5, 4)), (1, 1): ((4, 3), (5, 4)),
}
for (_ta, _tb), (_sa, _sb) in _GEMM_AB.items():
    for _opset in (7, 9, 11, 13):
        for _sc in [(3, 5), (5,), (1, 5), (3, 1), (), None]:
            if _sc is None and _opset < 11:
                continue  # C is optional from opset 11
            _attrs = {k: v for k, v in (("transA", _ta), ("transB", _tb)) if v}
            _ins = [("A", ("real", _sa)), ("B", ("real", _sb))]
            if _sc is not None:
                _ins.append(("C", ("real", _sc)))
            SAMPLES.append(S("Gemm", _ins, _attrs, _opset))
            if _sc in ((3, 5), (5,), None):
                SAMPLES.append(S("Gemm", _ins, dict(_attrs, alpha=0.5, beta=-2.0), _opset))
for _sa, _sb in [
    ((3, 4), (4, 5)), ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,)),
    ((2, 3, 4), (4, 5)), ((4,), (2, 4, 5)), ((2, 3, 4), (4,)), ((3, 4), (2, 4, 5)),
    ((2, 1, 3, 4), (5, 4, 2)), ((2, 3, 4), (2, 4, 5)), ((1, 3, 4), (2, 4, 5)),
]:
    for _opset in (9, 13):
        SAMPLES.append(S("MatMul", [("A", ("real", _sa)), ("B", ("real", _sb))], {}, _opset))
SAMPLES.append(S("MatMul", [("A", ("int64", [[1, 2], [3, 4]])), ("B", ("int64", [5, 6]))], {}, 13))

# -- shape ---------------------------------------------------------------------------------------
SAMPLES += [S("Identity", [("X", ("real", s))], {}, o) for s in UNARY_SHAPES for o in (13, 21)]
for _opset, _axes in [(9, (None, 0, 1, 2, 3)), (13, (None, 0, 2, 3, -1, -3))]:
    for _axis in _axes:  # negative axes from opset 11
        _attrs = {} if _axis is None else {"axis": _axis}
        SAMPLES.append(S("Flatten", [("X", ("real", (2, 3, 4)))], _attrs, _opset))
for _opset in (5, 13, 14):
    for _shape in ([4, -1], [0, 12], [-1], [2, 0, 2, 2], [1, 24, 1], [0, 0, -1]):
        SAMPLES.append(S("Reshape", [("data", ("real", (2, 3, 4))), ("shape", ("int64", _shape))],
                         {}, _opset))
SAMPLES += [
    S("Reshape", [("data", ("real", (2, 3, 4))), ("shape", ("int64", [4, 0, 2]))], {"allowzero": 0}, 14),
    S("Reshape", [("data", ("real", (2, 3, 4))), ("shape", ("int64", [24]))], {"allowzero": 1}, 14),
    S("Reshape", [("data", ("real", (2, 3, 4))), ("shape", ("int64", [4, 3, 2]))], {"allowzero": 1}, 21),
    S("Reshape", [("data", ("real", (0, 3))), ("shape", ("int64", [3, 0]))], {"allowzero": 1}, 14),
]
for _perm in (None, [1, 0, 2], [2, 0, 1], [0, 1, 2]):
    for _opset in (1, 13, 21):
        SAMPLES.append(S("Transpose", [("data", ("real", (2, 3, 4)))],
                         {} if _perm is None else {"perm": _perm}, _opset))
SAMPLES.append(S("Transpose", [("data", ("real", (3, 5)))], {}, 13))
# Cast: TensorProto codes FLOAT=1, INT32=6, INT64=7, BOOL=9, FLOAT16=10, DOUBLE=11.
SAMPLES += [
    S("Cast", [("input", ("real", (3, 4)))], {"to": 11}, 13),
    S("Cast", [("input", ("real", (3, 4)))], {"to": 1}, 13, tol={"eps": 1e-2, "rtol": 1e-4}),
    S("Cast", [("input", ("real", (3, 4)))], {"to": 1}, 6, tol={"eps": 1e-2, "rtol": 1e-4}),
    S("Cast", [("input", ("real", (2, 3)))], {"to": 1, "saturate": 1}, 19, tol={"eps": 1e-2, "rtol": 1e-4}),
    S("Cast", [("input", ("float", [-2.7, -0.5, 0.0, 0.5, 2.7]))], {"to": 7}, 13),
    S("Cast", [("input", ("float", [-2.0, 0.0, 0.5]))], {"to": 9}, 13),
    S("Cast", [("input", ("int64", [-2, 0, 3]))], {"to": 1}, 13),
    S("Cast", [("input", ("int64", [-2, 0, 3]))], {"to": 6}, 21),
]
SAMPLES += [
    S("Constant", [], {"value": ("float32", [[1.5, -2.0], [0.0, 4.0]])}, 13),
    S("Constant", [], {"value": ("int64", [3, 4])}, 9),
    S("Constant", [], {"value_float": 2.5}, 13),
    S("Constant", [], {"value_floats": [1.0, -2.5]}, 13),
    S("Constant", [], {"value_int": 7}, 13),
    S("Constant", [], {"value_ints": [1, 2, 3]}, 21),
]
SAMPLES += [S("Shape", [("data", ("real", (2, 3, 4)))], {}, o) for o in (1, 13)]
for _attrs in ({}, {"start": 1}, {"end": -1}, {"start": -2, "end": 3}, {"start": 5},
               {"start": 0, "end": 2}, {"start": -10, "end": 10}):
    SAMPLES.append(S("Shape", [("data", ("real", (2, 3, 4)))], _attrs, 15))
# The ONNX reference evaluator's Unsqueeze-1/11 inserts axes in the order listed
# (the spec says the order does not matter): unsorted axes go to onnxruntime.
for _axes in ([0], [-1], [1, 3], [0, 4, 2]):
    _ref = "onnx" if _axes == sorted(_axes) else "onnxruntime"
    if min(_axes) >= 0:
        SAMPLES.append(S("Unsqueeze", [("data", ("real", (2, 3)))], {"axes": _axes}, 1, ref=_ref))
    SAMPLES.append(S("Unsqueeze", [("data", ("real", (2, 3)))], {"axes": _axes}, 11, ref=_ref))
    SAMPLES.append(S("Unsqueeze", [("data", ("real", (2, 3))), ("axes", ("int64", _axes))], {}, 13))
SAMPLES.append(S("Unsqueeze", [("data", ("real", ())), ("axes", ("int64", [0, 1]))], {}, 21))
for _axes in ([0], [-2], [0, 2], None):
    _attrs = {} if _axes is None else {"axes": _axes}
    SAMPLES.append(S("Squeeze", [("data", ("real", (1, 3, 1, 4)))], _attrs, 11))
    _ins = [("data", ("real", (1, 3, 1, 4)))]
    if _axes is not None:
        _ins.append(("axes", ("int64", _axes)))
    SAMPLES.append(S("Squeeze", _ins, {}, 13))

# -- reductions ---------------------------------------------------------------------------------
for _op, _input_from in [("ReduceSum", 13), ("ReduceMean", 18)]:
    for _keep in (None, 0, 1):
        _k = {} if _keep is None else {"keepdims": _keep}
        for _axes in (None, [1], [0, 2], [-1], [0, 1, 2]):
            _attrs = dict(_k) if _axes is None else dict(_k, axes=_axes)
            SAMPLES.append(S(_op, [("data", ("real", (2, 3, 4)))], _attrs, 11))
            _ins = [("data", ("real", (2, 3, 4)))]
            if _axes is not None:
                _ins.append(("axes", ("int64", _axes)))
            SAMPLES.append(S(_op, _ins, dict(_k), _input_from))
        for _noop in (0, 1):  # empty axes: everything, or nothing with noop_with_empty_axes
            SAMPLES.append(S(_op, [("data", ("real", (2, 3, 4))), ("axes", ("int64", []))],
                             dict(_k, noop_with_empty_axes=_noop), _input_from))
            SAMPLES.append(S(_op, [("data", ("real", (3, 4)))],
                             dict(_k, noop_with_empty_axes=_noop), _input_from))
    SAMPLES.append(S(_op, [("data", ("real", (5,)))], {"keepdims": 0}, 13))
SAMPLES.append(S("ReduceSum", [("data", ("int64", [[1, 2], [3, 4]])), ("axes", ("int64", [1]))], {}, 13))
_TIES = [[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, -1.0, 2.0], [5.0, 4.0, 5.0, 5.0]]
for _opset in (11, 12, 13):
    for _attrs in ({}, {"axis": 1}, {"axis": -1, "keepdims": 0}, {"axis": 0, "keepdims": 0}):
        SAMPLES.append(S("ArgMax", [("data", ("real", (2, 3, 4)))], _attrs, _opset))
        SAMPLES.append(S("ArgMax", [("data", ("float", _TIES))], _attrs, _opset))
        if _opset >= 12:
            SAMPLES.append(S("ArgMax", [("data", ("float", _TIES))],
                             dict(_attrs, select_last_index=1), _opset))

# -- ai.onnx.ml ----------------------------------------------------------------------------------
SAMPLES += [
    S("ArrayFeatureExtractor", [("X", ("real", (3, 5))), ("Y", ("int64", [0, 2]))], {}, 13, ML),
    S("ArrayFeatureExtractor", [("X", ("real", (3, 5))), ("Y", ("int64", [[4, 1, 1]]))], {}, 13, ML),
    S("ArrayFeatureExtractor", [("X", ("real", (5,))), ("Y", ("int64", [3]))], {}, 13, ML),
    S("ArrayFeatureExtractor", [("X", ("real", (2, 3, 4))), ("Y", ("int64", [[3], [0]]))], {}, 13, ML),
    S("ArrayFeatureExtractor", [("X", ("int64", [[1, 2, 3], [4, 5, 6]])), ("Y", ("int64", [2, 0]))],
      {}, 13, ML),
]

#: Ops that must appear in the database (one family each: these files' ops).
OPS: dict[str, Any] = {s.op: s.domain for s in SAMPLES}
