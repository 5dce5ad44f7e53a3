"""The gradient builder: sums, pruning, naming, missing rules, whole networks."""

import numpy as np
import pytest

import onnxgrad
from helpers import helper, make_model, mlp_model


def numeric_gradients(proto, feeds, target, loss, output=None, eps=1e-6):
    """Central differences of the loss for every float64 initializer, element by element."""
    model = onnxgrad.load(proto)
    names = list(model.parameters())
    result = {}
    weights = model.graph.initializers  # a trainer may replace an array (its layout)
    for name in names:
        grad = np.zeros_like(weights[name])
        for idx in np.ndindex(grad.shape):
            old = weights[name][idx]
            values = []
            for delta in (eps, -eps):
                weights[name][idx] = old + delta
                trainer = onnxgrad.Trainer(model, loss=loss, output=output,
                                           optimizer=onnxgrad.SGD(lr=0.0))
                values.append(trainer.step(feeds, target))
            weights[name][idx] = old
            grad[idx] = (values[0] - values[1]) / (2 * eps)
        result[name] = grad
    return result


def test_whole_network_gradients_match_finite_differences():
    proto = mlp_model(sizes=(3, 4, 4, 3), dtype=np.float64)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3))
    y = rng.integers(0, 3, 5)
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss="cross_entropy",
                               optimizer=onnxgrad.SGD(lr=0.1))
    analytic = trainer.gradients({"x": x}, y)
    numeric = numeric_gradients(proto, {"x": x}, y, "cross_entropy")
    assert set(analytic) == set(numeric) == {"W0", "b0", "W1", "b1", "W2", "b2"}
    for name in analytic:
        np.testing.assert_allclose(analytic[name], numeric[name], rtol=1e-6, atol=1e-8,
                                   err_msg=name)


def test_a_value_used_twice_sums_its_gradients():
    # y = W*x + W*W  (W feeds three uses), loss = mean((y - t)^2)
    nodes = [helper.make_node("Mul", ["W", "x"], ["a"], name="a"),
             helper.make_node("Mul", ["W", "W"], ["b"], name="b"),
             helper.make_node("Add", ["a", "b"], ["y"], name="y")]
    w = np.array([0.5, -1.5, 2.0])
    proto = make_model(nodes, [("x", np.float64, [3])], [("y", np.float64, [3])], {"W": w})
    x, t = np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, -1.0])
    grads = onnxgrad.Trainer(onnxgrad.load(proto), loss="mse",
                             optimizer=onnxgrad.SGD(lr=0.1)).gradients({"x": x}, t)
    y = w * x + w * w
    np.testing.assert_allclose(grads["W"], 2 * (y - t) / 3 * (x + 2 * w), rtol=1e-12)


def _classifier_with_label_branch():
    proto = mlp_model(sizes=(4, 3))
    proto.graph.node.append(helper.make_node("ArgMax", ["logits"], ["label"], name="argmax",
                                             axis=1, keepdims=0))
    proto.graph.output.append(helper.make_tensor_value_info("label", 7, ["N"]))
    return proto


def test_non_differentiable_branch_is_pruned():
    model = onnxgrad.load(_classifier_with_label_branch())
    trainer = onnxgrad.Trainer(model, loss="cross_entropy", output="logits")
    assert "ArgMax" not in {n.op_type for n in trainer.graph.nodes}
    x = np.ones((2, 4), np.float32)
    assert set(trainer.gradients({"x": x}, np.array([0, 2]))) == {"W0", "b0"}


def test_gradients_are_named_after_their_parameters():
    trainer = onnxgrad.Trainer(onnxgrad.load(mlp_model()), loss="cross_entropy")
    produced = {o for n in trainer.graph.nodes for o in n.outputs}
    assert {"W0_grad", "b0_grad", "W1_grad", "b1_grad"} <= produced


def test_frozen_parameters_get_no_backward_nodes():
    trainer = onnxgrad.Trainer(onnxgrad.load(mlp_model()), loss="cross_entropy",
                               trainable=["W1", "b1"])
    produced = {o for n in trainer.graph.nodes for o in n.outputs}
    assert "W0_grad" not in produced and "b0_grad" not in produced
    # Nothing upstream of the last layer is differentiated.
    assert not any(n.name.startswith(("relu0/", "fc0/")) for n in trainer.graph.nodes)
    grads = trainer.gradients({"x": np.ones((2, 4), np.float32)}, np.array([0, 1]))
    assert set(grads) == {"W1", "b1"}


def test_missing_gradient_rule_names_the_node():
    # ArrayFeatureExtractor has a forward kernel but no gradient rule.
    nodes = [helper.make_node("Mul", ["x", "W"], ["h"], name="scale"),
             helper.make_node("ArrayFeatureExtractor", ["h", "idx"], ["y"], name="pick",
                              domain="ai.onnx.ml")]
    proto = make_model(nodes, [("x", np.float32, [2, 4])], [("y", np.float32, [2, 2])],
                       {"W": np.ones(4, np.float32), "idx": np.array([0, 2], np.int64)},
                       domains=[("ai.onnx.ml", 3)])
    with pytest.raises(onnxgrad.UnsupportedOpError) as err:
        onnxgrad.Trainer(onnxgrad.load(proto), loss="mse")
    msg = str(err.value)
    assert "ArrayFeatureExtractor" in msg and "'pick'" in msg and "gradient" in msg


def test_float32_stays_float32():
    trainer = onnxgrad.Trainer(onnxgrad.load(mlp_model()), loss="cross_entropy")
    grads = trainer.gradients({"x": np.ones((2, 4), np.float32)}, np.array([0, 1]))
    assert all(g.dtype == np.float32 for g in grads.values())


def test_gradients_do_not_trust_inferred_shapes_of_values():
    # The file declares a wrong shape for an intermediate value (as an older
    # shape inference can for ceil-mode pooling); gradients use run-time shapes.
    nodes = [helper.make_node("Mul", ["x", "V"], ["y"], name="scale"),
             helper.make_node("Add", ["y", "W"], ["z"], name="add")]
    v, w = np.array([1.5, -0.5, 2.0]), np.array([0.5, -1.0, 2.0])
    proto = make_model(nodes, [("x", np.float64, [2, 3])], [("z", np.float64, [2, 3])],
                       {"V": v, "W": w})
    proto.graph.value_info.append(helper.make_tensor_value_info("y", 11, [2, 5]))
    model = onnxgrad.load(proto)
    assert model.graph.shape("y") == (2, 5)  # the wrong declaration survived loading
    x = np.array([[1.0, -2.0, 3.0], [0.5, 0.25, -1.0]])
    grads = onnxgrad.Trainer(model, loss="mse").gradients({"x": x}, np.zeros((2, 3)))
    dz = 2 * (x * v + w) / x.size
    np.testing.assert_allclose(grads["W"], dz.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(grads["V"], (dz * x).sum(axis=0), rtol=1e-12)
