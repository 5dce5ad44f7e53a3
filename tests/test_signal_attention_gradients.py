"""Gradients of DFT, STFT, LinearAttention and FlexAttention, against central
differences in float64 (forward kernels against the ONNX reference or onnxruntime).

DFT and STFT reuse the one-node harness of tests/test_transformer_ops.py over
attribute combinations (opset 17 and 20 forms; real and complex inputs; one-sided
and inverse transforms; ``dft_length`` padding and truncating).  LinearAttention
runs in float64 (onnxgrad's kernel takes it though the schema stops at float32);
FlexAttention, in the ai.onnx.preview domain, has its own small model builder.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxgrad
from onnxgrad.errors import UnsupportedOpError
from op_db_transformer import Sample as S
from test_transformer_ops import (check_gradient, differentiable, make_model, materialize,
                                  out_names, reference_run)


def _dft(shape, opset, length=None, axis=None, **attrs):
    """A DFT sample: an optional ``dft_length`` and, at opset 20, an ``axis`` input."""
    inputs = [("input", ("real", shape)),
              ("dft_length" if length is not None else None, ("int64", np.array(length)))]
    if axis is not None and opset >= 20:
        inputs.append(("axis", ("int64", np.array(axis))))
    elif axis is not None:
        attrs["axis"] = axis
    while inputs[-1][0] is None:
        inputs.pop()
    return S("DFT", inputs, attrs, opset)


SIGNAL_SAMPLES = [
    _dft((2, 5, 1), 20),
    _dft((2, 5, 2), 20, inverse=1),
    _dft((3, 6, 1), 20, length=8, onesided=1),
    _dft((4, 3, 2), 20, length=3, axis=0),
    _dft((2, 6, 1), 20, length=4, onesided=1),
    _dft((2, 4, 2), 20, inverse=1, onesided=1),
    _dft((2, 4, 2), 20, length=5, inverse=1, onesided=1),
    _dft((2, 4, 1), 20, length=8, inverse=1, onesided=1),
    _dft((3, 5, 2), 20, length=7, inverse=1),
    _dft((2, 3, 4, 2), 20, length=2, axis=-3, inverse=1),
    _dft((2, 6, 2), 17),
    _dft((5, 2, 1), 17, axis=0, onesided=1),
    _dft((2, 5, 2), 17, length=4, inverse=1),
    _dft((2, 3, 2), 17, length=6, inverse=1, onesided=1),
    S("STFT", [("signal", ("real", (2, 16, 1))), ("frame_step", ("int64", np.array(4))),
               ("window", ("pos", (8,)))], {}, 17),
    S("STFT", [("signal", ("real", (1, 12, 2))), ("frame_step", ("int64", np.array(3))),
               (None, ("real", (6,))), ("frame_length", ("int64", np.array(6)))],
      {"onesided": 0}, 17),
    S("STFT", [("signal", ("real", (2, 11, 2))), ("frame_step", ("int64", np.array(2))),
               ("window", ("real", (5,))), ("frame_length", ("int64", np.array(5)))],
      {"onesided": 0}, 17),
    S("STFT", [("signal", ("real", (1, 10, 1))), ("frame_step", ("int64", np.array(3))),
               ("window", ("real", (7,)))], {"onesided": 1}, 17),
]


@pytest.mark.parametrize("sample", SIGNAL_SAMPLES, ids=lambda s: s.id)
def test_signal_forward_matches_reference(sample):
    arrays = materialize(sample, np.float32)
    model = make_model(sample, arrays, set(arrays))
    want = reference_run(model, dict(arrays))
    got = onnxgrad.load(model).run(dict(arrays))
    for y, w in zip(out_names(sample), want):
        assert got[y].shape == w.shape
        np.testing.assert_allclose(got[y], w, rtol=1e-4, atol=1e-5, err_msg=y)


SIGNAL_GRADS = [(s, n) for s in SIGNAL_SAMPLES for n in differentiable(s)]


@pytest.mark.parametrize("sample,name", SIGNAL_GRADS,
                         ids=[f"{s.id}-d{n}" for s, n in SIGNAL_GRADS])
def test_signal_gradient(sample, name):
    check_gradient(sample, name)


# -- LinearAttention (opset 27): float64 runs (the schema allows float32 at most, onnxgrad's
# kernel any float type), checked through both outputs, Y and present_state ----------------

def _linear(rule, hq=2, hkv=2, t=3, d_k=3, d_v=2, past=False, decay=None, beta=None, **attrs):
    """A LinearAttention sample; ``decay``/``beta``: features per step."""
    b = 2
    inputs = [("query", ("real", (b, t, hq * d_k))), ("key", ("real", (b, t, hkv * d_k))),
              ("value", ("real", (b, t, hkv * d_v))),
              ("past_state" if past else None, ("real", (b, hkv, d_k, d_v))),
              ("decay" if decay else None, ("real", (b, t, decay or 1))),
              ("beta" if beta else None, ("pos", (b, t, beta or 1)))]
    while inputs[-1][0] is None:
        inputs.pop()
    return S("LinearAttention", inputs, {"q_num_heads": hq, "kv_num_heads": hkv,
                                         "update_rule": rule, **attrs}, 27, outputs=2)


LINEAR_SAMPLES = [
    _linear("linear"),
    _linear("linear", t=1),
    _linear("gated", past=True, decay=2 * 3),
    _linear("gated", decay=2),
    _linear("delta", beta=2, past=True),
    _linear("gated_delta", hq=4, hkv=2, decay=2, beta=1, past=True, scale=0.7),
    _linear("gated_delta", hq=2, hkv=1, decay=3, beta=1, d_k=3, t=4),
    _linear("gated_delta", decay=2 * 3, beta=2, past=True),
]

LINEAR_GRADS = [(s, n) for s in LINEAR_SAMPLES for n in differentiable(s)]


@pytest.mark.parametrize("sample,name", LINEAR_GRADS,
                         ids=[f"{s.id}-d{n}" for s, n in LINEAR_GRADS])
def test_linear_attention_gradient(sample, name):
    check_gradient(sample, name)


# -- FlexAttention (ai.onnx.preview): Q, K and V, through score_mod and prob_mod ---------------

def _graph(name, inp, out, nodes, inits=()):
    return helper.make_graph(
        nodes, name, [helper.make_tensor_value_info(inp, TensorProto.DOUBLE, list("BHLS"))],
        [helper.make_tensor_value_info(out, TensorProto.DOUBLE, list("BHLS"))],
        initializer=list(inits))


SOFT_CAP = _graph("soft_cap", "s", "capped", [
    helper.make_node("Div", ["s", "cap"], ["r"]), helper.make_node("Tanh", ["r"], ["t"]),
    helper.make_node("Mul", ["t", "cap"], ["capped"])],
    [numpy_helper.from_array(np.array(1.5), "cap")])
CAUSAL = _graph("causal", "s", "masked", [helper.make_node("Where", ["mask", "s", "ninf"],
                                                           ["masked"])],
                [numpy_helper.from_array(np.array(-np.inf), "ninf")])
SQUARE = _graph("square", "p", "q", [helper.make_node("Mul", ["p", "p"], ["q"])])
OUTER_BIAS = _graph("bias", "s", "biased", [helper.make_node("Add", ["s", "bias"], ["biased"])])


def _flex_model(arrays, attrs):
    """FlexAttention over initializers, giving ``loss = sum(Y * U)``."""
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    nodes = [helper.make_node("FlexAttention", ["Q", "K", "V"], ["Y"],
                              domain="ai.onnx.preview", **attrs),
             helper.make_node("Mul", ["Y", "U"], ["YU"]),
             helper.make_node("ReduceSum", ["YU"], ["loss"], keepdims=0)]
    graph = helper.make_graph(nodes, "flex", [], [helper.make_tensor_value_info(
        "loss", TensorProto.DOUBLE, [])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 26),
                                                   helper.make_opsetid("ai.onnx.preview", 1)])


def _flex_arrays(hq, hkv, seq=4, d=3, d_v=2):
    rng = np.random.default_rng(hq * 10 + hkv)
    arrays = {"Q": rng.uniform(-1, 1, (2, hq, seq, d)), "K": rng.uniform(-1, 1, (2, hkv, seq, d)),
              "V": rng.uniform(-1, 1, (2, hkv, seq, d_v))}
    arrays["U"] = rng.standard_normal((2, hq, seq, d_v))
    return arrays


FLEX_CASES = [
    (2, 2, {}),
    (4, 2, {"scale": 0.3}),
    (2, 1, {"score_mod": SOFT_CAP}),
    (2, 2, {"score_mod": CAUSAL}),
    (2, 2, {"prob_mod": SQUARE, "score_mod": SOFT_CAP}),
]


def _causal_mask(arrays):
    seq = arrays["Q"].shape[2]
    return {**arrays, "mask": np.tril(np.ones((seq, seq), dtype=bool))}


@pytest.mark.parametrize("hq,hkv,attrs", FLEX_CASES,
                         ids=[f"{a}x{b}-{sorted(c)}" for a, b, c in FLEX_CASES])
@pytest.mark.parametrize("name", ["Q", "K", "V"])
def test_flex_attention_gradient(hq, hkv, attrs, name):
    arrays = _flex_arrays(hq, hkv)
    if "score_mod" in attrs and attrs["score_mod"] is CAUSAL:
        arrays = _causal_mask(arrays)
    trainer = onnxgrad.Trainer(onnxgrad.load(_flex_model(arrays, attrs)), loss=None,
                               output="loss", optimizer=onnxgrad.SGD(lr=0.0), trainable=[name])
    grad = trainer.gradients({}, None)[name]
    x = arrays[name]
    assert grad.shape == x.shape and grad.dtype == x.dtype
    v = np.random.default_rng(7).standard_normal(x.shape)

    def f(shift):
        model = onnxgrad.load(_flex_model({**arrays, name: x + shift * v}, attrs))
        return float(model.run({})["loss"])

    numeric = (f(1e-6) - f(-1e-6)) / 2e-6
    np.testing.assert_allclose(np.sum(grad * v), numeric, rtol=1e-6, atol=1e-8)


def test_flex_attention_refuses_the_gradient_of_an_outer_value():
    arrays = {**_flex_arrays(2, 2), "bias": np.array(0.25)}
    model = onnxgrad.load(_flex_model(arrays, {"score_mod": OUTER_BIAS}))
    grads = onnxgrad.Trainer(model, loss=None, output="loss", optimizer=onnxgrad.SGD(lr=0.0),
                             trainable=["Q"]).gradients({}, None)
    assert grads["Q"].shape == arrays["Q"].shape
    with pytest.raises(UnsupportedOpError, match="captured"):
        onnxgrad.Trainer(model, loss=None, output="loss", optimizer=onnxgrad.SGD(lr=0.0),
                         trainable=["bias"])
