"""Convolutional networks exported by torch.onnx (tests/reference/make_cnn_reference.py):
a LeNet, a ResNet-style net with BatchNormalization exported in eval mode, and an
encoder-decoder with per-pixel cross-entropy.  onnxgrad runs them like
onnxruntime, gets PyTorch's training-mode gradients, and after SGD(momentum) and
AdamW steps holds PyTorch's weights and BatchNorm running statistics."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest

import onnxgrad

REF = pathlib.Path(__file__).resolve().parent / "reference"
DATA = np.load(REF / "cnn.npz")
META = json.loads(str(DATA["meta"]))
NETS = list(META["nets"])


def _path(net):
    return REF / META["nets"][net]["file"]


def _ort(path, feeds):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _expected(net, kind, names):
    return {n: DATA[f"{net}/{kind}/{n}"] for n in names}


def _assert_close(got, want, rtol, atol, what):
    assert set(want) <= set(got), f"{what}: missing {sorted(set(want) - set(got))}"
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=rtol, atol=atol,
                                   err_msg=f"{what}: {name}")


def _feeds(net):
    return {"input": DATA[f"{net}/x"]}


@pytest.mark.parametrize("net", NETS)
def test_forward_matches_onnxruntime(net):
    model = onnxgrad.load(_path(net))
    got = model.run(_feeds(net))["logits"]
    np.testing.assert_allclose(got, _ort(_path(net), _feeds(net))["logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, DATA[f"{net}/logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("net", NETS)
def test_gradients_match_torch_training_mode(net):
    model = onnxgrad.load(_path(net))
    params, buffers = META["nets"][net]["params"], META["nets"][net]["buffers"]
    trainer = onnxgrad.Trainer(model, loss="cross_entropy")
    assert sorted(trainer.trainable) == sorted(params)     # running statistics are not trained
    before = model.parameters()
    grads = trainer.gradients(_feeds(net), DATA[f"{net}/y"])
    _assert_close(grads, _expected(net, "grad", params), 2e-3, 1e-6, f"{net} gradients")
    after = model.parameters()
    for name in params + buffers:                          # gradients() changes nothing
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("net", NETS)
def test_steps_match_torch(net, optimizer, tmp_path):
    model = onnxgrad.load(_path(net))
    make = onnxgrad.SGD if optimizer == "sgd" else onnxgrad.AdamW
    trainer = onnxgrad.Trainer(model, loss="cross_entropy", optimizer=make(**META[optimizer]))
    losses = [trainer.step(_feeds(net), DATA[f"{net}/y"])
              for _ in range(META[f"{optimizer}_steps"])]
    np.testing.assert_allclose(losses, DATA[f"{net}/{optimizer}_losses"], rtol=1e-4)
    names = META["nets"][net]["params"] + META["nets"][net]["buffers"]
    _assert_close(model.parameters(), _expected(net, optimizer, names), 1e-4, 1e-6,
                  f"{net} after {optimizer} steps")
    # The saved model is the trained one and runs in onnxruntime.
    model.save(tmp_path / "trained.onnx")
    onnx.checker.check_model(str(tmp_path / "trained.onnx"))
    got = _ort(tmp_path / "trained.onnx", _feeds(net))["logits"]
    np.testing.assert_allclose(model.run(_feeds(net))["logits"], got, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, DATA[f"{net}/logits"])


def test_reference_files_are_small():
    total = sum(p.stat().st_size for p in REF.glob("cnn*"))
    assert total < 1_000_000
    assert set(META["nets"]["resnet"]["ops"]) >= {"BatchNormalization", "Conv", "Add",
                                                  "GlobalAveragePool"}
    assert set(META["nets"]["encdec"]["ops"]) >= {"ConvTranspose", "Concat", "LeakyRelu",
                                                  "Sigmoid"}


@pytest.mark.gpu
@pytest.mark.parametrize("net", NETS)
def test_cuda_steps_match_cpu(net):
    """The same SGD steps on CuPy: losses, weights and running statistics as on the CPU."""
    results = {}
    for device in ("cpu", "cuda"):
        model = onnxgrad.load(_path(net))
        trainer = onnxgrad.Trainer(model, loss="cross_entropy",
                                   optimizer=onnxgrad.SGD(**META["sgd"]), device=device)
        losses = [trainer.step(_feeds(net), DATA[f"{net}/y"]) for _ in range(META["sgd_steps"])]
        results[device] = (losses, model.parameters())
    np.testing.assert_allclose(results["cuda"][0], results["cpu"][0], rtol=1e-5)
    _assert_close(results["cuda"][1], results["cpu"][1], 1e-4, 1e-6, f"{net} on cuda")
    names = META["nets"][net]["params"] + META["nets"][net]["buffers"]
    _assert_close(results["cuda"][1], _expected(net, "sgd", names), 1e-4, 1e-6, f"{net} vs torch")
