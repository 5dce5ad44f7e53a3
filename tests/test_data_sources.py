"""Data sources of ``onnxgrad train`` besides .npz: a folder of .npy files (memory-mapped),
CSV and Parquet tables, and an image folder (one subfolder of images per class)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxgrad
from helpers import helper, make_model
from onnxgrad.tools.cli import main
from onnxgrad.tools import data as D

ROOT = pathlib.Path(__file__).resolve().parent.parent
MLP = str(ROOT / "models" / "digits_mlp.onnx")
DIGITS = np.load(ROOT / "models" / "digits_train.npz")
TEST = np.load(ROOT / "models" / "digits_test.npz")


def _train(model, data, tmp_path, *extra):
    out = tmp_path / "trained.onnx"
    result = CliRunner().invoke(main, ["train", model, "--data", str(data), "--epochs", "3",
                                       "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9",
                                       "--out", str(out), "-q", *extra])
    assert result.exit_code == 0, result.output
    return onnxgrad.load(out), result.output


def _accuracy(model, x, y):
    logits = model.run({"input": x.astype(np.float32)})["logits"]
    return (logits.argmax(1) == y).mean()


def _table_columns():
    columns = {f"pixel{i}": DIGITS["input"][:, i] for i in range(64)}
    columns["digit"] = DIGITS["label"]
    return columns


def test_a_folder_of_npy_files_is_memory_mapped(tmp_path):
    folder = tmp_path / "arrays"
    folder.mkdir()
    np.save(folder / "input.npy", DIGITS["input"].astype(np.float64))  # cast batch by batch
    np.save(folder / "label.npy", DIGITS["label"])
    arrays, _ = D.load_data(str(folder))
    assert isinstance(arrays["input"], np.memmap)
    ds = D.build_dataset(arrays, str(folder), {"input": "input"}, "label",
                         {"input": (np.dtype(np.float32), ("N", 64))})
    assert isinstance(ds.feeds["input"], np.memmap)  # not read into memory
    model, _ = _train(MLP, folder, tmp_path)
    assert _accuracy(model, TEST["input"], TEST["label"]) > 0.85


def test_a_csv_table_trains_with_a_target_column(tmp_path):
    columns = _table_columns()
    path = tmp_path / "digits.csv"
    names = list(columns)
    rows = np.stack([columns[n] for n in names], axis=1)
    with open(path, "w") as f:
        f.write(",".join(names) + "\n")
        for row in rows:
            f.write(",".join(f"{v:g}" for v in row) + "\n")
    model, output = _train(MLP, path, tmp_path, "--target-column", "digit")
    assert "target <- 'label'" in output
    assert _accuracy(model, TEST["input"], TEST["label"]) > 0.85


def test_a_parquet_table_trains_with_chosen_feature_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = _table_columns()
    columns["id"] = np.array([f"row{i}" for i in range(len(columns["digit"]))])  # not numeric
    path = tmp_path / "digits.parquet"
    pq.write_table(pa.table(columns), path)
    features = ",".join(f"pixel{i}" for i in range(64))
    model, _ = _train(MLP, path, tmp_path, "--target-column", "digit", "--feature-columns",
                      features)
    assert _accuracy(model, TEST["input"], TEST["label"]) > 0.85
    result = CliRunner().invoke(main, ["train", MLP, "--data", str(path), "--target-column",
                                       "digit", "--out", str(tmp_path / "x.onnx")])
    assert result.exit_code != 0
    assert "feature column 'id'" in result.output and "is not numeric" in result.output


def _image_model():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], name="fc", transB=1)]
    inits = {"w1": (rng.standard_normal((4, 1, 3, 3)) * 0.3).astype(np.float32),
             "b1": np.zeros(4, np.float32),
             "w2": (rng.standard_normal((3, 4 * 8 * 8)) * 0.05).astype(np.float32),
             "b2": np.zeros(3, np.float32)}
    return make_model(nodes, [("input", np.float32, ["N", 1, 8, 8])],
                      [("logits", np.float32, ["N", 3])], inits)


def test_an_image_folder_trains_and_writes_its_classes(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    for digit, name in ((0, "zero"), (1, "one"), (7, "seven")):
        (folder / name).mkdir(parents=True)
        for i, pixels in enumerate(DIGITS["input"][DIGITS["label"] == digit][:40]):
            image = (pixels.reshape(8, 8) * 255).astype(np.uint8)  # pixels lie in [0, 1]
            Image.fromarray(image).resize((16, 16)).save(folder / name / f"{i}.png")
    model_path = tmp_path / "cnn.onnx"
    onnx.save(_image_model(), model_path)
    out = tmp_path / "trained.onnx"
    result = CliRunner().invoke(main, ["train", str(model_path), "--data", str(folder),
                                       "--epochs", "15", "--optimizer", "sgd", "--lr", "0.05",
                                       "--momentum", "0.9", "--mean", "0.2", "--std", "0.3",
                                       "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    classes = json.loads((tmp_path / "trained.classes.json").read_text())["classes"]
    assert classes == ["one", "seven", "zero"]
    arrays, extra = D.load_data(str(folder), D.Source(mean=(0.2,), std=(0.3,),
                                                      input_shape=("N", 1, 8, 8)))
    assert arrays["input"].shape == (120, 1, 8, 8) and extra["classes"] == classes
    logits = onnxgrad.load(out).run({"input": arrays["input"]})["logits"]
    assert (logits.argmax(1) == arrays["label"]).mean() > 0.9


@pytest.mark.parametrize("make,message", [
    (lambda p: p.mkdir(), "neither .npy files nor one subfolder"),
    (lambda p: p.with_suffix(".csv").write_text("a,b\n1\n"), "line 2 has 1 fields"),
    (lambda p: p.with_suffix(".csv").write_text("a,b\n1,2\n"), "no target column"),
])
def test_bad_sources_get_one_line(tmp_path, make, message):
    path = tmp_path / "data"
    make(path)
    target = path if path.exists() else path.with_suffix(".csv")
    result = CliRunner().invoke(main, ["train", MLP, "--data", str(target), "--out",
                                       str(tmp_path / "x.onnx")])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
