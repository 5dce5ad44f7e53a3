"""A built-in loss that reads a value which already went through the function the loss
applies (cross-entropy on Softmax probabilities, BCE on a Sigmoid) is warned about, with
the value to use; the CLI reads a final Softmax's logits by default and says so."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import onnxgrad
from helpers import helper, make_model
from onnxgrad.program import LossInputWarning
from onnxgrad.tools.cli import main


def _classifier(final="Softmax"):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], name="fc", transB=1),
             helper.make_node(final, ["logits"], ["probs"], name="final")]
    return make_model(nodes, [("x", np.float32, ["N", 4])], [("probs", np.float32, ["N", 3])],
                      {"w": rng.standard_normal((3, 4)).astype(np.float32),
                       "b": np.zeros(3, np.float32)})


@pytest.mark.parametrize("final,loss", [("Softmax", "cross_entropy"), ("Sigmoid", "bce_with_logits"),
                                        ("Softmax", "nll")])
def test_a_loss_on_what_it_applies_itself_is_warned_about(final, loss):
    with pytest.warns(LossInputWarning, match="output=.logits."):
        onnxgrad.Trainer(onnxgrad.load(_classifier(final)), loss=loss)


def test_no_warning_on_the_logits():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", LossInputWarning)
        onnxgrad.Trainer(onnxgrad.load(_classifier()), output="logits")


def test_the_command_line_reads_the_logits_of_a_final_softmax(tmp_path):
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(_classifier(), path)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((40, 4)).astype(np.float32),
             label=rng.integers(0, 3, 40))
    result = CliRunner().invoke(main, ["train", str(path), "--data", str(tmp_path / "d.npz"),
                                       "--epochs", "1", "--out", str(tmp_path / "o.onnx")])
    assert result.exit_code == 0, result.output
    assert "the loss reads its input 'logits'" in result.output
    assert "on 'logits'" in result.output
