"""Checkpoints: a run interrupted, saved and resumed gives bit-identical weights to an
uninterrupted one (optimizer state, BatchNorm statistics, schedule, Dropout's random
numbers included); a checkpoint that does not fit, or a damaged file, is refused with
CheckpointError and changes nothing."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import onnxgrad
from helpers import helper, make_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = np.load(ROOT / "models" / "digits_train.npz")


def _dropout_mlp():
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Gemm", ["input", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Dropout", ["r", "ratio"], ["d"], name="drop"),
             helper.make_node("Gemm", ["d", "w2", "b2"], ["logits"], name="fc2", transB=1)]
    inits = {"w1": rng.standard_normal((32, 64)).astype(np.float32) * 0.1,
             "b1": np.zeros(32, np.float32), "ratio": np.array(0.3, np.float32),
             "w2": rng.standard_normal((10, 32)).astype(np.float32) * 0.1,
             "b2": np.zeros(10, np.float32)}
    return make_model(nodes, [("input", np.float32, ["N", 64])],
                      [("logits", np.float32, ["N", 10])], inits, opset=13)


CASES = {
    "cnn-sgd-step-schedule": (lambda: ROOT / "models" / "digits_cnn.onnx",
                              lambda: onnxgrad.SGD(lr=0.05, momentum=0.9, nesterov=True),
                              lambda o: onnxgrad.StepLR(o, step_size=4, gamma=0.5)),
    "cnn-adamw-cosine": (lambda: ROOT / "models" / "digits_cnn.onnx",
                         lambda: onnxgrad.AdamW(lr=0.01),
                         lambda o: onnxgrad.CosineAnnealingLR(o, total_steps=16, warmup_steps=3)),
    "dropout-adam-onecycle": (_dropout_mlp, lambda: onnxgrad.Adam(lr=0.01),
                              lambda o: onnxgrad.OneCycleLR(o, max_lr=0.02, total_steps=16)),
}


def _trainer(case):
    model, optimizer, schedule = CASES[case]
    trainer = onnxgrad.Trainer(onnxgrad.load(model()), optimizer=optimizer(), seed=7)
    trainer.schedule = schedule(trainer.optimizer)
    return trainer


def _batch(i):
    return {"input": DATA["input"][i * 24:(i + 1) * 24]}, DATA["label"][i * 24:(i + 1) * 24]


@pytest.mark.parametrize("case", list(CASES))
def test_a_resumed_run_is_bit_identical(case, tmp_path):
    whole = _trainer(case)
    for i in range(16):
        whole.step(*_batch(i))
    first = _trainer(case)
    for i in range(7):
        first.step(*_batch(i))
    first.epoch = 1
    first.loop_state = {"order": [3, 1, 2]}
    first.save_checkpoint(tmp_path / "run.ckpt")
    resumed = _trainer(case)
    resumed.load_checkpoint(tmp_path / "run.ckpt")
    assert (resumed.steps, resumed.epoch, resumed.loop_state) == (7, 1, {"order": [3, 1, 2]})
    for i in range(7, 16):
        resumed.step(*_batch(i))
    want, got = whole.model.parameters(), resumed.model.parameters()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert resumed.optimizer.lr == whole.optimizer.lr
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]  # no temporary file left


def test_a_checkpoint_is_plain_arrays_and_json(tmp_path):
    trainer = _trainer("cnn-adamw-cosine")
    trainer.step(*_batch(0))
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    with np.load(tmp_path / "c.ckpt", allow_pickle=False) as archive:
        names = set(archive.files)
    assert "meta" in names and "weights/features.0.weight" in names
    assert "optimizer/features.0.weight/exp_avg" in names


def _mismatch(tmp_path, saved_case, loader):
    trainer = _trainer(saved_case)
    trainer.step(*_batch(0))
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    other = loader()
    before = other.model.parameters()
    return other, before


@pytest.mark.parametrize("make,message", [
    (lambda: onnxgrad.Trainer(onnxgrad.load(ROOT / "models" / "digits_mlp.onnx"),
                              optimizer=onnxgrad.AdamW(lr=0.01)), "has no weight '0.weight'"),
    (lambda: onnxgrad.Trainer(onnxgrad.load(ROOT / "models" / "digits_cnn.onnx"),
                              optimizer=onnxgrad.SGD(lr=0.1)), "saved with optimizer AdamW"),
    (lambda: onnxgrad.Trainer(onnxgrad.load(ROOT / "models" / "digits_cnn.onnx"),
                              optimizer=onnxgrad.AdamW(lr=0.01)), "this trainer has none"),
])
def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path, make, message):
    other, before = _mismatch(tmp_path, "cnn-adamw-cosine", make)
    with pytest.raises(onnxgrad.CheckpointError, match=message):
        other.load_checkpoint(tmp_path / "c.ckpt")
    after = other.model.parameters()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert other.steps == 0 and not other.optimizer.state


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_damaged_checkpoint_is_refused(tmp_path, damage):
    trainer = _trainer("cnn-sgd-step-schedule")
    trainer.step(*_batch(0))
    path = tmp_path / "c.ckpt"
    trainer.save_checkpoint(path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    else:
        path.unlink()
    fresh = _trainer("cnn-sgd-step-schedule")
    with pytest.raises(onnxgrad.CheckpointError, match=str(path)):
        fresh.load_checkpoint(path)
    assert fresh.steps == 0
