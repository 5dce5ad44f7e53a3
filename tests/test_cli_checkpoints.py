"""``onnxgrad train`` with schedules, checkpoints and --resume: a run interrupted after an
epoch and resumed ends with the weights of an uninterrupted run, bit for bit."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from click.testing import CliRunner

import onnxgrad
import onnxgrad.tools.log
from onnxgrad.tools.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "models" / "digits_mlp.onnx")
DATA = str(ROOT / "models" / "digits_train.npz")
VAL = str(ROOT / "models" / "digits_test.npz")
RUN = ["--data", DATA, "--val", VAL, "--epochs", "4", "--batch-size", "64", "--optimizer",
       "sgd", "--lr", "0.05", "--momentum", "0.9", "--lr-schedule", "cosine",
       "--warmup-steps", "5", "-q"]


def _train(args):
    result = CliRunner().invoke(main, ["train", MODEL, *args])
    return result


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    whole = tmp_path / "whole.onnx"
    assert _train([*RUN, "--out", str(whole)]).exit_code == 0
    # The same run, stopped in its third epoch (as by Ctrl-C), then resumed.
    step, calls = onnxgrad.Trainer.step, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * 23 + 5:  # 23 batches of 64 an epoch
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(onnxgrad.Trainer, "step", interrupted)
    resumed = tmp_path / "resumed.onnx"
    checkpoints = tmp_path / "ck"
    first = _train([*RUN, "--out", str(resumed), "--checkpoint-dir", str(checkpoints)])
    assert first.exit_code == 130 and not resumed.exists()
    assert f"continue with the same options and --resume {checkpoints}" in first.output
    monkeypatch.setattr(onnxgrad.Trainer, "step", step)
    second = _train([*RUN, "--out", str(resumed), "--resume", str(checkpoints),
                     "--checkpoint-dir", str(checkpoints)])
    assert second.exit_code == 0, second.output
    assert "resumed from" in second.output and "2 epoch(s)" in second.output
    want, got = onnxgrad.load(whole).parameters(), onnxgrad.load(resumed).parameters()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_save_best_keeps_the_best_epoch(tmp_path):
    out = tmp_path / "m.onnx"
    result = _train([*RUN, "--out", str(out), "--checkpoint-dir", str(tmp_path / "ck"),
                     "--save-best", "--monitor", "val_acc"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ck" / "best.ckpt").exists() and (tmp_path / "m_best.onnx").exists()
    state = onnxgrad.checkpoint.load(tmp_path / "ck" / "best.ckpt")
    assert 1 <= state["epoch"] <= 4 and state["loop"]["best"] > 0.8


@pytest.mark.parametrize("args,message", [
    (["--save-best"], "--save-best needs --checkpoint-dir"),
    (["--resume", "{tmp}/nothing"], "no checkpoint"),
    (["--lr-schedule", "cosine", "--step-size", "3"], "--step-size applies to --lr-schedule step"),
    (["--lr-schedule", "step"], "--lr-schedule step needs --step-size"),
    (["--lr-schedule", "multistep", "--milestones", "4,x"], "--milestones '4,x'"),
    (["--lr-schedule", "cosine", "--warmup-steps", "1000"], "warmup_steps must lie in"),
])
def test_bad_options_get_one_line(tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    result = _train(["--data", DATA, "--epochs", "1", "--out", str(tmp_path / "o.onnx"), *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_monitoring_validation_without_validation_data_is_refused(tmp_path):
    result = _train(["--data", DATA, "--epochs", "1", "--out", str(tmp_path / "o.onnx"),
                     "--checkpoint-dir", str(tmp_path / "ck"), "--save-best"])
    assert result.exit_code != 0 and "--monitor val_loss needs validation data" in result.output


def test_log_plot_clip_accumulate_and_early_stopping(tmp_path):
    log, png = tmp_path / "run.csv", tmp_path / "run.png"
    result = _train(["--data", DATA, "--val", VAL, "--epochs", "30", "--optimizer", "sgd",
                     "--lr", "0.05", "--momentum", "0.9", "--clip-grad-norm", "1.0",
                     "--accumulate", "2", "--early-stopping", "1", "--monitor", "val_loss",
                     "--log", str(log), "--log-every", "10", "--plot", str(png),
                     "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert "early stopping after epoch" in result.output  # patience 1 over 30 epochs
    rows = onnxgrad.tools.log.read(str(log))
    epochs = [r for r in rows if r["train_loss"]]
    assert len(epochs) < 30 and [int(r["epoch"]) for r in epochs] == list(range(1, len(epochs) + 1))
    assert int(epochs[0]["step"]) == 23  # 45 batches of 32, two a step, the last one alone
    assert all(float(r["val_acc"]) > 0.8 for r in epochs)
    assert any(not r["train_loss"] and int(r["step"]) % 10 == 0 for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(main, ["plot", str(log), "-o", str(tmp_path / "again.png")])
    assert again.exit_code == 0 and (tmp_path / "again.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--clip-grad-norm", "0"], "--clip-grad-norm must be positive"),
    (["--accumulate", "0"], "--accumulate must be at least 1"),
    (["--log-every", "5"], "--log-every needs --log FILE.csv or --tensorboard DIR"),
    (["--plot", "x.png"], "--plot needs --log FILE.csv"),
    (["--early-stopping", "2"], "--monitor val_loss needs validation data"),
])
def test_bad_job_options_get_one_line(tmp_path, args, message):
    result = _train(["--data", DATA, "--epochs", "1", "--out", str(tmp_path / "o.onnx"), *args])
    assert result.exit_code != 0 and message in result.output, result.output


def test_plot_refuses_a_file_that_is_not_a_log(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    result = CliRunner().invoke(main, ["plot", str(bad), "-o", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "not an onnxgrad training log" in result.output


def _scalars(folder):
    """(tag, step, value) of every scalar in the TensorBoard event files of ``folder``."""
    import struct

    from tensorboardX.proto import event_pb2

    found = []
    for path in folder.iterdir():
        data = path.read_bytes()
        at = 0
        while at < len(data):  # TFRecord: length, its CRC, the record, its CRC
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                found.append((value.tag, event.step, value.simple_value))
    return found


def test_tensorboard_gets_the_metrics(tmp_path):
    board = tmp_path / "board"
    result = _train(["--data", DATA, "--val", VAL, "--epochs", "2", "--log-every", "20",
                     "--tensorboard", str(board), "--out", str(tmp_path / "m.onnx"), "-q"])
    assert result.exit_code == 0, result.output
    scalars = _scalars(board)
    tags = {tag for tag, _, _ in scalars}
    assert {"loss/train", "loss/val", "accuracy/val", "lr", "loss/step"} <= tags
    val = sorted((step, value) for tag, step, value in scalars if tag == "accuracy/val")
    assert [step for step, _ in val] == [45, 90] and all(v > 0.8 for _, v in val)
