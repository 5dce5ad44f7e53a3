"""Conformance follow-ups: captured values in bodies, robust scalar and axes inputs, Cast to
the narrow types, sequences and optionals through Model.run, and the ops added for the node
suite (with their gradient rules checked in float64 against central differences)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import gradcheck as gc
import onnxgrad
from helpers import model_of, vi
from onnxgrad.errors import UnsupportedOpError
from onnxgrad.ops import registered_ops
from op_db import Sample as S

F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


# -- the loader passes captured values; scalar and axes inputs -----------------------------------
def test_loaded_body_nodes_receive_their_captured_values():
    then = helper.make_graph([helper.make_node("Add", ["a", "s"], ["t"])], "then", [],
                             [vi("t", F, [2])])
    other = helper.make_graph([helper.make_node("Sub", ["a", "s"], ["e"])], "else", [],
                              [vi("e", F, [2])])
    nodes = [helper.make_node("Mul", ["b", "b"], ["s"]),  # computed before If, read only by it
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    model = onnxgrad.load(model_of(nodes, [vi("c", B, []), vi("a", F, [2]), vi("b", F, [2])],
                                   [vi("y", F, [2])]))
    assert model.graph.nodes[1].inputs == ["c", "a", "s"]
    a, b = np.array([1.0, 2.0], np.float32), np.array([3.0, -1.0], np.float32)
    np.testing.assert_allclose(model.run({"c": np.array(True), "a": a, "b": b})["y"], a + b * b)
    np.testing.assert_allclose(model.run({"c": np.array(False), "a": a, "b": b})["y"], a - b * b)


def test_bodies_may_read_the_nodes_own_inputs():
    """An If branch reading the condition, a Loop body reading its trip count."""
    then = helper.make_graph([helper.make_node("Cast", ["c"], ["t"], to=F)], "then", [],
                             [vi("t", F, [])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [vi("e", F, [])])
    model = onnxgrad.load(model_of(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        [vi("c", B, []), vi("x", F, [])], [vi("y", F, [])]))
    assert model.graph.nodes[0].inputs == ["c", "x"]
    x = np.array(3.0, np.float32)
    assert model.run({"c": np.array(True), "x": x})["y"] == 1.0
    assert model.run({"c": np.array(False), "x": x})["y"] == -3.0
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Cast", ["M"], ["m"], to=F),
         helper.make_node("Add", ["acc", "m"], ["acc_out"])], "body",
        [vi("i", I64, []), vi("cond_in", B, []), vi("acc", F, [])],
        [vi("cond_out", B, []), vi("acc_out", F, [])])
    model = onnxgrad.load(model_of([helper.make_node("Loop", ["M", "", "a0"], ["a"], body=body)],
                                   [vi("M", I64, []), vi("a0", F, [])], [vi("a", F, [])]))
    assert model.run({"M": np.array(3), "a0": np.array(1.0, np.float32)})["a"] == 10.0


@pytest.mark.parametrize("shape", [(), (1,)])
def test_range_takes_scalars_and_one_element_vectors(shape):
    nodes = [helper.make_node("Range", ["s", "l", "d"], ["y"])]
    model = onnxgrad.load(model_of(nodes, [vi(n, F, list(shape)) for n in "sld"],
                                   [vi("y", F, ["n"])]))
    feeds = {k: np.full(shape, v, np.float32) for k, v in zip("sld", (1.0, 2.5, 0.5))}
    np.testing.assert_allclose(model.run(feeds)["y"], [1.0, 1.5, 2.0])
    nodes = [helper.make_node("Range", ["s", "l", "d"], ["y"])]
    model = onnxgrad.load(model_of(nodes, [vi(n, I64, list(shape)) for n in "sld"],
                                   [vi("y", I64, ["n"])]))
    feeds = {k: np.full(shape, v, np.int64) for k, v in zip("sld", (5, 0, -2))}
    assert model.run(feeds)["y"].tolist() == [5, 3, 1]


def test_unsqueeze_takes_a_0d_axes_tensor():
    nodes = [helper.make_node("Unsqueeze", ["x", "axes"], ["y"])]
    axes = numpy_helper.from_array(np.array(-1, np.int64), "axes")
    model = onnxgrad.load(model_of(nodes, [vi("x", F, [2, 3])], [vi("y", F, [2, 3, 1])], [axes]))
    assert model.run({"x": np.zeros((2, 3), np.float32)})["y"].shape == (2, 3, 1)


# -- Cast to the narrow types -----------------------------------------------------------------
NARROW = [TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2FNUZ,
          TensorProto.INT4, TensorProto.UINT2, TensorProto.FLOAT4E2M1, TensorProto.FLOAT8E8M0]


@pytest.mark.parametrize("to", NARROW, ids=[TensorProto.DataType.Name(t) for t in NARROW])
def test_cast_to_narrow_types_matches_the_reference(to):
    x = np.array([-3.2, -1.0, 0.0, 0.26, 1.7, 2.5, 900.0], np.float32)
    if to in (TensorProto.UINT2, TensorProto.FLOAT8E8M0):
        x = np.abs(x)
    nodes = [helper.make_node("Cast", ["x"], ["n"], to=to),
             helper.make_node("Cast", ["n"], ["y"], to=F)]
    proto = model_of(nodes, [vi("x", F, [7])], [vi("n", to, [7]), vi("y", F, [7])], opset=25)
    got = onnxgrad.load(proto).run({"x": x})
    want = ReferenceEvaluator(proto).run(None, {"x": x})
    assert got["n"].dtype == want[0].dtype
    np.testing.assert_array_equal(got["y"], want[1])


def test_cast_to_and_from_strings():
    nodes = [helper.make_node("Cast", ["x"], ["s"], to=TensorProto.STRING),
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.DOUBLE)]
    proto = model_of(nodes, [vi("x", F, [3])], [vi("s", TensorProto.STRING, [3]),
                                                vi("y", TensorProto.DOUBLE, [3])])
    out = onnxgrad.load(proto).run({"x": np.array([1.5, -2.0, np.inf], np.float32)})
    assert out["s"].tolist() == ["1.5", "-2.0", "inf"]
    np.testing.assert_array_equal(out["y"], [1.5, -2.0, np.inf])


@pytest.mark.parametrize("to", [TensorProto.BFLOAT16, TensorProto.FLOAT16, TensorProto.FLOAT])
def test_cast_gradient_through_narrow_floats_is_straight_through(to):
    """d/dw sum(Cast(Cast(w, to), double) * U) = U rounded to ``to`` and back."""
    from onnxgrad.ops.shape import element_dtype

    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4))
    u = rng.standard_normal((3, 4))
    nodes = [helper.make_node("Cast", ["w"], ["n"], to=to),
             helper.make_node("Cast", ["n"], ["d"], to=TensorProto.DOUBLE),
             helper.make_node("Mul", ["d", "U"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["loss"], keepdims=0)]
    proto = model_of(nodes, [vi("U", TensorProto.DOUBLE, [3, 4])],
                     [vi("loss", TensorProto.DOUBLE, [])], [numpy_helper.from_array(w, "w")])
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=["w"])
    grad = trainer.gradients({"U": u}, None)["w"]
    assert grad.dtype == np.float64
    np.testing.assert_array_equal(grad, u.astype(element_dtype(to)).astype(np.float64))


def test_cast_to_an_integer_carries_no_gradient():
    nodes = [helper.make_node("Cast", ["w"], ["i"], to=TensorProto.INT64),
             helper.make_node("Cast", ["i"], ["d"], to=TensorProto.DOUBLE),
             helper.make_node("Mul", ["d", "w"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["loss"], keepdims=0)]
    w = np.array([1.5, -2.5])
    proto = model_of(nodes, [], [vi("loss", TensorProto.DOUBLE, [])],
                     [numpy_helper.from_array(w, "w")])
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=["w"])
    np.testing.assert_array_equal(trainer.gradients({}, None)["w"], np.trunc(w))


# -- sequences and optionals through Model.run ----------------------------------------------------
def _seq_type(elem, shape=None):
    return helper.make_sequence_type_proto(helper.make_tensor_type_proto(elem, shape))


def _sequence_model():
    """seq (a sequence) and maybe (an optional tensor) in; the sequence with x appended,
    the shape of seq's first element, whether ``maybe`` holds a tensor and x's shape, out."""
    nodes = [helper.make_node("SequenceInsert", ["seq", "x"], ["longer"]),
             helper.make_node("SequenceAt", ["seq", "zero"], ["first"]),
             helper.make_node("Shape", ["first"], ["first_shape"]),
             helper.make_node("OptionalHasElement", ["maybe"], ["has"]),
             helper.make_node("Shape", ["x"], ["x_shape"])]  # recorded: plans specialise
    opt = helper.make_optional_type_proto(helper.make_tensor_type_proto(F, ["n"]))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_value_info("seq", _seq_type(F)), vi("x", F, ["n"]),
         helper.make_value_info("maybe", opt)],
        [helper.make_value_info("longer", _seq_type(F)), vi("first_shape", I64, [None]),
         vi("has", B, []), vi("x_shape", I64, [1])],
        [numpy_helper.from_array(np.array(0, np.int64), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_sequences_and_optionals_are_fed_and_returned_as_lists_and_none():
    model = onnxgrad.load(_sequence_model())
    assert model.graph.info["seq"].kind == "sequence"
    assert model.graph.info["seq"].element.dtype == np.float32
    assert model.graph.info["maybe"].kind == "optional"
    assert model.graph.dtype("seq") is None and model.graph.shape("seq") is None
    a, b = np.ones((2, 3), np.float32), np.zeros(4, np.float32)
    out = model.run({"seq": [a, b], "x": np.arange(2.0), "maybe": None})
    assert isinstance(out["longer"], list) and len(out["longer"]) == 3
    assert out["longer"][2].dtype == np.float32  # float64 fed, cast within its kind
    np.testing.assert_array_equal(out["longer"][2], [0.0, 1.0])
    assert out["first_shape"].tolist() == [2, 3] and not out["has"]
    # Same input shapes but other element shapes: no specialisation mixes them up.
    out = model.run({"seq": (b, a), "x": np.arange(2.0), "maybe": np.ones(1, np.float32)})
    assert out["first_shape"].tolist() == [4] and out["has"]
    out = model.run({"seq": [a, b], "x": np.arange(2.0), "maybe": None})
    assert out["first_shape"].tolist() == [2, 3]


def test_wrong_sequence_feeds_are_data_errors():
    model = onnxgrad.load(_sequence_model())
    good = {"seq": [np.ones(2, np.float32)], "x": np.ones(1, np.float32), "maybe": None}
    with pytest.raises(onnxgrad.DataError, match="'seq' is a sequence"):
        model.run({**good, "seq": np.ones(2, np.float32)})
    with pytest.raises(onnxgrad.DataError, match=r"'seq\[0\]' expects element type float32"):
        model.run({**good, "seq": [np.array(["a"])]})
    with pytest.raises(onnxgrad.DataError, match="'x' expects"):
        model.run({**good, "x": None})


# -- ops added for the node suite: samples, forward, gradients ---------------------------------
#: The ops added for the node suite: every op of these modules, and these ops, which live
#: with their families.
MODULES = {f"onnxgrad.ops.{m}" for m in
           ("deform_conv", "flex_attention", "gated", "linear_attention", "rotary")}
NODE_SUITE_OPS = {"CumProd", "Scatter", "TensorScatter",  # ops/indexing.py
                  "GlobalLpPool", "LpPool", "MaxUnpool"}  # ops/pool.py
PREVIEW = "ai.onnx.preview"


def _i64(values):
    return ("int64", values)


OMIT = (None, ("real", ()))  # an optional input left out


SAMPLES = [
    # CumProd: axes, exclusive and reverse; integers (no gradient)
    *[S("CumProd", [("x", ("real", (3, 4))), ("axis", _i64(axis))],
        {"exclusive": e, "reverse": r}, 26)
      for axis in (0, -1) for e in (0, 1) for r in (0, 1)],
    S("CumProd", [("x", ("real", (2, 3, 4))), ("axis", _i64(1))], {}, 26),
    S("CumProd", [("x", ("int32", [[1, -2, 3], [4, 0, 2]])), ("axis", _i64(1))],
      {"exclusive": 1}, 26),
    # LpPool: p = 1, 2, 3; pads, strides, dilations, ceil_mode, auto_pad; opset 11 and 22
    S("LpPool", [("X", ("away0", (1, 2, 5, 5)))], {"kernel_shape": [3, 3], "p": 1}, 22),
    S("LpPool", [("X", ("real", (2, 1, 6, 5)))],
      {"kernel_shape": [2, 3], "pads": [1, 0, 1, 2], "strides": [2, 1]}, 22),
    S("LpPool", [("X", ("real", (1, 2, 7)))],
      {"kernel_shape": [3], "p": 3, "dilations": [2], "ceil_mode": 1, "strides": [2]}, 22),
    S("LpPool", [("X", ("real", (1, 1, 5, 4)))],
      {"kernel_shape": [2, 2], "auto_pad": "SAME_UPPER", "strides": [2, 2]}, 11),
    S("LpPool", [("X", ("real", (1, 1, 2, 3, 3)))], {"kernel_shape": [2, 2, 2], "p": 4}, 18),
    # MaxUnpool: with and without output_shape
    S("MaxUnpool", [("X", ("real", (1, 2, 2, 2))),
                    ("I", _i64([[[[5, 7], [8, 15]], [[16, 19], [26, 31]]]]))],
      {"kernel_shape": [2, 2], "strides": [2, 2]}, 11),
    S("MaxUnpool", [("X", ("real", (1, 1, 2, 2))), ("I", _i64([[[[0, 3], [8, 14]]]])),
                    ("output_shape", _i64([1, 1, 5, 5]))],
      {"kernel_shape": [2, 2], "strides": [2, 2]}, 22),
    # RotaryEmbedding: 4-D and 3-D inputs, interleaved, partial rotation, no position ids
    *[S("RotaryEmbedding", [("X", ("real", (2, 2, 3, 8))), ("cos_cache", ("real", (5, rd // 2))),
                            ("sin_cache", ("real", (5, rd // 2))),
                            ("position_ids", _i64([[0, 1, 2], [4, 2, 3]]))],
        {"interleaved": il, "rotary_embedding_dim": rd if rd < 8 else 0}, 23)
      for il in (0, 1) for rd in (8, 4)],
    S("RotaryEmbedding", [("X", ("real", (2, 3, 12))), ("cos_cache", ("real", (2, 3, 3))),
                          ("sin_cache", ("real", (2, 3, 3)))], {"num_heads": 2}, 23),
    S("RotaryEmbedding", [("X", ("real", (1, 3, 8))), ("cos_cache", ("real", (4, 1))),
                          ("sin_cache", ("real", (4, 1))), ("position_ids", _i64([[3, 0, 1]]))],
      {"num_heads": 2, "interleaved": 1, "rotary_embedding_dim": 2}, 23),
    # Swish and SwiGLU
    S("Swish", [("X", ("real", (3, 4)))], {}, 24),
    S("Swish", [("X", ("real", (2, 5)))], {"alpha": 0.5}, 24),
    S("SwiGLU", [("A", ("real", (2, 6))), ("B", ("real", (2, 6)))], {}, 28),
    S("SwiGLU", [("A", ("real", (3,))), ("B", ("real", (3,)))], {"alpha": 1.7}, 28),
    # Scatter (opset 9/10) and TensorScatter
    S("Scatter", [("data", ("real", (3, 3))), ("indices", _i64([[1, 0, 2], [0, 2, 1]])),
                  ("updates", ("real", (2, 3)))], {}, 10),
    S("Scatter", [("data", ("real", (2, 4))), ("indices", _i64([[3, 1], [0, 2]])),
                  ("updates", ("real", (2, 2)))], {"axis": 1}, 9),
    S("TensorScatter", [("past_cache", ("real", (2, 3, 5, 4))), ("update", ("real", (2, 3, 2, 4))),
                        ("write_indices", _i64([1, 3]))], {}, 24),
    S("TensorScatter", [("past_cache", ("real", (2, 4, 3))), ("update", ("real", (2, 3, 3))),
                        ("write_indices", _i64([2, 0]))], {"mode": "circular", "axis": 1}, 24),
    S("TensorScatter", [("past_cache", ("real", (1, 2, 4))), ("update", ("real", (1, 2, 1)))],
      {"axis": -1}, 24),
    # LinearAttention (forward only): the four update rules, GQA/MQA, decay per head or per
    # key feature, beta per head or shared, a past state, an explicit scale
    S("LinearAttention", [("query", ("real", (2, 3, 8))), ("key", ("real", (2, 3, 8))),
                          ("value", ("real", (2, 3, 6)))],
      {"q_num_heads": 2, "kv_num_heads": 2, "update_rule": "linear"}, 27),
    S("LinearAttention", [("query", ("real", (1, 4, 8))), ("key", ("real", (1, 4, 8))),
                          ("value", ("real", (1, 4, 4))), ("past_state", ("real", (1, 2, 4, 2))),
                          ("decay", ("real", (1, 4, 2)))],
      {"q_num_heads": 2, "kv_num_heads": 2, "update_rule": "gated", "scale": 0.3}, 27),
    S("LinearAttention", [("query", ("real", (2, 3, 8))), ("key", ("real", (2, 3, 4))),
                          ("value", ("real", (2, 3, 2))), ("past_state", ("real", (2, 1, 4, 2))),
                          OMIT, ("beta", ("pos", (2, 3, 1)))],
      {"q_num_heads": 2, "kv_num_heads": 1, "update_rule": "delta"}, 27),
    S("LinearAttention", [("query", ("real", (1, 5, 12))), ("key", ("real", (1, 5, 6))),
                          ("value", ("real", (1, 5, 4))), OMIT,
                          ("decay", ("real", (1, 5, 6))), ("beta", ("pos", (1, 5, 2)))],
      {"q_num_heads": 4, "kv_num_heads": 2}, 27),
    # CausalConvWithState: bias, past state, SiLU, kernel size 1
    S("CausalConvWithState", [("input", ("real", (2, 3, 5))), ("weight", ("real", (3, 1, 3))),
                              ("bias", ("real", (3,))), ("past_state", ("real", (2, 3, 2)))],
      {}, 27),
    S("CausalConvWithState", [("input", ("real", (1, 2, 4))), ("weight", ("real", (2, 1, 4)))],
      {"activation": "silu"}, 27),
    S("CausalConvWithState", [("input", ("real", (2, 2, 3))), ("weight", ("real", (2, 1, 2))),
                              OMIT, ("past_state", ("real", (2, 2, 1)))],
      {"activation": "swish"}, 27),
    S("CausalConvWithState", [("input", ("real", (1, 3, 4))), ("weight", ("real", (3, 1, 1))),
                              ("bias", ("real", (3,)))], {}, 27),
    # FlexAttention (forward only; the subgraphs are tested below)
    S("FlexAttention", [("Q", ("real", (1, 2, 3, 4))), ("K", ("real", (1, 2, 5, 4))),
                        ("V", ("real", (1, 2, 5, 3)))], {}, 26, domain=PREVIEW),
    S("FlexAttention", [("Q", ("real", (2, 4, 3, 4))), ("K", ("real", (2, 2, 3, 4))),
                        ("V", ("real", (2, 2, 3, 4)))], {"scale": 0.7}, 26, domain=PREVIEW),
    S("FlexAttention", [("Q", ("real", (1, 1, 2, 4))), ("K", ("real", (1, 1, 3, 4))),
                        ("V", ("real", (1, 1, 3, 2)))], {"softmax_precision": 11}, 26,
      domain=PREVIEW),
    # DeformConv (forward only)
    S("DeformConv", [("X", ("real", (1, 2, 4, 5))), ("W", ("real", (3, 2, 2, 2))),
                     ("offset", ("real", (1, 8, 3, 4)))], {"kernel_shape": [2, 2]}, 22),
    S("DeformConv", [("X", ("real", (2, 4, 5, 7))), ("W", ("real", (2, 2, 3, 3))),
                     ("offset", ("real", (2, 36, 3, 3))), ("B", ("real", (2,))),
                     ("mask", ("pos", (2, 18, 3, 3)))],
      {"pads": [1, 0, 1, 0], "strides": [2, 1], "dilations": [1, 2], "group": 2,
       "offset_group": 2}, 19),
]

#: Inputs declared differentiable with no rule (asking raises UnsupportedOpError), whose
#: refusal is tested where their samples live: FlexAttention's values captured by its
#: score/prob subgraphs (tests/test_signal_attention_gradients.py).
REFUSED = {("FlexAttention", "captured")}
#: Ops of these modules whose samples live in tests/test_vision_gradients.py, which
#: checks their forward against onnxruntime (onnx's reference evaluator lacks them).
ELSEWHERE = {"GlobalLpPool", "MaxRoiPool"}

GRAD_CASES = [(s, n) for s in SAMPLES for n in gc.differentiable_inputs(s)]


#: Ops whose second output (a carried state) ONNX requires: their models keep every output.
TWO_OUTPUTS = {"LinearAttention", "CausalConvWithState"}


def _outputs(sample):
    return [gc.OUT, "state"] if sample.op in TWO_OUTPUTS else [gc.OUT]


def _full_model(sample, arrays, as_inputs, us=None):
    """The sample's node with all its outputs; names in ``as_inputs`` are graph inputs, the
    other arrays initializers.  With ``us`` (one array per output) the graph computes
    ``loss = Σ_k ⟨Y_k, U_k⟩`` (U_k fed as "U0", "U1"…) and outputs only that."""
    outs = _outputs(sample)
    node = gc.make_node(sample)
    del node.output[:]
    node.output.extend(outs)

    def info(name, a):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype),
                                             a.shape)

    probe = helper.make_model(
        helper.make_graph([node], "probe", [info(n, a) for n, a in arrays.items()],
                          [helper.make_value_info(o, onnx.TypeProto()) for o in outs]),
        opset_imports=gc.opset_imports(sample), ir_version=gc.ir_version(sample.opset))
    ys = ReferenceEvaluator(probe).run(None, arrays)
    nodes, outputs, extra = [node], [info(o, y) for o, y in zip(outs, ys)], []
    if us is not None:
        parts = []
        for k, (o, u) in enumerate(zip(outs, us)):
            extra.append(info(f"U{k}", u.reshape(-1, 1)))
            nodes += [helper.make_node("Flatten", [o], [f"{o}_row"], axis=0),
                      helper.make_node("MatMul", [f"{o}_row", f"U{k}"], [f"{o}_u"])]
            parts.append(f"{o}_u")
        nodes += [helper.make_node("Sum", parts, ["total"]),
                  helper.make_node("ReduceSum", ["total"], ["loss"], keepdims=0)]
        outputs = [helper.make_tensor_value_info("loss", helper.np_dtype_to_tensor_dtype(
            us[0].dtype), [])]
    graph = helper.make_graph(
        nodes, "full", [info(n, a) for n, a in arrays.items() if n in as_inputs] + extra,
        outputs, [numpy_helper.from_array(a, n) for n, a in arrays.items() if n not in as_inputs])
    return helper.make_model(graph, opset_imports=gc.opset_imports(sample),
                             ir_version=gc.ir_version(sample.opset)), ys


def _check_gradient_all_outputs(sample, name):
    """gradcheck.check_gradient with every output of the node in the loss."""
    arrays = gc.materialize(sample, np.float64)
    _, ys = _full_model(sample, arrays, set(arrays))
    rng = np.random.default_rng(7)
    us = [rng.standard_normal(y.shape) for y in ys]
    feeds = {f"U{k}": u.reshape(-1, 1) for k, u in enumerate(us)}
    model, _ = _full_model(sample, arrays, set(), us)
    trainer = onnxgrad.Trainer(onnxgrad.load(model), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=[name])
    grad = trainer.gradients(feeds, None)[name]
    x = arrays[name]
    assert grad.dtype == x.dtype and grad.shape == x.shape
    runner = onnxgrad.load(_full_model(sample, arrays, set(arrays), us)[0])
    v = rng.standard_normal(x.shape)

    def f(shift):
        return float(runner.run({**arrays, **feeds, name: x + shift * v})["loss"])

    eps = 1e-6
    numeric = (f(eps) - f(-eps)) / (2 * eps)
    analytic = float(np.sum(grad * v))
    assert abs(analytic - numeric) <= 1e-8 + 1e-5 * (float(np.sum(np.abs(grad * v))) + abs(numeric))


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.id for s in SAMPLES])
def test_forward_matches_the_reference(sample):
    arrays = gc.materialize(sample, np.float32)
    if sample.op in TWO_OUTPUTS:
        model, wants = _full_model(sample, arrays, set(arrays))
        gots = [onnxgrad.load(model).run(arrays)[o] for o in _outputs(sample)]
    else:
        model, got = gc.run_forward(sample, arrays)
        if sample.op == "Scatter":  # the reference knows it by its new name only
            model = gc.build_model(sample._replace(op="ScatterElements", opset=11), arrays,
                                   set(arrays))
        gots, wants = [got], ReferenceEvaluator(model).run(None, arrays)
    for got, want in zip(gots, wants):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sample,name", GRAD_CASES, ids=[f"{s.id}-d{n}" for s, n in GRAD_CASES])
def test_gradient(sample, name):
    if sample.op in TWO_OUTPUTS:
        _check_gradient_all_outputs(sample, name)
    else:
        gc.check_gradient(sample, name)


def test_every_new_op_and_input_is_covered():
    checked = {(s.op, gc.definition(s).input_name([n for n, _ in s.inputs].index(name)))
               for s, name in GRAD_CASES}
    in_db = {s.op for s in SAMPLES}
    for (domain, name), versions in registered_ops().items():
        if domain == "onnxgrad" or name in ELSEWHERE or \
                versions[0].kernel.__module__ not in MODULES and name not in NODE_SUITE_OPS:
            continue
        assert name in in_db, f"{name} has no sample"
        for d in versions:
            for inp in d.differentiable:
                if (name, inp) in REFUSED:
                    continue
                assert d.rule is not None, f"{name}: input {inp!r} has no rule"
                assert (name, inp) in checked, f"{name}: input {inp!r} is never checked"


def test_cumprod_gradient_with_zeros():
    """No division: inputs that are zero (once or twice) still get exact gradients."""
    x = np.array([[2.0, 0.0, 3.0, -1.5, 0.0], [1.0, 0.5, 0.0, 2.0, 4.0]])
    rng = np.random.default_rng(3)
    for exclusive in (0, 1):
        for reverse in (0, 1):
            sample = S("CumProd", [("x", ("float", x.tolist())), ("axis", _i64(1))],
                       {"exclusive": exclusive, "reverse": reverse}, 26)
            arrays = gc.materialize(sample)
            u = rng.standard_normal(x.shape)
            grad = gc.analytic_gradients(sample, arrays, ["x"], u)["x"]
            # The Jacobian column by column: y is multilinear in x.
            jac = np.zeros(x.shape + x.shape)
            model = onnxgrad.load(gc.build_model(sample, arrays, set(arrays)))
            for idx in np.ndindex(x.shape):
                e = np.zeros_like(x)
                e[idx] = 1.0
                hi = model.run({**arrays, "x": x + e})[gc.OUT]
                lo = model.run({**arrays, "x": x - e})[gc.OUT]
                jac[(...,) + idx] = (hi - lo) / 2
            np.testing.assert_allclose(grad, np.einsum("ij,ijkl->kl", u, jac), atol=1e-12)


def test_flex_attention_runs_its_subgraphs_with_captured_values():
    """score_mod adds a bias from the outer graph (a captured value), prob_mod doubles."""
    T4 = helper.make_tensor_type_proto(F, ["b", "h", "l", "s"])
    score = helper.make_graph([helper.make_node("Add", ["scores", "bias"], ["out"])], "score_mod",
                              [helper.make_value_info("scores", T4)],
                              [helper.make_value_info("out", T4)])
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    prob = helper.make_graph([helper.make_node("Mul", ["probs", "two"], ["out"])], "prob_mod",
                             [helper.make_value_info("probs", T4)],
                             [helper.make_value_info("out", T4)], [two])
    nodes = [helper.make_node("Neg", ["b0"], ["bias"]),
             helper.make_node("FlexAttention", ["Q", "K", "V"], ["Y"], domain=PREVIEW,
                              score_mod=score, prob_mod=prob, scale=0.5)]
    shapes = {"Q": (1, 4, 3, 2), "K": (1, 2, 5, 2), "V": (1, 2, 5, 3), "b0": (3, 5)}
    graph = helper.make_graph(nodes, "g", [vi(n, F, list(s)) for n, s in shapes.items()],
                              [vi("Y", F, [1, 4, 3, 3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 26),
                                                    helper.make_opsetid(PREVIEW, 1)])
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    model = onnxgrad.load(proto)
    assert model.graph.nodes[1].inputs == ["Q", "K", "V", "bias"]
    y = model.run(feeds)["Y"]
    K, V = (np.repeat(feeds[n], 2, axis=1) for n in "KV")
    S = feeds["Q"] @ np.swapaxes(K, -1, -2) * 0.5 - feeds["b0"]
    P = np.exp(S - S.max(-1, keepdims=True))
    P = 2 * P / P.sum(-1, keepdims=True)
    np.testing.assert_allclose(y, P @ V, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 5e-7), (np.float64, 2e-15)])
def test_erf_of_arrays_larger_than_a_block(dtype, tol):
    """NumPy evaluates erf blockwise; every block, the last partial one and a
    non-contiguous input included, equals math.erf."""
    import math

    from onnxgrad.ops import nonlinear

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, nonlinear.ERF_BLOCK + 77)) * 2).astype(dtype)[:, ::2]
    want = np.vectorize(math.erf)(x.astype(np.float64))
    got = nonlinear.erf(np, x)
    assert got.dtype == dtype and got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


@pytest.mark.parametrize("transA", [0, 1])
@pytest.mark.parametrize("transB", [0, 1])
def test_gemm_weight_gradient_follows_the_weights_memory_order(transA, transB):
    """GemmGradB gives the same values for a row- or column-major B, in B's order."""
    from onnxgrad.ops.linalg import GemmGradB

    rng = np.random.default_rng(0)
    A = rng.standard_normal((4, 3) if transA else (3, 4))
    B = rng.standard_normal((5, 4) if transB else (4, 5))
    dY = rng.standard_normal((3, 5))
    opA = A.T if transA else A
    want = 0.5 * (dY.T @ opA if transB else opA.T @ dY)
    for layout in (np.ascontiguousarray, np.asfortranarray):
        (got,) = GemmGradB(np, dY, A, layout(B), alpha=0.5, transA=transA, transB=transB)
        np.testing.assert_allclose(got, want, rtol=1e-14)
        assert got.flags.f_contiguous == (layout is np.asfortranarray)
