"""Gradient clipping and accumulation against PyTorch (reference weights from
tests/reference/make_clip_reference.py: the shipped digits MLP, SGD with momentum)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import onnxgrad

ROOT = pathlib.Path(__file__).resolve().parent.parent
REF = np.load(ROOT / "tests" / "reference" / "clip.npz")
DATA = np.load(ROOT / "models" / "digits_train.npz")
STEPS, BATCH, MICRO = 4, 32, 4


def _trainer():
    return onnxgrad.Trainer(onnxgrad.load(ROOT / "models" / "digits_mlp.onnx"),
                            optimizer=onnxgrad.SGD(lr=0.1, momentum=0.9))


def _params(trainer, prefix):
    got = trainer.model.parameters()
    return {name: (got[name], REF[f"{prefix}/{name}"]) for name in trainer.trainable}


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clipping_equals_torch_clip_grad_norm(max_norm):
    trainer = _trainer()
    trainer.clip_grad_norm = max_norm
    for i in range(STEPS):
        sl = slice(i * BATCH, (i + 1) * BATCH)
        trainer.step({"input": DATA["input"][sl]}, DATA["label"][sl])
        np.testing.assert_allclose(trainer.last_grad_norm, REF[f"clip{max_norm}/norm{i}"],
                                   rtol=1e-5)
    for name, (got, want) in _params(trainer, f"clip{max_norm}").items():
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_accumulated_micro_batches_equal_torch_accumulation():
    trainer = _trainer()
    trainer.accumulate = MICRO
    micro = BATCH // MICRO
    for i in range(STEPS * MICRO):
        sl = slice(i * micro, (i + 1) * micro)
        trainer.step({"input": DATA["input"][sl]}, DATA["label"][sl])
    assert trainer.steps == STEPS
    for name, (got, want) in _params(trainer, "accumulate").items():
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_accumulation_equals_one_step_on_the_whole_batch():
    whole, parts = _trainer(), _trainer()
    parts.accumulate = 2
    x, y = DATA["input"][:64], DATA["label"][:64]
    whole.step({"input": x}, y)
    parts.step({"input": x[:32]}, y[:32])
    assert parts.steps == 0  # half a step: nothing updated yet
    parts.step({"input": x[32:]}, y[32:])
    for name in whole.trainable:
        np.testing.assert_allclose(parts.model.parameters()[name], whole.model.parameters()[name],
                                   rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_partial_accumulation_is_finished_on_request():
    trainer = _trainer()
    trainer.accumulate = 4
    trainer.step({"input": DATA["input"][:8]}, DATA["label"][:8])
    before = trainer.model.parameters()["2.weight"].copy()
    assert trainer.finish_accumulation() and trainer.steps == 1
    assert not np.array_equal(trainer.model.parameters()["2.weight"], before)
    assert not trainer.finish_accumulation()


@pytest.mark.parametrize("attr,value,message", [("accumulate", 0, "accumulate must be"),
                                                 ("clip_grad_norm", -1.0, "must be positive")])
def test_bad_settings_are_refused(attr, value, message):
    trainer = _trainer()
    setattr(trainer, attr, value)
    with pytest.raises(onnxgrad.OnnxgradError, match=message):
        trainer.step({"input": DATA["input"][:4]}, DATA["label"][:4])


@pytest.mark.parametrize("setting", [("clip_grad_norm", 1.0), ("accumulate", 2),
                                     ("detect_anomaly", True)])
def test_a_profile_counts_the_steps_that_clip_accumulate_or_check(setting):
    """These settings take every gradient before the update: the profile still counts
    each step (one run of the kernels) and times the optimizer's updates."""
    trainer = _trainer()
    setattr(trainer, *setting)
    trainer.profile = onnxgrad.Profile()
    for i in range(4):
        trainer.step({"input": DATA["input"][32 * i:32 * (i + 1)]},
                     DATA["label"][32 * i:32 * (i + 1)])
    assert trainer.profile.steps == 4
    assert trainer.profile.optimizer_seconds > 0
    assert "profile over 4 step(s)" in str(trainer.profile)
