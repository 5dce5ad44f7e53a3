"""The CLI's profiling and TrainingInfoProto modes."""

import numpy as np
import onnx
from click.testing import CliRunner

import onnxgrad
from onnxgrad.tools.cli import main
from test_training_ops import _linear_regression_with_training_info


def test_train_profile_prints_time_by_op(tmp_path):
    out = tmp_path / "t.onnx"
    result = CliRunner().invoke(main, [
        "train", "models/digits_mlp.onnx", "--data", "models/digits_test.npz", "--epochs", "1",
        "--profile", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "profile over" in result.output and "Gemm" in result.output
    assert "(optimizer update)" in result.output


def test_train_with_training_info(tmp_path):
    model_path, data_path, out = tmp_path / "lr.onnx", tmp_path / "d.npz", tmp_path / "out.onnx"
    onnx.save(_linear_regression_with_training_info(lr=0.01), model_path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 2)).astype(np.float32)
    np.savez(data_path, x=x, t=x @ np.array([[2.0], [-1.0]], np.float32))
    result = CliRunner().invoke(main, ["train", str(model_path), "--data", str(data_path),
                                       "--training-info", "--steps", "40", "--batch-size", "16",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "40 step(s)" in result.output and "last step: loss" in result.output
    trained = onnxgrad.load(out).parameters()["W"]
    np.testing.assert_allclose(trained, [[2.0], [-1.0]], atol=0.05)  # converged from W = 0.5


def test_training_info_data_key_missing(tmp_path):
    model_path, data_path = tmp_path / "lr.onnx", tmp_path / "d.npz"
    onnx.save(_linear_regression_with_training_info(), model_path)
    np.savez(data_path, x=np.ones((4, 2), np.float32))
    result = CliRunner().invoke(main, ["train", str(model_path), "--data", str(data_path),
                                       "--training-info"])
    assert result.exit_code != 0
    assert "lacks key(s) for the training algorithm's inputs: t (key 't')" in result.output and "Traceback" not in result.output


def test_language_model_fine_tunes_with_class_axis_and_prints_perplexity(tmp_path):
    out = tmp_path / "lm.onnx"
    result = CliRunner().invoke(main, [
        "train", "models/tiny_lm.onnx", "--data", "models/tiny_lm_corpus.npz",
        "--val", "models/tiny_lm_val.npz", "--class-axis", "-1", "--epochs", "2", "--quiet",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    before = [ln for ln in result.output.splitlines() if ln.startswith("before:")][0]
    after = [ln for ln in result.output.splitlines() if ln.startswith("after:")][0]
    ppl = lambda line: float(line.split("val_ppl ")[1].split()[0])  # noqa: E731
    assert ppl(after) < ppl(before)
    evaluated = CliRunner().invoke(main, ["eval", str(out), "--data", "models/tiny_lm_val.npz",
                                          "--class-axis", "-1"])
    assert evaluated.exit_code == 0, evaluated.output
    assert f"perplexity: {ppl(after):.3f}" in evaluated.output


def test_ignored_labels_do_not_count(tmp_path):
    data = np.load("models/tiny_lm_val.npz")
    label = data["label"].copy()
    label[:, :16] = -100  # the first half of each window is padding
    path = tmp_path / "padded.npz"
    np.savez(path, tokens=data["tokens"], label=label)
    args = ["eval", "models/tiny_lm.onnx", "--class-axis", "-1"]
    full = CliRunner().invoke(main, args + ["--data", "models/tiny_lm_val.npz"])
    half = CliRunner().invoke(main, args + ["--data", str(path), "--ignore-index", "-100"])
    assert half.exit_code == 0, half.output
    counted = lambda text: int(text.split("/")[-1].split(")")[0])  # noqa: E731
    assert counted(half.output) * 2 == counted(full.output)
    bad = CliRunner().invoke(main, args + ["--data", str(path)])
    assert bad.exit_code != 0 and "-100" in bad.output and "Traceback" not in bad.output


def test_class_options_need_a_class_loss():
    result = CliRunner().invoke(main, ["eval", "models/digits_mlp.onnx", "--data",
                                       "models/digits_test.npz", "--loss", "mse", "--class-axis", "1"])
    assert result.exit_code != 0 and "apply to class losses" in result.output


def test_frozen_backbone_batchnorm_in_eval_mode(tmp_path):
    out = tmp_path / "cnn.onnx"
    result = CliRunner().invoke(main, [
        "train", "models/digits_cnn.onnx", "--data", "models/digits_train.npz",
        "--freeze", "features.*", "--frozen-batchnorm", "eval", "--epochs", "1", "--quiet",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    before = onnxgrad.load("models/digits_cnn.onnx").parameters()
    after = onnxgrad.load(out).parameters()
    for name in before:
        if name.startswith("features."):  # weights and running statistics alike
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert not np.array_equal(after["head.weight"], before["head.weight"])
