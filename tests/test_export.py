"""Model.save: same graph, current weights, onnxruntime agrees, atomic writes."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxgrad
from helpers import mlp_model

X = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)


def _trained(tmp_path):
    proto = mlp_model()
    proto.doc_string = "a test model"
    proto.graph.node[0].doc_string = "first layer"
    onnx.helper.set_model_props(proto, {"author": "tests"})
    model = onnxgrad.load(proto)
    trainer = onnxgrad.Trainer(model, optimizer=onnxgrad.SGD(lr=0.5, momentum=0.9))
    for _ in range(3):
        trainer.step({"x": X}, np.array([0, 1, 2, 0, 1]))
    return proto, model


def test_saved_model_runs_in_onnxruntime_like_model_run(tmp_path):
    proto, model = _trained(tmp_path)
    path = tmp_path / "out.onnx"
    model.save(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"x": X})[0]
    np.testing.assert_allclose(got, model.run({"x": X})["logits"], rtol=1e-5, atol=1e-6)
    # The weights changed and the file holds the new ones.
    saved = onnxgrad.load(path).parameters()
    for name, value in model.parameters().items():
        np.testing.assert_array_equal(saved[name], value)
    assert not np.array_equal(saved["W0"], onnx.numpy_helper.to_array(proto.graph.initializer[0]))


def test_saved_model_keeps_the_original_graph(tmp_path):
    proto, model = _trained(tmp_path)
    path = tmp_path / "out.onnx"
    model.save(path)
    saved = onnx.load(path)
    assert [n.name for n in saved.graph.node] == [n.name for n in proto.graph.node]
    assert [n.op_type for n in saved.graph.node] == [n.op_type for n in proto.graph.node]
    assert saved.doc_string == "a test model"
    assert saved.graph.node[0].doc_string == "first layer"
    assert {p.key: p.value for p in saved.metadata_props} == {"author": "tests"}
    assert list(saved.opset_import) == list(proto.opset_import)
    assert saved.ir_version == proto.ir_version
    onnx.checker.check_model(saved)


def test_failed_save_leaves_the_existing_file_intact(tmp_path, monkeypatch):
    _, model = _trained(tmp_path)
    path = tmp_path / "out.onnx"
    path.write_bytes(b"precious")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(onnxgrad.ModelError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["out.onnx"]  # no temporary file left behind


def test_save_into_a_missing_folder(tmp_path):
    _, model = _trained(tmp_path)
    with pytest.raises(onnxgrad.ModelError, match="does not exist"):
        model.save(tmp_path / "no" / "such" / "out.onnx")


def test_model_with_external_data_saves_inline(tmp_path):
    proto = mlp_model()
    folder = tmp_path / "src"
    folder.mkdir()
    onnx.save(proto, str(folder / "m.onnx"), save_as_external_data=True, location="w.bin",
              size_threshold=0)
    model = onnxgrad.load(folder / "m.onnx")
    model.save(tmp_path / "copy.onnx")
    session = ort.InferenceSession(str(tmp_path / "copy.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": X})[0], model.run({"x": X})["logits"],
                               rtol=1e-5, atol=1e-6)
