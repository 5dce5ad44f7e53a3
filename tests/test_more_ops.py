"""Conformance follow-ups: captured values in bodies, robust scalar and axes inputs, Cast to
the narrow types, sequences and optionals through Model.run, and the ops added for the node
suite (with their gradient rules checked in float64 against central differences)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxgrad

F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def model_of(nodes, inputs, outputs, inits=(), opset=21):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


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
