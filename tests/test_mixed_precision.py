"""Mixed precision (Trainer(precision="bf16" | "fp16")): the autocast transform, training
in the low types, fp16 loss scaling and its checkpoints, saved models and the CLI."""

import copy

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import onnxgrad
from helpers import helper, make_model
from onnxgrad.errors import OnnxgradError
from onnxgrad.precision import LossScaler, autocast
from onnxgrad.tools.cli import main

BF16 = np.dtype(ml_dtypes.bfloat16)
#: Machine epsilon of each low type: gradients must agree with float32 within a few.
EPS = {"bf16": 2.0 ** -7, "fp16": 2.0 ** -10}
LOW = {"bf16": BF16, "fp16": np.dtype(np.float16)}

_digits = np.load("models/digits_train.npz")
X, Y = _digits["input"][:64].astype(np.float32), _digits["label"][:64]


def _products_model(dtype=np.float32):
    """MatMul x2 (sharing x), Add, LayerNormalization, Softmax, Einsum, Gemm."""
    rng = np.random.default_rng(0)
    inits = {name: rng.standard_normal(shape).astype(dtype) for name, shape in
             {"W1": (4, 5), "W4": (4, 5), "gamma": (5,), "beta": (5,), "W2": (5, 3),
              "W3": (3, 3), "b3": (3,)}.items()}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["mm1"], name="mm1"),
             helper.make_node("MatMul", ["x", "W4"], ["mm2"], name="mm2"),
             helper.make_node("Add", ["mm1", "mm2"], ["sum"], name="add"),
             helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["ln"], name="ln"),
             helper.make_node("Softmax", ["ln"], ["sm"], name="softmax"),
             helper.make_node("Einsum", ["sm", "W2"], ["e"], name="einsum", equation="ij,jk->ik"),
             helper.make_node("Gemm", ["e", "W3", "b3"], ["logits"], name="fc", transB=1)]
    return make_model(nodes, [("x", dtype, ["N", 4])], [("logits", dtype, ["N", 3])], inits)


# -- the transform ----------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_casts_the_inputs_and_outputs_of_products_only(precision):
    model = onnxgrad.load(_products_model())
    graph = model.graph.copy()
    added = autocast(graph, precision)
    low = LOW[precision]
    casts = [n for n in graph.nodes if n.op_type == "Cast"]
    assert sorted(n.name for n in casts) == sorted(added)
    to_low = {n.inputs[0] for n in casts if graph.dtype(n.outputs[0]) == low}
    to_float = {n.outputs[0] for n in casts if graph.dtype(n.outputs[0]) == np.float32}
    # x is read by two products but cast once; LayerNormalization's and Softmax's inputs
    # and parameters are not cast.
    assert to_low == {"x", "W1", "W4", "sm", "W2", "e", "W3", "b3"}
    assert len([n for n in casts if n.inputs[0] == "x"]) == 1
    assert to_float == {"mm1", "mm2", "e", "logits"}  # each product's output keeps its name
    for node in graph.nodes:
        if node.op_type in ("MatMul", "Einsum", "Gemm"):
            assert all(graph.dtype(x) == low for x in node.inputs + node.outputs), node
        elif node.op_type != "Cast":
            assert all(graph.dtype(x) == np.float32 for x in node.inputs + node.outputs), node
    # The model's own graph is untouched.
    assert not any(n.op_type == "Cast" for n in model.graph.nodes)
    assert model.graph.nodes[0].inputs == ["x", "W1"] and model.graph.nodes[0].outputs == ["mm1"]


def test_autocast_leaves_other_types_and_fp32_alone():
    graph = onnxgrad.load(_products_model(np.float64)).graph.copy()
    before = [(n.op_type, list(n.inputs), list(n.outputs)) for n in graph.nodes]
    assert autocast(graph, "fp16") == []
    assert [(n.op_type, n.inputs, n.outputs) for n in graph.nodes] == before
    graph = onnxgrad.load(_products_model()).graph.copy()
    assert autocast(graph, "fp32") == [] and not any(n.op_type == "Cast" for n in graph.nodes)


def test_trainer_graph_casts_convolutions_and_keeps_batchnorm_in_float32():
    tr = onnxgrad.Trainer(onnxgrad.load("models/digits_cnn.onnx"), precision="bf16")
    graph = tr.graph
    assert tr.precision == "bf16" and tr.loss_scale is None
    forward = [n for n in graph.nodes if n.name in tr.program.autocast_nodes]
    assert forward and all(n.op_type == "Cast" for n in forward)
    for node in graph.nodes:
        if node.op_type in ("Conv", "Gemm"):
            assert all(graph.dtype(x) == BF16 for x in node.inputs if x), node
        if node.op_type in ("BatchNormalization", "Relu", "MaxPool", "GlobalAveragePool"):
            assert all(graph.dtype(x) == np.float32 for x in node.inputs if x), node
    assert graph.dtype(tr.loss_value) == np.float32
    assert all(graph.dtype(g) == np.float32 for g in tr.program.grads.values())


# -- training -----------------------------------------------------------------------------

def _relative_errors(grads, reference):
    return {k: float(np.linalg.norm(grads[k] - reference[k]) / np.linalg.norm(reference[k]))
            for k in reference}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mlp_gradients_agree_with_float32_and_training_reduces_the_loss(precision):
    reference = onnxgrad.Trainer(onnxgrad.load("models/digits_mlp.onnx")).gradients(
        {"input": X}, Y)
    tr = onnxgrad.Trainer(onnxgrad.load("models/digits_mlp.onnx"), precision=precision,
                          optimizer=onnxgrad.SGD(lr=0.1, momentum=0.9))
    grads = tr.gradients({"input": X}, Y)
    assert all(g.dtype == np.float32 for g in grads.values())
    errors = _relative_errors(grads, reference)
    assert max(errors.values()) < 4 * EPS[precision], errors
    losses = [tr.step({"input": X}, Y) for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0]
    assert tr.skipped_steps == 0 and tr.steps == 15
    assert all(v.dtype == np.float32 for v in tr.model.parameters().values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cnn_gradients_agree_with_float32_and_training_reduces_the_loss(precision):
    reference = onnxgrad.Trainer(onnxgrad.load("models/digits_cnn.onnx")).gradients(
        {"input": X}, Y)
    tr = onnxgrad.Trainer(onnxgrad.load("models/digits_cnn.onnx"), precision=precision,
                          optimizer=onnxgrad.Adam(lr=0.01))
    grads = tr.gradients({"input": X}, Y)
    # The first convolution's bias feeds a BatchNormalization, which removes it: its exact
    # gradient is zero, and the low type leaves only rounding noise there (a sum of 4096
    # rounded terms, which NumPy adds up in bfloat16 itself).
    bias = grads.pop("features.0.bias")
    reference.pop("features.0.bias")
    assert np.abs(bias).max() < 64 * EPS[precision] * np.abs(reference["features.0.weight"]).max()
    errors = _relative_errors(grads, reference)
    # The layers before BatchNormalization lose more to rounding: it subtracts the mean
    # of values rounded to the low type.
    assert max(errors.values()) < 32 * EPS[precision], errors
    assert errors["head.weight"] < 4 * EPS[precision], errors
    first = tr.step({"input": X}, Y)
    for _ in range(14):
        last = tr.step({"input": X}, Y)
    assert last < 0.7 * first


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_einsum_convtranspose_and_attention_train_in_the_low_type(precision):
    rng = np.random.default_rng(1)
    inits = {"Wq": rng.standard_normal((4, 8)).astype(np.float32) * 0.5,
             "Wt": rng.standard_normal((2, 3, 2, 2)).astype(np.float32) * 0.5,
             "bt": np.zeros(3, np.float32)}
    nodes = [helper.make_node("Einsum", ["x", "Wq"], ["q"], name="proj", equation="bsi,ij->bsj"),
             helper.make_node("Attention", ["q", "q", "q"], ["att"], name="attention",
                              q_num_heads=2, kv_num_heads=2),
             helper.make_node("Reshape", ["att", "shape"], ["img"], name="reshape"),
             helper.make_node("ConvTranspose", ["img", "Wt", "bt"], ["y"], name="deconv",
                              strides=[2, 2])]
    inits["shape"] = np.array([-1, 2, 4, 4], np.int64)
    proto = make_model(nodes, [("x", np.float32, [2, 4, 4])], [("y", np.float32, [2, 3, 8, 8])],
                       inits, opset=23)
    x = rng.standard_normal((2, 4, 4)).astype(np.float32)
    t = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    reference = onnxgrad.Trainer(onnxgrad.load(proto), loss="mse").gradients({"x": x}, t)
    tr = onnxgrad.Trainer(onnxgrad.load(proto), loss="mse", precision=precision)
    einsum = next(n for n in tr.graph.nodes if n.op_type == "Einsum")
    # NumPy's einsum takes float16 but not bfloat16: there Einsum stays in float32.
    expected = np.float32 if precision == "bf16" else LOW[precision]
    assert tr.graph.dtype(einsum.inputs[0]) == expected
    attention = next(n for n in tr.graph.nodes if n.op_type == "Attention")
    assert attention.attrs["softmax_precision"] == 1  # the softmax stays in float32
    assert tr.graph.dtype(attention.inputs[0]) == LOW[precision]
    grads = tr.gradients({"x": x}, t)
    errors = _relative_errors(grads, {k: v for k, v in reference.items() if k != "bt"})
    assert max(errors.values()) < 8 * EPS[precision], errors
    np.testing.assert_allclose(grads["bt"], reference["bt"], rtol=8 * EPS[precision],
                               atol=8 * EPS[precision] * np.abs(reference["bt"]).max())


# -- fp16 loss scaling ------------------------------------------------------------------

def _state(trainer):
    state = trainer.state_dict()
    return state["weights"], copy.deepcopy(state["optimizer"]["state"])


# Overflows are the point here; the pool's helper threads report them as warnings.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_an_overflowing_fp16_step_is_skipped_and_the_scale_halves():
    tr = onnxgrad.Trainer(onnxgrad.load("models/digits_cnn.onnx"), precision="fp16",
                          optimizer=onnxgrad.Adam(lr=0.01))
    assert tr.loss_scale == 2.0 ** 16
    for _ in range(2):
        tr.step({"input": X}, Y)
    weights, optimizer_state = _state(tr)
    assert "features.1.running_mean" in weights  # running statistics are checked too
    tr.loss_scaler.scale = 2.0 ** 40  # every float16 gradient overflows
    loss = tr.step({"input": X}, Y)
    assert np.isfinite(loss)
    assert tr.skipped_steps == 1 and tr.steps == 2 and tr.loss_scale == 2.0 ** 39
    after_weights, after_optimizer = _state(tr)
    for name, value in weights.items():
        assert after_weights[name].tobytes() == value.tobytes(), name
    for param, entries in optimizer_state.items():
        for key, value in entries.items():
            if hasattr(value, "tobytes"):
                assert after_optimizer[param][key].tobytes() == value.tobytes(), (param, key)
            else:
                assert after_optimizer[param][key] == value, (param, key)
    # The scale comes down step by step until the gradients fit; then steps are taken.
    while tr.steps == 2:
        tr.step({"input": X}, Y)
    assert tr.loss_scale <= 2.0 ** 16 and tr.skipped_steps > 1
    assert not np.array_equal(tr.state_dict()["weights"]["head.weight"], weights["head.weight"])


# Overflows are the point here; the pool's helper threads report them as warnings.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_the_loss_scale_grows_after_growth_interval_good_steps():
    tr = onnxgrad.Trainer(onnxgrad.load("models/digits_mlp.onnx"), precision="fp16",
                          loss_scaler=LossScaler(init_scale=256.0, growth_interval=3))
    for _ in range(2):
        tr.step({"input": X}, Y)
    assert tr.loss_scale == 256.0 and tr.loss_scaler.growth_tracker == 2
    tr.step({"input": X}, Y)
    assert tr.loss_scale == 512.0 and tr.loss_scaler.growth_tracker == 0
    tr.loss_scaler.scale = 2.0 ** 40
    tr.step({"input": X}, Y)
    assert tr.loss_scale == 2.0 ** 39 and tr.loss_scaler.growth_tracker == 0


def test_loss_scaling_works_with_clipping_and_accumulation():
    tr = onnxgrad.Trainer(onnxgrad.load("models/digits_mlp.onnx"), precision="fp16",
                          optimizer=onnxgrad.SGD(lr=0.1))
    tr.clip_grad_norm, tr.accumulate = 0.5, 2
    ref = onnxgrad.Trainer(onnxgrad.load("models/digits_mlp.onnx"), optimizer=onnxgrad.SGD(lr=0.1))
    ref.clip_grad_norm, ref.accumulate = 0.5, 2
    for trainer in (tr, ref):
        trainer.step({"input": X[:32]}, Y[:32])
        trainer.step({"input": X[32:]}, Y[32:])
    assert tr.steps == ref.steps == 1
    assert tr.last_grad_norm == pytest.approx(ref.last_grad_norm, rel=4 * EPS["fp16"])
    for name, value in ref.model.parameters().items():
        np.testing.assert_allclose(tr.model.parameters()[name], value, rtol=0, atol=1e-3)


# Overflows are the point here; the pool's helper threads report them as warnings.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_the_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    def make():
        return onnxgrad.Trainer(onnxgrad.load("models/digits_cnn.onnx"), precision="fp16",
                                optimizer=onnxgrad.Adam(lr=0.01),
                                loss_scaler=LossScaler(init_scale=2.0 ** 20, growth_interval=4))
    tr = make()
    for _ in range(6):
        tr.step({"input": X}, Y)
    assert tr.skipped_steps >= 1
    state = (tr.loss_scale, tr.loss_scaler.growth_tracker, tr.skipped_steps, tr.steps)
    tr.save_checkpoint(tmp_path / "run.ckpt")
    restored = make()
    restored.load_checkpoint(tmp_path / "run.ckpt")
    assert (restored.loss_scale, restored.loss_scaler.growth_tracker, restored.skipped_steps,
            restored.steps) == state
    for _ in range(3):
        assert restored.step({"input": X}, Y) == tr.step({"input": X}, Y)
    assert restored.loss_scale == tr.loss_scale
    # A trainer that does not scale the loss reads the checkpoint too, and ignores the scale.
    plain = onnxgrad.Trainer(onnxgrad.load("models/digits_cnn.onnx"),
                             optimizer=onnxgrad.Adam(lr=0.01))
    plain.load_checkpoint(tmp_path / "run.ckpt")
    assert plain.loss_scale is None and plain.state_dict()["scaler"] is None
    broken = tr.state_dict()
    broken["scaler"] = {"scale": -1.0, "growth_tracker": 0}
    with pytest.raises(onnxgrad.CheckpointError, match="loss scale"):
        restored.load_state_dict(broken)


def test_precision_errors_name_the_option():
    model = onnxgrad.load("models/digits_mlp.onnx")
    with pytest.raises(OnnxgradError, match="precision must be one of .*'fp8'"):
        onnxgrad.Trainer(model, precision="fp8")
    with pytest.raises(OnnxgradError, match="loss_scaler .*precision='bf16'"):
        onnxgrad.Trainer(model, precision="bf16", loss_scaler=LossScaler())
    with pytest.raises(OnnxgradError, match="growth_interval"):
        LossScaler(growth_interval=0)
    with pytest.raises(OnnxgradError, match="backoff_factor"):
        LossScaler(backoff_factor=1.5)


# -- saved models --------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_saved_model_has_float32_weights_and_runs_in_onnxruntime(precision, tmp_path):
    model = onnxgrad.load("models/digits_cnn.onnx")
    tr = onnxgrad.Trainer(model, precision=precision, optimizer=onnxgrad.Adam(lr=0.01))
    for _ in range(3):
        tr.step({"input": X}, Y)
    path = tmp_path / "trained.onnx"
    model.save(path)
    saved = onnx.load(path)
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in saved.graph.initializer)
    assert not any(n.op_type == "Cast" for n in saved.graph.node)
    original = onnx.load("models/digits_cnn.onnx")
    assert [n.op_type for n in saved.graph.node] == [n.op_type for n in original.graph.node]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": X})
    np.testing.assert_allclose(logits, model.run({"input": X})["logits"], rtol=1e-4, atol=1e-4)


# -- the command line --------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cli_trains_in_mixed_precision(precision, tmp_path):
    out = tmp_path / "t.onnx"
    result = CliRunner().invoke(main, [
        "train", "models/digits_mlp.onnx", "--data", "models/digits_test.npz", "--epochs", "2",
        "--precision", precision, "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{precision} mixed precision" in result.output
    assert ("fp16 loss scale" in result.output) == (precision == "fp16")
    before = float(result.output.split("before: train_loss ")[1].split()[0])
    after = float(result.output.split("after: train_loss ")[1].split()[0])
    assert after < before
    saved = onnx.load(out)
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in saved.graph.initializer)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_cli_refuses_a_bad_precision_and_training_info(tmp_path):
    result = CliRunner().invoke(main, [
        "train", "models/digits_mlp.onnx", "--data", "models/digits_test.npz",
        "--precision", "fp8"])
    assert result.exit_code == 2
    assert "Invalid value for '--precision': 'fp8' is not one of 'fp32', 'bf16', 'fp16'" \
        in result.output
    result = CliRunner().invoke(main, [
        "train", "models/digits_mlp.onnx", "--data", "models/digits_test.npz",
        "--training-info", "--precision", "bf16", "--out", str(tmp_path / "t.onnx")])
    assert result.exit_code == 1
    assert "--precision bf16" in result.output and "--training-info" in result.output


def test_bias_and_einsum_gradients_of_narrow_floats_accumulate_in_float32():
    """A bias gradient of bfloat16 or float16 values is summed in float32 (as PyTorch
    does), then rounded once; EinsumGrad takes bfloat16 as Einsum does."""
    import ml_dtypes
    from onnxgrad.ops.conv import BiasGrad
    from onnxgrad.ops.math import EinsumGrad

    rng = np.random.default_rng(0)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        dY = rng.standard_normal((16, 4, 16, 16)).astype(dtype)
        (got,) = BiasGrad(np, dY)
        exact = dY.astype(np.float64).sum(axis=(0, 2, 3))
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, exact.astype(np.float32).astype(dtype))
    a = rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal((5, 2)).astype(ml_dtypes.bfloat16)
    dy = rng.standard_normal((3, 2)).astype(ml_dtypes.bfloat16)
    (da,) = EinsumGrad(np, dy, a, b, equation="ij,jk->ik", wrt=0)
    assert da.dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(da.astype(np.float32),
                               (dy.astype(np.float32) @ b.astype(np.float32).T)
                               .astype(ml_dtypes.bfloat16).astype(np.float32))
