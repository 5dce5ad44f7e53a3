"""``onnxgrad predict``: class predictions with probabilities for classifiers, raw
values for other models."""

from __future__ import annotations

import csv
import pathlib

import numpy as np
from click.testing import CliRunner

import onnxgrad
from helpers import mlp_model
from onnxgrad.tools.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_mlp.onnx"
TEST = ROOT / "models" / "digits_test.npz"


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_classifier_gets_classes_and_probabilities(tmp_path):
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(main, ["predict", str(MODEL), "--data", str(TEST), "--out",
                                       str(out), "--batch-size", "100"])
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    data = np.load(TEST)
    logits = onnxgrad.load(MODEL).run({"input": data["input"]})["logits"]
    assert len(rows) == len(logits)
    assert [int(r["class"]) for r in rows] == list(logits.argmax(1))
    probs = np.array([[float(r[f"prob_{c}"]) for c in range(10)] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    want = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, want / want.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_other_models_get_their_values(tmp_path):
    model = tmp_path / "reg.onnx"
    import onnx

    onnx.save(mlp_model(sizes=(3, 4, 1)), model)
    x = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(main, ["predict", str(model), "--data", str(tmp_path / "x.npz"),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    want = onnxgrad.load(model).run({"x": x})["logits"][:, 0]
    np.testing.assert_allclose([float(r["logits_0"]) for r in rows], want, rtol=1e-6)


def test_predict_refuses_to_write_over_its_data(tmp_path):
    result = CliRunner().invoke(main, ["predict", str(MODEL), "--data", str(TEST), "--out",
                                       str(TEST)])
    assert result.exit_code != 0 and "is an input file" in result.output
