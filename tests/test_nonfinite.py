"""A step whose loss is not finite raises NonFiniteError before it changes anything:
weights, optimizer state, running statistics and counters stay as they were."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from click.testing import CliRunner

import onnxgrad
from onnxgrad.tools.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = np.load(ROOT / "models" / "digits_train.npz")


@pytest.mark.parametrize("deferred", [False, True], ids=["early-updates", "clipped"])
def test_a_nan_batch_changes_nothing(deferred):
    model = onnxgrad.load(ROOT / "models" / "digits_cnn.onnx")  # with BatchNormalization
    trainer = onnxgrad.Trainer(model, optimizer=onnxgrad.Adam(lr=0.01))
    if deferred:
        trainer.clip_grad_norm = 1.0
    x, y = DATA["input"][:16], DATA["label"][:16]
    trainer.step({"input": x}, y)
    before = model.parameters()
    state = {k: {n: np.array(v, copy=True) if hasattr(v, "shape") else v for n, v in s.items()}
             for k, s in trainer.optimizer.state.items()}
    bad = x.copy()
    bad[2, 7] = np.nan
    with pytest.raises(onnxgrad.NonFiniteError, match="the loss is nan at step 2; no weight"):
        trainer.step({"input": bad}, y)
    after = model.parameters()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    for name, entries in state.items():
        for key, value in entries.items():
            np.testing.assert_array_equal(trainer.optimizer.state[name][key], value)
    assert trainer.steps == 1
    assert np.isfinite(trainer.step({"input": x}, y))  # and training goes on


def test_the_command_line_refuses_non_finite_data_by_key_and_row(tmp_path):
    x = DATA["input"].copy()
    x[40, 3] = np.inf
    data = tmp_path / "bad.npz"
    np.savez(data, input=x, label=DATA["label"])
    out = tmp_path / "out.onnx"
    for command in (["train", "--out", str(out), "-q"], ["eval"]):
        result = CliRunner().invoke(main, [command[0], str(ROOT / "models" / "digits_mlp.onnx"),
                                           "--data", str(data), *command[1:]])
        assert result.exit_code == 1, result.output
        assert f"key 'input' of '{data}' holds inf at row 40" in result.output
    assert not out.exists()


def test_eval_of_a_model_with_non_finite_outputs_fails(tmp_path):
    model = onnxgrad.load(ROOT / "models" / "digits_mlp.onnx")
    weights = model.parameters()["2.bias"]
    weights[3] = np.nan
    model.set_parameters({"2.bias": weights})
    model.save(tmp_path / "nan.onnx")
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "nan.onnx"), "--data",
                                       str(ROOT / "models" / "digits_test.npz")])
    assert result.exit_code == 1 and "holds values that are not finite" in result.output


def test_anomaly_detection_names_the_first_node_forward_or_backward():
    from helpers import helper, make_model

    model = onnxgrad.load(ROOT / "models" / "digits_cnn.onnx")
    weight = model.parameters()["head.weight"]
    weight[0, 0] = np.inf
    model.set_parameters({"head.weight": weight})
    trainer = onnxgrad.Trainer(model, detect_anomaly=True)
    with pytest.raises(onnxgrad.NonFiniteError,
                       match=r"node '/head/Gemm' \(Gemm, forward pass\) made NaN in 'logits'"):
        trainer.step({"input": DATA["input"][:8]}, DATA["label"][:8])
    # sqrt at 0: a finite forward pass, an infinite derivative
    nodes = [helper.make_node("Mul", ["x", "w"], ["h"], name="mul"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Sqrt", ["r"], ["s"], name="root"),
             helper.make_node("ReduceSum", ["s"], ["loss"], name="sum", keepdims=0)]
    proto = make_model(nodes, [("x", np.float32, [4])], [("loss", np.float32, [])],
                       {"w": np.array([1.0, -1.0, 2.0, 0.5], np.float32)})
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss",
                               trainable=["w"], detect_anomaly=True)
    before = trainer.model.parameters()["w"].copy()
    with pytest.raises(onnxgrad.NonFiniteError, match=r"\(.*backward pass\) made an infinite"):
        trainer.step({"x": np.ones(4, np.float32)}, None)
    np.testing.assert_array_equal(trainer.model.parameters()["w"], before)
