"""Gradients of BatchNormalization's running statistics, QuantizeLinear's float inputs,
Attention's ``qk_matmul_output`` and RoiAlign's ``rois``, in float64 against central
differences; forward outputs against onnx's reference evaluator.

* BatchNormalization's ``mean``/``var`` are asked for through the ``Gradient`` operator
  (a training step never trains them): checked where the node normalises with them
  (``Model.run``, frozen nodes), zero where it uses batch statistics.
* QuantizeLinear to a float type passes the cast's rounding straight through, as Cast
  does: its gradients equal those of the ``Div`` and ``Cast`` it stands for, and its
  gradient kernel (and standard form, differentiated again) match central differences
  of that unrounded function.  To an integer type no gradient flows.
* Attention: every ``qk_matmul_output_mode``, with and without ``Y`` in the loss,
  through softcap, float and boolean masks, causal masks, grouped heads and a cache.
* RoiAlign: both coordinate modes, both pooling modes, regions partly outside the
  image and regions raised to size 1, away from the kinks at whole pixels.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxgrad
from helpers import finite_projection_loss
from onnxgrad.backend import get_backend
from onnxgrad.errors import ModelError
from onnxgrad.executor import RunState
from onnxgrad.model import Model
from op_db_transformer import Sample as S
from test_transformer_ops import check_gradient, make_model, materialize, out_names

PREVIEW = "ai.onnx.preview.training"
D = TensorProto.DOUBLE


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _model(nodes, inputs, outputs, inits=(), opset=21, domains=()):
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = helper.find_min_ir_version_for(opsets)
    onnx.checker.check_model(model)
    return model


def _info(name, array):
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                         array.shape)


def _directional(f, x, v, eps=1e-6):
    return (f(x + eps * v) - f(x - eps * v)) / (2 * eps)


def _close(analytic, numeric, rtol=1e-6, atol=1e-9):
    assert abs(analytic - numeric) <= atol + rtol * (abs(analytic) + abs(numeric)), \
        f"analytic {analytic!r} vs numeric {numeric!r}"


# -- BatchNormalization: the running mean and variance --------------------------------------

#: (X shape, opset, attributes): spatial statistics over N and the positions, a 2-D
#: input, 3-D positions, opsets 9 and 7 (with spatial=0: statistics per element).
BN_CASES = [((4, 3, 2, 2), 15, {}), ((5, 3), 15, {"epsilon": 0.1}), ((3, 2, 4, 2, 2), 14, {}),
            ((4, 3, 2), 9, {"momentum": 0.7}), ((3, 2, 3), 7, {"spatial": 1}),
            ((3, 2, 3), 7, {"spatial": 0})]


def _bn_arrays(shape, opset, attrs):
    rng = _rng("bn", shape, opset, sorted(attrs.items()))
    stat = shape[1:] if attrs.get("spatial", 1) == 0 else (shape[1],)
    return {"X": rng.uniform(-2, 2, shape), "scale": rng.uniform(-2, 2, stat),
            "B": rng.uniform(-2, 2, stat), "mean": rng.uniform(-1, 1, stat),
            "var": rng.uniform(0.5, 2, stat), "U": rng.standard_normal(shape)}


def _bn_gradient_model(arrays, opset, attrs, wrt=("mean", "var")):
    """loss = sum(BatchNormalization(...) * U), and Gradient(loss) for ``wrt``."""
    nodes = [helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], ["Y"],
                              name="bn", **attrs),
             helper.make_node("Mul", ["Y", "U"], ["YU"]),
             helper.make_node("ReduceSum", ["YU"], ["loss"], keepdims=0),
             helper.make_node("Gradient", list(wrt), [f"d{n}" for n in wrt], domain=PREVIEW,
                              xs=list(wrt), y="loss")]
    outputs = [helper.make_tensor_value_info("loss", D, [])] + \
        [_info(f"d{n}", arrays[n]) for n in wrt]
    return onnxgrad.load(_model(nodes, [_info(k, v) for k, v in arrays.items()], outputs,
                                opset=opset, domains=[PREVIEW]))


@pytest.mark.parametrize("shape,opset,attrs", BN_CASES,
                         ids=[f"{s}-{o}-{a}" for s, o, a in BN_CASES])
def test_batchnorm_running_statistics_gradient(shape, opset, attrs):
    """Outside training runs the node normalises with its running statistics: the
    Gradient operator's dmean and dvar against central differences of Model.run."""
    arrays = _bn_arrays(shape, opset, attrs)
    model = _bn_gradient_model(arrays, opset, attrs)
    out = model.run(arrays)
    for name in ("mean", "var"):
        x, v = arrays[name], _rng("v", name, shape).standard_normal(arrays[name].shape)
        assert out[f"d{name}"].shape == x.shape and out[f"d{name}"].dtype == x.dtype

        def f(value):
            return float(model.run({**arrays, name: value})["loss"])

        _close(float(np.sum(out[f"d{name}"] * v)), _directional(f, x, v))
    # and the formula itself
    axes = (0,) if attrs.get("spatial", 1) == 0 else (0,) + tuple(range(2, len(shape)))
    bshape = (1,) + arrays["mean"].shape + (1,) * (len(shape) - 1 - arrays["mean"].ndim)
    epsilon = float(np.float32(attrs.get("epsilon", 1e-5)))  # a float attribute
    inv = 1 / np.sqrt(arrays["var"].reshape(bshape) + epsilon)
    k = arrays["U"] * arrays["scale"].reshape(bshape) * inv
    np.testing.assert_allclose(out["dmean"], -k.sum(axis=axes).reshape(arrays["mean"].shape),
                               rtol=1e-12)
    centred = arrays["X"] - arrays["mean"].reshape(bshape)
    np.testing.assert_allclose(out["dvar"], (-0.5 * k * centred * inv * inv).sum(axis=axes)
                               .reshape(arrays["var"].shape), rtol=1e-12)


@pytest.mark.parametrize("shape,opset,attrs", BN_CASES,
                         ids=[f"{s}-{o}-{a}" for s, o, a in BN_CASES])
def test_batchnorm_gradient_outside_training_holds_the_statistics_constant(shape, opset, attrs):
    """Outside training runs the node normalises with its running statistics, which are
    constants of Y: the Gradient operator's dX, dscale and dB against central
    differences of Model.run (a batch-statistics gradient would be far off)."""
    arrays = _bn_arrays(shape, opset, attrs)
    wrt = ("X", "scale", "B")
    model = _bn_gradient_model(arrays, opset, attrs, wrt=wrt)
    out = model.run(arrays)
    for name in wrt:
        x, v = arrays[name], _rng("v", name, shape).standard_normal(arrays[name].shape)

        def f(value):
            return float(model.run({**arrays, name: value})["loss"])

        _close(float(np.sum(out[f"d{name}"] * v)), _directional(f, x, v))


def _run_as(model, arrays, fetch, training, inference_nodes=frozenset()):
    """A run of ``model``'s graph with the given run state (as a training step sets it)."""
    state = RunState()
    state.training, state.inference_nodes = training, frozenset(inference_nodes)
    plan = Model.make_plan(model.graph, get_backend("cpu"), fetch, state=state)
    return {k: np.asarray(v) for k, v in plan.run(dict(arrays)).items()}


@pytest.mark.parametrize("opset", [15, 9])
def test_batchnorm_running_statistics_follow_the_statistics_the_run_uses(opset):
    """In a training run the node normalises with batch statistics, which do not read the
    running ones: their gradient is zero, exactly.  A node that runs as in inference
    (frozen_batchnorm="eval") gets the inference gradient."""
    attrs = {}
    arrays = _bn_arrays((4, 3, 2, 2), opset, attrs)
    model = _bn_gradient_model(arrays, opset, attrs)
    inference = model.run(arrays)
    batch = _run_as(model, arrays, ["dmean", "dvar"], training=True)
    np.testing.assert_array_equal(batch["dmean"], np.zeros(3))
    np.testing.assert_array_equal(batch["dvar"], np.zeros(3))
    frozen = _run_as(model, arrays, ["dmean", "dvar", "loss"], training=True,
                     inference_nodes={"bn"})
    np.testing.assert_allclose(frozen["loss"], inference["loss"], rtol=1e-15)
    for name in ("dmean", "dvar"):
        np.testing.assert_allclose(frozen[name], inference[name], rtol=1e-15)
        assert np.abs(frozen[name]).min() > 0


def test_batchnorm_in_training_mode_never_reads_its_running_statistics():
    """training_mode=1: batch statistics in every run, so zero gradients (standard ops),
    while X's gradient is unchanged."""
    attrs = {"training_mode": 1}
    arrays = _bn_arrays((4, 3, 2, 2), 15, attrs)
    model = _bn_gradient_model(arrays, 15, attrs, wrt=("mean", "var", "X"))
    out = model.run(arrays)
    np.testing.assert_array_equal(out["dmean"], np.zeros(3))
    np.testing.assert_array_equal(out["dvar"], np.zeros(3))
    x, v = arrays["X"], _rng("vx").standard_normal(arrays["X"].shape)
    _close(float(np.sum(out["dX"] * v)),
           _directional(lambda value: float(model.run({**arrays, "X": value})["loss"]), x, v))


def test_trainer_never_trains_running_statistics():
    """The running statistics are state a step overwrites: not trained by default, and
    named as trainable they are refused (no gradient path in a training step), never
    trained with zeros."""
    arrays = _bn_arrays((4, 3, 2, 2), 15, {})
    nodes = [helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], ["Y"]),
             helper.make_node("Mul", ["Y", "U"], ["YU"]),
             helper.make_node("ReduceSum", ["YU"], ["loss"], keepdims=0)]
    weights = {k: arrays[k] for k in ("scale", "B", "mean", "var")}
    proto = _model(nodes, [_info("X", arrays["X"]), _info("U", arrays["U"])],
                   [helper.make_tensor_value_info("loss", D, [])], weights, opset=15)
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.1))
    assert trainer.trainable == ["scale", "B"]
    with pytest.raises(ModelError, match="gradient path"):
        onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss", trainable=["mean"])


# -- QuantizeLinear ---------------------------------------------------------------------------

F8 = TensorProto.FLOAT8E4M3FN

#: (x shape, y_scale shape, attributes, output type): per tensor, per axis (1 and 0),
#: per block (the last block cut short), and a float4 target with a zero point.
Q_CASES = [((3, 4), (), {}, F8), ((3, 4), (4,), {"axis": 1}, F8),
           ((3, 4), (3,), {"axis": 0}, TensorProto.FLOAT8E5M2),
           ((2, 5), (2, 2), {"axis": 1, "block_size": 3}, F8),
           ((3, 4), (), {}, TensorProto.FLOAT4E2M1)]


def _q_arrays(xshape, sshape):
    rng = _rng("q", xshape, sshape)
    return rng.uniform(-2, 2, xshape), rng.uniform(0.05, 0.5, sshape), \
        rng.standard_normal(xshape)


def _broadcast_scale(s, shape, attrs):
    """y_scale as QuantizeLinear applies it to an input of ``shape``."""
    if s.ndim == 0:
        return s
    axis = attrs.get("axis", 1)
    if attrs.get("block_size"):
        return np.repeat(s, attrs["block_size"], axis=axis)[tuple(slice(0, n) for n in shape)]
    return s.reshape([-1 if i == axis else 1 for i in range(len(shape))])


def _q_loss_model(xshape, sshape, attrs, to, decomposed=False):
    """loss = sum(Cast(QuantizeLinear(x, y_scale), double) * U), or with Div and Cast in
    the QuantizeLinear's place (per tensor and per axis)."""
    ins = [helper.make_tensor_value_info("x", D, xshape), helper.make_tensor_value_info(
        "s", D, sshape), helper.make_tensor_value_info("U", D, xshape)]
    inits = {}
    if decomposed:
        axis = attrs.get("axis", 1)
        inits["shape"] = np.array([-1 if i == axis else 1 for i in range(len(xshape))]
                                  if sshape else [], np.int64)
        nodes = [helper.make_node("Reshape", ["s", "shape"], ["sb"]),
                 helper.make_node("Div", ["x", "sb"], ["r"]),
                 helper.make_node("Cast", ["r"], ["q"], to=to)]
    else:
        nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], output_dtype=to, **attrs)]
    nodes += [helper.make_node("Cast", ["q"], ["y"], to=D),
              helper.make_node("Mul", ["y", "U"], ["p"]),
              helper.make_node("ReduceSum", ["p"], ["loss"], keepdims=0)]
    return _model(nodes, ins, [helper.make_tensor_value_info("loss", D, [])], inits, opset=23)


@pytest.mark.parametrize("xshape,sshape,attrs,to", Q_CASES[:3] + Q_CASES[4:],
                         ids=lambda v: str(v))
def test_quantize_linear_to_a_float_type_has_the_gradient_of_div_and_cast(xshape, sshape,
                                                                          attrs, to):
    x, s, u = _q_arrays(xshape, sshape)
    grads = []
    for decomposed in (False, True):
        model = _q_loss_model(xshape, sshape, attrs, to, decomposed)
        values = {"x": x, "s": s, "U": u}
        grads.append(model_gradients(model, values, ["x", "s"]))
    for name in ("x", "s"):
        assert grads[0][name].dtype == np.float64 and grads[0][name].shape == np.shape(
            {"x": x, "s": s}[name])
        np.testing.assert_allclose(grads[0][name], grads[1][name], rtol=1e-12, atol=1e-12)
        assert np.abs(grads[0][name]).max() > 0


def model_gradients(proto, values, wrt):
    """The Gradient operator's d loss / d ``wrt`` of a model computing ``loss``."""
    graph = proto.graph
    graph.node.append(helper.make_node("Gradient", list(wrt), [f"d_{n}" for n in wrt],
                                       domain=PREVIEW, xs=list(wrt), y="loss"))
    graph.output.extend(_info(f"d_{n}", np.asarray(values[n])) for n in wrt)
    proto.opset_import.append(helper.make_opsetid(PREVIEW, 1))
    out = onnxgrad.load(proto).run(values)
    return {n: out[f"d_{n}"] for n in wrt}


@pytest.mark.parametrize("xshape,sshape,attrs,to", Q_CASES, ids=lambda v: str(v))
def test_quantize_linear_gradient_kernel_against_central_differences(xshape, sshape, attrs, to):
    """The straight-through gradient is the derivative of the unrounded quantization
    ``x / y_scale``: checked along random directions of x and y_scale."""
    from onnxgrad.ops.quantize import QuantizeLinearGrad

    x, s, u = _q_arrays(xshape, sshape)
    a = {"axis": attrs.get("axis", 1), "block_size": attrs.get("block_size", 0)}
    dx, ds = QuantizeLinearGrad(np, u, x, s, **a)
    assert dx.shape == x.shape and ds.shape == s.shape and ds.dtype == s.dtype

    def f(xv, sv):
        return float(np.sum(u * xv / _broadcast_scale(sv, xshape, attrs)))

    rng = _rng("dir", xshape, sshape)
    vx, vs = rng.standard_normal(x.shape), rng.standard_normal(s.shape)
    _close(float(np.sum(dx * vx)), _directional(lambda xv: f(xv, s), x, vx))
    _close(float(np.sum(ds * vs)), _directional(lambda sv: f(x, sv), s, vs))


@pytest.mark.parametrize("sshape,attrs", [((), {}), ((4,), {"axis": 1}), ((3,), {"axis": -2})],
                         ids=["tensor", "axis1", "axis-2"])
def test_quantize_linear_gradient_differentiated_again(sshape, attrs):
    """d/ds sum(C * Gradient(loss wrt x)): QuantizeLinearGrad has no rule of its own, so
    its standard form is differentiated; against central differences of Model.run."""
    xshape = (3, 4)
    x, s, u = _q_arrays(xshape, sshape)
    c = _rng("C").standard_normal(xshape)
    proto = _q_loss_model(xshape, sshape, attrs, F8)
    graph = proto.graph
    graph.node[-1].output[0] = "first"
    graph.node.extend([
        helper.make_node("Gradient", ["x"], ["dx"], domain=PREVIEW, xs=["x"], y="first"),
        helper.make_node("Mul", ["dx", "C"], ["dxC"]),
        helper.make_node("ReduceSum", ["dxC"], ["loss"], keepdims=0)])
    graph.input.append(helper.make_tensor_value_info("C", D, xshape))
    proto.opset_import.append(helper.make_opsetid(PREVIEW, 1))
    values = {"x": x, "s": s, "U": u, "C": c}
    ds = model_gradients(proto, values, ["s"])["s"]
    model = onnxgrad.load(proto)
    v = _rng("vs").standard_normal(s.shape)
    _close(float(np.sum(ds * v)),
           _directional(lambda sv: float(model.run({**values, "s": sv})["loss"]), s, v))


def test_quantize_linear_to_an_integer_type_carries_no_gradient():
    """Round and a cast to integers: no gradient path, said by name, never a zero."""
    rng = _rng("int8")
    nodes = [helper.make_node("QuantizeLinear", ["W", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    proto = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                   {"W": rng.standard_normal((3, 4)).astype(np.float32),
                    "s": np.float32(0.05), "zp": np.int8(0)})
    with pytest.raises(ModelError, match="gradient path"):
        onnxgrad.Trainer(onnxgrad.load(proto), loss="mse", trainable=["W"])


@pytest.mark.parametrize("xshape,sshape,attrs,to", Q_CASES, ids=lambda v: str(v))
def test_quantize_linear_float_outputs_match_the_reference(xshape, sshape, attrs, to):
    x, s, _ = _q_arrays(xshape, sshape)
    x, s = x.astype(np.float32), s.astype(np.float32)
    node = helper.make_node("QuantizeLinear", ["x", "s"], ["q"], output_dtype=to, **attrs)
    proto = _model([node, helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT)],
                   [_info("x", x), _info("s", s)],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, xshape)], opset=23)
    want = ReferenceEvaluator(proto).run(None, {"x": x, "s": s})[0]
    np.testing.assert_array_equal(onnxgrad.load(proto).run({"x": x, "s": s})["y"], want)


# -- Attention: qk_matmul_output -----------------------------------------------------------

_Q4, _K4 = ("real", (2, 2, 3, 4)), ("real", (2, 2, 5, 4))
_MASK_B = [[True, True, False, True, True], [True, False, True, True, True],
           [False, True, True, True, True]]
_DEAD_ROW = [[False] * 5, [True] * 5, [True, False, True, False, True]]


def _attention(mode, extra=(), opset=23, **attrs):
    inputs = [("Q", _Q4), ("K", _K4), ("V", _K4), *extra]
    return S("Attention", inputs, {"qk_matmul_output_mode": mode, **attrs}, opset, outputs=4)


#: Finite qk outputs: through the one-node harness, with every output in the loss.
FINITE = []
for _mode in range(4):
    FINITE += [
        _attention(_mode),
        _attention(_mode, softcap=1.5, scale=0.6),
        _attention(_mode, [("attn_mask", ("real", (3, 5)))]),
        _attention(_mode, [("attn_mask", ("real", (2, 1, 3, 5)))], softcap=2.0),
    ]
FINITE += [
    S("Attention", [("Q", ("real", (2, 3, 8))), ("K", ("real", (2, 5, 4))),
                    ("V", ("real", (2, 5, 6))), ("attn_mask", ("real", (3, 5)))],
      {"q_num_heads": 4, "kv_num_heads": 2, "qk_matmul_output_mode": 2}, 23, outputs=4),
    S("Attention", [("Q", ("real", (2, 4, 3, 4))), ("K", _K4), ("V", _K4)],
      {"qk_matmul_output_mode": 1, "softcap": 1.0}, 23, outputs=4),
    S("Attention", [("Q", _Q4), ("K", ("real", (2, 2, 2, 4))), ("V", ("real", (2, 2, 2, 4))),
                    (None, None), ("past_key", ("real", (2, 2, 3, 4))),
                    ("past_value", ("real", (2, 2, 3, 4)))],
      {"qk_matmul_output_mode": 0}, 23, outputs=4),
    S("Attention", [("Q", _Q4), ("K", _K4), ("V", _K4)],
      {"qk_matmul_output_mode": 3, "softmax_precision": 11}, 24, outputs=4),
]
FINITE_GRADS = [(s, n) for s in FINITE for n, spec in s.inputs
                if n is not None and spec[0] == "real"]


@pytest.mark.parametrize("sample", FINITE, ids=lambda s: s.id)
def test_attention_qk_output_matches_the_reference(sample):
    arrays = materialize(sample, np.float32)
    model = make_model(sample, arrays, set(arrays))
    want = ReferenceEvaluator(model).run(None, dict(arrays))
    got = onnxgrad.load(model).run(dict(arrays))
    for y, w in zip(out_names(sample), want):
        np.testing.assert_allclose(got[y], w, rtol=1e-5, atol=1e-6, err_msg=y)


@pytest.mark.parametrize("sample,name", FINITE_GRADS,
                         ids=[f"{s.id}-d{n}" for s, n in FINITE_GRADS])
def test_attention_gradient_with_qk_output(sample, name):
    check_gradient(sample, name)


def _attention_check(sample, name, outputs):
    """Like check_gradient, with only ``outputs`` (indices of the node's outputs) in the
    loss, and -inf entries of qk_matmul_output (masked, constant) left out of it."""
    arrays = materialize(sample, np.float64)
    ins = ["" if n is None else n for n, _ in sample.inputs]
    # Y is required; the others only where the loss reads them
    outs = [f"y{k}" if k in outputs or k == 0 else "" for k in range(4)]
    while outs[-1] == "":
        outs.pop()
    plain = helper.make_node("Attention", ins, outs, **sample.attrs)
    opsets = [helper.make_opsetid("", sample.opset)]
    ir = helper.find_min_ir_version_for(opsets)
    forward = onnxgrad.load(make_model(sample, arrays, set(arrays)))  # all four outputs
    ys = forward.run(dict(arrays), outputs=[f"y{k}" for k in outputs])
    rng = _rng("U", sample.id)
    us = {y: rng.standard_normal(v.shape) for y, v in ys.items()}
    nodes = [plain] + finite_projection_loss(us)
    graph = helper.make_graph(
        nodes, "l", [_info(f"U_{y}", u) for y, u in us.items()],
        [helper.make_tensor_value_info("loss", D, [])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()]
        + [numpy_helper.from_array(np.array(0.0), "zero")])
    trainer = onnxgrad.Trainer(
        onnxgrad.load(helper.make_model(graph, opset_imports=opsets, ir_version=ir)), loss=None,
        output="loss", optimizer=onnxgrad.SGD(lr=0.0), trainable=[name])
    grad = trainer.gradients({f"U_{y}": u for y, u in us.items()}, None)[name]
    x = arrays[name]
    assert grad.shape == x.shape and np.isfinite(grad).all()
    v = _rng("v", sample.id, name).standard_normal(x.shape)

    def f(value):
        out = forward.run({**arrays, name: value}, outputs=list(us))
        return sum(float(np.sum(np.where(np.isinf(out[y]), 0.0, out[y]) * u))
                   for y, u in us.items())

    _close(float(np.sum(grad * v)), _directional(f, x, v), rtol=1e-5, atol=1e-8)


#: qk_matmul_output with -inf entries (boolean and causal masks, windows, padding), and
#: cases where it alone carries a gradient.
MASKED = []
for _mode in range(4):
    MASKED += [
        (_attention(_mode, [("attn_mask", ("bool", _MASK_B))], softcap=2.0), (0, 3)),
        (_attention(_mode, is_causal=1), (3,)),
        (_attention(_mode, [("attn_mask", ("real", (3, 5)))]), (3,)),
    ]
MASKED += [
    # a row that attends nothing (all -inf), one that attends all, one in between
    (_attention(2, [("attn_mask", ("bool", _DEAD_ROW))]), (0, 3)),
    (_attention(2, [(None, None), (None, None), (None, None),
                    ("nonpad_kv_seqlen", ("int64", [4, 5]))], opset=24, is_causal=1), (0, 3)),
    (_attention(3, opset=25, is_causal=1, left_window_size=1), (0, 3)),
    (S("Attention", [("Q", ("real", (2, 3, 8))), ("K", ("real", (2, 5, 8))),
                     ("V", ("real", (2, 5, 8))), ("attn_mask", ("real", (1, 2, 3, 5)))],
       {"q_num_heads": 2, "kv_num_heads": 2, "is_causal": 1, "qk_matmul_output_mode": 2},
       23, outputs=4), (3,)),
]
MASKED_GRADS = [(s, o, n) for s, o in MASKED for n, spec in s.inputs
                if n is not None and spec[0] == "real"]


@pytest.mark.parametrize("sample,outputs,name", MASKED_GRADS,
                         ids=[f"{s.id}-out{o}-d{n}" for s, o, n in MASKED_GRADS])
def test_attention_gradient_through_masked_qk_output(sample, outputs, name):
    _attention_check(sample, name, outputs)


# -- RoiAlign: rois ------------------------------------------------------------------------

#: Regions inside, partly outside and across the image's edge, a small one (raised to size
#: 1 by output_half_pixel), none with corners or samples on whole pixels.
BOXES = [[0.53, 0.81, 4.27, 5.13], [1.31, 0.22, 6.44, 3.37], [-1.47, 2.06, 2.58, 7.61],
         [2.07, 2.11, 2.63, 2.38], [3.9, -0.7, 6.6, 1.97]]
ROI_SAMPLES = []
for _mode in ("avg", "max"):
    ROI_SAMPLES += [
        S("RoiAlign", [("X", ("real", (2, 3, 6, 7))), ("rois", ("float", BOXES)),
                       ("batch_indices", ("int64", [0, 1, 1, 0, 1]))],
          {"mode": _mode, "output_height": 2, "output_width": 3}, 16),
        S("RoiAlign", [("X", ("real", (2, 2, 5, 6))), ("rois", ("float", BOXES)),
                       ("batch_indices", ("int64", [1, 0, 1, 0, 0]))],
          {"mode": _mode, "output_height": 3, "output_width": 2, "sampling_ratio": 2,
           "spatial_scale": 0.8, "coordinate_transformation_mode": "output_half_pixel"}, 16),
        S("RoiAlign", [("X", ("real", (1, 2, 6, 6))), ("rois", ("float", BOXES)),
                       ("batch_indices", ("int64", [0, 0, 0, 0, 0]))],
          {"mode": _mode, "output_height": 2, "output_width": 2, "spatial_scale": 1.3}, 10),
        S("RoiAlign", [("X", ("real", (1, 2, 7, 6))), ("rois", ("float", BOXES)),
                       ("batch_indices", ("int64", [0, 0, 0, 0, 0]))],
          {"mode": _mode, "output_height": 1, "output_width": 2, "sampling_ratio": 3,
           "spatial_scale": 0.6, "coordinate_transformation_mode": "half_pixel"}, 16),
    ]


@pytest.mark.parametrize("sample", ROI_SAMPLES, ids=lambda s: s.id)
def test_roi_align_rois_gradient(sample):
    check_gradient(sample._replace(tol={"eps": 1e-7}), "rois")


def test_roi_align_rois_gradient_is_not_zero_everywhere():
    """The check above is not vacuous: each region's corners move some output."""
    from onnxgrad.ops.detection import RoiAlignRoisGrad

    sample = ROI_SAMPLES[0]
    arrays = materialize(sample, np.float64)
    dY = _rng("dY").standard_normal((len(BOXES), 3, 2, 3))
    (drois,) = RoiAlignRoisGrad(np, dY, arrays["X"], arrays["rois"], arrays["batch_indices"],
                                output_height=2, output_width=3)
    assert drois.shape == (len(BOXES), 4) and (np.abs(drois).sum(axis=1) > 0).all()


@pytest.mark.parametrize("training", [True, False, None], ids=["training", "inference", "either"])
def test_batchnorm_gradient_standard_form_follows_the_kind_of_run(training):
    """BatchNormalizationGrad in standard ops gives the kernel's dX, dscale and dB: the
    batch-statistics form for a training run, the constant-statistics one outside, and
    for a graph that may run either way a choice made at run time."""
    from onnxgrad.autodiff import GradBuilder, expand_in_standard_ops
    from onnxgrad.ir import Graph

    shape = (4, 3, 2, 2)
    arrays = _bn_arrays(shape, 15, {})
    model = _bn_gradient_model(arrays, 15, {}, wrt=("X", "scale", "B"))
    grad_node = next(n for n in model.graph.nodes if n.op_type == "BatchNormalizationGrad")
    assert len(grad_node.inputs) == 7  # dY, X, scale, saved statistics, running ones
    fetch = [f"d{n}" for n in ("X", "scale", "B")]
    runs = [True, False] if training is None else [training]

    def run_as(training_run):
        state = RunState()
        state.training = training_run
        plan = Model.make_plan(model.graph, get_backend("cpu"), fetch, state=state, weights=())
        return {k: np.asarray(v) for k, v in plan.run(dict(arrays)).items()}

    want = {run: run_as(run) for run in runs}
    graph: Graph = model.graph
    g = GradBuilder(graph)
    g.training_run = training
    assert expand_in_standard_ops(g, grad_node)
    ops = {n.op_type for n in graph.nodes}
    assert "BatchNormalizationGrad" not in ops
    assert ("BatchStatisticsRun" in ops) == (training is None)
    for run in runs:
        got = run_as(run)
        for name in fetch:
            np.testing.assert_allclose(got[name], want[run][name], rtol=1e-10, atol=1e-12,
                                       err_msg=f"{name}, training run: {run}")
