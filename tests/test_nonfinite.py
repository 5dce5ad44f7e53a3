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


def test_the_command_line_names_the_step(tmp_path):
    x = DATA["input"].copy()
    x[40, 3] = np.inf
    data = tmp_path / "bad.npz"
    np.savez(data, input=x, label=DATA["label"])
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["train", str(ROOT / "models" / "digits_mlp.onnx"),
                                       "--data", str(data), "--out", str(out), "-q"])
    assert result.exit_code == 1 and "the loss is" in result.output
    assert "Traceback" not in result.output and not out.exists()
