"""End to end: real exported models trained by onnxgrad.

* An MLP exported by both torch exporters (tests/reference/mlp_*.onnx):
  forward equals onnxruntime, gradients and optimizer steps equal torch's
  (reference values in tests/reference/mlp.npz), saved files run in
  onnxruntime.
* A scikit-learn MLPClassifier converted by skl2onnx: forward equals
  onnxruntime on every output; fine-tuning through the logits (the input of
  its final Softmax) does not lose test accuracy; the saved file runs in
  onnxruntime.
* The shipped models/digits_mlp.onnx: a few epochs on the shipped data lower
  the loss and raise the test accuracy.

Reference data is made by tests/reference/make_reference.py; torch is not
needed here.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxgrad

HERE = pathlib.Path(__file__).resolve().parent
REF = HERE / "reference"
MODELS = HERE.parent / "models"

MLP = np.load(REF / "mlp.npz")
MLP_META = json.loads(str(MLP["meta"]))
EXPORTERS = MLP_META["exporters"]

# The value feeding sklearn_mlp.onnx's final Softmax (see make_reference.py).
SKLEARN_LOGITS = "add_result1"


def ort_run(path_or_bytes, feeds):
    if isinstance(path_or_bytes, pathlib.Path):
        path_or_bytes = str(path_or_bytes)
    sess = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def mlp_path(exporter):
    return REF / MLP_META["files"][exporter]


def mlp_names(exporter):
    return sorted(m["initializer"] for m in MLP_META["mapping"][exporter].values())


def mlp_expected(exporter, kind):
    return {n: MLP[f"{exporter}/{kind}/{n}"] for n in mlp_names(exporter)}


def assert_params(got, want, rtol, atol, what):
    assert set(want) <= set(got), f"{what}: missing {set(want) - set(got)}"
    for n, w in want.items():
        np.testing.assert_allclose(got[n], w, rtol=rtol, atol=atol,
                                   err_msg=f"{what}: {n}")


def assert_saved_runs_in_ort(model, path, feeds, original):
    """model.save(path): same graph, current weights; onnxruntime agrees."""
    model.save(path)
    saved = onnx.load(str(path))
    onnx.checker.check_model(saved, full_check=True)
    orig = onnx.load(str(original))
    assert [n.op_type for n in saved.graph.node] == [n.op_type for n in orig.graph.node]
    assert [i.name for i in saved.graph.input] == [i.name for i in orig.graph.input]
    assert [o.name for o in saved.graph.output] == [o.name for o in orig.graph.output]
    params = model.parameters()
    for t in saved.graph.initializer:
        if t.name in params:
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), params[t.name],
                                          err_msg=f"saved initializer {t.name}")
    got = ort_run(path, feeds)
    ours = model.run(feeds)
    assert set(got) <= set(ours)
    for name, v in got.items():
        if v.dtype.kind == "f":
            np.testing.assert_allclose(ours[name], v, rtol=1e-5, atol=1e-6,
                                       err_msg=f"output {name}")
        else:
            np.testing.assert_array_equal(ours[name], v, err_msg=f"output {name}")
    return got


# ---------------------------------------------------------------------------
# MLP exported by torch (TorchScript and dynamo exporters)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_mlp_forward_matches_onnxruntime(exporter):
    model = onnxgrad.load(mlp_path(exporter))
    feeds = {"input": MLP["x"]}
    got = model.run(feeds)
    want = ort_run(mlp_path(exporter), feeds)
    assert set(got) == set(want) == {"logits"}
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["logits"], MLP["logits"], rtol=1e-5, atol=1e-6)
    assert_params(model.parameters(), mlp_expected(exporter, "init"), 0, 0,
                  f"{exporter} initial weights")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_mlp_gradients_match_torch(exporter):
    model = onnxgrad.load(mlp_path(exporter))
    trainer = onnxgrad.Trainer(model, loss="cross_entropy",
                               optimizer=onnxgrad.SGD(lr=0.1))
    grads = trainer.gradients({"input": MLP["x"]}, MLP["y"])
    assert set(grads) == set(mlp_names(exporter))
    assert_params(grads, mlp_expected(exporter, "grad"), 2e-3, 1e-6,
                  f"{exporter} gradients")
    # gradients() must not move the weights
    assert_params(trainer.model.parameters(), mlp_expected(exporter, "init"), 0, 0,
                  f"{exporter} weights after gradients()")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_mlp_sgd_momentum_steps_match_torch(exporter, tmp_path):
    model = onnxgrad.load(mlp_path(exporter))
    trainer = onnxgrad.Trainer(model, loss="cross_entropy",
                               optimizer=onnxgrad.SGD(**MLP_META["sgd"]))
    feeds = {"input": MLP["x"]}
    losses = [trainer.step(feeds, MLP["y"]) for _ in range(MLP_META["sgd_steps"])]
    assert all(isinstance(v, float) for v in losses)
    np.testing.assert_allclose(losses, MLP["sgd_losses"], rtol=1e-5)
    assert_params(trainer.model.parameters(), mlp_expected(exporter, "sgd"),
                  2e-5, 1e-7, f"{exporter} after SGD steps")
    assert_saved_runs_in_ort(trainer.model, tmp_path / "sgd.onnx", feeds,
                             mlp_path(exporter))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_mlp_adamw_steps_match_torch(exporter, tmp_path):
    model = onnxgrad.load(mlp_path(exporter))
    trainer = onnxgrad.Trainer(model, loss="cross_entropy",
                               optimizer=onnxgrad.AdamW(**MLP_META["adamw"]))
    feeds = {"input": MLP["x"]}
    losses = [trainer.step(feeds, MLP["y"]) for _ in range(MLP_META["adamw_steps"])]
    np.testing.assert_allclose(losses, MLP["adamw_losses"], rtol=1e-5)
    assert_params(trainer.model.parameters(), mlp_expected(exporter, "adamw"),
                  2e-5, 1e-7, f"{exporter} after AdamW steps")
    got = assert_saved_runs_in_ort(trainer.model, tmp_path / "adamw.onnx", feeds,
                                   mlp_path(exporter))
    # the saved model really is the trained one, not the original
    before = ort_run(mlp_path(exporter), feeds)["logits"]
    assert not np.allclose(got["logits"], before)


def test_mlp_save_untrained_roundtrip(tmp_path):
    model = onnxgrad.load(onnx.load(str(mlp_path(EXPORTERS[0]))))   # from a ModelProto
    got = assert_saved_runs_in_ort(model, tmp_path / "same.onnx", {"input": MLP["x"]},
                                   mlp_path(EXPORTERS[0]))
    np.testing.assert_allclose(got["logits"], MLP["logits"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# scikit-learn MLPClassifier through skl2onnx
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    train = np.load(MODELS / "digits_train.npz")
    test = np.load(MODELS / "digits_test.npz")
    return ({k: train[k] for k in train.files}, {k: test[k] for k in test.files})


def test_sklearn_mlp_forward_matches_onnxruntime(digits):
    _, test = digits
    path = REF / "sklearn_mlp.onnx"
    model = onnxgrad.load(path)
    feeds = {"input": test["input"]}
    got = model.run(feeds)
    want = ort_run(path, feeds)
    assert set(got) == set(want) == {"label", "probabilities"}
    np.testing.assert_array_equal(got["label"], want["label"])
    assert got["label"].dtype == want["label"].dtype
    np.testing.assert_allclose(got["probabilities"], want["probabilities"],
                               rtol=1e-5, atol=1e-6)


def test_sklearn_mlp_finetune(digits, tmp_path):
    train, test = digits
    path = REF / "sklearn_mlp.onnx"
    feeds_test = {"input": test["input"]}
    acc_before = float((ort_run(path, feeds_test)["label"] == test["label"]).mean())

    model = onnxgrad.load(path)
    trainer = onnxgrad.Trainer(model, loss="cross_entropy", output=SKLEARN_LOGITS,
                               optimizer=onnxgrad.Adam(lr=1e-2))
    assert set(trainer.model.parameters()) >= {
        "coefficient", "intercepts", "coefficient1", "intercepts1"}
    rng = np.random.default_rng(0)
    n = len(train["label"])
    for _ in range(3):
        order = rng.permutation(n)
        for i in range(0, n, 64):
            idx = order[i:i + 64]
            trainer.step({"input": train["input"][idx]}, train["label"][idx])

    got = assert_saved_runs_in_ort(trainer.model, tmp_path / "sklearn_tuned.onnx",
                                   feeds_test, path)
    np.testing.assert_allclose(got["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    acc_after = float((got["label"] == test["label"]).mean())
    assert acc_after >= acc_before, (acc_before, acc_after)
    assert acc_after >= acc_before + 0.1, (acc_before, acc_after)  # torch: 0.59 -> 0.93


# ---------------------------------------------------------------------------
# the shipped digits model
# ---------------------------------------------------------------------------
def cross_entropy(logits, labels):
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def test_digits_mlp_loss_down_accuracy_up(digits, tmp_path):
    train, test = digits
    model = onnxgrad.load(MODELS / "digits_mlp.onnx")

    def evaluate(m):
        logits = m.run({"input": test["input"]})["logits"]
        return cross_entropy(logits, test["label"]), float(
            (logits.argmax(axis=1) == test["label"]).mean())

    loss0, acc0 = evaluate(model)
    trainer = onnxgrad.Trainer(model, loss="cross_entropy",
                               optimizer=onnxgrad.Adam(lr=1e-2))
    rng = np.random.default_rng(0)
    n = len(train["label"])
    epoch_losses = []
    for _ in range(3):
        order = rng.permutation(n)
        losses = []
        for i in range(0, n, 64):
            idx = order[i:i + 64]
            losses.append(trainer.step({"input": train["input"][idx]},
                                       train["label"][idx]))
        epoch_losses.append(float(np.mean(losses)))
    loss1, acc1 = evaluate(trainer.model)

    assert all(np.isfinite(epoch_losses)), epoch_losses
    assert epoch_losses[-1] < epoch_losses[0], epoch_losses
    assert loss1 < loss0, (loss0, loss1)
    assert acc1 >= acc0 + 0.05, (acc0, acc1)   # about 0.79 -> 0.94 with torch
    got = assert_saved_runs_in_ort(trainer.model, tmp_path / "digits_tuned.onnx",
                                   {"input": test["input"]}, MODELS / "digits_mlp.onnx")
    assert float((got["logits"].argmax(1) == test["label"]).mean()) == acc1
