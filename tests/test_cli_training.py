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
    assert "lacks key(s) ['t']" in result.output and "Traceback" not in result.output
