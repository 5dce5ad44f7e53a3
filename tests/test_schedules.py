"""Learning-rate schedules against torch.optim.lr_scheduler, stepped once per optimizer
step (reference numbers from tests/reference/make_schedule_reference.py)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import onnxgrad
from onnxgrad.schedules import SCHEDULES

REF = json.loads((pathlib.Path(__file__).parent / "reference" / "schedules.json").read_text())
KIND = {"step": "step", "multistep": "multistep", "exponential": "exponential",
        "cosine": "cosine", "cosine-warmup": "cosine", "linear": "linear",
        "onecycle-sgd": "onecycle", "onecycle-adamw": "onecycle"}


def _optimizer(case):
    if case in ("linear", "onecycle-adamw"):
        return onnxgrad.AdamW(lr=3e-3)
    return onnxgrad.SGD(lr=0.1, momentum=0.9)


@pytest.mark.parametrize("case", list(REF["cases"]))
def test_learning_rate_at_every_step_equals_torch(case):
    ref = REF["cases"][case]
    opt = _optimizer(case)
    schedule = SCHEDULES[KIND[case]](opt, **ref["settings"])
    lrs, momenta = [], []
    for _ in range(REF["steps"]):
        lrs.append(opt.lr)
        momenta.append(opt.betas[0] if hasattr(opt, "betas") else opt.momentum)
        schedule.step()
    np.testing.assert_allclose(lrs, ref["lr"], rtol=1e-12, atol=1e-15)
    if ref["momentum"]:
        np.testing.assert_allclose(momenta, ref["momentum"], rtol=1e-12)


def test_a_schedule_resumes_from_its_state():
    opt = onnxgrad.SGD(lr=0.1)
    schedule = onnxgrad.CosineAnnealingLR(opt, total_steps=20, warmup_steps=4)
    for _ in range(9):
        schedule.step()
    state = schedule.state_dict()
    other = onnxgrad.SGD(lr=0.1)
    again = onnxgrad.CosineAnnealingLR(other, total_steps=20, warmup_steps=4)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert other.lr == opt.lr
    assert [schedule.step() for _ in range(5)] == [again.step() for _ in range(5)]


@pytest.mark.parametrize("make,message", [
    (lambda o: onnxgrad.StepLR(o, step_size=0), "step_size must be at least 1"),
    (lambda o: onnxgrad.MultiStepLR(o, milestones=[]), "milestones"),
    (lambda o: onnxgrad.CosineAnnealingLR(o, total_steps=10, warmup_steps=10), "warmup_steps"),
    (lambda o: onnxgrad.OneCycleLR(o, max_lr=1.0, total_steps=10, pct_start=1.5), "pct_start"),
])
def test_bad_settings_are_refused(make, message):
    with pytest.raises(onnxgrad.OnnxgradError, match=message):
        make(onnxgrad.SGD(lr=0.1))


def test_one_cycle_refuses_steps_past_its_end():
    opt = onnxgrad.SGD(lr=0.1, momentum=0.9)
    schedule = onnxgrad.OneCycleLR(opt, max_lr=1.0, total_steps=3)
    for _ in range(3):  # as torch: the schedule steps after each of the 3 optimizer steps
        schedule.step()
    with pytest.raises(onnxgrad.OnnxgradError, match="past its end"):
        schedule.step()
