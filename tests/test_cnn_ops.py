"""Convolutional-network ops (conv, pool, normalization, dropout, resize, nonlinear):
forward kernels against the ONNX reference evaluator or onnxruntime, gradients
against central differences, MaxPool's Indices, BatchNormalization's running
statistics and Dropout in training runs.  The ONNX backend node suite runs in
test_conformance.py."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import gradcheck as gc
import onnxgrad
from helpers import make_model
from onnxgrad.ops import conv, registered_ops
from op_db_cnn import FORWARD_ONLY, SAMPLES

FAMILIES = {f"onnxgrad.ops.{m}" for m in
            ("conv", "pool", "normalization", "dropout", "resize", "nonlinear")}
#: Ops of these families whose samples live in other test modules (forward against the
#: reference or onnxruntime, gradients against central differences), with the ONNX backend
#: node suite (test_conformance.py) for the forward passes of all of them.
ELSEWHERE = {
    "Col2Im", "LRN", "MeanVarianceNormalization",      # tests/test_vision_gradients.py
    "LpPool", "GlobalLpPool", "MaxUnpool",             # tests/test_more_ops.py
    "CenterCropPad", "Shrink", "ThresholdedRelu",      # tests/test_extra_ops.py (gradients)
}


def _assert_same(got, want, rtol, atol, what=""):
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    if want.dtype.kind in "fc":
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


def _onnxruntime(model: onnx.ModelProto, feeds: dict, outputs=None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def _f32(arrays):
    return {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in arrays.items()}


# -- forward against the reference -------------------------------------------------------------

#: Ops whose reference computes float64 inputs partly in float32: GroupNormalization's
#: function body follows stash_type=1 literally (onnxgrad computes statistics in float32
#: *or wider*); Gelu's function body has float32 constants; Resize's coefficients mix in
#: float32 attributes and scales (cubic_coeff_a, roi).
FLOAT32_REFERENCE = {"GroupNormalization", "Gelu", "Resize"}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("sample", SAMPLES, ids=[s.id for s in SAMPLES])
def test_forward_matches_reference(sample, dtype):
    arrays = gc.materialize(sample, dtype)
    model, got = gc.run_forward(sample, arrays)
    if sample.ref == "onnxruntime":
        # onnxruntime lacks float64 kernels for several of these ops: it computes in float32.
        model32, _ = gc.run_forward(sample, _f32(arrays))
        (want,) = _onnxruntime(model32, _f32(arrays))
        want = want.astype(got.dtype)
        tol = (1e-5, 1e-5)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            (want,) = ReferenceEvaluator(model).run(None, arrays)
        tol = (1e-7, 1e-10) if dtype == np.float64 else (1e-5, 1e-6)
        if sample.op in FLOAT32_REFERENCE and dtype == np.float64:
            tol = (1e-5, 1e-6)
    _assert_same(np.asarray(got), np.asarray(want), *tol, what=sample.id)


# -- gradients ---------------------------------------------------------------------------------

GRAD_CASES = [(s, name) for s in SAMPLES if s.id not in FORWARD_ONLY
              for name in gc.differentiable_inputs(s)]


@pytest.mark.parametrize("sample,name", GRAD_CASES, ids=[f"{s.id}-d{n}" for s, n in GRAD_CASES])
def test_gradient(sample, name):
    gc.check_gradient(sample, name)


F32_CASES = [s for s in SAMPLES if s.id not in FORWARD_ONLY and gc.differentiable_inputs(s)]


@pytest.mark.parametrize("sample", F32_CASES, ids=[s.id for s in F32_CASES])
def test_gradient_float32(sample):
    """float32 in, float32 gradients out, equal to float64's."""
    gc.check_float32_gradients(sample, rtol=2e-4, atol=2e-4)


def test_every_op_and_input_is_covered():
    checked = set()
    for s, name in GRAD_CASES:
        index = [n for n, _ in s.inputs].index(name)
        checked.add((s.op, gc.definition(s).input_name(index)))
    checked.add(("Dropout", "data"))          # test_dropout_gradient_is_mask_times_scale
    in_db = {s.op for s in SAMPLES}
    for (domain, name), versions in registered_ops().items():
        if domain == "onnxgrad" or versions[0].kernel.__module__ not in FAMILIES \
                or name in ELSEWHERE:
            continue
        assert name in in_db, f"{name} has no sample in op_db_cnn"
        for d in versions:
            assert d.rule is not None or not d.differentiable, f"{name}-{d.since} has no rule"
            for inp in d.differentiable:
                assert (name, inp) in checked, f"{name}: input {inp!r} is never checked"


# -- MaxPool: Indices and ties -------------------------------------------------------------

@pytest.mark.parametrize("shape,attrs", [
    ((2, 3, 9), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    ((2, 2, 6, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((2, 2, 6, 7), {"kernel_shape": [2, 3], "storage_order": 1}),
    ((1, 2, 7, 7), {"kernel_shape": [2, 2], "dilations": [2, 2], "ceil_mode": 1,
                    "strides": [2, 2]}),
    ((1, 2, 6, 5), {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 1]}),
    ((1, 2, 4, 5, 4), {"kernel_shape": [2, 2, 2], "strides": [2, 2, 2], "pads": [0, 1, 0, 1, 0, 1]}),
    ((1, 2, 4, 5, 4), {"kernel_shape": [2, 3, 2], "storage_order": 1}),
])
def test_maxpool_indices_match_onnxruntime(shape, attrs):
    x = np.random.default_rng(0).permutation(int(np.prod(shape))).reshape(shape).astype(np.float32)
    node = helper.make_node("MaxPool", ["x"], ["y", "i"], **attrs)
    dims = [f"d{k}" for k in range(len(shape))]
    model = make_model([node], [("x", np.float32, shape)],
                       [("y", np.float32, dims), ("i", np.int64, dims)], opset=12)
    got = onnxgrad.load(model).run({"x": x})
    y, i = _onnxruntime(model, {"x": x})
    _assert_same(got["y"], y, 0, 0, "Y")
    _assert_same(got["i"], i, 0, 0, "Indices")
    if not attrs.get("storage_order"):
        np.testing.assert_array_equal(x.reshape(-1)[got["i"]], got["y"])


def test_maxpool_ties_go_to_the_first_maximum():
    """Like torch: the first maximum of each window (row-major) gets the gradient."""
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 2:, 2:] = [[1, 1], [1, 0]]
    model = make_model([helper.make_node("MaxPool", ["w"], ["y"], kernel_shape=[2, 2],
                                         strides=[2, 2]),
                        helper.make_node("ReduceSum", ["y"], ["loss"], keepdims=0)],
                       [], [("loss", np.float64, [])], {"w": x}, opset=12)
    grads = onnxgrad.Trainer(onnxgrad.load(model), loss=None, output="loss",
                             trainable=["w"]).gradients({})
    want = np.zeros_like(x)
    want[0, 0, [0, 0, 2], [0, 2, 0]] = 1
    want[0, 0, 2, 2] = 1
    np.testing.assert_array_equal(grads["w"], want)


# -- BatchNormalization: running statistics ------------------------------------------------

def _bn_model(opset=15, attrs=None, shape=(6, 3, 4, 4), seed=0):
    rng = np.random.default_rng(seed)
    c = shape[1]
    inits = {"scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
             "bias": rng.uniform(-0.5, 0.5, c).astype(np.float32),
             "rmean": rng.uniform(-1, 1, c).astype(np.float32),
             "rvar": rng.uniform(0.5, 2, c).astype(np.float32)}
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "rmean", "rvar"], ["y"],
                            **(attrs or {}))
    model = make_model([node], [("x", np.float32, ["N", *shape[1:]])],
                       [("y", np.float32, ["N", *shape[1:]])], inits, opset=opset)
    return model, inits


def _batch(shape=(6, 3, 4, 4), seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)


@pytest.mark.parametrize("opset,attrs", [(15, {}), (15, {"momentum": 0.8, "epsilon": 1e-3}),
                                         (9, {}), (7, {"spatial": 1}), (14, {"training_mode": 1})])
def test_batchnorm_step_updates_running_statistics(opset, attrs):
    model_proto, inits = _bn_model(opset, attrs)
    model = onnxgrad.load(model_proto)
    trainer = onnxgrad.Trainer(model, loss="mse", optimizer=onnxgrad.SGD(lr=0.1, momentum=0.9))
    assert set(trainer.trainable) == {"scale", "bias"}      # running statistics are not trained
    momentum, eps = attrs.get("momentum", 0.9), attrs.get("epsilon", 1e-5)
    mean, var = inits["rmean"].astype(np.float64), inits["rvar"].astype(np.float64)
    for step in range(2):
        x = _batch(seed=step + 1)
        target = np.zeros_like(x)
        before = model.parameters()
        # gradients() changes neither weights nor running statistics
        grads = trainer.gradients({"x": x}, target)
        after = model.parameters()
        for k in before:
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
        # Independently: the loss's gradient for bias with batch statistics.
        xd = x.astype(np.float64)
        bm, bv = xd.mean(axis=(0, 2, 3)), xd.var(axis=(0, 2, 3))
        xhat = (xd - bm[:, None, None]) / np.sqrt(bv[:, None, None] + eps)
        y = xhat * before["scale"][:, None, None] + before["bias"][:, None, None]
        np.testing.assert_allclose(grads["bias"], (2 * y / y.size).sum(axis=(0, 2, 3)),
                                   rtol=1e-4, atol=1e-6)
        trainer.step({"x": x}, target)
        n = x.size // x.shape[1]
        mean = momentum * mean + (1 - momentum) * bm
        var = momentum * var + (1 - momentum) * bv * n / (n - 1)
        params = model.parameters()
        np.testing.assert_allclose(params["rmean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(params["rvar"], var, rtol=1e-5, atol=1e-6)
    # Model.run normalises with the running statistics (for training_mode=0 nodes).
    x = _batch(seed=9)
    params = model.parameters()
    want = ((x - params["rmean"][:, None, None]) / np.sqrt(params["rvar"][:, None, None] + eps)
            * params["scale"][:, None, None] + params["bias"][:, None, None])
    if not attrs.get("training_mode"):
        np.testing.assert_allclose(model.run({"x": x})["y"], want, rtol=1e-5, atol=1e-5)


def test_batchnorm_1d_input_and_saved_model(tmp_path):
    model_proto, inits = _bn_model(15, shape=(8, 3))
    model = onnxgrad.load(model_proto)
    trainer = onnxgrad.Trainer(model, loss="mse", optimizer=onnxgrad.SGD(lr=0.0))
    x = _batch((8, 3))
    trainer.step({"x": x}, np.zeros_like(x))
    xd = x.astype(np.float64)
    np.testing.assert_allclose(model.parameters()["rmean"], 0.9 * inits["rmean"] + 0.1 * xd.mean(0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.parameters()["rvar"],
                               0.9 * inits["rvar"] + 0.1 * xd.var(0, ddof=1), rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "bn.onnx")
    saved = onnx.load(tmp_path / "bn.onnx")
    stored = {t.name: numpy_helper.to_array(t) for t in saved.graph.initializer}
    np.testing.assert_array_equal(stored["rvar"], model.parameters()["rvar"])
    (y,) = _onnxruntime(saved, {"x": x})
    np.testing.assert_allclose(model.run({"x": x})["y"], y, rtol=1e-5, atol=1e-5)


def test_batchnorm_training_mode_outputs_follow_the_spec():
    """training_mode=1 (opset 14+) in Model.run: batch statistics, and the running
    outputs use the biased batch variance, as the spec (and onnxruntime) says."""
    model_proto, inits = _bn_model(15, {"training_mode": 1, "momentum": 0.7})
    node = model_proto.graph.node[0]
    node.output.extend(["rm", "rv"])
    model_proto.graph.output.extend([helper.make_tensor_value_info("rm", 1, [3]),
                                     helper.make_tensor_value_info("rv", 1, [3])])
    x = _batch()
    got = onnxgrad.load(model_proto).run({"x": x})
    want = _onnxruntime(model_proto, {"x": x})
    for g, w, name in zip([got["y"], got["rm"], got["rv"]], want, ["y", "rm", "rv"]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


# -- Dropout ---------------------------------------------------------------------------------

def _dropout_model(opset, ratio=0.25, shape=(50, 40), mask=False):
    inits = {"w": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    if opset >= 12:
        inits["ratio"] = np.array(ratio, np.float32)
        node = helper.make_node("Dropout", ["w", "ratio"], ["y", "m"] if mask else ["y"])
    else:
        node = helper.make_node("Dropout", ["w"], ["y", "m"] if mask else ["y"], ratio=ratio)
    nodes = [node, helper.make_node("Mul", ["y", "u"], ["yu"]),
             helper.make_node("ReduceSum", ["yu"], ["loss"], keepdims=0)]
    outputs = [("loss", np.float32, [])]
    if mask:
        outputs.append(("m", np.bool_ if opset >= 10 else np.float32, list(shape)))
    return make_model(nodes, [("u", np.float32, list(shape))], outputs, inits, opset=opset), inits


@pytest.mark.parametrize("opset", [7, 10, 13, 22])
def test_dropout_gradient_is_mask_times_scale(opset):
    ratio = 0.25
    proto, inits = _dropout_model(opset, ratio)
    u = np.random.default_rng(1).standard_normal(inits["w"].shape).astype(np.float32)

    def grads(seed):
        trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss",
                                   optimizer=onnxgrad.SGD(lr=0.0), trainable=["w"], seed=seed)
        assert "DropoutGrad" in {n.op_type for n in trainer.graph.nodes}
        return trainer.gradients({"u": u})["w"]

    g = grads(7)
    kept = g != 0
    np.testing.assert_allclose(g[kept], u[kept] / (1 - ratio), rtol=1e-6)
    dropped = 1 - kept.mean()
    assert abs(dropped - ratio) < 4 * np.sqrt(ratio * (1 - ratio) / g.size)
    np.testing.assert_array_equal(grads(7), g)                 # seeded: reproducible
    assert not np.array_equal(grads(8), g)


def test_dropout_is_active_in_training_steps_only():
    proto, inits = _dropout_model(13, 0.5, mask=True)
    model = onnxgrad.load(proto)
    u = np.ones_like(inits["w"])
    out = model.run({"u": u})
    np.testing.assert_allclose(out["loss"], inits["w"].sum(), rtol=1e-5)
    assert out["m"].dtype == np.bool_ and out["m"].all()
    trainer = onnxgrad.Trainer(model, loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=["w"], seed=0)
    losses = {trainer.step({"u": u}) for _ in range(3)}
    assert len(losses) == 3                                    # a new mask each step
    assert all(abs(v - inits["w"].sum()) > 1e-3 for v in losses)


def test_dropout_training_mode_input_in_inference():
    x = np.random.default_rng(0).standard_normal((30, 30)).astype(np.float32)
    node = helper.make_node("Dropout", ["x", "r", "t"], ["y", "m"])
    model = make_model([node], [("x", np.float32, [30, 30])],
                       [("y", np.float32, [30, 30]), ("m", np.bool_, [30, 30])],
                       {"r": np.array(0.4, np.float32), "t": np.array(True)}, opset=13)
    out = onnxgrad.load(model).run({"x": x})
    assert 0.2 < 1 - out["m"].mean() < 0.6
    np.testing.assert_allclose(out["y"], x * out["m"] / 0.6, rtol=1e-6)


CONV_CASES = [(s, name) for s, name in GRAD_CASES if s.op in ("Conv", "ConvTranspose")]


@pytest.mark.parametrize("batch_major", [True, False], ids=["batch_major", "batch_inner"])
@pytest.mark.parametrize("sample,name", CONV_CASES, ids=[f"{s.id}-d{n}" for s, n in CONV_CASES])
def test_conv_gradient_in_each_column_layout(sample, name, batch_major, monkeypatch):
    """Both column layouts, whichever one a sample's shapes would choose: forward
    against the reference and every gradient, in float64."""
    monkeypatch.setattr(conv, "_batch_major", lambda positions, channels, kernel: batch_major)
    test_forward_matches_reference(sample, np.float64)
    gc.check_gradient(sample, name)


@pytest.mark.parametrize("x_shape,w_shape,attrs", [
    ((2, 3, 7), (4, 3, 3), {"pads": [1, 2]}),
    ((2, 6, 8, 7), (4, 3, 3, 2), {"group": 2, "pads": [3, 0, 1, 2], "dilations": [2, 1]}),
    ((1, 2, 5, 4, 5), (3, 2, 2, 3, 3), {"auto_pad": "SAME_UPPER", "dilations": [1, 1, 2]}),
    ((2, 4, 6, 6), (4, 4, 5, 5), {"pads": [4, 4, 4, 4]}),
])
def test_flipped_kernel_input_gradient_equals_the_column_scatter(x_shape, w_shape, attrs):
    """Both ways of computing a stride-1 Conv's input gradient agree, whichever
    :data:`FLIPPED_MIN_CHANNELS` picks for a shape (float64)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    dy = rng.standard_normal(conv.Conv(np, x, w, **attrs)[0].shape)
    geometry = conv._conv_geometry(x_shape, w_shape, attrs.get("auto_pad", "NOTSET"),
                                   attrs.get("dilations"), attrs.get("pads"), None)
    sp, _, strides, dilations, begin, end, _ = geometry
    full = tuple(s + b + e for s, b, e in zip(sp, begin, end))
    scattered = conv.conv_input_grad(np, dy, w, full, strides, dilations, attrs.get("group", 1))
    scattered = conv.pad_spatial(np, scattered, [-b for b in begin], [-e for e in end])
    flipped = conv.flipped_input_grad(np, dy, w, sp, begin, end, dilations, attrs.get("group", 1))
    np.testing.assert_allclose(flipped, scattered, rtol=1e-12, atol=1e-12)


# -- gradient graphs -------------------------------------------------------------------------

def test_first_layer_input_gradient_is_pruned():
    """Per-input private gradient ops: nothing computes the gradient of the data."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["p"], ["g"]),
             helper.make_node("Flatten", ["g"], ["logits"])]
    model = make_model(nodes, [("x", np.float32, ["N", 2, 6, 6])],
                       [("logits", np.float32, ["N", 4])],
                       {"w": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
                        "b": np.zeros(4, np.float32)})
    trainer = onnxgrad.Trainer(onnxgrad.load(model), loss="cross_entropy")
    ops = [n.op_type for n in trainer.graph.nodes]
    assert "ConvGradW" in ops and "BiasGrad" in ops and "ConvGradX" not in ops
    loss = trainer.step({"x": rng.standard_normal((3, 2, 6, 6)).astype(np.float32)},
                        np.array([0, 1, 3]))
    assert np.isfinite(loss)


@pytest.mark.gpu
def test_dropout_on_cuda_is_seeded_and_scaled():
    ratio = 0.25
    proto, inits = _dropout_model(13, ratio)
    u = np.random.default_rng(1).standard_normal(inits["w"].shape).astype(np.float32)

    def grads(seed):
        trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss",
                                   optimizer=onnxgrad.SGD(lr=0.0), trainable=["w"], seed=seed,
                                   device="cuda")
        return trainer.gradients({"u": u})["w"]

    g = grads(3)
    kept = g != 0
    np.testing.assert_allclose(g[kept], u[kept] / (1 - ratio), rtol=1e-6)
    assert abs((1 - kept.mean()) - ratio) < 4 * np.sqrt(ratio * (1 - ratio) / g.size)
    np.testing.assert_array_equal(grads(3), g)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,attrs", [
    ((2, 2, 6, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((1, 2, 4, 5, 4), {"kernel_shape": [2, 3, 2], "storage_order": 1}),
])
def test_maxpool_indices_on_cuda(shape, attrs):
    from onnxgrad.backend import get_backend
    from onnxgrad.model import Model

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    dims = [f"d{k}" for k in range(len(shape))]
    proto = make_model([helper.make_node("MaxPool", ["x"], ["y", "i"], **attrs)],
                       [("x", np.float32, shape)],
                       [("y", np.float32, dims), ("i", np.int64, dims)], opset=12)
    model = onnxgrad.load(proto)
    backend = get_backend("cuda")
    plan = Model.make_plan(model.graph, backend, ["y", "i"])
    got = {k: backend.to_host(v) for k, v in plan.run({"x": backend.asarray(x)}).items()}
    want = model.run({"x": x})
    np.testing.assert_array_equal(got["i"], want["i"])
    np.testing.assert_array_equal(got["y"], want["y"])


@pytest.mark.parametrize("shape,spatial", [((4, 3, 5, 2), 1), ((6, 3), 1), ((4, 3, 5), 0)])
def test_batchnorm_gradient_reads_the_forward_batch_statistics(shape, spatial):
    """BatchNormalizationGrad gives the same gradients from the forward pass's batch
    mean and variance (as in training graphs) as when it computes them again."""
    from onnxgrad.ops.normalization import BatchNormalizationGrad, _batch_norm, _bn_layout

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    _, channel_shape = _bn_layout(x, spatial)
    params = channel_shape[1:] if not spatial else (shape[1],)
    scale, bias = rng.standard_normal(params), rng.standard_normal(params)
    mean, var = np.zeros(params), np.ones(params)

    class Ctx:
        training = False

    _, (_, _, batch_mean, batch_var) = _batch_norm(np, x, scale, bias, mean, var, 1e-5, 0.9,
                                                   spatial, True, Ctx)
    dy = rng.standard_normal(shape)
    from types import SimpleNamespace
    step = SimpleNamespace(state=SimpleNamespace(training=True, inference_nodes=frozenset()))
    with_stats = BatchNormalizationGrad(np, dy, x, scale, batch_mean, batch_var,
                                        spatial=spatial, ctx=step)
    again = BatchNormalizationGrad(np, dy, x, scale, spatial=spatial, ctx=step)
    for a, b in zip(with_stats, again):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
