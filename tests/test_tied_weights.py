"""Tied weights: an embedding and an output matrix that an exporter wrote as two equal
initializers (the second, here, transposed) train as one weight with tie_weights:
the gradient of every use summed, one update, copies kept equal in the saved model;
the same as a graph that reads one initializer twice."""

from __future__ import annotations

import numpy as np
import onnx
from click.testing import CliRunner

import onnxgrad
from helpers import helper, make_model
from onnxgrad.program import tied_weights
from onnxgrad.tools.cli import main

V, D = 11, 6


def _lm(tied_copy: bool):
    """tokens -> E[tokens] -> tanh -> @ W (W = Eᵀ): two initializers, or one read twice."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((V, D)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "tokens"], ["h"], name="embed"),
             helper.make_node("Tanh", ["h"], ["t"], name="tanh")]
    inits = {"E": emb}
    if tied_copy:
        inits["W"] = np.ascontiguousarray(emb.T)
        nodes.append(helper.make_node("MatMul", ["t", "W"], ["logits"], name="head"))
    else:
        nodes += [helper.make_node("Transpose", ["E"], ["Et"], name="tr", perm=[1, 0]),
                  helper.make_node("MatMul", ["t", "Et"], ["logits"], name="head")]
    return make_model(nodes, [("tokens", np.int64, ["N"])], [("logits", np.float32, ["N", V])],
                      inits)


def _train(proto, tie, steps=5):
    model = onnxgrad.load(proto)
    trainer = onnxgrad.Trainer(model, optimizer=onnxgrad.AdamW(lr=0.05), tie_weights=tie)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        tokens = rng.integers(0, V, 16)
        trainer.step({"tokens": tokens}, (tokens + 1) % V)
    return model, trainer


def test_copies_are_found_transposed_or_not():
    model = onnxgrad.load(_lm(True))
    assert tied_weights(model.graph) == {"W": ("E", True)}


def test_a_tied_copy_trains_as_the_shared_weight(tmp_path):
    tied, trainer = _train(_lm(True), tie=True)
    shared, _ = _train(_lm(False), tie=False)
    assert trainer.trainable == ["E"]
    got, want = tied.parameters(), shared.parameters()
    np.testing.assert_allclose(got["E"], want["E"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["W"], got["E"].T)  # kept equal
    tied.save(tmp_path / "t.onnx")
    saved = onnxgrad.load(tmp_path / "t.onnx").parameters()
    np.testing.assert_array_equal(saved["W"], saved["E"].T)


def test_without_tying_the_copies_drift():
    untied, _ = _train(_lm(True), tie=False)
    params = untied.parameters()
    assert not np.allclose(params["W"], params["E"].T)


def test_inspect_reports_and_train_ties(tmp_path):
    path = tmp_path / "lm.onnx"
    onnx.save(_lm(True), path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0 and "'W' repeats 'E' (transposed)" in result.output
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, V, 64)
    np.savez(tmp_path / "d.npz", tokens=tokens, label=(tokens + 1) % V)
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(main, ["train", str(path), "--data", str(tmp_path / "d.npz"),
                                       "--tie-weights", "--epochs", "2", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    params = onnxgrad.load(out).parameters()
    np.testing.assert_array_equal(params["W"], params["E"].T)
