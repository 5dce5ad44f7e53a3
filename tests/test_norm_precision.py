"""Normalization statistics in float32 at full precision.

Channels whose values sit far from zero and close together (BatchNorm over
8 values per channel, here at 1000 ± 1) are where a float32 mean's rounding is
no small part of the spread.  onnxgrad computes the statistics with the
shifted-data algorithm (``ops/normalization.py``), so that its float32 gradients
on such stacks stay within 2× of PyTorch float32's error against float64 (the
reference, from ``tests/reference/make_norm_precision_reference.py``) and, in
fact, near float32's own resolution.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxgrad

REFERENCE = np.load(pathlib.Path(__file__).parent / "reference" / "norm_precision.npz")
LAYERS = 6
#: Measured: about 5e-7 for both stacks; rounding the statistics' mean to float32
#: (the textbook two-pass algorithm) gives 8e-5–1.4e-4 on the BatchNorm stack.
FULL_PRECISION = 1e-5


def _model(kind: str, dtype) -> onnxgrad.Model:
    ref = {k.split("/", 1)[1]: v for k, v in REFERENCE.items() if k.startswith(kind + "/")}
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    inits = [numpy_helper.from_array(ref["U"].astype(dtype), "U")]
    nodes, prev = [], "x"
    for i in range(LAYERS):
        inits.append(numpy_helper.from_array(ref[f"W{i}"].astype(dtype), f"W{i}"))
        if kind == "bn":
            c = ref["W0"].shape[0]
            for name, value in (("s", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0)):
                inits.append(numpy_helper.from_array(np.full(c, value, dtype), f"{name}{i}"))
            nodes += [helper.make_node("BatchNormalization",
                                       [prev, f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"]),
                      helper.make_node("Relu", [f"n{i}"], [f"a{i}"]),
                      helper.make_node("Conv", [f"a{i}", f"W{i}"], [f"y{i}"], pads=[1, 1, 1, 1])]
        else:
            f = ref["W0"].shape[0]
            inits += [numpy_helper.from_array(np.ones(f, dtype), f"s{i}"),
                      numpy_helper.from_array(np.zeros(f, dtype), f"b{i}")]
            nodes += [helper.make_node("LayerNormalization", [prev, f"s{i}", f"b{i}"], [f"n{i}"]),
                      helper.make_node("Tanh", [f"n{i}"], [f"a{i}"]),
                      helper.make_node("MatMul", [f"a{i}", f"W{i}"], [f"y{i}"])]
        prev = f"y{i}"
    nodes += [helper.make_node("Mul", [prev, "U"], ["p"]),
              helper.make_node("ReduceSum", ["p"], ["loss"], keepdims=0)]
    graph = helper.make_graph(
        nodes, f"{kind}_stack", [helper.make_tensor_value_info("x", elem, ref["x"].shape)],
        [helper.make_tensor_value_info("loss", elem, [])], inits)
    return onnxgrad.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _gradients(kind: str, dtype) -> dict[str, np.ndarray]:
    trainer = onnxgrad.Trainer(_model(kind, dtype), loss=None, output="loss",
                               trainable=[f"W{i}" for i in range(LAYERS)])
    x = REFERENCE[f"{kind}/x"].astype(dtype)  # float32 values, exact in float64 too
    return {k: v.astype(np.float64) for k, v in trainer.gradients({"x": x}).items()}


def _error(got: dict, want: dict) -> float:
    return max(float(np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k])) for k in want)


@pytest.mark.parametrize("kind", ["bn", "ln"])
def test_float32_gradients_of_ill_conditioned_normalization_stacks(kind):
    want = {f"W{i}": REFERENCE[f"{kind}/grad64/W{i}"] for i in range(LAYERS)}
    # The same function as PyTorch's: float64 gradients agree to 1e-8.
    assert _error(_gradients(kind, np.float64), want) < 1e-8
    error = _error(_gradients(kind, np.float32), want)
    torch_error = float(REFERENCE[f"{kind}/torch_float32_error"])
    assert error <= 2 * torch_error, (error, torch_error)
    assert error < FULL_PRECISION, error
