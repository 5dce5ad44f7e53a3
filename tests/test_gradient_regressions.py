"""Gradient bugs that an independent float64 check found, each with the case that
showed it, and higher-order gradients: exact where a rule exists, refused (never a
silent zero) where one is missing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxgrad
from helpers import make_model, model_of, vi
from onnxgrad.ops.shape import _space_to_depth

PREVIEW = "ai.onnx.preview.training"


def _gradient(proto, feeds, wrt, u):
    """∂ sum(Y * U) / ∂ wrt, through the Trainer (U is fed as input "U")."""
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=list(wrt))
    return trainer.gradients({**feeds, "U": u}, None)


def _with_projection(node, inputs, inits, y_shape, opset=17, checked=True):
    """A model of ``node`` (output "Y") whose loss is sum(Y * U)."""
    nodes = [node, helper.make_node("Mul", ["Y", "U"], ["YU"]),
             helper.make_node("ReduceSum", ["YU"], ["loss"], keepdims=0)]
    graph_inputs = inputs + [vi("U", TensorProto.DOUBLE, y_shape)]
    outputs = [vi("loss", TensorProto.DOUBLE, [])]
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()]
    if checked:
        graph = helper.make_graph(nodes, "g", graph_inputs, outputs, inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        proto.ir_version = 8
        onnx.checker.check_model(proto)
        return proto
    return model_of(nodes, graph_inputs, outputs, inits, opset=opset)


def test_space_to_depth_in_crd_layout_sends_each_gradient_back_to_its_element():
    # ONNX's SpaceToDepth has no mode (the checker refuses one), but onnxgrad's kernel
    # takes DepthToSpace's, and its rule must honour it: built here without the loader.
    from onnxgrad.autodiff import build_gradients
    from onnxgrad.backend import get_backend
    from onnxgrad.executor import Plan
    from onnxgrad.ir import Graph, Node, ValueInfo

    x = np.random.default_rng(0).standard_normal((1, 3, 4, 4))
    u = np.random.default_rng(1).standard_normal((1, 12, 2, 2))
    graph = Graph(nodes=[Node("SpaceToDepth", ["X"], ["Y"], {"blocksize": 2, "mode": "CRD"},
                              "s2d", "", 13),
                         Node("Mul", ["Y", "U"], ["YU"], {}, "mul", "", 13),
                         Node("ReduceSum", ["YU"], ["loss"], {"keepdims": 0}, "sum", "", 13)],
                  inputs=["U"], outputs=["loss"], initializers={"X": x},
                  info={"U": ValueInfo(np.dtype(np.float64), u.shape),
                        "Y": ValueInfo(np.dtype(np.float64), u.shape),
                        "YU": ValueInfo(np.dtype(np.float64), u.shape),
                        "loss": ValueInfo(np.dtype(np.float64), ())},
                  opsets={"": 13})
    grads = build_gradients(graph, "loss", ["X"])
    constants = {k: v for k, v in graph.initializers.items() if k != "X"}  # the seed
    plan = Plan(graph, get_backend("cpu"), constants=constants, fetch=[grads["X"]])
    got = plan.run({"X": x, "U": u})[grads["X"]]
    # The op moves each element: the gradient of element i is U at the place it went.
    moved = _space_to_depth(np, np.arange(x.size).reshape(x.shape), 2, "CRD")
    want = np.zeros(x.size)
    want[moved.reshape(-1)] = u.reshape(-1)
    np.testing.assert_array_equal(got, want.reshape(x.shape))


def test_pow_exponent_gradient_is_zero_at_base_zero():
    x = np.array([0.0, 0.0, 2.0, 0.5])
    e = np.array([2.0, 0.0, 1.5, 3.0])
    u = np.array([1.0, -2.0, 0.5, 3.0])
    node = helper.make_node("Pow", ["X", "E"], ["Y"])
    proto = _with_projection(node, [], {"X": x, "E": e}, [4])
    got = _gradient(proto, {}, ["X", "E"], u)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.where(x == 0, 0.0, u * x**e * np.log(x))
    assert np.isfinite(got["E"]).all()
    np.testing.assert_allclose(got["E"], want, rtol=1e-12)
    np.testing.assert_allclose(got["X"], u * e * x ** (e - 1), rtol=1e-12)


def test_reduce_prod_over_an_empty_axis_has_an_empty_gradient():
    x = np.zeros((2, 4, 0))
    node = helper.make_node("ReduceProd", ["X", "axes"], ["Y"], keepdims=0)
    proto = _with_projection(node, [], {"X": x, "axes": np.array([2])}, [2, 4], opset=18)
    got = _gradient(proto, {}, ["X"], np.ones((2, 4)))["X"]
    assert got.shape == (2, 4, 0)


def test_a_fully_masked_softmax_row_that_a_where_replaces_has_a_zero_gradient():
    """As the ONNX Attention function: softmax over a row of -inf is NaN, Where puts
    zeros there, and the logits of that row get a zero gradient, not NaN · 0."""
    s = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]])
    mask = np.array([[0.0, 0.0, -np.inf], [-np.inf, -np.inf, -np.inf]])
    u = np.array([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]])
    dead = np.array([[False], [True]])
    nodes = [helper.make_node("Add", ["S", "M"], ["Z"]),
             helper.make_node("Softmax", ["Z"], ["P"], axis=-1),
             helper.make_node("Where", ["dead", "zero", "P"], ["Y"])]
    proto = make_model(nodes + [helper.make_node("Mul", ["Y", "U"], ["YU"]),
                                helper.make_node("ReduceSum", ["YU"], ["loss"], keepdims=0)],
                       [("U", np.float64, [2, 3])], [("loss", np.float64, [])],
                       {"S": s, "M": mask, "dead": dead, "zero": np.array(0.0)})
    got = _gradient(proto, {}, ["S"], u)["S"]
    p = np.exp(s[0] + mask[0] - (s[0] + mask[0]).max())
    p /= p.sum()
    np.testing.assert_allclose(got[0], p * (u[0] - (u[0] * p).sum()), rtol=1e-12)
    np.testing.assert_array_equal(got[1], 0.0)


def test_a_nan_softmax_row_that_the_loss_reads_stays_nan():
    """Where the loss does read the NaN row, the gradient says so too."""
    nodes = [helper.make_node("Add", ["S", "M"], ["Z"]),
             helper.make_node("Softmax", ["Z"], ["Y"], axis=-1),
             helper.make_node("Mul", ["Y", "U"], ["YU"]),
             helper.make_node("ReduceSum", ["YU"], ["loss"], keepdims=0)]
    proto = make_model(nodes, [("U", np.float64, [1, 2])], [("loss", np.float64, [])],
                       {"S": np.array([[0.5, 1.0]]), "M": np.full((1, 2), -np.inf)})
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=["S"])
    with np.errstate(invalid="ignore"):
        got = trainer.gradients({"U": np.ones((1, 2))}, None)["S"]
    assert np.isnan(got).all()


def _second_order(loss_nodes):
    """W → h = x·W → y = tanh(h); dW = Gradient(y wrt W); then ``loss_nodes``."""
    nodes = [helper.make_node("Mul", ["x", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["y"]),
             helper.make_node("Gradient", ["W"], ["dW"], domain=PREVIEW, xs=["W"], y="y"),
             *loss_nodes]
    return make_model(nodes, [("x", np.float64, [3])], [("loss", np.float64, [])],
                      {"W": np.array([0.3, -0.2, 0.5]), "C": np.array([1.0, 2.0, -1.0])},
                      domains=[(PREVIEW, 1)])


X_SECOND = np.array([1.0, -0.5, 2.0])


@pytest.mark.parametrize("loss_nodes,want", [
    # sum(Gradient(tanh)), dW = x(1 - t²): its gradient is the second derivative -2x²t(1 - t²)
    ([helper.make_node("ReduceSum", ["dW"], ["loss"], keepdims=0)],
     lambda x, t, c: -2 * x * x * t * (1 - t * t)),
    # sum(C · dW) + sum(W): the second-order part must not be dropped
    ([helper.make_node("Mul", ["C", "dW"], ["CdW"]),
      helper.make_node("ReduceSum", ["CdW"], ["a"], keepdims=0),
      helper.make_node("ReduceSum", ["W"], ["b"], keepdims=0),
      helper.make_node("Add", ["a", "b"], ["loss"])],
     lambda x, t, c: c * -2 * x * x * t * (1 - t * t) + 1),
], ids=["gradient-of-gradient", "first-plus-second-order"])
def test_a_second_order_gradient_is_exact(loss_nodes, want):
    """TanhGrad has no rule of its own: differentiated again, it is expanded into
    standard ops, whose rules give the exact second derivative."""
    proto = _second_order(loss_nodes)
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss", trainable=["W"])
    got = trainer.gradients({"x": X_SECOND}, None)["W"]
    W, C = (onnx.numpy_helper.to_array(t) for t in proto.graph.initializer)
    t = np.tanh(X_SECOND * W)
    np.testing.assert_allclose(got, want(X_SECOND, t, C), rtol=1e-12)
    # and against central differences of the loss, which the model computes itself
    plain = onnxgrad.load(proto)
    eps, v = 1e-6, np.array([0.3, -1.0, 0.7])

    def loss(w):
        plain.set_parameters({"W": w})
        return float(plain.run({"x": X_SECOND})["loss"])

    numeric = (loss(W + eps * v) - loss(W - eps * v)) / (2 * eps)
    np.testing.assert_allclose(float(got @ v), numeric, rtol=1e-7)


def test_a_second_order_gradient_through_a_kernel_without_a_standard_form_is_refused():
    """RNNGrad has no rule of its own, and its standard form unrolls the time steps, so
    with a time axis known only at run time it has none: refused by name, never a zero."""
    nodes = [helper.make_node("RNN", ["X", "W", "R"], ["Y"], hidden_size=2),
             helper.make_node("Gradient", ["W"], ["dW"], domain=PREVIEW, xs=["W"], y="Y"),
             helper.make_node("ReduceSum", ["dW"], ["loss"], keepdims=0)]
    rng = np.random.default_rng(0)
    proto = make_model(nodes, [("X", np.float64, ["T", 1, 2])], [("loss", np.float64, [])],
                       {"W": rng.normal(size=(1, 2, 2)), "R": rng.normal(size=(1, 2, 2))},
                       domains=[(PREVIEW, 1)])
    with pytest.raises(onnxgrad.UnsupportedOpError, match="'RNNGrad'"):
        onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss", trainable=["W"])


def test_a_gradient_that_does_not_depend_on_the_weight_is_exact():
    # d/dW sum(Gradient(x·W wrt W)) = d/dW sum(x) = 0, exactly: the gradient of Mul
    # reads W nowhere, so nothing is dropped.
    nodes = [helper.make_node("Mul", ["x", "W"], ["y"]),
             helper.make_node("Gradient", ["W"], ["dW"], domain=PREVIEW, xs=["W"], y="y"),
             helper.make_node("ReduceSum", ["dW"], ["a"], keepdims=0),
             helper.make_node("ReduceSum", ["W"], ["b"], keepdims=0),
             helper.make_node("Add", ["a", "b"], ["loss"])]
    proto = make_model(nodes, [("x", np.float64, [3])], [("loss", np.float64, [])],
                       {"W": np.array([0.3, -0.2, 0.5])}, domains=[(PREVIEW, 1)])
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss", trainable=["W"])
    grads = trainer.gradients({"x": np.array([1.0, -0.5, 2.0])}, None)
    np.testing.assert_array_equal(grads["W"], np.ones(3))
