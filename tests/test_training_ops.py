"""ONNX's own training constructs: the Gradient operator and TrainingInfoProto."""

import glob
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.backend.test.loader import DATA_DIR

import onnxgrad
from helpers import make_model

PREVIEW = "ai.onnx.preview.training"


@pytest.mark.parametrize("case", ["test_gradient_of_add", "test_gradient_of_add_and_mul"])
def test_backend_gradient_model_cases(case):
    folder = os.path.join(DATA_DIR, "simple", case)
    model = onnxgrad.load(os.path.join(folder, "model.onnx"))
    load = lambda f: numpy_helper.to_array(onnx.load_tensor(f))  # noqa: E731
    inputs = [load(f) for f in sorted(glob.glob(f"{folder}/test_data_set_0/input_*.pb"))]
    expected = [load(f) for f in sorted(glob.glob(f"{folder}/test_data_set_0/output_*.pb"))]
    outputs = model.run(dict(zip(model.graph.inputs, inputs)))
    assert list(outputs) == model.graph.outputs
    for got, want in zip(outputs.values(), expected):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-7)


def test_gradient_of_a_tensor_sums_its_elements_and_covers_intermediates():
    # y = tanh(x * w); Gradient(xs=[w, h, k], y=y) with h = x * w and k unused.
    nodes = [helper.make_node("Mul", ["x", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["y"]),
             helper.make_node("Gradient", ["w", "h", "k"], ["dw", "dh", "dk"], domain=PREVIEW,
                              xs=["w", "h", "k"], y="y")]
    proto = make_model(nodes, [("x", np.float64, [3]), ("w", np.float64, [3]), ("k", np.float64, [2])],
                       [("dw", np.float64, [3]), ("dh", np.float64, [3]), ("dk", np.float64, [2])],
                       domains=[(PREVIEW, 1)])
    x, w, k = np.array([0.5, -1.0, 2.0]), np.array([1.5, 0.3, -0.7]), np.ones(2)
    out = onnxgrad.load(proto).run({"x": x, "w": w, "k": k})
    dh = 1 - np.tanh(x * w) ** 2
    np.testing.assert_allclose(out["dh"], dh, rtol=1e-12)
    np.testing.assert_allclose(out["dw"], dh * x, rtol=1e-12)
    np.testing.assert_array_equal(out["dk"], np.zeros(2))


def _linear_regression_with_training_info(lr=0.1):
    """Inference: y = x @ W.  Algorithm: one gradient-descent step on sum((x@W - t)^2),
    counting iterations in an initializer of its own.  Initialization: W = 0.5."""
    w0 = np.array([[1.0], [-2.0]], np.float32)
    inference = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                           [("x", np.float32, ["N", 2])], [("y", np.float32, ["N", 1])],
                           {"W": w0}, domains=[(PREVIEW, 1)])
    f32 = onnx.TensorProto.FLOAT
    algorithm = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["p"]),
         helper.make_node("Sub", ["p", "t"], ["d"]),
         helper.make_node("Mul", ["d", "d"], ["d2"]),
         helper.make_node("ReduceSum", ["d2"], ["loss"], keepdims=0),
         helper.make_node("Gradient", ["W"], ["dW"], domain=PREVIEW, xs=["W"], y="loss"),
         helper.make_node("Mul", ["dW", "lr"], ["step"]),
         helper.make_node("Sub", ["W", "step"], ["W_new"]),
         helper.make_node("Add", ["iterations", "one"], ["iterations_new"])],
        "algorithm",
        [helper.make_tensor_value_info("x", f32, ["N", 2]), helper.make_tensor_value_info("t", f32, ["N", 1])],
        [helper.make_tensor_value_info("loss", f32, []), helper.make_tensor_value_info("W_new", f32, [2, 1]),
         helper.make_tensor_value_info("iterations_new", onnx.TensorProto.INT64, [])],
        [numpy_helper.from_array(np.array(lr, np.float32), "lr"),
         numpy_helper.from_array(np.array(0, np.int64), "iterations"),
         numpy_helper.from_array(np.array(1, np.int64), "one")])
    initialization = helper.make_graph(
        [helper.make_node("Constant", [], ["W_init"],
                          value=numpy_helper.from_array(np.full((2, 1), 0.5, np.float32)))],
        "initialization", [], [helper.make_tensor_value_info("W_init", f32, [2, 1])])
    inference.training_info.append(helper.make_training_info(
        algorithm, [("W", "W_new"), ("iterations", "iterations_new")],
        initialization, [("W", "W_init")]))
    onnx.checker.check_model(inference)
    return inference


def test_training_info_runs_its_algorithm_and_applies_bindings(tmp_path):
    lr = 0.05
    model = onnxgrad.load(_linear_regression_with_training_info(lr))
    info = onnxgrad.TrainingInfo(model)
    assert info.inputs == ["x", "t"]
    info.initialize()
    np.testing.assert_array_equal(model.parameters()["W"], np.full((2, 1), 0.5, np.float32))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 2)).astype(np.float32)
    t = (x @ np.array([[2.0], [-1.0]], np.float32)).astype(np.float32)
    w = np.full((2, 1), 0.5)
    for _ in range(5):  # gradient descent derived by hand, in float64
        loss = float(np.sum((x @ w - t) ** 2))
        out = info.step({"x": x, "t": t})
        assert out["loss"] == pytest.approx(loss, rel=1e-5)
        w = w - lr * 2 * x.T @ (x @ w - t)
    np.testing.assert_allclose(model.parameters()["W"], w, rtol=1e-5)
    assert int(info.state["iterations"]) == 5

    # The trained model saves with its weights and its training state.
    model.save(tmp_path / "trained.onnx")
    saved = onnx.load(tmp_path / "trained.onnx")
    state = {t.name: numpy_helper.to_array(t) for t in saved.training_info[0].algorithm.initializer}
    assert int(state["iterations"]) == 5
    np.testing.assert_allclose(onnxgrad.load(tmp_path / "trained.onnx").parameters()["W"], w, rtol=1e-5)


def test_training_info_errors():
    with pytest.raises(onnxgrad.ModelError, match="carries no training_info"):
        onnxgrad.TrainingInfo(onnxgrad.load(make_model(
            [helper.make_node("Relu", ["x"], ["y"])], [("x", np.float32, [2])], [("y", np.float32, [2])])))
    proto = _linear_regression_with_training_info()
    proto.training_info[0].update_binding[0].key = "nonexistent"
    with pytest.raises(onnxgrad.ModelError, match="'nonexistent' is not an initializer"):
        onnxgrad.TrainingInfo(onnxgrad.load(proto))
    model = onnxgrad.load(_linear_regression_with_training_info())
    with pytest.raises(onnxgrad.DataError, match=r"missing input\(s\) \['t'\]"):
        onnxgrad.TrainingInfo(model).step({"x": np.ones((1, 2), np.float32)})
