"""The ``onnxgrad`` command line: help, inspect, train, eval, ops and every error path."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxgrad.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_mlp.onnx"
TRAIN = ROOT / "models" / "digits_train.npz"
TEST = ROOT / "models" / "digits_test.npz"

ort = pytest.importorskip("onnxruntime")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output
    return result.output


def failed(result, *names):
    """A clean failure: non-zero exit, one 'Error: ...' line naming ``names``, no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    out = result.output
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, out
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def digits(path=TEST):
    d = np.load(path)
    return d["input"], d["label"]


def ort_logits(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def metric(output, line_prefix, name):
    line = next(line for line in output.splitlines() if line.startswith(line_prefix))
    return float(re.search(rf"\b{name} ([0-9.]+)", line).group(1))


# -- help ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["inspect"], ["train"], ["eval"], ["ops"]])
def test_help(command):
    out = ok(invoke(*command, "--help"))
    assert "Usage:" in out
    assert "Examples:" in out
    if not command:
        for name in ("inspect", "train", "eval", "ops"):
            assert name in out


def test_version():
    assert "0.1.0" in ok(invoke("--version"))


# -- inspect ---------------------------------------------------------------------------
def test_inspect_digits():
    out = ok(invoke("inspect", MODEL))
    assert re.search(r"input\s+float32\s+\[batch, 64\]", out)
    assert re.search(r"logits\s+float32\s+\[batch, 10\]", out)
    # 64*32 + 32 + 32*10 + 10 weights of float32
    assert "4 tensors, 2,410 values, 9,640 bytes" in out
    assert re.search(r"Gemm\s+17\s+2\s+yes\s+yes", out)
    assert re.search(r"Relu\s+17\s+1\s+yes\s+yes", out)
    assert "ops without a gradient rule: none" in out


def test_inspect_trainable_and_freeze():
    out = ok(invoke("inspect", MODEL, "--freeze", "0.*"))
    assert re.search(r"0\.weight .* frozen", out)
    assert re.search(r"2\.weight .* trainable", out)
    assert "trainable: 2 of 4 tensors, 330 values" in out
    out = ok(invoke("inspect", MODEL, "--trainable", "*.bias"))
    assert re.search(r"0\.bias .* trainable", out)
    assert re.search(r"2\.weight .* frozen", out)


def test_inspect_unknown_op(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"]),
         helper.make_node("Frobnicate", ["h"], ["y"], domain="com.example")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    path = tmp_path / "odd.onnx"
    onnx.save(model, path)
    result = invoke("inspect", path)
    if result.exit_code != 0:  # the loader may refuse unknown ops outright: fine if clean
        failed(result, "Frobnicate")
        return
    assert re.search(r"com\.example::Frobnicate\s+1\s+1\s+NO", result.output)
    assert "without a forward kernel" in result.output


def _no_grad_model(path):
    """x @ w -> com.test.cli::Wobble (a kernel without a gradient rule) -> y."""
    from onnxgrad.ops import is_registered, op

    if not is_registered("Wobble", "com.test.cli", 1):
        @op("Wobble", since=1, domain="com.test.cli", differentiable=("X",))
        def Wobble(xp, X):
            return (X * 2,)

    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Wobble", ["h"], ["y"], domain="com.test.cli", name="wob")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.test.cli", 1)]), path)


def test_inspect_and_train_op_without_gradient(tmp_path):
    model = tmp_path / "wobble.onnx"
    _no_grad_model(model)
    out = ok(invoke("inspect", model))
    assert re.search(r"com\.test\.cli::Wobble\s+1\s+1\s+yes\s+no", out)
    assert "ops without a gradient rule: com.test.cli::Wobble" in out
    assert "would fail at: wob (Wobble)" in out
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((8, 4), np.float32), y=np.zeros((8, 2), np.float32))
    failed(invoke("train", model, "--data", data, "--loss", "mse", "--out", tmp_path / "o.onnx"),
           "Wobble", "wob")


def test_ops_lists_registry():
    out = ok(invoke("ops"))
    assert re.search(r"^Gemm\s+\d+\s+yes", out, re.M)
    out = ok(invoke("ops", "Relu"))
    assert "Gemm" not in out
    failed(invoke("ops", "NoSuchOp*"), "NoSuchOp*")


# -- train -----------------------------------------------------------------------------
def test_train_digits(tmp_path):
    out_path = tmp_path / "trained.onnx"
    before_hash = sha(MODEL)
    out = ok(invoke("train", MODEL, "--data", TRAIN, "--val", TEST, "--epochs", 2,
                    "--out", out_path))
    assert sha(MODEL) == before_hash  # the input model is untouched
    assert re.search(r"^epoch 1/2: step_loss [0-9.]+  train_loss [0-9.]+  train_acc [0-9.]+", out, re.M)
    assert re.search(r"^epoch 2/2: .*val_acc [0-9.]+", out, re.M)
    acc_before = metric(out, "before:", "val_acc")
    acc_after = metric(out, "after:", "val_acc")
    assert metric(out, "before:", "train_acc") < metric(out, "after:", "train_acc")
    assert acc_before < acc_after
    assert f"saved {out_path}" in out

    # The written model runs in onnxruntime and reproduces the printed accuracy.
    x, y = digits(TEST)
    logits = ort_logits(out_path, x)
    assert abs(float((logits.argmax(1) == y).mean()) - acc_after) < 1e-3
    # Same graph as the input, only the weights differ.
    src, dst = onnx.load(MODEL), onnx.load(out_path)
    assert [n.op_type for n in src.graph.node] == [n.op_type for n in dst.graph.node]
    assert not np.array_equal(numpy_helper.to_array(src.graph.initializer[0]),
                              numpy_helper.to_array(dst.graph.initializer[0]))


def test_train_default_out_and_freeze(tmp_path):
    model = tmp_path / "digits_mlp.onnx"
    shutil.copy(MODEL, model)
    before_hash = sha(model)
    out = ok(invoke("train", model, "--data", TRAIN, "--epochs", 1, "--optimizer", "sgd",
                    "--lr", 0.05, "--momentum", 0.9, "--freeze", "0.*", "--val-split", 0.25,
                    "--quiet"))
    assert sha(model) == before_hash
    trained = tmp_path / "digits_mlp_trained.onnx"
    assert trained.exists()
    assert "training 2 of 4 parameter tensors" in out
    assert "epoch 1/1" not in out  # --quiet
    metric(out, "after:", "val_acc")  # --val-split gives validation metrics
    src = {t.name: numpy_helper.to_array(t) for t in onnx.load(model).graph.initializer}
    dst = {t.name: numpy_helper.to_array(t) for t in onnx.load(trained).graph.initializer}
    np.testing.assert_array_equal(src["0.weight"], dst["0.weight"])
    np.testing.assert_array_equal(src["0.bias"], dst["0.bias"])
    assert not np.array_equal(src["2.weight"], dst["2.weight"])


@pytest.mark.gpu
def test_train_on_cuda_matches_cpu(tmp_path):
    args = ["train", MODEL, "--data", TRAIN, "--epochs", 1, "--quiet"]
    ok(invoke(*args, "--device", "cuda", "--out", tmp_path / "gpu.onnx"))
    ok(invoke(*args, "--device", "cpu", "--out", tmp_path / "cpu.onnx"))
    gpu = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "gpu.onnx").graph.initializer}
    cpu = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "cpu.onnx").graph.initializer}
    for name in cpu:
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-4, atol=1e-5)


def test_train_float64_input_is_cast(tmp_path):
    x, y = digits(TEST)
    data = tmp_path / "f64.npz"
    np.savez(data, x=x.astype(np.float64), y=y)  # also exercises the 'x'/'y' key defaults
    out = ok(invoke("train", MODEL, "--data", data, "--epochs", 1, "--optimizer", "adamw",
                    "--out", tmp_path / "o.onnx"))
    assert "input <- 'x'; target <- 'y'" in out


def _linear_model(path, outputs=1, log_softmax=False, input_name="features"):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(3, outputs)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(outputs, np.float32), "b")
    nodes = [helper.make_node("MatMul", [input_name, "w"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["z" if log_softmax else "pred"])]
    if log_softmax:
        nodes.append(helper.make_node("LogSoftmax", ["z"], ["pred"], axis=1))
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("pred", TensorProto.FLOAT, ["N", outputs])], [w, b])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("loss", ["mse", "l1", "bce_with_logits", "nll"])
def test_train_other_losses(tmp_path, loss):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    score = x @ np.array([1.0, -2.0, 0.5], np.float32)
    model = tmp_path / "lin.onnx"
    if loss == "nll":
        _linear_model(model, outputs=3, log_softmax=True)
        y = np.digitize(score, [-1.0, 1.0]).astype(np.int64)
    else:
        _linear_model(model)
        y = (score > 0).astype(np.float32) if loss == "bce_with_logits" else score
    data = tmp_path / "d.npz"
    np.savez(data, features=x, target=y)  # input named like the model input; target 'target'
    out = ok(invoke("train", model, "--data", data, "--loss", loss, "--epochs", 3,
                    "--optimizer", "sgd", "--lr", 0.1, "--batch-size", 16))
    assert metric(out, "after:", "train_loss") < metric(out, "before:", "train_loss")
    assert ("train_acc" in out) == (loss == "nll")
    ok(invoke("eval", tmp_path / "lin_trained.onnx", "--data", data, "--loss", loss))


def test_train_internal_output(tmp_path):
    # cross-entropy on the logits 'z' that feed the final LogSoftmax
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    model = tmp_path / "lin.onnx"
    _linear_model(model, outputs=3, log_softmax=True)
    data = tmp_path / "d.npz"
    np.savez(data, input=x, label=y)
    out = ok(invoke("train", model, "--data", data, "--output", "z", "--epochs", 2,
                    "--lr", 0.05, "--out", tmp_path / "o.onnx"))
    assert "loss cross_entropy on 'z'" in out
    out = ok(invoke("eval", tmp_path / "o.onnx", "--data", data, "--output", "z"))
    assert "cross_entropy on 'z'" in out


def test_fixed_batch_model(tmp_path):
    """A model exported without a dynamic batch axis: batch size taken from it."""
    proto = onnx.load(MODEL)
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 7
    model = tmp_path / "fixed.onnx"
    onnx.save(proto, model)
    out = ok(invoke("eval", model, "--data", TEST))  # 360 = 51 * 7 + 3: a padded last batch
    x, y = digits(TEST)
    correct = int((ort_logits(MODEL, x).argmax(1) == y).sum())
    assert f"({correct}/360)" in out
    out = ok(invoke("train", model, "--data", TEST, "--epochs", 1))
    assert "batch size 7" in out and "leaves out 3" in out
    failed(invoke("train", model, "--data", TEST, "--batch-size", 32), "--batch-size 7")


# -- eval ------------------------------------------------------------------------------------
def test_eval_digits():
    out = ok(invoke("eval", MODEL, "--data", TEST, "--batch-size", 100))
    x, y = digits(TEST)
    logits = ort_logits(MODEL, x)
    correct = int((logits.argmax(1) == y).sum())
    assert f"accuracy: {correct / len(y):.4f} ({correct}/{len(y)})" in out
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    ce = float((lse - z[np.arange(len(y)), y]).mean())
    printed = float(re.search(r"^loss \(cross_entropy on 'logits'\): ([0-9.]+)", out, re.M).group(1))
    assert abs(printed - ce) < 1e-3


# -- errors ----------------------------------------------------------------------------------
@pytest.fixture
def bad(tmp_path):
    """Data files with one thing wrong each."""
    x, y = digits(TEST)
    files = {
        "shape": dict(input=x[:, :63], label=y),
        "rank": dict(input=x.reshape(-1, 8, 8), label=y),
        "dtype": dict(input=x > 0.5, label=y),
        "high": dict(input=x, label=y + 1),
        "neg": dict(input=x, label=y - 1),
        "frac": dict(input=x, label=y + 0.5),
        "nolabel": dict(input=x, answer=y),
        "noinput": dict(pixels=x, label=y),
        "length": dict(input=x, label=y[:-1]),
    }
    paths = {}
    for name, arrays in files.items():
        paths[name] = tmp_path / f"{name}.npz"
        np.savez(paths[name], **arrays)
    paths["text"] = tmp_path / "text.npz"
    paths["text"].write_text("not an archive")
    paths["npy"] = tmp_path / "array.npy"
    np.save(paths["npy"], x)
    paths["model_text"] = tmp_path / "model.onnx"
    paths["model_text"].write_text("not a model")
    paths["missing"] = tmp_path / "missing.npz"
    return paths


@pytest.mark.parametrize("command", ["train", "eval"])
def test_data_errors(bad, command, tmp_path):
    def run(data, *extra):
        args = [command, MODEL, "--data", data, *extra]
        if command == "train":
            args += ["--epochs", 1, "--out", tmp_path / "never.onnx"]
        return invoke(*args)

    failed(run(bad["missing"]), "missing.npz", "does not exist")
    failed(run(bad["text"]), "text.npz", ".npz")
    failed(run(bad["npy"]), "array.npy", ".npy")
    failed(run(bad["shape"]), "'input'", "64", "63")
    failed(run(bad["rank"]), "'input'", "[batch, 64]", "(360, 8, 8)")
    failed(run(bad["dtype"]), "'input'", "float32", "bool")
    failed(run(bad["high"]), "'label'", "10 classes", "10")
    failed(run(bad["neg"]), "'label'", "-1")
    failed(run(bad["frac"]), "'label'", "integer")
    failed(run(bad["nolabel"]), "--target-key", "'answer'", "'input'")
    failed(run(bad["noinput"]), "'input'", "'pixels'", "--input-key")
    failed(run(bad["length"]), "'input' has 360", "'label' has 359")
    failed(run(TEST, "--input-key", "pixels"), "'pixels'", "'input', 'label'")
    failed(run(TEST, "--target-key", "answer"), "'answer'", "'input', 'label'")
    failed(run(TEST, "--input-key", "nope=input"), "'nope'")
    failed(run(TEST, "--loss", "hinge"), "'hinge'", "cross_entropy")
    failed(run(TEST, "--loss", "mse"), "'label'", "mse", "(360,)")
    failed(run(TEST, "--output", "nowhere"), "'nowhere'")
    assert not (tmp_path / "never.onnx").exists()


@pytest.mark.parametrize("command", ["train", "eval", "inspect"])
def test_model_errors(bad, command):
    data = [] if command == "inspect" else ["--data", TEST]
    failed(invoke(command, bad["model_text"], *data), "model.onnx")
    failed(invoke(command, bad["missing"].with_suffix(".onnx"), *data), "missing.onnx",
           "does not exist")


def test_train_option_errors(tmp_path):
    base = ["train", MODEL, "--data", TEST, "--epochs", 1]
    failed(invoke(*base, "--optimizer", "rmsprop"), "'rmsprop'", "sgd")
    failed(invoke(*base, "--momentum", 0.9), "--momentum", "sgd")
    failed(invoke(*base, "--lr", -1), "--lr")
    failed(invoke(*base, "--epochs", 0), "--epochs")
    failed(invoke(*base, "--batch-size", 0), "--batch-size")
    failed(invoke(*base, "--val", TEST, "--val-split", 0.1), "--val-split")
    failed(invoke(*base, "--val-split", 1.5), "--val-split")
    failed(invoke(*base, "--trainable", "fc*"), "'fc*'", "0.weight")
    failed(invoke(*base, "--freeze", "*"), "no parameters left")
    failed(invoke(*base, "--out", tmp_path / "no" / "such" / "dir.onnx"), "does not exist")
    failed(invoke(*base, "--val", tmp_path / "absent.npz"), "absent.npz")
    failed(invoke("inspect", MODEL, "--freeze", "fc*"), "'fc*'")


def test_console_script_error_is_one_line(tmp_path):
    """The real entry point (not CliRunner): one line on stderr, exit status 1."""
    proc = subprocess.run(
        [sys.executable, "-m", "onnxgrad.tools.cli", "eval", str(MODEL),
         "--data", str(tmp_path / "absent.npz")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "ONNXGRAD_DEBUG": ""},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"Error: data file {str(tmp_path / 'absent.npz')!r} does not exist"]
    assert "Traceback" not in proc.stderr + proc.stdout
