"""Gradient rules against central differences, for every differentiable input of
every op sample in op_db (float64), and the same rules in float32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import gradcheck as gc
import onnxgrad
from onnxgrad.errors import UnsupportedOpError
from onnxgrad.ops import registered_ops
from op_db import SAMPLES

GRAD_CASES = [(s, name) for s in SAMPLES for name in gc.differentiable_inputs(s)]
FAMILIES = {f"onnxgrad.ops.{m}" for m in ("elementwise", "activation", "linalg", "shape", "reduce", "ml")}
#: Ops of these families whose samples live in other test modules, with the ONNX backend
#: node suite (test_conformance.py) for the forward passes of all of them.
ELSEWHERE = {
    "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare",
    "ReduceProd", "ReduceLogSum",                      # tests/op_db_transformer.py
    "Det",                                             # tests/test_vision_gradients.py
    "DepthToSpace", "SpaceToDepth",                    # tests/test_extra_ops.py (gradients)
    "LabelEncoder", "Binarizer",                       # forward only: the node suite
    "OneHotEncoder", "FeatureVectorizer",              # forward only: tests/test_ml_forward.py
}


@pytest.mark.parametrize("sample,name", GRAD_CASES, ids=[f"{s.id}-d{n}" for s, n in GRAD_CASES])
def test_gradient(sample, name):
    if gc.definition(sample).rule is None:
        # Declared differentiable without a rule: asking for it must raise, never give zero.
        arrays = gc.materialize(sample)
        _, y = gc.run_forward(sample, arrays)
        with pytest.raises(UnsupportedOpError, match=sample.op):
            gc.analytic_gradients(sample, arrays, [name], gc.projection_u(sample, y))
        return
    gc.check_gradient(sample, name)


F32_CASES = [s for s in SAMPLES if gc.differentiable_inputs(s) and gc.definition(s).rule is not None
             and not s.tol]


@pytest.mark.parametrize("sample", F32_CASES, ids=[s.id for s in F32_CASES])
def test_gradient_float32(sample):
    """float32 in, float32 gradients out (no float64 upcast), equal to float64's."""
    gc.check_float32_gradients(sample, rtol=1e-4, atol=1e-4)


def test_every_op_and_input_is_covered():
    """Each public op of these families has samples, and each differentiable input is checked."""
    checked = set()
    for s, name in GRAD_CASES:
        index = [n for n, _ in s.inputs].index(name)
        checked.add((s.domain, s.op, gc.definition(s).input_name(index)))
    in_db = {(s.domain, s.op) for s in SAMPLES}
    for (domain, name), versions in registered_ops().items():
        if domain == "onnxgrad" or versions[0].kernel.__module__ not in FAMILIES \
                or name in ELSEWHERE:
            continue
        assert (domain, name) in in_db, f"{name} has no sample in op_db"
        for d in versions:
            for inp in d.differentiable:
                assert (domain, name, inp) in checked, f"{name}: input {inp!r} is never checked"


def _reshaped_matmul(shape_a, shape_b, rank_known: bool):
    """loss = sum(MatMul(Reshape(A0, sA), B) * U); with ``rank_known=False`` the
    reshape targets are graph inputs of unknown length, so A's rank is unknown
    when the backward graph is built (the rule falls back to MatMulGrad)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape_a)
    b = rng.standard_normal(shape_b)
    y = np.matmul(a, b)
    u = rng.standard_normal(y.shape)
    dim = [len(shape_a)] if rank_known else ["n"]
    dimb = [len(shape_b)] if rank_known else ["m"]
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["A0", "sA"], ["A"]),
         helper.make_node("Reshape", ["B0", "sB"], ["B"]),
         helper.make_node("MatMul", ["A", "B"], ["Y"]),
         helper.make_node("Mul", ["Y", "U"], ["YU"]),
         helper.make_node("ReduceSum", ["YU"], ["loss"], keepdims=0)],
        "mm",
        [helper.make_tensor_value_info("sA", onnx.TensorProto.INT64, dim),
         helper.make_tensor_value_info("sB", onnx.TensorProto.INT64, dimb),
         helper.make_tensor_value_info("U", onnx.TensorProto.DOUBLE, u.shape)],
        [helper.make_tensor_value_info("loss", onnx.TensorProto.DOUBLE, [])],
        initializer=[numpy_helper.from_array(a.reshape(-1), "A0"),
                     numpy_helper.from_array(b.reshape(-1), "B0")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    trainer = onnxgrad.Trainer(onnxgrad.load(model), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=["A0", "B0"])
    feeds = {"sA": np.array(shape_a, np.int64), "sB": np.array(shape_b, np.int64), "U": u}
    return trainer, trainer.gradients(feeds, None), a, b, u


@pytest.mark.parametrize("shape_a,shape_b", [
    ((3, 4), (4, 5)), ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,)),
    ((2, 1, 3, 4), (5, 4, 2)), ((4,), (2, 4, 5)), ((2, 3, 4), (4,)),
])
def test_matmul_gradient_with_unknown_ranks(shape_a, shape_b):
    """The run-time MatMulGrad fallback agrees with the static decomposition."""
    trainer, dynamic, a, b, u = _reshaped_matmul(shape_a, shape_b, rank_known=False)
    static_trainer, static, *_ = _reshaped_matmul(shape_a, shape_b, rank_known=True)
    for name in ("A0", "B0"):
        np.testing.assert_allclose(dynamic[name], static[name], rtol=1e-12, atol=1e-12)
    # The two trainers really took the two paths (the training graph is inspectable).
    ops = lambda t: {n.op_type for n in t.graph.nodes}  # noqa: E731
    assert "MatMulGrad" in ops(trainer) and "MatMulGrad" not in ops(static_trainer)
    if a.ndim == 2 and b.ndim == 2:  # and both equal the textbook formulas
        np.testing.assert_allclose(static["A0"], (u @ b.T).reshape(-1), rtol=1e-12)
        np.testing.assert_allclose(static["B0"], (a.T @ u).reshape(-1), rtol=1e-12)


# -- float32 on CuPy (tests/test_gpu.py covers float64 and the forward kernels) --------------

@pytest.mark.gpu
@pytest.mark.parametrize("sample", F32_CASES, ids=[s.id for s in F32_CASES])
def test_gradient_float32_cuda_matches_cpu(sample):
    names = gc.differentiable_inputs(sample)
    arrays = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v)
              for k, v in gc.materialize(sample, np.float64).items()}
    _, y = gc.run_forward(sample, arrays)
    u = gc.projection_u(sample, y)
    cpu = gc.analytic_gradients(sample, arrays, names, u)
    gpu = gc.analytic_gradients(sample, arrays, names, u, device="cuda")
    for name in names:
        assert gpu[name].dtype == np.float32, f"{name}: {gpu[name].dtype}"
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-4, atol=1e-5, err_msg=name)
