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


def _shared_statistics_model():
    """Two BatchNormalizations whose parameters and running statistics are a few shared
    tensors, directly and through Identity nodes, as torch.onnx writes a freshly
    initialised network (it stores equal initializers once)."""
    C = 3
    nodes = [
        helper.make_node("Identity", ["ones"], ["ones_a"], name="id_a"),
        helper.make_node("Identity", ["zeros"], ["zeros_a"], name="id_b"),
        helper.make_node("BatchNormalization", ["X", "ones", "zeros", "zeros_a", "ones_a"],
                         ["H"], name="bn1", momentum=0.5),
        helper.make_node("BatchNormalization", ["H", "ones_a", "zeros_a", "zeros", "ones"],
                         ["Y"], name="bn2", momentum=0.5),
    ]
    inits = {"ones": np.ones(C, np.float32), "zeros": np.zeros(C, np.float32)}
    return make_model(nodes, [("X", np.float32, ["N", C, 4])], [("Y", np.float32, ["N", C, 4])],
                      inits, opset=15)


def test_shared_running_statistics_get_tensors_of_their_own(tmp_path):
    """Each BatchNormalization's running statistics become initializers of its own: the
    model computes the same, a training step (batch statistics) updates each node's
    running statistics (and no parameter), and the saved model keeps them and runs in
    onnxruntime."""
    import onnxruntime

    proto = _shared_statistics_model()
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 3, 4)) * 2 + 1).astype(np.float32)
    model = onnxgrad.load(proto)
    want = onnxruntime.InferenceSession(proto.SerializeToString()).run(None, {"X": x})[0]
    np.testing.assert_allclose(model.run({"X": x})["Y"], want, rtol=1e-5, atol=1e-5)
    own = {"bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"}
    assert own <= set(model.parameters())

    trainer = onnxgrad.Trainer(model, loss="mse", optimizer=onnxgrad.SGD(lr=0.0))
    trainer.step({"X": x}, np.zeros((5, 3, 4), np.float32))
    params = model.parameters()
    np.testing.assert_array_equal(params["ones"], np.ones(3, np.float32))
    np.testing.assert_array_equal(params["zeros"], np.zeros(3, np.float32))
    mean = x.mean(axis=(0, 2))  # momentum 0.5: half the batch mean, half the initial zero
    np.testing.assert_allclose(params["bn1.running_mean"], 0.5 * mean, rtol=1e-5, atol=1e-6)
    var = x.var(axis=(0, 2), ddof=1)
    np.testing.assert_allclose(params["bn1.running_var"], 0.5 + 0.5 * var, rtol=1e-5)
    # bn2 normalises bn1's output: mean 0 and (unbiased) variance near 1 per channel
    np.testing.assert_allclose(params["bn2.running_mean"], 0.0, atol=1e-5)
    assert np.all(np.abs(params["bn2.running_var"] - 1.0) < 0.1)

    path = tmp_path / "trained.onnx"
    model.save(path)
    saved = onnx.load(path)
    stored = {t.name: numpy_helper.to_array(t) for t in saved.graph.initializer}
    for name in own:
        np.testing.assert_array_equal(stored[name], params[name])
    # inference: the saved statistics, in onnxruntime and in onnxgrad alike
    got = onnxgrad.load(saved).run({"X": x})["Y"]
    want = onnxruntime.InferenceSession(saved.SerializeToString()).run(None, {"X": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
