"""Ops added for conformance, beyond what the backend node suite checks: random numbers
(shapes, types, statistics, seeds), control flow with captured outer-scope values,
sequences inside a graph, and the gradient rules of the rearranging ops."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxgrad
from helpers import model_of, vi
from onnxgrad.ops.control import add_captured_inputs, free_names

F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


# -- random numbers -----------------------------------------------------------------------------
def _random_model(seed=None):
    extra = {} if seed is None else {"seed": float(seed)}
    nodes = [
        helper.make_node("RandomNormal", [], ["n"], shape=[400, 250], mean=1.5, scale=2.0, **extra),
        helper.make_node("RandomUniformLike", ["x"], ["u"], low=-1.0, high=3.0,
                         dtype=TensorProto.DOUBLE, **extra),
        helper.make_node("RandomNormalLike", ["x"], ["nl"], **extra),
        helper.make_node("RandomUniform", [], ["uu"], shape=[7], dtype=TensorProto.FLOAT16,
                         **extra),
        helper.make_node("Bernoulli", ["p"], ["b"], **extra),
        helper.make_node("Multinomial", ["logits"], ["m"], sample_size=20000, **extra),
    ]
    return model_of(nodes, [vi("x", F, [300, 200]), vi("p", F, [100000]), vi("logits", F, [2, 3])],
                    [vi("n", F, [400, 250]), vi("u", TensorProto.DOUBLE, [300, 200]),
                     vi("nl", F, [300, 200]), vi("uu", TensorProto.FLOAT16, [7]),
                     vi("b", F, [100000]), vi("m", TensorProto.INT32, [2, 20000])])


def _random_feeds():
    probs = np.array([[0.2, 0.3, 0.5], [0.7, 0.0, 0.3]])
    return {"x": np.zeros((300, 200), np.float32), "p": np.full(100000, 0.25, np.float32),
            "logits": np.log(probs + 1e-30).astype(np.float32)}


def test_random_ops_shapes_types_and_statistics():
    out = onnxgrad.load(_random_model()).run(_random_feeds())
    n, u, nl, uu, b, m = (out[k] for k in ("n", "u", "nl", "uu", "b", "m"))
    assert n.shape == (400, 250) and n.dtype == np.float32
    assert abs(n.mean() - 1.5) < 0.03 and abs(n.std() - 2.0) < 0.03
    assert u.shape == (300, 200) and u.dtype == np.float64
    assert u.min() >= -1 and u.max() < 3 and abs(u.mean() - 1.0) < 0.03
    assert nl.dtype == np.float32 and abs(nl.std() - 1) < 0.02
    assert uu.shape == (7,) and uu.dtype == np.float16
    assert b.dtype == np.float32 and set(np.unique(b)) <= {0.0, 1.0} and abs(b.mean() - 0.25) < 0.01
    assert m.shape == (2, 20000) and m.dtype == np.int32
    freq = np.stack([np.bincount(row, minlength=3) / row.size for row in m])
    np.testing.assert_allclose(freq, [[0.2, 0.3, 0.5], [0.7, 0.0, 0.3]], atol=0.015)


def test_seeded_random_ops_repeat_after_loading_and_unseeded_ones_do_not():
    feeds = _random_feeds()
    first = onnxgrad.load(_random_model(seed=3)).run(feeds)
    again = onnxgrad.load(_random_model(seed=3)).run(feeds)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    model = onnxgrad.load(_random_model())
    a, b = model.run(feeds), model.run(feeds)
    assert not np.array_equal(a["n"], b["n"])


# -- control flow -----------------------------------------------------------------------------
def _loop_model():
    """Loop M times: acc += x * scale (scale from the outer scope); scan out acc each step."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["step"]),
         helper.make_node("Add", ["acc_in", "step"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["acc_out"], ["scan_out"])],
        "body",
        [vi("i", I64, []), vi("cond_in", B, []), vi("acc_in", F, [2])],
        [vi("cond_out", B, []), vi("acc_out", F, [2]), vi("scan_out", F, [2])])
    nodes = [helper.make_node("Mul", ["x0", "two"], ["scale"]),
             helper.make_node("Loop", ["M", "", "acc0"], ["acc", "history"], body=body)]
    return model_of(nodes, [vi("M", I64, []), vi("acc0", F, [2]), vi("x0", F, []),
                            vi("x", F, [2])],
                    [vi("acc", F, [2]), vi("history", F, [None, 2])],
                    [numpy_helper.from_array(np.array(2.0, np.float32), "two")])


def test_loop_reads_captured_values_and_stacks_scan_outputs():
    proto = _loop_model()
    assert free_names(proto.graph.node[1].attribute[0].g) == ["x", "scale"]
    model = onnxgrad.load(proto)
    add_captured_inputs(model.graph)  # what the loader does for nodes with bodies
    add_captured_inputs(model.graph)  # (idempotent)
    assert model.graph.nodes[1].inputs == ["M", "", "acc0", "x", "scale"]
    x, acc0 = np.array([1.0, -2.0], np.float32), np.array([0.5, 0.5], np.float32)
    out = model.run({"M": np.array(3), "acc0": acc0, "x0": np.array(1.5, np.float32), "x": x})
    steps = acc0 + np.arange(1, 4)[:, None] * (x * 3.0)
    np.testing.assert_allclose(out["history"], steps)
    np.testing.assert_allclose(out["acc"], steps[-1])


def test_a_body_without_its_captured_values_fails_loudly():
    model = onnxgrad.load(_loop_model())
    model.graph.nodes[1].inputs = ["M", "", "acc0"]
    feeds = {"M": np.array(1), "acc0": np.zeros(2, np.float32), "x0": np.array(1.0, np.float32),
             "x": np.zeros(2, np.float32)}
    with pytest.raises(onnxgrad.ModelError, match="outer-scope value"):
        model.run(feeds)


def test_if_picks_a_branch_with_captured_values():
    then = helper.make_graph([helper.make_node("Add", ["a", "b"], ["t"])], "then", [],
                             [vi("t", F, [2])])
    other = helper.make_graph([helper.make_node("Sub", ["a", "b"], ["e"])], "else", [],
                              [vi("e", F, [2])])
    proto = model_of([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                     [vi("c", B, []), vi("a", F, [2]), vi("b", F, [2])], [vi("y", F, [2])])
    model = onnxgrad.load(proto)
    add_captured_inputs(model.graph)
    a, b = np.array([1.0, 2.0], np.float32), np.array([0.5, 4.0], np.float32)
    np.testing.assert_allclose(model.run({"c": np.array(True), "a": a, "b": b})["y"], a + b)
    np.testing.assert_allclose(model.run({"c": np.array(False), "a": a, "b": b})["y"], a - b)


def test_scan_reverse_directions_and_axes():
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"]),
         helper.make_node("Identity", ["s_out"], ["y_t"])],
        "body", [vi("s_in", F, [3]), vi("x_t", F, [3])], [vi("s_out", F, [3]), vi("y_t", F, [3])])
    node = helper.make_node("Scan", ["s0", "xs"], ["s", "ys"], body=body, num_scan_inputs=1,
                            scan_input_axes=[1], scan_input_directions=[1],
                            scan_output_axes=[-1])
    proto = model_of([node], [vi("s0", F, [3]), vi("xs", F, [3, 4])],
                     [vi("s", F, [3]), vi("ys", F, [3, 4])])
    xs = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = onnxgrad.load(proto).run({"s0": np.zeros(3, np.float32), "xs": xs})
    expected = np.cumsum(xs[:, ::-1], axis=1)  # scanned right to left along axis 1
    np.testing.assert_allclose(out["ys"], expected)
    np.testing.assert_allclose(out["s"], xs.sum(axis=1))


def test_sequences_inside_a_graph():
    nodes = [
        helper.make_node("SplitToSequence", ["x"], ["seq"], axis=1, keepdims=0),
        helper.make_node("SequenceErase", ["seq", "zero"], ["rest"]),
        helper.make_node("SequenceInsert", ["rest", "extra", "zero"], ["again"]),
        helper.make_node("SequenceLength", ["again"], ["n"]),
        helper.make_node("SequenceAt", ["again", "minus_one"], ["last"]),
        helper.make_node("ConcatFromSequence", ["again"], ["stacked"], axis=0, new_axis=1),
    ]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(-1, np.int64), "minus_one")]
    proto = model_of(nodes, [vi("x", F, [2, 3]), vi("extra", F, [2])],
                     [vi("n", I64, []), vi("last", F, [2]), vi("stacked", F, [3, 2])], inits)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    extra = np.array([9.0, 9.0], np.float32)
    out = onnxgrad.load(proto).run({"x": x, "extra": extra})
    assert int(out["n"]) == 3
    np.testing.assert_array_equal(out["last"], x[:, 2])
    np.testing.assert_array_equal(out["stacked"], np.stack([extra, x[:, 1], x[:, 2]]))


# -- gradients of the rearranging ops ------------------------------------------------------------
def _check_gradient(node, x, extra_inputs=(), extra_values=None, opset=21):
    """Trainer.gradients of sum(Y * U) w.r.t. the initializer "x" against central differences."""
    rng = np.random.default_rng(0)
    y_probe = onnxgrad.load(model_of(
        [node], [vi(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                 for n, v in (extra_values or {}).items()],
        [vi("y", TensorProto.DOUBLE, [f"d{i}" for i in range(x.ndim)])],  # (rank kept)
        [numpy_helper.from_array(x, "x")], opset)).run(dict(extra_values or {}))["y"]
    u = rng.standard_normal(y_probe.shape)
    nodes = [node, helper.make_node("Mul", ["y", "u"], ["yu"]),
             helper.make_node("ReduceSum", ["yu"], ["loss"], keepdims=0)]
    inputs = [vi(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in (extra_values or {}).items()]
    proto = model_of(nodes, inputs, [vi("loss", TensorProto.DOUBLE, [])],
                     [numpy_helper.from_array(x, "x"), numpy_helper.from_array(u, "u")], opset)
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss", trainable=["x"])
    grad = trainer.gradients(dict(extra_values or {}), None)["x"]

    def f(xv):
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        p.graph.initializer[0].CopyFrom(numpy_helper.from_array(xv, "x"))
        return float(onnxgrad.load(p).run(dict(extra_values or {}))["loss"])

    v = rng.standard_normal(x.shape)
    eps = 1e-6
    numeric = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    np.testing.assert_allclose(np.sum(grad * v), numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("node, shape", [
    (helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode="DCR"), (1, 8, 2, 3)),
    (helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode="CRD"), (2, 8, 2, 2)),
    (helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2), (1, 2, 4, 6)),
    (helper.make_node("Shrink", ["x"], ["y"], lambd=0.6, bias=0.2), (3, 5)),
    (helper.make_node("ThresholdedRelu", ["x"], ["y"], alpha=0.3), (3, 5)),
])
def test_rearranging_and_masking_gradients(node, shape):
    x = np.random.default_rng(1).uniform(-2, 2, shape)
    _check_gradient(node, x)


def test_reverse_sequence_and_center_crop_pad_gradients():
    x = np.random.default_rng(2).standard_normal((4, 3, 2))
    lens = np.array([4, 1, 2], np.int64)
    _check_gradient(helper.make_node("ReverseSequence", ["x", "lens"], ["y"], batch_axis=1,
                                     time_axis=0), x, extra_values={"lens": lens})
    for target in ([2, 5], [6, 1]):
        _check_gradient(helper.make_node("CenterCropPad", ["x", "shape"], ["y"], axes=[0, 2]), x,
                        extra_values={"shape": np.array(target, np.int64)})


def test_castlike_gradient_casts_back():
    x = np.random.default_rng(3).standard_normal((2, 3))
    node = helper.make_node("CastLike", ["x", "like"], ["y"])
    _check_gradient(node, x, extra_values={"like": np.zeros(1, np.float64)})


# -- recurrent layers against onnxruntime ----------------------------------------------------------
@pytest.mark.parametrize("op_type, gates, attrs", [
    ("LSTM", 4, {"direction": "bidirectional"}),
    ("LSTM", 4, {"direction": "reverse", "input_forget": 1, "clip": 0.8}),
    ("GRU", 3, {"direction": "bidirectional", "linear_before_reset": 1}),
    ("GRU", 3, {"direction": "reverse"}),
    ("RNN", 1, {"direction": "bidirectional", "activations": ["Relu", "Tanh"]}),
])
def test_recurrent_layers_with_sequence_lengths_match_onnxruntime(op_type, gates, attrs):
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(4)
    steps, batch, size, hidden = 4, 3, 5, 6
    dirs = 2 if attrs["direction"] == "bidirectional" else 1
    arrays = {
        "X": rng.standard_normal((steps, batch, size)).astype(np.float32),
        "W": (0.4 * rng.standard_normal((dirs, gates * hidden, size))).astype(np.float32),
        "R": (0.4 * rng.standard_normal((dirs, gates * hidden, hidden))).astype(np.float32),
        "B": (0.2 * rng.standard_normal((dirs, 2 * gates * hidden))).astype(np.float32),
        "lens": np.array([4, 1, 3], np.int32),
        "h0": rng.standard_normal((dirs, batch, hidden)).astype(np.float32),
    }
    ins = ["X", "W", "R", "B", "lens", "h0"]
    outs = ["Y", "Y_h"]
    if op_type == "LSTM":
        arrays["c0"] = rng.standard_normal((dirs, batch, hidden)).astype(np.float32)
        arrays["P"] = (0.3 * rng.standard_normal((dirs, 3 * hidden))).astype(np.float32)
        ins += ["c0", "P"]
        outs.append("Y_c")
    node = helper.make_node(op_type, ins, outs, hidden_size=hidden, **attrs)
    proto = model_of([node], [vi(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                              for n, a in arrays.items()],
                     [vi(n, F, ["d0", "d1", "d2", "d3"][:4 if n == "Y" else 3]) for n in outs],
                     opset=14)
    proto.ir_version = 8
    want = ort.InferenceSession(proto.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, arrays)
    got = onnxgrad.load(proto).run(arrays)
    for name, w in zip(outs, want):
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_gradients_through_forward_only_ops_raise():
    """Forward-only ops never give a silent zero."""
    quantized = model_of([helper.make_node("DynamicQuantizeLinear", ["w"], ["q", "s", "z"]),
                          helper.make_node("ReduceSum", ["s"], ["loss"], keepdims=0)],
                         [], [vi("loss", TensorProto.FLOAT, [])],
                         [numpy_helper.from_array(np.linspace(-1, 2, 4, dtype=np.float32), "w")])
    with pytest.raises(onnxgrad.UnsupportedOpError, match="DynamicQuantizeLinear"):
        onnxgrad.Trainer(onnxgrad.load(quantized), loss=None, output="loss",
                         trainable=["w"]).gradients({}, None)


def test_tree_ensemble_with_more_leaves_than_nodes_and_average():
    """Two stumps: x0 <= 0.5 (leaves 0/1) and x1 > 2 (leaves 2/3); AVERAGE over two targets."""
    ml = "ai.onnx.ml"
    node = helper.make_node(
        "TreeEnsemble", ["X"], ["Y"], domain=ml, n_targets=2, aggregate_function=0,
        tree_roots=[0, 1], nodes_featureids=[0, 1],
        nodes_modes=numpy_helper.from_array(np.array([0, 3], np.uint8)),
        nodes_splits=numpy_helper.from_array(np.array([0.5, 2.0], np.float32)),
        nodes_truenodeids=[0, 2], nodes_falsenodeids=[1, 3], nodes_trueleafs=[1, 1],
        nodes_falseleafs=[1, 1], leaf_targetids=[0, 1, 1, 0],
        leaf_weights=numpy_helper.from_array(np.array([1.0, 2.0, 4.0, 8.0], np.float32)))
    graph = helper.make_graph([node], "g", [vi("X", F, [3, 2])], [vi("Y", F, [3, 2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(ml, 5)])
    X = np.array([[0.0, 3.0], [1.0, 1.0], [np.nan, 5.0]], np.float32)
    y = onnxgrad.load(proto).run({"X": X})["Y"]
    # row 0: leaf 0 (t0 += 1), leaf 2 (t1 += 4); row 1: leaf 1 (t1 += 2), leaf 3 (t0 += 8);
    # row 2: NaN goes false -> leaf 1 (t1 += 2), leaf 2 (t1 += 4).
    np.testing.assert_allclose(y, np.array([[1, 4], [8, 2], [0, 6]]) / 2)
