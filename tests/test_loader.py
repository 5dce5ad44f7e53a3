"""Loading models: paths and protos, validation, external data, opsets."""

import os

import numpy as np
import onnx
import pytest

import onnxgrad
from helpers import helper, make_model, mlp_model, numpy_helper


def test_load_path_and_proto_agree(tmp_path):
    proto = mlp_model()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    a = onnxgrad.load(str(path)).run({"x": x})["logits"]
    b = onnxgrad.load(proto).run({"x": x})["logits"]
    np.testing.assert_array_equal(a, b)
    assert onnxgrad.load(path).graph.opsets[""] == 17


def test_initializers_repeated_as_graph_inputs_are_not_inputs():
    proto = mlp_model()
    for t in proto.graph.initializer:  # the IR < 4 convention
        proto.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    model = onnxgrad.load(proto)
    assert model.graph.inputs == ["x"]
    assert set(model.parameters()) == {"W0", "b0", "W1", "b1"}


def test_missing_file(tmp_path):
    with pytest.raises(onnxgrad.ModelError, match="no such file"):
        onnxgrad.load(tmp_path / "absent.onnx")


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    with pytest.raises(onnxgrad.ModelError, match="junk.onnx"):
        onnxgrad.load(path)


def test_invalid_model_names_file(tmp_path):
    proto = mlp_model()
    proto.graph.node[0].input[1] = "no_such_value"
    path = tmp_path / "bad.onnx"
    onnx.save(proto, path)
    with pytest.raises(onnxgrad.ModelError, match="bad.onnx: not a valid ONNX model"):
        onnxgrad.load(path)


def _with_external_weights(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    proto = mlp_model(sizes=(64, 40, 3))
    weights = {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer}
    path = folder / "m.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    return weights, path


def test_external_data_loads(tmp_path):
    weights, path = _with_external_weights(tmp_path)
    params = onnxgrad.load(path).parameters()
    assert set(params) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(params[name], value)


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    _, path = _with_external_weights(tmp_path)
    proto = onnx.load(path, load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, path)
    with pytest.raises(onnxgrad.ModelError, match="outside the model's folder"):
        onnxgrad.load(path)


def test_external_data_through_a_symlink_out_of_the_folder_is_refused(tmp_path):
    _, path = _with_external_weights(tmp_path)
    secret = tmp_path / "secret.bin"
    os.replace(path.parent / "weights.bin", secret)
    os.symlink(secret, path.parent / "weights.bin")
    with pytest.raises(onnxgrad.ModelError, match="outside the model's folder"):
        onnxgrad.load(path)


@pytest.mark.parametrize("kind", ["fifo", "folder", "nul"])
def test_external_data_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    _, path = _with_external_weights(tmp_path)
    data = path.parent / "weights.bin"
    data.unlink()
    if kind == "fifo":
        os.mkfifo(data)  # reading it would block
        message = "not a regular file"
    elif kind == "folder":
        data.mkdir()
        message = "not a regular file"
    else:
        proto = onnx.load(path, load_external_data=False)
        for t in proto.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = "weights\0.bin"
        onnx.save(proto, path)
        message = "NUL byte"
    with pytest.raises(onnxgrad.ModelError, match=message):
        onnxgrad.load(path)


def test_unsupported_op_names_op_opset_and_node():
    proto = make_model([helper.make_node("Frobnicate", ["x"], ["y"], name="the_node",
                                         domain="com.example")],
                       [("x", np.float32, [2, 3])], [("y", np.float32, [2, 3])],
                       domains=[("com.example", 3)])
    model = onnxgrad.load(proto)  # loading works; running needs the kernel
    with pytest.raises(onnxgrad.UnsupportedOpError) as err:
        model.run({"x": np.zeros((2, 3), np.float32)})
    msg = str(err.value)
    assert "Frobnicate" in msg and "com.example" in msg and "opset 3" in msg and "the_node" in msg


def test_constant_nodes_and_unnamed_nodes_load():
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
                 np.array([1.0, 2.0, 3.0], np.float32))),
             helper.make_node("Add", ["x", "c"], ["y"])]
    proto = make_model(nodes, [("x", np.float32, [3])], [("y", np.float32, [3])])
    model = onnxgrad.load(proto)
    assert all(n.name for n in model.graph.nodes)
    np.testing.assert_array_equal(model.run({"x": np.ones(3, np.float32)})["y"], [2, 3, 4])
