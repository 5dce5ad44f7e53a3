"""Gradients through sequence values, against central differences in float64.

Each model builds its sequences from trainable initializers (sequences cannot be
initializers) with SequenceConstruct or SplitToSequence, passes them through the
sequence ops, SequenceMap, Loop or If, and turns them back into tensors; its loss is
``Σ_k sum(Y_k * U_k)`` over the named tensor outputs.  The forward pass (loss and
outputs) must equal onnx's reference evaluator (where the evaluator errs, with an
optional's content, SequenceInsert at position n or outer values read by SequenceMap's
body, outputs written out in NumPy), and the analytic gradient
(``Trainer(loss=None).gradients``) central differences of ``Model.run`` element by
element.  An element whose gradient no output reaches gets exact zeros of its shape.
The end-to-end case is a scripted PyTorch model that builds lists, exported by
torch.onnx (reference data: ``tests/reference/make_sequence_reference.py``).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxgrad
from helpers import (check_against_central_differences, make_model, model_of, tensor_type,
                     uniform, vi)

D, I64, B = TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL
EPS = 1e-6
REF = pathlib.Path(__file__).parent / "reference"


def _const(name, values, dtype=np.int64):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(
        name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), np.shape(values),
        np.ravel(values).tolist()))


def _loss_model(nodes, ys, params, feeds, opset, shapes=None):
    """The model of ``nodes`` with ``loss = Σ_k sum(Y_k * U_k)`` over outputs ``ys``; it
    outputs the loss and the Y_k.  Without ``shapes`` (Y_k's shapes), the Y_k are typed
    without shape and U_k are left out: a probe whose outputs give the shapes."""
    rng = np.random.default_rng(1)
    consts, loss_nodes, terms = {}, [], []
    outputs = [("loss", np.float64, [])] if shapes else []
    for k, y in enumerate(ys):
        if shapes:
            consts[f"U{k}"] = rng.standard_normal(shapes[k])
            loss_nodes += [helper.make_node("Mul", [y, f"U{k}"], [f"yu{k}"]),
                           helper.make_node("ReduceSum", [f"yu{k}"], [f"term{k}"], keepdims=0)]
            terms.append(f"term{k}")
        outputs.append((y, np.float64, list(shapes[k]) if shapes else None))
    if shapes:
        loss_nodes.append(helper.make_node("Sum", terms, ["loss"]))
    inputs = [(n, a.dtype, list(a.shape)) for n, a in feeds.items()]
    if not shapes:  # outputs of unknown rank, which the checker refuses
        return model_of(nodes, [vi(n, tensor_type(d), s) for n, d, s in inputs],
                        [vi(n, D, None) for n, _, _ in outputs],
                        [numpy_helper.from_array(a, n) for n, a in params.items()], opset)
    return make_model(nodes + loss_nodes, inputs, outputs, {**params, **consts}, opset=opset)


def check_gradients(nodes, ys, params, feeds=None, opset=17, want=None):
    """The forward pass against onnx's reference evaluator (or the arrays ``want``, one per
    output), then the analytic gradient of every parameter against central differences;
    returns the analytic gradients."""
    feeds = feeds or {}
    probe = _loss_model(nodes, ys, params, feeds, opset)
    shapes = [y.shape for y in ReferenceEvaluator(probe).run(None, feeds)] if want is None \
        else [y.shape for y in want]
    proto = _loss_model(nodes, ys, params, feeds, opset, shapes)
    model = onnxgrad.load(proto)
    got = model.run(dict(feeds))
    if want is None:
        ref = ReferenceEvaluator(proto).run(None, feeds)
        want = ref[1:]
        np.testing.assert_allclose(got["loss"], ref[0], rtol=1e-12, atol=1e-12)
    for name, value in zip(ys, want):
        np.testing.assert_allclose(got[name], value, rtol=1e-12, atol=1e-12, err_msg=name)
    return check_against_central_differences(proto, feeds, params, EPS, model)


def _abc():
    """Three tensors of 3 columns and 2, 4 and 1 rows."""
    return {"a": uniform(2, 3), "b": uniform(4, 3, seed=1), "c": uniform(1, 3, seed=2)}


# -- SequenceConstruct, SequenceAt -------------------------------------------------------------
def test_construct_and_at_an_unread_element_gets_zeros():
    nodes = [helper.make_node("SequenceConstruct", ["a", "b", "c"], ["seq"]),
             _const("zero", 0), _const("last", -1),
             helper.make_node("SequenceAt", ["seq", "zero"], ["first"]),
             helper.make_node("SequenceAt", ["seq", "last"], ["y1"]),
             helper.make_node("Tanh", ["first"], ["y0"])]
    grads = check_gradients(nodes, ["y0", "y1"], _abc())
    np.testing.assert_array_equal(grads["b"], np.zeros((4, 3)))  # read by nobody


def test_gradients_of_one_sequence_add_element_by_element():
    """Three readers of one sequence: two SequenceAt of the same element and a concat."""
    nodes = [helper.make_node("SequenceConstruct", ["a", "b"], ["seq"]),
             _const("one", 1), _const("last", -1),
             helper.make_node("SequenceAt", ["seq", "one"], ["b1"]),
             helper.make_node("SequenceAt", ["seq", "last"], ["b2"]),
             helper.make_node("Mul", ["b1", "b2"], ["y0"]),
             helper.make_node("ConcatFromSequence", ["seq"], ["y1"], axis=0)]
    params = _abc()
    del params["c"]
    check_gradients(nodes, ["y0", "y1"], params)


def test_identity_and_optional_pass_a_sequence_gradient_through():
    nodes = [helper.make_node("SequenceConstruct", ["a", "b"], ["seq"]),
             helper.make_node("Identity", ["seq"], ["same"]),
             helper.make_node("Optional", ["same"], ["maybe"]),
             helper.make_node("OptionalGetElement", ["maybe"], ["back"]),
             helper.make_node("ConcatFromSequence", ["back"], ["y0"], axis=0),
             helper.make_node("Optional", ["c"], ["maybe_c"]),
             helper.make_node("OptionalGetElement", ["maybe_c"], ["c2"]),
             helper.make_node("Mul", ["c2", "c"], ["y1"])]
    p = _abc()
    # onnx's reference evaluator wraps an optional's content in a list that
    # OptionalGetElement keeps: the expected outputs are written out instead.
    check_gradients(nodes, ["y0", "y1"], p, want=[np.concatenate([p["a"], p["b"]]),
                                                 p["c"] * p["c"]])


# -- ConcatFromSequence ------------------------------------------------------------------------
@pytest.mark.parametrize("axis,new_axis", [(0, 0), (-1, 0), (1, 1), (-1, 1), (0, 1)])
def test_concat_from_sequence(axis, new_axis):
    if new_axis:  # stacked: elements of one shape
        params = {"a": uniform(2, 3), "b": uniform(2, 3, seed=1), "c": uniform(2, 3, seed=2)}
    elif axis == 0:
        params = _abc()
    else:
        params = {"a": uniform(3, 2), "b": uniform(3, 4, seed=1), "c": uniform(3, 1, seed=2)}
    nodes = [helper.make_node("SequenceConstruct", ["a", "b", "c"], ["seq"]),
             helper.make_node("ConcatFromSequence", ["seq"], ["cat"], axis=axis,
                              new_axis=new_axis),
             helper.make_node("Sin", ["cat"], ["y0"])]
    check_gradients(nodes, ["y0"], params)


# -- SequenceInsert, SequenceErase -------------------------------------------------------------
@pytest.mark.parametrize("position", [None, 0, 1, -1, 2])
def test_sequence_insert(position):
    """c inserted into (a, b); the concat reads every element, the product one of them."""
    nodes = [helper.make_node("SequenceConstruct", ["a", "b"], ["seq"]), _const("one", 1)]
    inputs = ["seq", "c"]
    if position is not None:
        nodes.append(_const("pos", position))
        inputs.append("pos")
    nodes += [helper.make_node("SequenceInsert", inputs, ["longer"]),
              helper.make_node("ConcatFromSequence", ["longer"], ["y0"], axis=0),
              helper.make_node("SequenceAt", ["longer", "one"], ["at1"]),
              helper.make_node("Mul", ["at1", "at1"], ["y1"])]
    p, want = _abc(), None
    if position == 2:  # onnx's reference evaluator inserts at position n at the front
        longer = [p["a"], p["b"], p["c"]]
        want = [np.concatenate(longer), longer[1] * longer[1]]
    check_gradients(nodes, ["y0", "y1"], p, want=want)


def test_sequence_insert_whose_tensor_no_output_reads_gets_zeros():
    nodes = [helper.make_node("SequenceConstruct", ["a", "b"], ["seq"]), _const("zero", 0),
             _const("one", 1),
             helper.make_node("SequenceInsert", ["seq", "c", "zero"], ["longer"]),
             helper.make_node("SequenceAt", ["longer", "one"], ["y0"])]
    grads = check_gradients(nodes, ["y0"], _abc())
    np.testing.assert_array_equal(grads["c"], np.zeros((1, 3)))
    np.testing.assert_array_equal(grads["b"], np.zeros((4, 3)))


@pytest.mark.parametrize("position", [None, 0, -2, 2])
def test_sequence_erase(position):
    """One of (a, b, c) erased: it gets exact zeros, the others their part of the concat."""
    nodes = [helper.make_node("SequenceConstruct", ["a", "b", "c"], ["seq"])]
    inputs = ["seq"]
    if position is not None:
        nodes.append(_const("pos", position))
        inputs.append("pos")
    nodes += [helper.make_node("SequenceErase", inputs, ["shorter"]),
              helper.make_node("ConcatFromSequence", ["shorter"], ["cat"], axis=0),
              helper.make_node("Tanh", ["cat"], ["y0"])]
    grads = check_gradients(nodes, ["y0"], _abc())
    erased = "abc"[{None: 2, 0: 0, -2: 1, 2: 2}[position]]
    np.testing.assert_array_equal(grads[erased], np.zeros_like(_abc()[erased]))


# -- SplitToSequence ---------------------------------------------------------------------------
SPLITS = [  # (attributes, split: None, a scalar or a list)
    ({}, None),
    ({"keepdims": 0}, None),
    ({"axis": 1, "keepdims": 0}, None),
    ({"axis": -1}, None),
    ({}, 2),                       # 2, 2, 1 rows
    ({"axis": 0}, [1, 3, 1]),
    ({"axis": -1, "keepdims": 0}, 3),  # keepdims is ignored when split is given
]


@pytest.mark.parametrize("attrs,split", SPLITS, ids=[f"{a}-{s}" for a, s in SPLITS])
def test_split_to_sequence(attrs, split):
    """x (5, 4) split; the concat reads every part back, the product two of them."""
    nodes, inputs = [_const("one", 1), _const("last", -1)], ["x"]
    if split is not None:
        nodes.append(_const("split", split))
        inputs.append("split")
    axis = attrs.get("axis", 0)
    stacked = split is None and attrs.get("keepdims", 1) == 0
    nodes += [helper.make_node("SplitToSequence", inputs, ["parts"], **attrs),
              helper.make_node("ConcatFromSequence", ["parts"], ["joined"], axis=axis,
                               new_axis=int(stacked)),
              helper.make_node("Tanh", ["joined"], ["y0"]),
              helper.make_node("SequenceAt", ["parts", "one"], ["p1"]),
              helper.make_node("SequenceAt", ["parts", "last"], ["p2"]),
              helper.make_node("Mul", ["p1", "p2"], ["y1"])]
    check_gradients(nodes, ["y0", "y1"], {"x": uniform(5, 4)})


def test_split_to_sequence_parts_no_output_reads_get_zeros():
    nodes = [_const("split", [2, 1, 2]), _const("one", 1),
             helper.make_node("SplitToSequence", ["x", "split"], ["parts"]),
             helper.make_node("SequenceAt", ["parts", "one"], ["middle"]),
             helper.make_node("Exp", ["middle"], ["y0"])]
    grads = check_gradients(nodes, ["y0"], {"x": uniform(5, 4)})
    np.testing.assert_array_equal(grads["x"][[0, 1, 3, 4]], np.zeros((4, 4)))
    assert np.all(grads["x"][2] != 0)


# -- SequenceMap -------------------------------------------------------------------------------
def _map_body():
    """(x_i, w) -> tanh(x_i * w) + v, with v read from the outer scope."""
    return helper.make_graph(
        [helper.make_node("Mul", ["x_i", "w_in"], ["xw"]),
         helper.make_node("Tanh", ["xw"], ["t"]),
         helper.make_node("Add", ["t", "v"], ["out_i"])],
        "body", [vi("x_i", D, None), vi("w_in", D, [3])], [vi("out_i", D, None)])


def test_sequence_map_with_a_tensor_input_and_an_outer_value():
    """Elements of different shapes; w is an additional input, v a captured value."""
    nodes = [_const("split", [1, 2, 3]),
             helper.make_node("SplitToSequence", ["x", "split"], ["xs"]),
             helper.make_node("SequenceMap", ["xs", "w"], ["outs"], name="map", body=_map_body()),
             helper.make_node("ConcatFromSequence", ["outs"], ["y0"], axis=0)]
    p = {"x": uniform(6, 3), "w": uniform(3, seed=1), "v": uniform(3, seed=2)}
    # onnx's reference evaluator does not pass outer values into SequenceMap's body
    want = np.tanh(p["x"] * p["w"]) + p["v"]
    check_gradients(nodes, ["y0"], p, want=[want])


def test_sequence_map_over_two_sequences_with_two_outputs():
    """out0 = a_i * b_i (all read), out1 = sum(a_i) (element 1 read): where only out0 has a
    gradient, out1's is written as zeros of its element's shape."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["a_i", "b_i"], ["ab"]),
         helper.make_node("ReduceSum", ["a_i"], ["s"], keepdims=1)],
        "body", [vi("a_i", D, None), vi("b_i", D, None)], [vi("ab", D, None), vi("s", D, None)])
    nodes = [_const("split", [2, 1, 3]), _const("one", 1),
             helper.make_node("SplitToSequence", ["a", "split"], ["as"]),
             helper.make_node("SplitToSequence", ["b", "split"], ["bs"]),
             helper.make_node("SequenceMap", ["as", "bs"], ["abs", "sums"], body=body),
             helper.make_node("ConcatFromSequence", ["abs"], ["y0"], axis=0),
             helper.make_node("SequenceAt", ["sums", "one"], ["s1"]),
             helper.make_node("Mul", ["s1", "s1"], ["y1"])]
    check_gradients(nodes, ["y0", "y1"], {"a": uniform(6, 2), "b": uniform(6, 2, seed=1)})


def test_sequence_map_elements_no_output_reads_get_zeros():
    nodes = [_const("zero", 0),
             helper.make_node("SplitToSequence", ["x"], ["xs"], axis=0),
             helper.make_node("SequenceMap", ["xs", "w"], ["outs"], body=_map_body()),
             helper.make_node("SequenceAt", ["outs", "zero"], ["y0"])]
    p = {"x": uniform(4, 3), "w": uniform(3, seed=1), "v": uniform(3, seed=2)}
    want = np.tanh(p["x"][:1] * p["w"]) + p["v"]  # see the test above
    grads = check_gradients(nodes, ["y0"], p, want=[want])
    np.testing.assert_array_equal(grads["x"][1:], np.zeros((3, 3)))


def test_sequence_map_whose_body_lacks_a_rule_raises_naming_the_node():
    body = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x_i"], ["q", "scale", "zero"]),
         helper.make_node("Mul", ["x_i", "scale"], ["out_i"])],
        "body", [vi("x_i", TensorProto.FLOAT, None)], [vi("out_i", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("SplitToSequence", ["x"], ["xs"]),
             helper.make_node("SequenceMap", ["xs"], ["outs"], name="map", body=body),
             helper.make_node("ConcatFromSequence", ["outs"], ["y"], axis=0),
             helper.make_node("ReduceSum", ["y"], ["loss"], keepdims=0)]
    proto = make_model(nodes, [], [("loss", np.float32, [])],
                       {"x": uniform(3, 2).astype(np.float32)})
    with pytest.raises(onnxgrad.UnsupportedOpError, match="DynamicQuantizeLinear.*'map'"):
        onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss", trainable=["x"])


# -- Loop and If with sequences ----------------------------------------------------------------
def test_loop_carrying_a_sequence_and_reading_one():
    """What torch.onnx writes for a scripted loop that appends to a list: the body reads
    element i of an outer sequence and appends to the sequence it carries; a tensor
    state is carried beside it (h = tanh(h * w + x_i))."""
    body = helper.make_graph(
        [helper.make_node("SequenceAt", ["xs", "i"], ["x_i"]),
         helper.make_node("Mul", ["h_in", "w"], ["hw"]),
         helper.make_node("Add", ["hw", "x_i"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["h_out"]),
         helper.make_node("SequenceInsert", ["list_in", "h_out"], ["list_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vi("i", I64, []), vi("cond_in", B, []), vi("h_in", D, [1, 3]),
                 helper.make_tensor_sequence_value_info("list_in", D, None)],
        [vi("cond_out", B, []), vi("h_out", D, [1, 3]),
         helper.make_tensor_sequence_value_info("list_out", D, None)])
    nodes = [helper.make_node("SplitToSequence", ["x"], ["xs"], axis=0),
             helper.make_node("SequenceLength", ["xs"], ["n"]),
             helper.make_node("SequenceEmpty", [], ["empty"], dtype=D),
             helper.make_node("Constant", [], ["yes"],
                              value=helper.make_tensor("yes", B, [], [True])),
             helper.make_node("Loop", ["n", "yes", "h0", "empty"], ["h", "hs"], name="rnn",
                              body=body),
             helper.make_node("ConcatFromSequence", ["hs"], ["y0"], axis=0)]
    params = {"x": uniform(4, 3), "h0": uniform(1, 3, seed=1), "w": uniform(3, seed=2)}
    check_gradients(nodes, ["y0", "h"], params)


def test_if_with_a_sequence_output():
    then = helper.make_graph(
        [helper.make_node("Mul", ["a", "w"], ["aw"]),
         helper.make_node("SequenceConstruct", ["aw", "b"], ["s"])],
        "then", [], [helper.make_tensor_sequence_value_info("s", D, None)])
    other = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["b", "a"], ["e"])],
        "else", [], [helper.make_tensor_sequence_value_info("e", D, None)])
    nodes = [helper.make_node("If", ["c"], ["seq"], name="branch", then_branch=then,
                              else_branch=other),
             helper.make_node("ConcatFromSequence", ["seq"], ["cat"], axis=0),
             helper.make_node("Tanh", ["cat"], ["y0"])]
    params = {"a": uniform(2, 3), "b": uniform(1, 3, seed=1), "w": uniform(3, seed=2)}
    for taken in (True, False):
        check_gradients(nodes, ["y0"], params, {"c": np.array(taken)})


def test_bodies_reading_an_outer_sequence():
    """SequenceMap's and Scan's bodies read element 0 or 1 of an outer sequence by name: its
    gradient sums over the elements, or the iterations (the reference evaluator gives
    bodies no outer values: the outputs are written out)."""
    body = helper.make_graph(
        [_const("zero", 0), helper.make_node("SequenceAt", ["ys", "zero"], ["y0"]),
         helper.make_node("Mul", ["x_i", "y0"], ["o"])],
        "body", [vi("x_i", D, None)], [vi("o", D, None)])
    nodes = [helper.make_node("SplitToSequence", ["x"], ["xs"]),
             helper.make_node("SplitToSequence", ["y"], ["ys"]),
             helper.make_node("SequenceMap", ["xs"], ["outs"], body=body),
             helper.make_node("ConcatFromSequence", ["outs"], ["r"], axis=0)]
    p = {"x": uniform(3, 2), "y": uniform(2, 2, seed=1)}
    grads = check_gradients(nodes, ["r"], p, want=[p["x"] * p["y"][:1]])
    np.testing.assert_array_equal(grads["y"][1], np.zeros(2))

    body = helper.make_graph(
        [_const("one", 1), helper.make_node("SequenceAt", ["ys", "one"], ["y1"]),
         helper.make_node("Mul", ["s_in", "y1"], ["sy"]),
         helper.make_node("Add", ["sy", "x_t"], ["s_out"]),
         helper.make_node("Identity", ["s_out"], ["o_t"])],
        "body", [vi("s_in", D, [1, 2]), vi("x_t", D, [1, 2])],
        [vi("s_out", D, [1, 2]), vi("o_t", D, [1, 2])])
    nodes = [helper.make_node("SplitToSequence", ["y"], ["ys"]),
             helper.make_node("Scan", ["s0", "xs"], ["s", "os"], body=body, num_scan_inputs=1)]
    p = {"y": uniform(3, 2), "s0": uniform(1, 2, seed=2), "xs": uniform(4, 1, 2, seed=3)}
    state, outs = p["s0"], []
    for x_t in p["xs"]:
        state = state * p["y"][1:2] + x_t
        outs.append(state)
    grads = check_gradients(nodes, ["s", "os"], p, want=[state, np.stack(outs)])
    np.testing.assert_array_equal(grads["y"][[0, 2]], np.zeros((2, 2)))


def test_loop_carrying_an_optional_refuses_naming_the_node():
    """A gradient through an optional carried value is refused, not dropped."""
    body = helper.make_graph(
        [helper.make_node("OptionalGetElement", ["opt_in"], ["t"]),
         helper.make_node("Mul", ["t", "w"], ["tw"]),
         helper.make_node("Optional", ["tw"], ["opt_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vi("i", I64, []), vi("cond_in", B, []),
                 helper.make_value_info("opt_in", helper.make_optional_type_proto(
                     helper.make_tensor_type_proto(D, [3])))],
        [vi("cond_out", B, []), helper.make_value_info("opt_out", helper.make_optional_type_proto(
            helper.make_tensor_type_proto(D, [3])))])
    nodes = [helper.make_node("Optional", ["x"], ["opt"]),
             helper.make_node("Loop", ["n", "", "opt"], ["last"], name="loop", body=body),
             helper.make_node("OptionalGetElement", ["last"], ["y"]),
             helper.make_node("ReduceSum", ["y"], ["loss"], keepdims=0)]
    proto = make_model(nodes, [("n", np.int64, [])], [("loss", np.float64, [])],
                       {"x": uniform(3), "w": uniform(3, seed=1)})
    with pytest.raises(onnxgrad.UnsupportedOpError, match="carried value 'last'.*'loop'"):
        onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss", trainable=["x", "w"])


# -- a scripted PyTorch model that builds lists --------------------------------------------------
TORCH = np.load(REF / "sequence.npz")
STEPS, LR, MOMENTUM = 3, 0.1, 0.9  # as make_sequence_reference.py
PARAMETERS = ["fc.weight", "fc.bias", "gain", "head.weight", "head.bias"]


def _torch_trainer():
    return onnxgrad.Trainer(onnxgrad.load(REF / "sequence_torchscript.onnx"),
                            loss="cross_entropy", optimizer=onnxgrad.SGD(lr=LR, momentum=MOMENTUM),
                            trainable=PARAMETERS)


def test_torch_export_holds_sequence_ops_and_runs_as_torch():
    import onnx

    ops = {n.op_type for n in onnx.load(str(REF / "sequence_torchscript.onnx")).graph.node}
    assert {"SplitToSequence", "SequenceEmpty", "Loop", "ConcatFromSequence"} <= ops
    got = onnxgrad.load(REF / "sequence_torchscript.onnx").run({"x": TORCH["x"]})["logits"]
    np.testing.assert_allclose(got, TORCH["logits"], rtol=1e-5, atol=1e-6)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(REF / "sequence_torchscript.onnx"),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, session.run(None, {"x": TORCH["x"]})[0], rtol=1e-5,
                               atol=1e-6)


def test_torch_export_gradients_and_sgd_steps_match_torch():
    trainer = _torch_trainer()
    feeds, label = {"x": TORCH["x"]}, TORCH["label"]
    grads = trainer.gradients(feeds, label)
    for name in PARAMETERS:
        np.testing.assert_allclose(grads[name], TORCH[f"grad/{name}"], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    losses = [trainer.step(feeds, label) for _ in range(STEPS)]
    np.testing.assert_allclose(losses, TORCH["losses"], rtol=1e-5, atol=1e-6)
    weights = trainer.model.parameters()
    for name in PARAMETERS:
        np.testing.assert_allclose(weights[name], TORCH[f"trained/{name}"], rtol=1e-4,
                                   atol=1e-6, err_msg=name)


@pytest.mark.gpu
def test_torch_export_gradients_on_the_gpu_equal_the_cpu():
    feeds, label = {"x": TORCH["x"]}, TORCH["label"]
    cpu = _torch_trainer().gradients(feeds, label)
    gpu = onnxgrad.Trainer(onnxgrad.load(REF / "sequence_torchscript.onnx"), loss="cross_entropy",
                           optimizer=onnxgrad.SGD(lr=LR, momentum=MOMENTUM),
                           trainable=PARAMETERS, device="cuda").gradients(feeds, label)
    for name in PARAMETERS:
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-5, atol=1e-6, err_msg=name)


# -- the step model in standard ops --------------------------------------------------------------
def _erase_nodes():
    return [helper.make_node("SequenceConstruct", ["a", "b", "c"], ["seq"]), _const("pos", -2),
            helper.make_node("SequenceErase", ["seq", "pos"], ["shorter"]),
            helper.make_node("ConcatFromSequence", ["shorter"], ["cat"], axis=0),
            helper.make_node("Tanh", ["cat"], ["y0"])]


def _insert_nodes(position):
    nodes = [helper.make_node("SequenceConstruct", ["a", "b"], ["seq"]), _const("one", 1)]
    inputs = ["seq", "c"] + ([] if position is None else ["pos"])
    nodes += [] if position is None else [_const("pos", position)]
    return nodes + [helper.make_node("SequenceInsert", inputs, ["longer"]),
                    helper.make_node("ConcatFromSequence", ["longer"], ["y0"], axis=0),
                    helper.make_node("SequenceAt", ["longer", "one"], ["at1"]),
                    helper.make_node("Mul", ["at1", "at1"], ["y1"])]


def _split_nodes(attrs, split):
    nodes, inputs = [_const("one", 1), _const("last", -1)], ["x"]
    if split is not None:
        nodes.append(_const("split", split))
        inputs.append("split")
    stacked = split is None and attrs.get("keepdims", 1) == 0
    return nodes + [helper.make_node("SplitToSequence", inputs, ["parts"], **attrs),
                    helper.make_node("ConcatFromSequence", ["parts"], ["joined"],
                                     axis=attrs.get("axis", 0), new_axis=int(stacked)),
                    helper.make_node("Tanh", ["joined"], ["y0"]),
                    helper.make_node("SequenceAt", ["parts", "one"], ["p1"]),
                    helper.make_node("SequenceAt", ["parts", "last"], ["p2"]),
                    helper.make_node("Mul", ["p1", "p2"], ["y1"])]


_CONVERT_CASES = {  # name: (nodes, outputs, parameters)
    "construct_at_unread": (
        [helper.make_node("SequenceConstruct", ["a", "b", "c"], ["seq"]),
         _const("zero", 0), _const("last", -1),
         helper.make_node("SequenceAt", ["seq", "zero"], ["first"]),
         helper.make_node("SequenceAt", ["seq", "last"], ["y1"]),
         helper.make_node("Tanh", ["first"], ["y0"])], ["y0", "y1"], _abc()),
    "two_readers_add": (
        [helper.make_node("SequenceConstruct", ["a", "b", "c"], ["seq"]), _const("one", 1),
         helper.make_node("SequenceAt", ["seq", "one"], ["b1"]),
         helper.make_node("Mul", ["b1", "b1"], ["y0"]),
         helper.make_node("ConcatFromSequence", ["seq"], ["y1"], axis=0)], ["y0", "y1"], _abc()),
    "concat_axis_-1": (
        [helper.make_node("SequenceConstruct", ["a", "b", "c"], ["seq"]),
         helper.make_node("ConcatFromSequence", ["seq"], ["cat"], axis=-1),
         helper.make_node("Sin", ["cat"], ["y0"])], ["y0"],
        {"a": uniform(3, 2), "b": uniform(3, 4, seed=1), "c": uniform(3, 1, seed=2)}),
    "stack_axis_1": (
        [helper.make_node("SequenceConstruct", ["a", "b"], ["seq"]),
         helper.make_node("ConcatFromSequence", ["seq"], ["cat"], axis=1, new_axis=1),
         helper.make_node("Sin", ["cat"], ["y0"])], ["y0"],
        {"a": uniform(2, 3), "b": uniform(2, 3, seed=1)}),
    "insert_none": (_insert_nodes(None), ["y0", "y1"], _abc()),
    "insert_-1": (_insert_nodes(-1), ["y0", "y1"], _abc()),
    "erase_-2": (_erase_nodes(), ["y0"], _abc()),
    "split_keepdims_0": (_split_nodes({"axis": 1, "keepdims": 0}, None), ["y0", "y1"],
                         {"x": uniform(5, 4)}),
    "split_list": (_split_nodes({"axis": 0}, [1, 3, 1]), ["y0", "y1"], {"x": uniform(5, 4)}),
    "split_scalar": (_split_nodes({}, 2), ["y0", "y1"], {"x": uniform(5, 4)}),
}


def _step_moves(proto, names, feeds=None, label=None, loss=None, output="loss"):
    """What one SGD step (lr 1) of the converted step model moves each weight by: in
    onnxruntime where it runs the model, else in onnxgrad (the model holding no private
    node)."""
    import onnx

    from onnxgrad.convert import step_model

    model = onnxgrad.load(proto)
    step = step_model(model, onnxgrad.SGD(lr=1.0), loss=loss, output=output, trainable=names)
    assert not [n.op_type for n in step.graph.node if n.domain == "onnxgrad"]
    onnx.checker.check_model(step)
    feeds = dict(feeds or {})
    step_inputs = {i.name for i in step.graph.input}
    params = model.parameters()
    feeds.update({k: v for k, v in params.items() if k in step_inputs})
    if label is not None:
        target = next(i.name for i in step.graph.input if i.name not in feeds and
                      i.type.tensor_type.elem_type == TensorProto.INT64)
        feeds[target] = label
    for init in step.graph.initializer:  # state inputs with their initial values
        feeds.pop(init.name, None)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(step.SerializeToString(), providers=["CPUExecutionProvider"])
    names_out = [o.name for o in session.get_outputs()]
    got = dict(zip(names_out, session.run(None, feeds)))
    return {n: params[n] - got[f"{n}.next"] for n in names}


@pytest.mark.parametrize("case", list(_CONVERT_CASES))
def test_sequence_gradients_convert_to_standard_ops(case):
    """The step model of onnxgrad convert holds only standard ops and moves the weights by
    onnxgrad's own gradients, in onnxruntime."""
    nodes, ys, params = _CONVERT_CASES[case]
    probe = _loss_model(nodes, ys, params, {}, 17)
    shapes = [y.shape for y in ReferenceEvaluator(probe).run(None, {})]
    proto = _loss_model(nodes, ys, params, {}, 17, shapes)
    want = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss",
                            trainable=list(params)).gradients({}, None)
    moved = _step_moves(proto, list(params))
    for name in params:
        np.testing.assert_allclose(moved[name], want[name], rtol=1e-10, atol=1e-12,
                                   err_msg=name)


def test_sequence_gradient_helpers_in_standard_ops_run_in_onnxruntime():
    """SequenceGradScale, SequenceZerosLike, SequenceGradSum and SequenceShapes (which the
    gradients of Loop, If and SequenceMap emit) expanded into standard ops: the same
    values in onnxruntime and onnxgrad as the private kernels'."""
    import onnx

    from onnxgrad.autodiff import GradBuilder, expand_in_standard_ops
    from onnxgrad.convert import _to_proto
    from onnxgrad.loader import load_model

    private = "onnxgrad"
    nodes = [helper.make_node("SequenceConstruct", ["a", "b"], ["seq"]),
             helper.make_node("SequenceGradScale", ["seq", "s"], ["scaled"], domain=private),
             helper.make_node("SequenceZerosLike", ["seq"], ["zeros"], domain=private),
             helper.make_node("SequenceGradSum", ["scaled", "zeros", "seq"], ["total"],
                              domain=private),
             helper.make_node("SequenceShapes", ["seq"], ["shapes"], domain=private),
             helper.make_node("ConcatFromSequence", ["total"], ["y"], axis=0)]
    graph = helper.make_graph(
        nodes, "helpers", [vi("a", D, [2, 3]), vi("b", D, [4, 3]), vi("s", D, [])],
        [vi("y", D, [6, 3]), vi("shapes", I64, [None])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(private, 1)])
    feeds = {"a": uniform(2, 3), "b": uniform(4, 3, seed=1), "s": np.array(3.0)}
    want = onnxgrad.load(proto).run(dict(feeds))
    np.testing.assert_allclose(want["y"], 4 * np.concatenate([feeds["a"], feeds["b"]]))
    np.testing.assert_array_equal(want["shapes"], [2, 2, 3, 2, 4, 3])
    _, ir_graph, _ = load_model(proto)
    g = GradBuilder(ir_graph)
    for node in [n for n in ir_graph.nodes if n.domain == private]:
        assert expand_in_standard_ops(g, node), node.op_type
    standard = _to_proto(ir_graph, proto, "helpers")
    onnx.checker.check_model(standard)
    assert {n.domain for n in standard.graph.node} == {""}
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(standard.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for got in (dict(zip(["y", "shapes"], session.run(["y", "shapes"], feeds))),
                onnxgrad.load(standard).run(dict(feeds))):
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-15)
        np.testing.assert_array_equal(got["shapes"], want["shapes"])


def test_torch_export_converts_to_standard_ops():
    """The scripted PyTorch model's step model moves the weights by onnxgrad's gradients
    (skipped while its Loop's gradient, LoopGrad, has no standard form)."""
    from onnxgrad.convert import step_model
    from onnxgrad.errors import ModelError

    model = onnxgrad.load(REF / "sequence_torchscript.onnx")
    try:
        step_model(model, onnxgrad.SGD(lr=1.0), loss="cross_entropy", trainable=PARAMETERS)
    except ModelError as exc:
        if "(onnxgrad::LoopGrad," in str(exc):
            pytest.skip("no standard form yet for LoopGrad")
        raise
    want = _torch_trainer().gradients({"x": TORCH["x"]}, TORCH["label"])
    moved = _step_moves(model.to_proto(), PARAMETERS, {"x": TORCH["x"]}, TORCH["label"],
                        loss="cross_entropy", output=None)
    for name in PARAMETERS:
        np.testing.assert_allclose(moved[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)
