"""Saving files: atomic, with the mode a user expects, and no temporary file left behind
by a writer that died; --out never names an input, and an unwritable folder is found
before training."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import onnxgrad
from onnxgrad.tools.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_mlp.onnx"
DATA = ROOT / "models" / "digits_train.npz"


def test_a_new_file_gets_the_umask_and_an_old_one_keeps_its_mode(tmp_path):
    model = onnxgrad.load(MODEL)
    old = os.umask(0o022)
    try:
        model.save(tmp_path / "new.onnx")
    finally:
        os.umask(old)
    assert (tmp_path / "new.onnx").stat().st_mode & 0o777 == 0o644
    (tmp_path / "new.onnx").chmod(0o640)
    model.save(tmp_path / "new.onnx")
    assert (tmp_path / "new.onnx").stat().st_mode & 0o777 == 0o640


def test_the_temporary_file_of_a_dead_writer_is_removed_on_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".m.onnx.{dead}.abcd.tmp"
    stale.write_bytes(b"half a model")
    alive = tmp_path / f".m.onnx.{os.getppid()}.efgh.tmp"  # a live writer's: kept
    alive.write_bytes(b"being written")
    onnxgrad.load(MODEL).save(tmp_path / "m.onnx")
    assert not stale.exists() and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "m.onnx"]


@pytest.mark.parametrize("which", ["model", "data"])
def test_out_may_not_name_an_input(tmp_path, which):
    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    model.write_bytes(MODEL.read_bytes())
    data.write_bytes(DATA.read_bytes())
    before = {p: p.read_bytes() for p in (model, data)}
    target = model if which == "model" else data
    result = CliRunner().invoke(main, ["train", str(model), "--data", str(data), "--out",
                                       str(target), "--epochs", "1", "-q"])
    assert result.exit_code != 0 and "would be overwritten" in result.output
    assert {p: p.read_bytes() for p in (model, data)} == before


def test_an_unwritable_folder_is_found_before_training():
    result = CliRunner().invoke(main, ["train", str(MODEL), "--data", str(DATA), "--out",
                                       "/proc/trained.onnx", "--epochs", "1"])
    assert result.exit_code != 0 and "is not writable" in result.output
    assert "training" not in result.output.split("Error")[0]  # refused before any training


def test_sigkill_during_saves_never_corrupts_and_leaves_nothing_after_the_next_save(tmp_path):
    import signal
    import time

    target = tmp_path / "m.onnx"
    onnxgrad.load(MODEL).save(target)
    script = ("import sys, onnxgrad\n"
              f"m = onnxgrad.load({str(MODEL)!r})\n"
              "print('ready', flush=True)\n"
              "while True:\n"
              f"    m.save({str(target)!r})\n")
    rng = np.random.default_rng(0)
    for delay in rng.uniform(0.05, 0.4, size=4):
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        child.stdout.readline()
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        onnxgrad.load(target)  # never a torn file: a whole model, old or new
    onnxgrad.load(MODEL).save(target)  # the next save clears what the dead writers left
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
