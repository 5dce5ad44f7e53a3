"""The op database of the transformer and index families: ops/indexing.py,
ops/tensor.py, ops/logic.py, ops/math.py and the reductions of ops/reduce.py
other than ReduceSum and ReduceMean.  (Ops that joined ops/indexing.py and
ops/tensor.py from the former catch-all modules keep their samples where they
were: Scatter, TensorScatter and CumProd in tests/test_more_ops.py, Compress in
tests/test_vision_gradients.py, ReverseSequence in tests/test_extra_ops.py.)
Plain data.

A sample is ``(op, inputs, attrs, opset)`` plus optional fields.  ``inputs``
is a list of ``(name, spec)`` in the op's input order (``name`` None leaves an
optional input out).  Specs, made into arrays by tests/test_transformer_ops.py
(floats in float64 for gradient checks, float32 for forward checks):

* ``("real", shape)``   uniform in [-2, 2]
* ``("pos", shape)``    uniform in [0.5, 2]
* ``("away0", shape)``  |x| in [0.3, 2], random sign
* ``("unit", shape)``   uniform in [-0.9, 0.9]   (Asin, Acos, Atanh)
* ``("gt1", shape)``    uniform in [1.2, 3]      (Acosh)
* ``("float", values)`` these float values (ties, infinities, NaN)
* ``(dtype, values)``   an integer or boolean constant ("int64", "int32", "bool"…)

``outputs`` is the node's number of outputs (Split, TopK); ``grad`` False
skips the gradient check (ties, where the derivative does not exist);
``tol`` overrides the check's ``{"eps", "rtol", "atol"}``.
"""

from __future__ import annotations

from typing import NamedTuple


class Sample(NamedTuple):
    op: str
    inputs: list
    attrs: dict
    opset: int
    outputs: int = 1
    grad: bool = True
    tol: dict | None = None

    @property
    def id(self) -> str:
        ins = ",".join("-" if n is None else
                       f"{s[0]}{list(s[1]) if isinstance(s[1], tuple) else s[1]}"
                       for n, s in self.inputs)
        attrs = ",".join(f"{k}={v!r}" for k, v in sorted(self.attrs.items()))
        return f"{self.op}-v{self.opset}({ins}){{{attrs}}}x{self.outputs}".replace(" ", "")


S = Sample
SAMPLES: list[Sample] = []

BROADCAST = [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 3, 4), (3, 1)), ((1, 4), (3, 1)),
             ((), (2, 3)), ((2, 1, 4), (1, 3, 1))]

# -- indexing ----------------------------------------------------------------------------
for _opset in (11, 13):
    SAMPLES += [
        S("Gather", [("data", ("real", (5, 4))), ("indices", ("int64", [0, 3, 3, -1, 0]))], {}, _opset),
        S("Gather", [("data", ("real", (5, 4))), ("indices", ("int64", [[1, 2], [2, -4]]))],
          {"axis": 1}, _opset),
        S("Gather", [("data", ("real", (2, 3, 4))), ("indices", ("int64", 2))], {"axis": -1}, _opset),
        S("Gather", [("data", ("real", (2, 3, 4))), ("indices", ("int32", [[0, 1, 0]]))],
          {"axis": 1}, _opset),
        S("Gather", [("data", ("real", (6,))), ("indices", ("int64", [[5, 5], [1, 0]]))], {}, _opset),
    ]
    SAMPLES += [
        S("GatherElements", [("data", ("real", (3, 4))),
                             ("indices", ("int64", [[0, 3, 3], [1, -1, 0], [2, 2, 2]]))],
          {"axis": 1}, _opset),
        S("GatherElements", [("data", ("real", (3, 4))),
                             ("indices", ("int64", [[0, 2, 1, 0], [2, 2, -1, 0]]))], {}, _opset),
        S("GatherElements", [("data", ("real", (2, 3, 4))),
                             ("indices", ("int64", [[[0], [2], [3]], [[1], [1], [-1]]]))], {"axis": 2}, _opset),
        S("GatherND", [("data", ("real", (3, 4))), ("indices", ("int64", [[0, 1], [2, 3], [0, 1]]))],
          {}, _opset),
        S("GatherND", [("data", ("real", (3, 4, 2))), ("indices", ("int64", [[1], [-1], [1]]))],
          {}, _opset),
        S("GatherND", [("data", ("real", (3, 4))), ("indices", ("int64", [[[0, 0]], [[2, 1]]]))],
          {}, _opset),
    ]
SAMPLES += [
    S("GatherND", [("data", ("real", (2, 3, 4))), ("indices", ("int64", [[1], [0]]))],
      {"batch_dims": 1}, 12),
    S("GatherND", [("data", ("real", (2, 3, 4))), ("indices", ("int64", [[[1, 2], [0, 0]], [[2, 3], [2, 3]]]))],
      {"batch_dims": 1}, 13),
]
for _opset, _reductions in [(11, [None]), (16, [None, "add"]), (18, ["none", "add"])]:
    for _red in _reductions:
        _attrs = {} if _red is None else {"reduction": _red}
        _rep = _red == "add"  # repeated indices only where the result is defined
        SAMPLES += [
            S("ScatterElements", [("data", ("real", (3, 4))),
                                  ("indices", ("int64", [[1, 0, 2, 0], [0, 2, 1, 1]] if not _rep
                                               else [[1, 0, 2, 0], [1, 0, 1, 1]])),
                                  ("updates", ("real", (2, 4)))], _attrs, _opset),
            S("ScatterElements", [("data", ("real", (3, 4))),
                                  ("indices", ("int64", [[3, -4], [1, 2], [0, 1]] if not _rep
                                               else [[3, 3], [1, 1], [0, -4]])),
                                  ("updates", ("real", (3, 2)))], dict(_attrs, axis=1), _opset),
            S("ScatterND", [("data", ("real", (4, 3))),
                            ("indices", ("int64", [[1], [3]] if not _rep else [[1], [1]])),
                            ("updates", ("real", (2, 3)))], _attrs, _opset),
            S("ScatterND", [("data", ("real", (2, 3, 2))),
                            ("indices", ("int64", [[0, 1], [1, 2], [0, 0]] if not _rep
                                         else [[0, 1], [0, 1], [1, 2]])),
                            ("updates", ("real", (3, 2)))], _attrs, _opset),
        ]
SAMPLES += [
    S("ScatterElements", [("data", ("float", [[1.0, 2.0, 3.0]])), ("indices", ("int64", [[0, 0, 2]])),
                          ("updates", ("float", [[5.0, 0.5, 4.0]]))], {"axis": 1, "reduction": red},
      18, grad=False) for red in ("mul", "max", "min")
] + [
    S("ScatterND", [("data", ("float", [1.0, 2.0, 3.0])), ("indices", ("int64", [[0], [0], [2]])),
                    ("updates", ("float", [5.0, 0.5, 4.0]))], {"reduction": red}, 18, grad=False)
    for red in ("mul", "max", "min")
]
_COND = {(3, 4): [[True, False, True, False]] * 3, (4,): [True, False, False, True],
         (3, 1): [[True], [False], [True]], (): True}
for _cs, _xs, _ys in [((3, 4), (3, 4), (3, 4)), ((4,), (3, 4), ()), ((3, 1), (4,), (3, 4)),
                      ((), (2, 3), (3,)), ((3, 4), (1,), (3, 1))]:
    for _opset in (9, 16):
        SAMPLES.append(S("Where", [("condition", ("bool", _COND[_cs])), ("X", ("real", _xs)),
                                   ("Y", ("real", _ys))], {}, _opset))
SAMPLES += [
    S("OneHot", [("indices", ("int64", [[0, 2], [-1, 1]])), ("depth", ("int64", 4)),
                 ("values", ("float", [0.0, 1.0]))], {}, 11),
    S("OneHot", [("indices", ("int64", [1, 0, 2])), ("depth", ("float", 3.0)),
                 ("values", ("int64", [-1, 5]))], {"axis": 0}, 11),
    S("OneHot", [("indices", ("int64", [[1], [2]])), ("depth", ("int64", 3)),
                 ("values", ("float", [2.0, 7.0]))], {"axis": 1}, 9),
]
for _opset, _kin in [(1, False), (10, True), (11, True)]:
    for _axis, _k in [(None, 2), (0, 1), (1, 3), (-1, 4)]:
        _attrs = {} if _axis is None else {"axis": _axis}
        _ins = [("X", ("real", (3, 4)))]
        if _kin:
            _ins.append(("K", ("int64", [_k])))
        else:
            _attrs["k"] = _k
        SAMPLES.append(S("TopK", _ins, _attrs, _opset, outputs=2))
SAMPLES += [
    S("TopK", [("X", ("real", (2, 3, 5))), ("K", ("int64", [2]))], {"largest": 0}, 11, outputs=2),
    S("TopK", [("X", ("real", (2, 3, 5))), ("K", ("int64", [3]))], {"axis": 1, "sorted": 1}, 11,
      outputs=2),
    S("TopK", [("X", ("float", [[1.0, 3.0, 3.0, 0.0, 3.0]])), ("K", ("int64", [3]))], {}, 11,
      outputs=2, grad=False),
    S("TopK", [("X", ("int64", [[4, 1, 4, 2]])), ("K", ("int64", [2]))], {"largest": 0}, 11, outputs=2),
]
SAMPLES += [
    S("NonZero", [("X", ("float", [[1.0, 0.0, 2.0], [0.0, 0.0, -1.0]]))], {}, 13),
    S("NonZero", [("X", ("bool", [[True, False], [True, True]]))], {}, 9),
    S("NonZero", [("X", ("int64", [0, 3, 0, 5]))], {}, 13),
]
for _k in (None, 0, 1, -1, 5):
    for _upper in (0, 1):
        _ins = [("input", ("real", (2, 3, 4)))]
        if _k is not None:
            _ins.append(("k", ("int64", _k)))
        SAMPLES.append(S("Trilu", _ins, {"upper": _upper}, 14))
SAMPLES.append(S("Trilu", [("input", ("real", (4, 3))), ("k", ("int64", -1))], {}, 14))
for _axis in (0, 1, -1):
    for _ex in (0, 1):
        for _rev in (0, 1):
            SAMPLES.append(S("CumSum", [("x", ("real", (3, 4))), ("axis", ("int64", _axis))],
                             {"exclusive": _ex, "reverse": _rev}, 14))
SAMPLES += [
    S("CumSum", [("x", ("real", (2, 3, 4))), ("axis", ("int32", 1))], {}, 11),
    S("CumSum", [("x", ("int64", [1, 2, 3, 4])), ("axis", ("int64", 0))], {"exclusive": 1}, 14),
]
_TIES = [[1.0, 3.0, 0.0, 0.0], [2.0, 2.0, -1.0, -1.0], [5.0, 4.0, 4.0, 5.0]]
for _opset in (11, 12, 13):
    for _attrs in ({}, {"axis": 1}, {"axis": -1, "keepdims": 0}):
        SAMPLES.append(S("ArgMin", [("data", ("real", (2, 3, 4)))], _attrs, _opset))
        SAMPLES.append(S("ArgMin", [("data", ("float", _TIES))], _attrs, _opset))
        if _opset >= 12:
            SAMPLES.append(S("ArgMin", [("data", ("float", _TIES))], dict(_attrs, select_last_index=1),
                             _opset))

# -- tensor assembly -------------------------------------------------------------------------------
for _opset in (4, 11, 13):
    SAMPLES += [
        S("Concat", [("a", ("real", (2, 3))), ("b", ("real", (2, 1))), ("c", ("real", (2, 4)))],
          {"axis": 1}, _opset),
        S("Concat", [("a", ("real", (2, 3))), ("b", ("real", (1, 3)))], {"axis": 0}, _opset),
        S("Concat", [("a", ("real", (2, 3, 2)))], {"axis": 2}, _opset),
    ]
SAMPLES += [
    S("Concat", [("a", ("real", (2, 3))), ("b", ("real", (2, 2)))], {"axis": -1}, 13),
    S("Concat", [("a", ("int64", [1, 2])), ("b", ("int64", [3])), ("c", ("int64", []))], {"axis": 0}, 13),
]
for _opset in (11, 13, 18):
    for _axis, _split, _n in [(0, None, 2), (1, [1, 3], 2), (-2, [2, 1, 1], 3), (1, None, 1),
                              (2, [0, 2], 2)]:
        _attrs = {"axis": _axis}
        _ins = [("input", ("real", (2, 4, 2)))]
        if _split is not None:
            if _opset < 13:
                _attrs["split"] = _split
            else:
                _ins.append(("split", ("int64", _split)))
        SAMPLES.append(S("Split", _ins, _attrs, _opset, outputs=_n))
SAMPLES += [
    S("Split", [("input", ("real", (7, 2)))], {"num_outputs": 3}, 18, outputs=3),
    S("Split", [("input", ("real", (2, 6)))], {"axis": 1, "num_outputs": 2}, 18, outputs=2),
]
for _starts, _ends, _axes, _steps in [
    ([1], [3], None, None), ([0, 1], [2, -1], [0, 2], None), ([-1], [-1000], [1], [-1]),
    ([0], [100], [2], [2]), ([3], [0], [-1], [-2]), ([1, 0], [2, 9223372036854775807], [1, 0], [1, 1]),
    ([5], [10], [0], None), ([-10], [2], [-2], [1]),
]:
    _ins = [("data", ("real", (2, 3, 5))), ("starts", ("int64", _starts)), ("ends", ("int64", _ends))]
    if _axes is not None:
        _ins.append(("axes", ("int64", _axes)))
    elif _steps is not None:
        _ins.append((None, None))
    if _steps is not None:
        _ins.append(("steps", ("int64", _steps)))
    for _opset in (10, 13):
        SAMPLES.append(S("Slice", _ins, {}, _opset))
    if _steps is None:
        _attrs = {"starts": _starts, "ends": _ends}
        if _axes is not None:
            _attrs["axes"] = _axes
        if min(_starts + _ends + (_axes or [0])) >= 0 and max(_ends) < 2 ** 31:
            SAMPLES.append(S("Slice", [("data", ("real", (2, 3, 5)))], _attrs, 1))
SAMPLES.append(S("Slice", [("data", ("int64", [[1, 2, 3], [4, 5, 6]])), ("starts", ("int64", [1])),
                           ("ends", ("int64", [3])), ("axes", ("int64", [1]))], {}, 13))
for _xs, _shape in [((3, 1), [2, 3, 4]), ((4,), [3, 1]), ((), [2, 2]), ((2, 1, 3), [1, 4, 1]),
                    ((3, 4), [4])]:
    for _opset in (8, 13):
        SAMPLES.append(S("Expand", [("input", ("real", _xs)), ("shape", ("int64", _shape))], {}, _opset))
for _xs, _reps in [((2, 3), [1, 2]), ((2, 3), [3, 1]), ((4,), [2]), ((2, 1, 3), [2, 3, 1]),
                   ((2, 3), [1, 1])]:
    for _opset in (6, 13):
        SAMPLES.append(S("Tile", [("input", ("real", _xs)), ("repeats", ("int64", _reps))], {}, _opset))
SAMPLES += [
    S("Range", [("start", ("int64", 1)), ("limit", ("int64", 10)), ("delta", ("int64", 3))], {}, 11),
    S("Range", [("start", ("int32", 10)), ("limit", ("int32", 4)), ("delta", ("int32", -2))], {}, 11),
    S("Range", [("start", ("float", 0.5)), ("limit", ("float", 2.0)), ("delta", ("float", 0.25))], {}, 11),
    S("Range", [("start", ("int64", 5)), ("limit", ("int64", 1)), ("delta", ("int64", 1))], {}, 11),
    S("ConstantOfShape", [("input", ("int64", [2, 3]))], {}, 9),
    S("ConstantOfShape", [("input", ("int64", [3]))], {"value": ("int64", [7])}, 20),
    S("ConstantOfShape", [("input", ("int64", [2, 0]))], {"value": ("float32", [1.5])}, 20),
    S("ConstantOfShape", [("input", ("int64", []))], {"value": ("bool", [True])}, 20),
    S("Size", [("data", ("real", (2, 3, 4)))], {}, 13),
    S("Size", [("data", ("real", ()))], {}, 19),
]
for _eq, _shapes in [
    ("ij,jk->ik", [(2, 3), (3, 4)]), ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("bhqd,bhkd->bhqk", [(1, 2, 3, 4), (1, 2, 5, 4)]), ("ij->ji", [(2, 3)]), ("ij->", [(2, 3)]),
    ("i,i->", [(4,), (4,)]), ("i,j->ij", [(3,), (2,)]), ("ii->i", [(3, 3)]), ("ii", [(3, 3)]),
    ("ij,jk", [(2, 3), (3, 4)]), ("...ij,...jk->...ik", [(2, 2, 3), (3, 4)]),
    ("...ij,...jk", [(1, 2, 3), (2, 3, 4)]), ("bij,j->bi", [(2, 3, 4), (4,)]),
    ("ijk,ikl,il->ij", [(2, 3, 4), (2, 4, 5), (2, 5)]), ("i j , j k -> i k", [(2, 3), (3, 2)]),
    ("iij->ij", [(3, 3, 2)]), ("ij,ij->ij", [(2, 3), (2, 3)]), ("ij->i", [(3, 4)]),
]:
    SAMPLES.append(S("Einsum", [(f"x{i}", ("real", s)) for i, s in enumerate(_shapes)],
                     {"equation": _eq}, 12))

# -- logic -------------------------------------------------------------------------------------------
_A = [[1.0, -2.0, 3.0, 0.5], [0.0, 2.0, -2.0, 3.0], [1.0, 1.0, 1.0, 1.0]]
_B = [1.0, 2.0, -2.0, 0.5]
for _op, _opset in [("Equal", 11), ("Equal", 13), ("Less", 9), ("Less", 13), ("Greater", 9),
                    ("Greater", 13), ("LessOrEqual", 12), ("LessOrEqual", 16),
                    ("GreaterOrEqual", 12), ("GreaterOrEqual", 16)]:
    SAMPLES += [
        S(_op, [("A", ("float", _A)), ("B", ("float", _B))], {}, _opset),
        S(_op, [("A", ("int64", [[1, 2, 3]])), ("B", ("int64", [[2], [3]]))], {}, _opset),
    ]
SAMPLES.append(S("Equal", [("A", ("bool", [True, False])), ("B", ("bool", [[True], [False]]))], {}, 13))
_P = [[True, False, True], [False, False, True]]
_Q = [True, False, False]
SAMPLES += [S(o, [("A", ("bool", _P)), ("B", ("bool", _Q))], {}, 7) for o in ("And", "Or", "Xor")]
SAMPLES += [S("Not", [("X", ("bool", _P))], {}, 1)]
_I = [[12, -7, 5, 0], [3, 8, -9, 4]]
_J = [5, 3, -4, 7]
SAMPLES += [S(o, [("A", ("int32", _I)), ("B", ("int32", _J))], {}, 18)
            for o in ("BitwiseAnd", "BitwiseOr", "BitwiseXor")]
SAMPLES += [
    S("BitwiseNot", [("X", ("int64", _I))], {}, 18),
    S("BitShift", [("X", ("uint32", [16, 4, 1])), ("Y", ("uint32", [1, 2, 3]))], {"direction": "LEFT"}, 11),
    S("BitShift", [("X", ("uint64", [16, 4, 1])), ("Y", ("uint64", [2]))], {"direction": "RIGHT"}, 11),
    S("Mod", [("A", ("int64", _I)), ("B", ("int64", _J))], {}, 13),
    S("Mod", [("A", ("int64", _I)), ("B", ("int64", _J))], {"fmod": 1}, 13),
    S("Mod", [("A", ("float", _A)), ("B", ("float", [1.5, -0.75, 2.0, 0.3]))], {"fmod": 1}, 10),
    # float remainders (fmod=1, as the spec asks of floats): dA = dY, dB = -trunc(A/B)·dY
    S("Mod", [("A", ("real", (3, 4))), ("B", ("away0", (3, 4)))], {"fmod": 1}, 13),
    S("Mod", [("A", ("real", (3, 4))), ("B", ("away0", (4,)))], {"fmod": 1}, 13),
]
_R = [[-2.5, -1.5, -0.5, 0.5], [1.5, 2.5, 2.7, -2.2]]
SAMPLES += [S(o, [("X", ("float", _R))], {}, v) for o, v in
            [("Floor", 6), ("Floor", 13), ("Ceil", 6), ("Ceil", 13), ("Round", 11)]]
_SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -1.5]
SAMPLES += [
    S("IsNaN", [("X", ("float", _SPECIAL))], {}, 13),
    S("IsInf", [("X", ("float", _SPECIAL))], {}, 10),
    S("IsInf", [("X", ("float", _SPECIAL))], {"detect_negative": 0}, 20),
    S("IsInf", [("X", ("float", _SPECIAL))], {"detect_positive": 0}, 20),
]

# -- maths ---------------------------------------------------------------------------------------------
for _op, _dom, _opsets in [("Sin", "real", (7,)), ("Cos", "real", (7,)), ("Tan", "unit", (7,)),
                           ("Asin", "unit", (7,)), ("Acos", "unit", (7,)), ("Atan", "real", (7,)),
                           ("Sinh", "real", (9,)), ("Cosh", "real", (9,)), ("Asinh", "real", (9,)),
                           ("Acosh", "gt1", (9,)), ("Atanh", "unit", (9,))]:
    for _opset in _opsets + (22,):
        for _s in [(3, 4), ()]:
            SAMPLES.append(S(_op, [("input", (_dom, _s))], {}, _opset))
for _op in ("Max", "Min", "Mean"):
    for _opset in (8, 13):
        SAMPLES.append(S(_op, [("data_0", ("real", (3, 4)))], {}, _opset))
        for _sa, _sb in BROADCAST:
            SAMPLES.append(S(_op, [("data_0", ("real", _sa)), ("data_1", ("real", _sb))], {}, _opset))
        SAMPLES.append(S(_op, [("data_0", ("real", (3, 1))), ("data_1", ("real", (4,))),
                               ("data_2", ("real", (2, 1, 1)))], {}, _opset))
    SAMPLES.append(S(_op, [("data_0", ("float", [1.0, 2.0, 3.0])), ("data_1", ("float", [1.0, 4.0, 0.0])),
                           ("data_2", ("float", [1.0, 2.0, 3.0]))], {}, 13, grad=False))
SAMPLES += [
    S("Max", [("data_0", ("int64", [1, 5, 3])), ("data_1", ("int64", [[4], [2]]))], {}, 13),
    S("Min", [("data_0", ("int32", [1, 5, 3])), ("data_1", ("int32", [4]))], {}, 13),
]

# -- reductions --------------------------------------------------------------------------------------------
_REDUCE_DOMAIN = {"ReduceMax": "real", "ReduceMin": "real", "ReduceL1": "away0", "ReduceL2": "real",
                  "ReduceLogSumExp": "real", "ReduceSumSquare": "real", "ReduceProd": "away0",
                  "ReduceLogSum": "pos"}
for _op, _dom in _REDUCE_DOMAIN.items():
    for _keep in (None, 0):
        _k = {} if _keep is None else {"keepdims": _keep}
        for _axes in (None, [1], [0, 2], [-1]):
            _attrs = dict(_k) if _axes is None else dict(_k, axes=_axes)
            SAMPLES.append(S(_op, [("data", (_dom, (2, 3, 4)))], _attrs, 13))
            _ins = [("data", (_dom, (2, 3, 4)))]
            if _axes is not None:
                _ins.append(("axes", ("int64", _axes)))
            SAMPLES.append(S(_op, _ins, dict(_k), 18))
    for _noop in (0, 1):
        SAMPLES.append(S(_op, [("data", (_dom, (3, 4))), ("axes", ("int64", []))],
                         {"noop_with_empty_axes": _noop}, 18))
    SAMPLES.append(S(_op, [("data", (_dom, (5,)))], {"keepdims": 0}, 11))
    SAMPLES.append(S(_op, [("data", ("float", [[[]], [[]]]))], {"axes": [1]}, 13, grad=False))
SAMPLES += [
    S("ReduceMax", [("data", ("float", _TIES))], {"axes": [1]}, 13, grad=False),
    S("ReduceMin", [("data", ("float", _TIES)), ("axes", ("int64", [0]))], {"keepdims": 0}, 18,
      grad=False),
    S("ReduceMax", [("data", ("int64", [[1, 5], [7, 2]]))], {"axes": [0]}, 13),
    S("ReduceProd", [("data", ("float", [[0.0, 2.0, 3.0], [0.0, 0.0, 4.0]]))], {"axes": [1]}, 13),
    S("ReduceSumSquare", [("data", ("int64", [[1, -2], [3, 4]]))], {"keepdims": 0}, 13),
    S("ReduceLogSumExp", [("data", ("float", [[1000.0, 1000.0], [-1000.0, 0.0]]))], {"axes": [1]}, 13),
]

#: Ops that must appear in the database.
OPS = sorted({s.op for s in SAMPLES})

# -- attention (opset 23 on) --------------------------------------------------------------------------------
_Q4, _K4 = ("real", (2, 2, 3, 4)), ("real", (2, 2, 5, 4))
_MASK_B = [[True, True, False, True, True], [True, False, True, True, True], [False, True, True, True, True]]
SAMPLES += [
    S("Attention", [("Q", _Q4), ("K", _K4), ("V", _K4)], {}, 23),
    S("Attention", [("Q", _Q4), ("K", _K4), ("V", ("real", (2, 2, 5, 3)))], {"is_causal": 1}, 23),
    S("Attention", [("Q", _Q4), ("K", _K4), ("V", _K4), ("attn_mask", ("real", (3, 5)))], {}, 23),
    S("Attention", [("Q", _Q4), ("K", _K4), ("V", _K4), ("attn_mask", ("real", (2, 1, 3, 4)))],
      {"scale": 0.3}, 23),
    S("Attention", [("Q", _Q4), ("K", _K4), ("V", _K4), ("attn_mask", ("bool", _MASK_B))],
      {"softcap": 2.0}, 23),
    S("Attention", [("Q", ("real", (2, 4, 3, 4))), ("K", _K4), ("V", _K4)], {"is_causal": 1}, 23),
    S("Attention", [("Q", _Q4), ("K", ("real", (2, 2, 2, 4))), ("V", ("real", (2, 2, 2, 4))),
                    (None, None), ("past_key", ("real", (2, 2, 3, 4))),
                    ("past_value", ("real", (2, 2, 3, 4)))], {"is_causal": 1}, 23, outputs=3),
    S("Attention", [("Q", ("real", (2, 3, 8))), ("K", ("real", (2, 5, 4))), ("V", ("real", (2, 5, 6)))],
      {"q_num_heads": 4, "kv_num_heads": 2}, 23),
    S("Attention", [("Q", ("real", (2, 3, 8))), ("K", ("real", (2, 5, 8))), ("V", ("real", (2, 5, 8))),
                    ("attn_mask", ("real", (1, 2, 3, 5)))],
      {"q_num_heads": 2, "kv_num_heads": 2, "is_causal": 1}, 23),
    S("Attention", [("Q", _Q4), ("K", _K4), ("V", _K4), ("attn_mask", ("real", (3, 5)))],
      {"qk_matmul_output_mode": 2}, 23),
    S("Attention", [("Q", _Q4), ("K", _K4), ("V", _K4), (None, None), (None, None), (None, None),
                    ("nonpad_kv_seqlen", ("int64", [4, 5]))], {"is_causal": 1}, 24),
    S("Attention", [("Q", _Q4), ("K", _K4), ("V", _K4)], {"left_window_size": 1, "is_causal": 1}, 25),
]
OPS = sorted({s.op for s in SAMPLES})

# -- recurrent layers (ops/rnn.py): X (steps, batch, input), W/R/B per direction ----------------------------
_T, _N, _I, _H = 3, 2, 3, 2


def _recurrent(op_type, dirs=1, lens=None, states=True, peepholes=False, layout=0, **attrs):
    """A recurrent sample: every float input present, ``lens`` (sequence_lens) when given."""
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op_type]
    steps_batch = (_N, _T) if layout else (_T, _N)
    state = ("real", (_N, dirs, _H) if layout else (dirs, _N, _H))
    inputs = [("X", ("real", steps_batch + (_I,))), ("W", ("real", (dirs, gates * _H, _I))),
              ("R", ("real", (dirs, gates * _H, _H))), ("B", ("real", (dirs, 2 * gates * _H))),
              ("sequence_lens", ("int32", lens)) if lens else (None, None)]
    if states:
        inputs.append(("initial_h", state))
        if op_type == "LSTM":
            inputs.append(("initial_c", state))
    if peepholes:
        inputs.append(("P", ("real", (dirs, 3 * _H))))
    if dirs == 2:
        attrs["direction"] = "bidirectional"
    if layout:
        attrs["layout"] = 1
    return S(op_type, inputs, {"hidden_size": _H, **attrs}, 14 if layout else 7,
             outputs=3 if op_type == "LSTM" else 2)


SAMPLES += [
    _recurrent("RNN"),
    _recurrent("RNN", dirs=2, lens=[3, 1], activations=["Tanh", "Sigmoid"]),
    _recurrent("RNN", direction="reverse", layout=1, clip=1.5),
    _recurrent("RNN", states=False, activations=["LeakyRelu"], activation_alpha=[0.1]),
    *[_recurrent("RNN", activations=[a]) for a in ("Elu", "Softsign", "Softplus", "HardSigmoid",
                                                     "Relu")],
    # Explicit parameters: onnxruntime's defaults for these two differ from the ONNX
    # functions they are named after.
    _recurrent("RNN", activations=["Affine"], activation_alpha=[0.7], activation_beta=[0.2]),
    _recurrent("RNN", activations=["ScaledTanh"], activation_alpha=[1.5], activation_beta=[0.5]),
    _recurrent("GRU"),
    _recurrent("GRU", dirs=2, lens=[2, 3], linear_before_reset=1),
    _recurrent("GRU", direction="reverse", layout=1, states=False),
    _recurrent("GRU", clip=1.0, activations=["HardSigmoid", "Softsign"]),
    _recurrent("LSTM", peepholes=True),
    _recurrent("LSTM", dirs=2, lens=[1, 3], peepholes=True, input_forget=1),
    _recurrent("LSTM", direction="reverse", layout=1, clip=1.2),
    _recurrent("LSTM", states=False, activations=["Sigmoid", "Elu", "Softplus"]),
]
OPS = sorted({s.op for s in SAMPLES})
