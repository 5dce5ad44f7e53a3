"""Fine-tuning a vision model from the command line: freeze the backbone, train the head.

The model is ``models/digits_cnn.onnx`` (made by ``models/make_digits_cnn.py``): a small
CNN whose initializers keep torch's names, ``features.*`` (conv, batch norm, conv) and
``head.*`` (the final Linear); its backbone is pretrained, its head barely trained.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxgrad
from onnxgrad.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_cnn.onnx"
TRAIN = ROOT / "models" / "digits_train.npz"
TEST = ROOT / "models" / "digits_test.npz"

ort = pytest.importorskip("onnxruntime")

HEAD = ["head.weight", "head.bias"]
BACKBONE = ["features.0.weight", "features.0.bias",      # first conv
            "features.1.weight", "features.1.bias",      # batch norm's scale and shift
            "features.4.weight", "features.4.bias"]      # second conv
RUNNING = ["features.1.running_mean", "features.1.running_var"]


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def status(output, name):
    """The last column of ``name``'s row in inspect's parameter table."""
    line = next(ln for ln in output.splitlines() if ln.split()[:1] == [name])
    return re.split(r"\]\s+", line, maxsplit=1)[1].strip()


def val_acc(output, prefix):
    line = next(ln for ln in output.splitlines() if ln.startswith(prefix))
    return float(re.search(r"\bval_acc ([0-9.]+)", line).group(1))


def ort_logits(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def test_shipped_cnn_keeps_parameter_names_and_runs_like_onnxruntime():
    proto = onnx.load(str(MODEL))
    names = {init.name for init in proto.graph.initializer
             if init.data_type == onnx.TensorProto.FLOAT}
    assert names == set(HEAD + BACKBONE + RUNNING)
    assert "BatchNormalization" in [n.op_type for n in proto.graph.node]  # not folded into Conv
    x = np.load(TEST)["input"]
    np.testing.assert_allclose(onnxgrad.load(MODEL).run({"input": x})["logits"],
                               ort_logits(MODEL, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("option", [("--freeze", "features.*"), ("--trainable", "head.*")])
def test_inspect_shows_the_head_trainable_and_the_backbone_frozen(option):
    out = invoke("inspect", MODEL, *option)
    for name in HEAD:
        assert status(out, name) == "trainable", out
    for name in BACKBONE:
        assert status(out, name) == "frozen", out
    for name in RUNNING:                       # buffers, never trained by a gradient
        assert status(out, name).startswith("no gradient path"), out
    assert "trainable: 2 of 10 tensors, 170 values" in out


def test_train_the_head_with_the_backbone_frozen(tmp_path):
    out_path = tmp_path / "cnn_head.onnx"
    out = invoke("train", MODEL, "--data", TRAIN, "--val", TEST, "--freeze", "features.*",
                 "--epochs", 3, "--lr", 0.01, "--quiet", "--out", out_path)
    assert "training 2 of 10 parameter tensors (170 values)" in out
    before, after = val_acc(out, "before:"), val_acc(out, "after:")
    assert before < 0.6 and after > 0.85 and after > before + 0.25, out

    old, new = onnxgrad.load(MODEL).parameters(), onnxgrad.load(out_path).parameters()
    for name in BACKBONE:                      # frozen: bit for bit the same
        np.testing.assert_array_equal(new[name], old[name], err_msg=name)
    for name in HEAD:
        assert not np.allclose(new[name], old[name]), name
    # Batch norm follows torch's train() mode in a training step even when its weights
    # are frozen: it normalises with batch statistics and updates its running mean and
    # variance (momentum 0.9 in ONNX terms).  The backbone was pretrained on the same
    # data, so they move only a little.
    for name in RUNNING:
        assert not np.array_equal(new[name], old[name]), name
        np.testing.assert_allclose(new[name], old[name], atol=0.1, err_msg=name)

    # Same graph, new weights; runs in onnxruntime exactly like onnxgrad's inference.
    assert ([n.op_type for n in onnx.load(str(out_path)).graph.node]
            == [n.op_type for n in onnx.load(str(MODEL)).graph.node])
    x, y = np.load(TEST)["input"], np.load(TEST)["label"]
    logits = onnxgrad.load(out_path).run({"input": x})["logits"]
    np.testing.assert_allclose(ort_logits(out_path, x), logits, rtol=1e-4, atol=1e-5)
    assert float((logits.argmax(1) == y).mean()) == pytest.approx(after, abs=1e-4)
