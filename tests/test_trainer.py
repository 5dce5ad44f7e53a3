"""Trainer: losses, parameter selection, feeds and targets, and their errors."""

import numpy as np
import pytest

import onnxgrad
from helpers import helper, make_model, mlp_model

X = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
Y = np.array([0, 1, 2, 0, 1, 2])


def trainer(**kw):
    kw.setdefault("loss", "cross_entropy")
    return onnxgrad.Trainer(onnxgrad.load(mlp_model()), **kw)


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _float64_linear(out_features=3):
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"], name="mm")]
    w = rng.standard_normal((4, out_features))
    return make_model(nodes, [("x", np.float64, ["N", 4])], [("z", np.float64, ["N", out_features])],
                      {"W": w}), w


# Each loss: its value from an independent NumPy formula, its gradient by
# central differences in float64.
LOSS_CASES = {
    "cross_entropy": (lambda z, t: -_log_softmax(z)[np.arange(len(t)), t].mean(),
                      lambda rng: rng.integers(0, 3, 5)),
    "nll": (lambda z, t: -z[np.arange(len(t)), t].mean(), lambda rng: rng.integers(0, 3, 5)),
    "mse": (lambda z, t: ((z - t) ** 2).mean(), lambda rng: rng.standard_normal((5, 3))),
    "l1": (lambda z, t: np.abs(z - t).mean(), lambda rng: rng.standard_normal((5, 3))),
    "bce_with_logits": (
        lambda z, t: (-(t * np.log(1 / (1 + np.exp(-z))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-z))))).mean(),
        lambda rng: rng.uniform(0, 1, (5, 3))),
}


@pytest.mark.parametrize("kind", sorted(LOSS_CASES))
def test_loss_value_and_gradient(kind):
    formula, make_target = LOSS_CASES[kind]
    rng = np.random.default_rng(7)
    proto, w = _float64_linear()
    x, t = rng.standard_normal((5, 4)), make_target(rng)
    tr = onnxgrad.Trainer(onnxgrad.load(proto), loss=kind, optimizer=onnxgrad.SGD(lr=0.0))
    grads = tr.gradients({"x": x}, t)
    assert tr.step({"x": x}, t) == pytest.approx(formula(x @ w, t), rel=1e-12)
    direction = rng.standard_normal(w.shape)
    eps = 1e-6
    numeric = (formula(x @ (w + eps * direction), t) - formula(x @ (w - eps * direction), t)) / (2 * eps)
    assert np.sum(grads["W"] * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_gradients_change_no_weight_and_step_returns_loss_before_update():
    tr = trainer(optimizer=onnxgrad.SGD(lr=0.5))
    before = tr.model.parameters()
    tr.gradients({"x": X}, Y)
    for k, v in tr.model.parameters().items():
        np.testing.assert_array_equal(v, before[k])
    z = tr.model.run({"x": X})["logits"]
    expected = -_log_softmax(z.astype(np.float64))[np.arange(6), Y].mean()
    assert tr.step({"x": X}, Y) == pytest.approx(expected, rel=1e-5)
    assert not np.array_equal(tr.model.parameters()["W0"], before["W0"])


def test_training_lowers_the_loss():
    tr = trainer(optimizer=onnxgrad.Adam(lr=0.05))
    losses = [tr.step({"x": X}, Y) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def test_loss_reads_an_inner_value():
    tr = trainer(output="z0", loss="mse")
    h = tr.model.run({"x": X}, outputs=["z0"])["z0"]
    assert tr.step({"x": X}, np.zeros_like(h)) == pytest.approx(float((h.astype(np.float64) ** 2).mean()), rel=1e-5)
    assert set(tr.trainable) == {"W0", "b0"}


@pytest.mark.parametrize("kw, match", [
    (dict(output="nope"), "output 'nope' is not a value of the graph"),
    (dict(loss="hinge"), "unknown loss 'hinge'"),
    (dict(trainable=["W9*"]), "pattern 'W9\\*' matches no initializer"),
    (dict(loss=None), "loss=None needs 'logits' to be a scalar"),
    (dict(device="tpu"), "unknown device 'tpu'"),
])
def test_configuration_errors(kw, match):
    with pytest.raises(onnxgrad.OnnxgradError, match=match):
        trainer(**kw)


def test_trainable_pattern_without_gradient_path():
    proto = mlp_model()
    proto.graph.initializer.append(helper.make_tensor("unused", 1, [1], [1.0]))
    with pytest.raises(onnxgrad.ModelError, match="no gradient path|none is a floating-point"):
        onnxgrad.Trainer(onnxgrad.load(proto), trainable="unused")


def test_trainable_globs_select_parameters():
    assert sorted(trainer(trainable="b*").trainable) == ["b0", "b1"]


@pytest.mark.parametrize("feeds, target, match", [
    ({}, Y, r"missing input\(s\) \['x'\]"),
    ({"x": X, "extra": X}, Y, r"unknown input\(s\) \['extra'\]"),
    ({"x": X.astype(np.int64)}, Y, "input 'x' expects element type float32, got int64"),
    ({"x": X[:, :3]}, Y, r"input 'x' expects shape \[\?, 4\], got \[6, 3\]"),
    ({"x": X}, Y.astype(np.float32), "needs integer class indices"),
    ({"x": X}, Y + 1, r"must lie in \[0, 3\).*\[1, 3\]"),
    ({"x": X}, Y[:, None], r"does not fit .logits. of shape \[.\?., 3\]"),
    ({"x": X}, None, "needs a target"),
])
def test_data_errors(feeds, target, match):
    with pytest.raises(onnxgrad.DataError, match=match):
        trainer().step(feeds, target)


@pytest.mark.parametrize("feeds, target, match", [
    ({"x": X}, Y + 1, r"must lie in \[0, 3\).*\[1, 3\]"),
    ({"x": X}, Y[:, None], r"does not fit .logits. of shape \[.\?., 3\]"),
    ({"x": X}, Y.astype(np.float32), "needs integer class indices"),
])
def test_data_errors_after_a_good_step(feeds, target, match):
    """A trainer checks a target's type and shape once per type and shape, and its
    class indices every step: errors still come after good steps."""
    tr = trainer()
    tr.step({"x": X}, Y)
    with pytest.raises(onnxgrad.DataError, match=match):
        tr.step(feeds, target)


def test_float64_feeds_are_cast_to_the_model_type():
    tr = trainer()
    assert np.isfinite(tr.step({"x": X.astype(np.float64)}, Y))


def test_mse_target_shape_must_match():
    tr = trainer(loss="mse")
    with pytest.raises(onnxgrad.DataError, match=r"target of shape \[6\] does not fit"):
        tr.step({"x": X}, np.zeros(6, np.float32))


def test_cuda_without_cupy_says_so():
    from onnxgrad.backend import cuda_available
    if cuda_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(onnxgrad.OnnxgradError, match="CuPy|CUDA"):
        trainer(device="cuda")


def _seq_model(layout):
    """Per-position logits from a MatMul: N×T×C ("ntc") or, transposed, N×C×T ("nct")."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"], name="mm")]
    out_shape = ["N", 6, 3]
    if layout == "nct":
        nodes.append(helper.make_node("Transpose", ["z"], ["zt"], name="t", perm=[0, 2, 1]))
        out_shape = ["N", 3, 6]
    proto = make_model(nodes, [("x", np.float64, ["N", 6, 4])],
                       [("zt" if layout == "nct" else "z", np.float64, out_shape)],
                       {"W": rng.standard_normal((4, 3))})
    return proto


def _weighted_ce(z_ntc, t, weight=None, ignore_index=None):
    logp = _log_softmax(np.moveaxis(z_ntc, -1, 1))  # N×C×T
    picked = -np.take_along_axis(logp, np.where(t == ignore_index, 0, t)[:, None], 1)[:, 0]
    w = np.ones_like(picked) if weight is None else np.asarray(weight)[np.where(t == ignore_index, 0, t)]
    if ignore_index is not None:
        w = w * (t != ignore_index)
    return (picked * w).sum() / w.sum()


@pytest.mark.parametrize("options", [
    dict(), dict(weight=(0.2, 1.0, 3.0)), dict(ignore_index=1),
    dict(weight=(0.5, 2.0, 1.0), ignore_index=2),
])
def test_cross_entropy_class_axis_weights_and_ignore_index(options):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 6, 4))
    t = rng.integers(0, 3, (2, 6))
    last = onnxgrad.Trainer(onnxgrad.load(_seq_model("ntc")),
                            loss=onnxgrad.CrossEntropy(class_axis=-1, **options),
                            optimizer=onnxgrad.SGD(lr=0.0))
    first = onnxgrad.Trainer(onnxgrad.load(_seq_model("nct")),
                             loss=onnxgrad.CrossEntropy(**options), optimizer=onnxgrad.SGD(lr=0.0))
    w = last.model.parameters()["W"]
    expected = _weighted_ce(x @ w, t, options.get("weight"), options.get("ignore_index"))
    assert last.step({"x": x}, t) == pytest.approx(expected, rel=1e-12)
    assert first.step({"x": x}, t) == pytest.approx(expected, rel=1e-12)
    g_last, g_first = last.gradients({"x": x}, t)["W"], first.gradients({"x": x}, t)["W"]
    np.testing.assert_allclose(g_last, g_first, rtol=1e-12)
    # Central differences along a random direction, in float64.
    d, eps = rng.standard_normal(w.shape), 1e-6
    numeric = (_weighted_ce(x @ (w + eps * d), t, options.get("weight"), options.get("ignore_index"))
               - _weighted_ce(x @ (w - eps * d), t, options.get("weight"), options.get("ignore_index"))) / (2 * eps)
    assert np.sum(g_last * d) == pytest.approx(numeric, rel=1e-6)


def test_ignored_targets_may_lie_outside_the_classes():
    tr = onnxgrad.Trainer(onnxgrad.load(_seq_model("ntc")),
                          loss=onnxgrad.CrossEntropy(class_axis=-1, ignore_index=-100))
    t = np.full((1, 6), -100)
    t[0, :2] = [0, 2]
    assert np.isfinite(tr.step({"x": np.ones((1, 6, 4))}, t))
    with pytest.raises(onnxgrad.DataError, match=r"must lie in \[0, 3\)"):
        tr.step({"x": np.ones((1, 6, 4))}, np.full((1, 6), 3))


def test_one_element_initializers_are_constants_unless_named():
    # y = (x @ W) * scale, with scale a one-element initializer as exporters write it.
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"], name="mm"),
             helper.make_node("Mul", ["z", "scale"], ["y"], name="scale_mul")]
    proto = make_model(nodes, [("x", np.float32, ["N", 4])], [("y", np.float32, ["N", 3])],
                       {"W": np.ones((4, 3), np.float32), "scale": np.array([0.5], np.float32)})
    assert onnxgrad.Trainer(onnxgrad.load(proto)).trainable == ["W"]
    assert onnxgrad.Trainer(onnxgrad.load(proto), trainable=["W", "scale"]).trainable == ["W", "scale"]


def test_frozen_batchnorm_eval_keeps_running_statistics():
    """A frozen backbone with frozen_batchnorm="eval" behaves as in inference."""
    data = np.load("models/digits_train.npz")
    x, y = data["input"][:64], data["label"][:64]
    model = onnxgrad.load("models/digits_cnn.onnx")
    stats = {k: v for k, v in model.parameters().items() if "running" in k}
    trainer = onnxgrad.Trainer(model, trainable="head.*", frozen_batchnorm="eval",
                               optimizer=onnxgrad.SGD(lr=0.1))
    logits = model.run({"input": x})["logits"].astype(np.float64)
    expected = -_log_softmax(logits)[np.arange(len(y)), y].mean()
    assert trainer.step({"input": x}, y) == pytest.approx(expected, rel=1e-5)
    for name, value in stats.items():
        np.testing.assert_array_equal(model.parameters()[name], value)
    # The default follows PyTorch's train(): batch statistics, running statistics move.
    model = onnxgrad.load("models/digits_cnn.onnx")
    onnxgrad.Trainer(model, trainable="head.*").step({"input": x}, y)
    assert any(not np.array_equal(model.parameters()[k], v) for k, v in stats.items())


def test_frozen_batchnorm_eval_leaves_trained_batchnorm_alone():
    model = onnxgrad.load("models/digits_cnn.onnx")
    trainer = onnxgrad.Trainer(model, frozen_batchnorm="eval")  # everything trains
    assert trainer._state.inference_nodes == frozenset()
    with pytest.raises(onnxgrad.OnnxgradError, match="frozen_batchnorm"):
        onnxgrad.Trainer(model, frozen_batchnorm="sometimes")


@pytest.mark.parametrize("alias", ["Identity", "Transpose"])
@pytest.mark.parametrize("left", [True, False], ids=["alias_left", "alias_right"])
def test_early_updates_wait_for_aliases_of_the_weight(left, alias):
    """A step, which updates each weight as soon as the backward pass no longer
    reads it, equals SGD applied by hand to :meth:`Trainer.gradients`, also when
    the backward pass reads an alias of the weight (Identity's output is the
    weight itself, Transpose's a view of it).  The planner-level test of the
    same rule is in test_planner.py."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 5)).astype(np.float32)
    w2 = rng.standard_normal((4, 3 if left else 5)).astype(np.float32)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    matmul = (["v", "a"] if left else ["a", "v"])
    nodes = [helper.make_node("MatMul", ["x", "w2"], ["z"]),
             helper.make_node("Tanh", ["z"], ["a"]),
             helper.make_node(alias, ["w"], ["v"]),
             helper.make_node("MatMul", matmul, ["y"])]
    out_shape = [5, 3] if left else [5, 5]
    model = make_model(nodes, [("x", np.float32, [5, 4])], [("y", np.float32, out_shape)],
                       {"w": w, "w2": w2})
    target = rng.standard_normal(out_shape).astype(np.float32)
    grads = onnxgrad.Trainer(onnxgrad.load(model), loss="mse").gradients({"x": x}, target)
    trained = onnxgrad.load(model)
    onnxgrad.Trainer(trained, loss="mse", optimizer=onnxgrad.SGD(lr=0.5)).step({"x": x}, target)
    params = trained.parameters()
    np.testing.assert_allclose(params["w"], w - np.float32(0.5) * grads["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(params["w2"], w2 - np.float32(0.5) * grads["w2"], rtol=1e-6,
                               atol=1e-7)


def test_first_layer_weight_kept_column_major_trains_like_the_others():
    """The first Gemm's weight (no input gradient reads it) is the trainer's own
    column-major array; a step equals SGD applied by hand to the gradients, and
    the model (parameters, run, save) sees the trained values."""
    from onnxgrad.trainer import column_major_weights

    model = onnxgrad.load(mlp_model((4, 6, 5, 3)))
    tr = onnxgrad.Trainer(model, loss="cross_entropy", optimizer=onnxgrad.SGD(lr=0.5))
    assert column_major_weights(tr.graph, ["W0", "W1", "W2"]) == ["W0"]
    grads = tr.gradients({"x": X}, Y)
    before = model.parameters()
    tr.step({"x": X}, Y)
    after = model.parameters()
    for k in before:
        np.testing.assert_allclose(after[k], before[k] - np.float32(0.5) * grads[k],
                                   rtol=1e-6, atol=1e-7)
    fresh = onnxgrad.load(mlp_model((4, 6, 5, 3)))
    for k, v in after.items():
        fresh.graph.initializers[k][...] = v
    np.testing.assert_array_equal(model.run({"x": X})["logits"], fresh.run({"x": X})["logits"])


def test_a_second_trainer_starts_from_the_first_ones_weights():
    """A trainer that keeps its own copy of a weight (W0, column-major) hands the
    trained values on to the next trainer of the same model."""
    model = onnxgrad.load(mlp_model())
    first = onnxgrad.Trainer(model, loss="cross_entropy", optimizer=onnxgrad.SGD(lr=0.5))
    first.step({"x": X}, Y)
    trained = {k: v.copy() for k, v in first._weights.items()}
    second = onnxgrad.Trainer(model, loss="cross_entropy", optimizer=onnxgrad.SGD(lr=0.5))
    for k, v in second._weights.items():
        np.testing.assert_array_equal(v, trained[k])
