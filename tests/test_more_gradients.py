"""Gradients of inputs that used to be refused or forward only: ScatterElements and
ScatterND with reduction mul/max/min, RotaryEmbedding's caches, Range's start and
delta, DequantizeLinear's x_scale, and the ai.onnx.preview.training optimizers
(Momentum, Adagrad, Adam).

Forward outputs are compared with onnx's ReferenceEvaluator; every gradient is
checked in float64 against central differences (the harness of
tests/test_transformer_ops.py; a small builder of its own for the optimizers,
whose domain and several outputs that harness does not cover).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxgrad
from op_db_transformer import Sample as S
from test_transformer_ops import (check_gradient, differentiable, make_model, materialize,
                                  out_names, reference_run)


def _i64(values):
    return ("int64", values)


# -- samples of the default domain ---------------------------------------------------------------
SAMPLES = []
for _red in ("mul", "max", "min"):
    SAMPLES += [
        # repeated indices: several updates reduce into one element
        S("ScatterElements", [("data", ("real", (3, 4))),
                              ("indices", _i64([[1, 0, 2, 0], [1, 0, 1, 1], [0, 0, 1, 1]])),
                              ("updates", ("real", (3, 4)))], {"reduction": _red}, 18),
        S("ScatterElements", [("data", ("away0", (2, 5))),
                              ("indices", _i64([[4, -1, 0], [2, 2, 2]])),
                              ("updates", ("away0", (2, 3)))], {"axis": 1, "reduction": _red}, 18),
        S("ScatterND", [("data", ("real", (4, 3))), ("indices", _i64([[1], [3], [1]])),
                        ("updates", ("real", (3, 3)))], {"reduction": _red}, 18),
        S("ScatterND", [("data", ("away0", (2, 3, 2))),
                        ("indices", _i64([[0, 1], [1, -1], [0, 1]])),
                        ("updates", ("away0", (3, 2)))], {"reduction": _red}, 18),
        S("ScatterND", [("data", ("real", (5,))), ("indices", _i64([[0], [4], [0], [0]])),
                        ("updates", ("real", (4,)))], {"reduction": _red}, 18),
    ]
_RD = {"rotary_embedding_dim": 4}
SAMPLES += [
    # RotaryEmbedding: caches read through position_ids (repeated), or one row per (batch, position)
    S("RotaryEmbedding", [("X", ("real", (2, 2, 3, 8))), ("cos_cache", ("real", (5, 4))),
                          ("sin_cache", ("real", (5, 4))),
                          ("position_ids", _i64([[0, 1, 1], [4, 2, 1]]))], {}, 23),
    S("RotaryEmbedding", [("X", ("real", (2, 3, 12))), ("cos_cache", ("real", (6, 2))),
                          ("sin_cache", ("real", (6, 2))),
                          ("position_ids", _i64([[5, 0, 2], [2, 3, 3]]))],
      {"num_heads": 2, "interleaved": 1, **_RD}, 23),
    S("RotaryEmbedding", [("X", ("real", (2, 2, 3, 6))), ("cos_cache", ("real", (2, 3, 3))),
                          ("sin_cache", ("real", (2, 3, 3)))], {"interleaved": 1}, 23),
    S("RotaryEmbedding", [("X", ("real", (1, 4, 8))), ("cos_cache", ("real", (1, 4, 2))),
                          ("sin_cache", ("real", (1, 4, 2)))], {"num_heads": 2, **_RD}, 23),
    # Range: limits chosen so that no step of the check crosses a change of length
    S("Range", [("start", ("real", ())), ("limit", ("float", 7.1)), ("delta", ("pos", ()))],
      {}, 11),
    S("Range", [("start", ("real", (1,))), ("limit", ("float", [-6.3])),
                ("delta", ("float", [-0.7]))], {}, 11),
    # DequantizeLinear: per tensor, per axis, per block (a last block cut short)
    S("DequantizeLinear", [("x", ("int8", [[-128, 5, 127], [0, -3, 60]])),
                           ("x_scale", ("pos", ())), ("x_zero_point", ("int8", 3))], {}, 13),
    S("DequantizeLinear", [("x", ("uint8", [[0, 5, 255], [10, 3, 60]])),
                           ("x_scale", ("pos", (3,)))], {"axis": -1}, 13),
    S("DequantizeLinear", [("x", ("int8", [[[1, 2], [3, 4]], [[-5, 6], [7, -8]]])),
                           ("x_scale", ("pos", (2,))), ("x_zero_point", ("int8", [1, -2]))],
      {"axis": 0}, 13),
    S("DequantizeLinear", [("x", ("int8", [[1, 2, 3, 4, 5], [-6, 7, -8, 9, 10]])),
                           ("x_scale", ("pos", (2, 3))),
                           ("x_zero_point", ("int8", [[0, 1, -1], [2, 0, 0]]))],
      {"axis": 1, "block_size": 2}, 21),
]
GRAD_CASES = [(s, n) for s in SAMPLES for n in differentiable(s)]


def _id(sample):
    return sample.id


@pytest.mark.parametrize("sample", SAMPLES, ids=_id)
def test_forward_matches_reference(sample):
    arrays = materialize(sample, np.float32)
    model = make_model(sample, arrays, set(arrays))
    got = onnxgrad.load(model).run(dict(arrays))
    for y, want in zip(out_names(sample), reference_run(model, dict(arrays))):
        assert got[y].dtype == want.dtype and got[y].shape == want.shape
        np.testing.assert_allclose(got[y], want, rtol=1e-5, atol=1e-6, err_msg=y)


@pytest.mark.parametrize("sample,name", GRAD_CASES, ids=[f"{s.id}-d{n}" for s, n in GRAD_CASES])
def test_gradient(sample, name):
    check_gradient(sample, name)


def test_every_new_input_is_checked():
    checked = {(s.op, n) for s, n in GRAD_CASES}
    assert checked >= {("RotaryEmbedding", "cos_cache"), ("RotaryEmbedding", "sin_cache"),
                       ("Range", "start"), ("Range", "delta"), ("DequantizeLinear", "x_scale")}
    for op_type in ("ScatterElements", "ScatterND"):
        for red in ("mul", "max", "min"):
            names = {n for s, n in GRAD_CASES if s.op == op_type and s.attrs["reduction"] == red}
            assert names == {"data", "updates"}, (op_type, red)


# -- exact values: zeros in a product, ties of a maximum -------------------------------------------
def _scatter_gradients(op_type, reduction, data, indices, updates, **attrs):
    """∂ sum(Y * U) / ∂ data and ∂ updates with U = 1."""
    nodes = [helper.make_node(op_type, ["data", "indices", "updates"], ["y"],
                              reduction=reduction, **attrs),
             helper.make_node("ReduceSum", ["y"], ["loss"], keepdims=0)]
    inits = {"data": data, "indices": indices, "updates": updates}
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(
        "loss", TensorProto.DOUBLE, [])], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    trainer = onnxgrad.Trainer(onnxgrad.load(model), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=["data", "updates"])
    grads = trainer.gradients({}, None)
    return grads["data"], grads["updates"]


@pytest.mark.parametrize("op_type", ["ScatterElements", "ScatterND"])
def test_product_with_zero_factors_is_exact(op_type):
    # Element 0 gets data 2 * 3 * 0; element 1 gets 5 * 0 * 0; element 2 gets 4 * 7.
    data = np.array([2.0, 5.0, 4.0])
    updates = np.array([3.0, 0.0, 0.0, 0.0, 7.0])
    where = np.array([0, 0, 1, 1, 2], dtype=np.int64)
    indices = where if op_type == "ScatterElements" else where[:, None]
    ddata, dupdates = _scatter_gradients(op_type, "mul", data, indices, updates)
    np.testing.assert_array_equal(ddata, [0.0, 0.0, 7.0])
    np.testing.assert_array_equal(dupdates, [0.0, 6.0, 0.0, 0.0, 4.0])


def test_tied_maximum_shares_the_gradient():
    # Element 0: data 3 and two updates 3 tie; element 1: an update of 1 loses to data 2.
    data = np.array([[3.0, 2.0]])
    ddata, dupdates = _scatter_gradients(
        "ScatterElements", "max", data, np.array([[0, 0, 1]], dtype=np.int64),
        np.array([[3.0, 3.0, 1.0]]), axis=1)
    np.testing.assert_allclose(ddata, [[1 / 3, 1.0]])
    np.testing.assert_allclose(dupdates, [[1 / 3, 1 / 3, 0.0]])


# -- ai.onnx.preview.training: Momentum, Adagrad, Adam ---------------------------------------------
PREVIEW = "ai.onnx.preview.training"
#: (op, attributes, state names per tensor, number of tensors, T)
OPTIMIZERS = [
    ("Momentum", dict(alpha=0.9, beta=0.1, mode="standard", norm_coefficient=0.0), ["V"], 1, 0),
    ("Momentum", dict(alpha=0.8, beta=0.3, mode="standard", norm_coefficient=0.05), ["V"], 2, 3),
    ("Momentum", dict(alpha=0.7, beta=0.5, mode="nesterov", norm_coefficient=0.1), ["V"], 2, 1),
    ("Momentum", dict(alpha=0.9, beta=0.9, mode="nesterov", norm_coefficient=0.0), ["V"], 1, 0),
    ("Adagrad", dict(), ["H"], 1, 0),
    ("Adagrad", dict(decay_factor=0.1, epsilon=1e-3, norm_coefficient=0.2), ["H"], 2, 4),
    ("Adam", dict(), ["V", "H"], 1, 0),
    ("Adam", dict(alpha=0.8, beta=0.9, epsilon=1e-2, norm_coefficient=0.1,
                  norm_coefficient_post=0.05), ["V", "H"], 2, 3),
    ("Adam", dict(norm_coefficient_post=0.2), ["V", "H"], 1, 7),
]


def _optimizer_case(op_type, attrs, states, n, t):
    """The node's inputs (by name, float64 but T) and output names."""
    rng = np.random.default_rng(zlib.crc32(f"{op_type}{attrs}{n}{t}".encode()))
    arrays = {"R": np.array(rng.uniform(0.1, 0.5)), "T": np.array(t, dtype=np.int64)}
    groups = ["X", "G"] + states
    for group in groups:
        for i in range(n):
            low = 0.1 if group == "H" else -2.0  # H: a running sum of squares
            arrays[f"{group}{i}"] = rng.uniform(low, 2.0, size=(2, 3))
    outputs = [f"{group}{i}_new" for group in ["X"] + states for i in range(n)]
    return arrays, outputs


def _optimizer_model(op_type, attrs, arrays, outputs, wrt=None):
    """The optimizer's node; with ``wrt`` (a float input) the graph outputs
    ``loss = Σ ⟨Y_k, U_k⟩`` (U_k fed) and holds the float inputs as initializers."""
    node = helper.make_node(op_type, list(arrays), outputs, domain=PREVIEW, **attrs)
    elem = {np.dtype(np.float64): TensorProto.DOUBLE, np.dtype(np.int64): TensorProto.INT64}
    inputs = [helper.make_tensor_value_info(k, elem[a.dtype], a.shape) for k, a in arrays.items()
              if wrt is None or a.dtype != np.float64]
    inits = [] if wrt is None else [numpy_helper.from_array(a, k) for k, a in arrays.items()
                                    if a.dtype == np.float64]
    nodes, outs = [node], [helper.make_tensor_value_info(y, TensorProto.DOUBLE, [2, 3])
                           for y in outputs]
    if wrt is not None:
        for y in outputs:
            inputs.append(helper.make_tensor_value_info(f"U_{y}", TensorProto.DOUBLE, [2, 3]))
            nodes += [helper.make_node("Mul", [y, f"U_{y}"], [f"{y}_u"]),
                      helper.make_node("ReduceSum", [f"{y}_u"], [f"{y}_term"], keepdims=0)]
        nodes.append(helper.make_node("Sum", [f"{y}_term" for y in outputs], ["loss"]))
        outs = [helper.make_tensor_value_info("loss", TensorProto.DOUBLE, [])]
    graph = helper.make_graph(nodes, op_type, inputs, outs, initializer=inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid(PREVIEW, 1)])


def _optimizer_params():
    for op_type, attrs, states, n, t in OPTIMIZERS:
        case = f"{op_type}-{attrs}-n{n}-T{t}".replace(" ", "")
        yield pytest.param(op_type, attrs, states, n, t, id=case)


@pytest.mark.parametrize("op_type,attrs,states,n,t", list(_optimizer_params()))
def test_optimizer_forward_matches_reference(op_type, attrs, states, n, t):
    arrays, outputs = _optimizer_case(op_type, attrs, states, n, t)
    model = _optimizer_model(op_type, attrs, arrays, outputs)
    got = onnxgrad.load(model).run(dict(arrays))
    for y, want in zip(outputs, ReferenceEvaluator(model).run(None, dict(arrays))):
        # The reference takes default attributes in float32 and rounds several-tensor Adam
        # outputs to float32.
        np.testing.assert_allclose(got[y], want, rtol=1e-6, atol=1e-7, err_msg=y)


@pytest.mark.parametrize("op_type,attrs,states,n,t", list(_optimizer_params()))
def test_optimizer_gradients(op_type, attrs, states, n, t):
    """⟨∂loss/∂x, v⟩ against central differences for R and every tensor input."""
    arrays, outputs = _optimizer_case(op_type, attrs, states, n, t)
    plain = onnxgrad.load(_optimizer_model(op_type, attrs, arrays, outputs))
    rng = np.random.default_rng(zlib.crc32(op_type.encode()))
    us = {y: rng.standard_normal((2, 3)) for y in outputs}
    floats = [k for k, a in arrays.items() if a.dtype == np.float64]
    model = onnxgrad.load(_optimizer_model(op_type, attrs, arrays, outputs, wrt=floats))
    trainer = onnxgrad.Trainer(model, loss=None, output="loss", optimizer=onnxgrad.SGD(lr=0.0),
                               trainable=floats)
    grads = trainer.gradients({"T": arrays["T"], **{f"U_{y}": u for y, u in us.items()}}, None)
    eps = 1e-6
    for name in floats:
        x = arrays[name]
        assert grads[name].shape == x.shape and grads[name].dtype == x.dtype, name
        v = rng.standard_normal(x.shape)

        def f(shift):
            out = plain.run({**arrays, name: x + shift * v})
            return sum(float(np.sum(u * out[y])) for y, u in us.items())

        numeric = (f(eps) - f(-eps)) / (2 * eps)
        analytic = float(np.sum(grads[name] * v))
        assert abs(analytic - numeric) <= 1e-8 + 1e-6 * (abs(analytic) + abs(numeric)), \
            f"d/d{name}: analytic {analytic!r} vs numeric {numeric!r}"


def test_optimizer_update_count_has_no_gradient():
    """T is an integer count: the rule gives R's and the tensors' gradients, none for T."""
    from onnxgrad.ops import lookup

    for op_type in ("Momentum", "Adagrad", "Adam"):
        definition = lookup(op_type, PREVIEW, 1)
        assert definition.rule is not None
        assert definition.is_differentiable(0) and not definition.is_differentiable(1)
