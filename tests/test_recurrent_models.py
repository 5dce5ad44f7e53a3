"""LSTM and GRU classifiers exported by both torch.onnx exporters train as in PyTorch.

Reference data from ``tests/reference/make_recurrent_reference.py``: the
forward pass, every parameter's gradient and three SGD(momentum) steps.  The
exporters rearrange torch's weights into ONNX's W, R and B (gates reordered,
split per direction), so gradients are compared as the sorted multiset of their
values, and the steps by their losses and the trained model's logits.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest

import onnxgrad

REF = pathlib.Path(__file__).parent / "reference"
DATA = np.load(REF / "recurrent.npz")
STEPS, LR, MOMENTUM = 3, 0.1, 0.9  # as make_recurrent_reference.py
CASES = [(kind, exporter) for kind in ("lstm", "gru") for exporter in ("torchscript", "dynamo")]
IDS = [f"{k}-{e}" for k, e in CASES]


def _path(kind, exporter):
    return REF / f"{kind}_{exporter}.onnx"


def _torch_parameters(kind, exporter) -> list[str]:
    """The initializers that hold torch's parameters: the recurrent nodes' W, R and B
    and the head (the dynamo file also keeps the zero initial state as one)."""
    graph = onnx.load(str(_path(kind, exporter))).graph
    names = {i.name for i in graph.initializer}
    wanted = {"head.weight", "head.bias"}
    for node in graph.node:
        if node.op_type in ("LSTM", "GRU"):
            wanted |= {n for n in node.input[1:4] if n in names}
    return sorted(wanted)


def _trainer(kind, exporter, lr=LR):
    return onnxgrad.Trainer(onnxgrad.load(_path(kind, exporter)), loss="cross_entropy",
                            optimizer=onnxgrad.SGD(lr=lr, momentum=MOMENTUM),
                            trainable=_torch_parameters(kind, exporter))


@pytest.mark.parametrize("kind,exporter", CASES, ids=IDS)
def test_forward_matches_torch_and_onnxruntime(kind, exporter):
    ort = pytest.importorskip("onnxruntime")
    feeds = {"x": DATA[f"{kind}/x"]}
    got = onnxgrad.load(_path(kind, exporter)).run(feeds)["logits"]
    np.testing.assert_allclose(got, DATA[f"{kind}/logits"], rtol=1e-5, atol=1e-6)
    session = ort.InferenceSession(str(_path(kind, exporter)), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, session.run(None, feeds)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,exporter", CASES, ids=IDS)
def test_gradients_match_torch(kind, exporter):
    trainer = _trainer(kind, exporter)
    grads = trainer.gradients({"x": DATA[f"{kind}/x"]}, DATA[f"{kind}/label"])
    values = np.sort(np.concatenate([g.ravel() for g in grads.values()]))
    want = DATA[f"{kind}/grad_values"]
    assert values.shape == want.shape  # every torch parameter, each entry once
    np.testing.assert_allclose(values, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,exporter", CASES, ids=IDS)
def test_sgd_steps_match_torch(kind, exporter, tmp_path):
    trainer = _trainer(kind, exporter)
    feeds = {"x": DATA[f"{kind}/x"]}
    losses = [trainer.step(feeds, DATA[f"{kind}/label"]) for _ in range(STEPS)]
    np.testing.assert_allclose(losses, DATA[f"{kind}/losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trainer.model.run(feeds)["logits"], DATA[f"{kind}/trained_logits"],
                               rtol=1e-4, atol=1e-5)
    out = tmp_path / "trained.onnx"  # the saved model runs in onnxruntime as in onnxgrad
    trainer.model.save(out)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, feeds)[0], trainer.model.run(feeds)["logits"],
                               rtol=1e-5, atol=1e-6)
