"""Gradients through If, Loop and Scan, against central differences in float64.

Each model reads trainable initializers (some as a node's own inputs, some captured by a
body from the outer scope); its loss is ``Σ_k sum(Y_k * U_k)`` over the named outputs.
The analytic gradient (``Trainer(loss=None).gradients``) must match central differences of
``Model.run`` element by element.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import onnxgrad
from helpers import check_against_central_differences, make_model, uniform, vi

D, I64, B = TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL
EPS = 1e-6


def _loss_model(nodes, outputs: dict[str, tuple], feeds: dict, params: dict, opset: int):
    """The model of ``nodes`` with ``loss = Σ_k sum(Y_k * U_k)`` over ``outputs`` (name ->
    shape)."""
    rng = np.random.default_rng(1)
    consts, loss_nodes, terms = {}, [], []
    for k, (y, shape) in enumerate(outputs.items()):
        consts[f"U{k}"] = rng.standard_normal(shape)
        loss_nodes += [helper.make_node("Mul", [y, f"U{k}"], [f"yu{k}"]),
                       helper.make_node("ReduceSum", [f"yu{k}"], [f"term{k}"], keepdims=0)]
        terms.append(f"term{k}")
    loss_nodes.append(helper.make_node("Sum", terms, ["loss"]))
    inputs = [(n, a.dtype, list(a.shape)) for n, a in feeds.items()]
    return make_model(nodes + loss_nodes, inputs, [("loss", np.float64, [])],
                      {**params, **consts}, opset=opset)


def check_gradients(nodes, outputs, feeds, params, opset=17):
    """Analytic gradients of every parameter against central differences."""
    proto = _loss_model(nodes, outputs, feeds, params, opset)
    return check_against_central_differences(proto, feeds, params, EPS)


# -- If ---------------------------------------------------------------------------------------
def _if_nodes():
    then = helper.make_graph(
        [helper.make_node("Mul", ["a", "w"], ["aw"]), helper.make_node("Tanh", ["aw"], ["t"])],
        "then", [], [vi("t", D, [3])])
    other = helper.make_graph(
        [helper.make_node("Mul", ["b", "w"], ["bw"]), helper.make_node("Add", ["bw", "a"], ["e"])],
        "else", [], [vi("e", D, [3])])
    return [helper.make_node("Mul", ["a0", "a0"], ["a"]),
            helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then,
                             else_branch=other)]


@pytest.mark.parametrize("taken", [True, False])
def test_if_gradient_flows_through_the_branch_taken(taken):
    params = {"a0": uniform(3), "b": uniform(3, seed=1), "w": uniform(3, seed=2)}
    grads = check_gradients(_if_nodes(), {"y": (3,)}, {"c": np.array(taken)}, params)
    if taken:  # b is read by the other branch only
        np.testing.assert_array_equal(grads["b"], np.zeros(3))


# -- Loop -------------------------------------------------------------------------------------
def _recurrence_body(cond_out_nodes, cond_out="cond_in"):
    """h = tanh(h·W + x_i); the scan output is h·v."""
    return helper.make_graph(
        [helper.make_node("Gather", ["X", "i"], ["x_t"], axis=0),
         helper.make_node("MatMul", ["h_in", "W"], ["hW"]),
         helper.make_node("Add", ["hW", "x_t"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["h_out"]),
         helper.make_node("Mul", ["h_out", "v"], ["y_t"])] + cond_out_nodes,
        "body", [vi("i", I64, []), vi("cond_in", B, []), vi("h_in", D, [2, 3])],
        [vi(cond_out, B, []), vi("h_out", D, [2, 3]), vi("y_t", D, [2, 3])])


def _recurrence_params():
    return {"h0": uniform(2, 3), "W": uniform(3, 3, seed=1), "X": uniform(4, 3, seed=2),
            "v": uniform(3, seed=3)}


def test_loop_recurrence_over_a_fixed_trip_count():
    body = _recurrence_body([])
    nodes = [helper.make_node("Loop", ["M", "", "h0"], ["h", "ys"], name="rnn", body=body)]
    check_gradients(nodes, {"h": (2, 3), "ys": (4, 2, 3)}, {"M": np.array(4, np.int64)},
                    _recurrence_params())


def test_loop_with_a_condition_that_stops_early():
    """The body keeps going while i < 1: two iterations of the four M allows."""
    body = _recurrence_body([helper.make_node("Less", ["i", "one"], ["go"])], "go")
    nodes = [helper.make_node("Constant", [], ["one"], value_int=1),
             helper.make_node("Constant", [], ["yes"],
                              value=helper.make_tensor("yes", B, [], [True])),
             helper.make_node("Loop", ["M", "yes", "h0"], ["h", "ys"], name="rnn", body=body)]
    feeds, params = {"M": np.array(4, np.int64)}, _recurrence_params()
    outputs = {"h": (2, 3), "ys": (2, 2, 3)}
    ran = onnxgrad.load(_loss_model(nodes, outputs, feeds, params, 17)).run(feeds)
    assert np.isfinite(ran["loss"])  # the scan output has the two iterations' shape
    check_gradients(nodes, outputs, feeds, params)


def test_loop_only_the_final_state_reaches_the_loss():
    body = _recurrence_body([])
    nodes = [helper.make_node("Loop", ["M", "", "h0"], ["h", "ys"], name="rnn", body=body)]
    params = _recurrence_params()
    grads = check_gradients(nodes, {"h": (2, 3)}, {"M": np.array(3, np.int64)}, params)
    np.testing.assert_array_equal(grads["v"], np.zeros(3))  # v feeds the scan output only
    np.testing.assert_array_equal(grads["X"][3], np.zeros(3))  # row 3 is never read


def test_loop_of_zero_iterations_passes_the_gradient_through():
    nodes = [helper.make_node("Loop", ["M", "", "h0"], ["h", "ys"], name="rnn",
                              body=_recurrence_body([]))]
    params = _recurrence_params()
    grads = check_gradients(nodes, {"h": (2, 3)}, {"M": np.array(0, np.int64)}, params)
    np.testing.assert_array_equal(grads["W"], np.zeros((3, 3)))


# -- Scan -------------------------------------------------------------------------------------
def _scan_body():
    """s = tanh(s * w + x_t); the scan output is s + x_t."""
    return helper.make_graph(
        [helper.make_node("Mul", ["s_in", "w"], ["sw"]),
         helper.make_node("Add", ["sw", "x_t"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["s_out"]),
         helper.make_node("Add", ["s_out", "x_t"], ["y_t"])],
        "body", [vi("s_in", D, [3]), vi("x_t", D, [3])], [vi("s_out", D, [3]), vi("y_t", D, [3])])


@pytest.mark.parametrize("attrs", [
    {},
    {"scan_input_directions": [1]},
    {"scan_input_axes": [1], "scan_input_directions": [1], "scan_output_axes": [-1],
     "scan_output_directions": [1]},
], ids=["forward", "reverse", "axes-and-directions"])
def test_scan_with_directions_axes_and_a_scan_output(attrs):
    xs = uniform(4, 3, seed=4) if attrs.get("scan_input_axes") != [1] else uniform(3, 4, seed=4)
    params = {"s0": uniform(3), "xs": xs, "w": uniform(3, seed=5)}
    nodes = [helper.make_node("Scan", ["s0", "xs"], ["s", "ys"], name="scan", body=_scan_body(),
                              num_scan_inputs=1, **attrs)]
    check_gradients(nodes, {"s": (3,), "ys": xs.shape}, {}, params)


def test_scan_opset8_with_a_batch_axis():
    params = {"s0": uniform(2, 3), "xs": uniform(2, 4, 3, seed=4), "w": uniform(3, seed=5)}
    nodes = [helper.make_node("Scan", ["", "s0", "xs"], ["s", "ys"], name="scan",
                              body=_scan_body(), num_scan_inputs=1, directions=[1])]
    check_gradients(nodes, {"s": (2, 3), "ys": (2, 4, 3)}, {}, params, opset=8)


def test_scan_whose_body_holds_an_if():
    """Nested bodies: the Scan body's If reads w from two scopes out."""
    then = helper.make_graph([helper.make_node("Mul", ["s_in", "w"], ["t"])], "then", [],
                             [vi("t", D, [3])])
    other = helper.make_graph([helper.make_node("Sub", ["s_in", "w"], ["e"])], "else", [],
                              [vi("e", D, [3])])
    body = helper.make_graph(
        [helper.make_node("If", ["c"], ["sw"], then_branch=then, else_branch=other),
         helper.make_node("Add", ["sw", "x_t"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["s_out"]),
         helper.make_node("Identity", ["s_out"], ["y_t"])],
        "body", [vi("s_in", D, [3]), vi("x_t", D, [3])], [vi("s_out", D, [3]), vi("y_t", D, [3])])
    params = {"s0": uniform(3), "xs": uniform(4, 3, seed=4), "w": uniform(3, seed=5)}
    nodes = [helper.make_node("Scan", ["s0", "xs"], ["s", "ys"], body=body, num_scan_inputs=1)]
    for c in (True, False):
        check_gradients(nodes, {"ys": (4, 3)}, {"c": np.array(c)}, params)


# -- what is not supported --------------------------------------------------------------------
def test_a_body_without_a_gradient_rule_raises_naming_the_node():
    then = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["w"], ["q", "scale", "zero"]),
         helper.make_node("Mul", ["w", "scale"], ["t"])],
        "then", [], [vi("t", D, [3])])
    other = helper.make_graph([helper.make_node("Identity", ["w"], ["e"])], "else", [],
                              [vi("e", D, [3])])
    nodes = [helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then,
                              else_branch=other)]
    proto = _loss_model(nodes, {"y": (3,)}, {"c": np.array(True)}, {"w": uniform(3)}, 17)
    with pytest.raises(onnxgrad.UnsupportedOpError, match="DynamicQuantizeLinear.*'branch'"):
        onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss", trainable=["w"])
