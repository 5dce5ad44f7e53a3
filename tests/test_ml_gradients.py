"""ai.onnx.ml linear models, SVMs, Scaler, Normalizer and Imputer.

* Forward: float32 one-node models against onnxruntime (labels and scores).
* Gradients (float64): ⟨∂loss/∂X, v⟩ from ``Trainer.gradients`` against central
  differences of ``Model.run``, with ``loss = Σ Y·U`` over the float output.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxgrad
from onnxgrad.errors import ModelError

ML = "ai.onnx.ml"
RNG = np.random.default_rng(0)
SV = RNG.normal(size=(4, 3)).round(3).ravel().tolist()
KERNELS = {"LINEAR": [0.0, 0.0, 0.0], "RBF": [0.5, 0.0, 0.0], "POLY": [0.5, 1.0, 3.0],
           "SIGMOID": [0.3, 0.2, 0.0]}
LINEAR3 = dict(coefficients=[1.0, 2.0, 3.0, -1.0, 0.0, 1.0, 0.5, -0.5, 0.2],
               intercepts=[0.5, 0.0, -0.3], classlabels_ints=[4, 5, 6])
BINARY = dict(coefficients=[1.0, 2.0, 3.0], intercepts=[0.5], classlabels_strings=["no", "yes"])

# (op, attrs, outputs); the last output is the differentiable one.
CASES = [("Scaler", dict(offset=[1.0, 2.0, 3.0], scale=[0.5, 2.0, -1.0]), 1),
         ("Scaler", dict(offset=[1.0], scale=[0.5]), 1),
         ("Imputer", dict(imputed_value_floats=[9.0, 8.0, 7.0], replaced_value_float=np.nan), 1)]
CASES += [("Normalizer", dict(norm=n), 1) for n in ("MAX", "L1", "L2")]
for pt in ("NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO"):
    CASES += [("LinearRegressor", dict(coefficients=[1.0, 2.0, 3.0, -1.0, 0.0, 1.0],
                                       intercepts=[0.5, 0.0], targets=2, post_transform=pt), 1),
              ("LinearClassifier", dict(LINEAR3, post_transform=pt), 2),
              ("LinearClassifier", dict(BINARY, post_transform=pt), 2)]
for kernel, params in KERNELS.items():
    svm = dict(kernel_type=kernel, kernel_params=params, support_vectors=SV)
    CASES += [("SVMRegressor", dict(svm, coefficients=[1.0, -0.5, 0.3, 0.7], n_supports=4,
                                    rho=[0.2]), 1)]
    for pt in ("NONE", "LOGISTIC", "SOFTMAX"):
        CASES += [("SVMClassifier", dict(svm, coefficients=[1.0, -0.5, 0.3, -0.7],
                                         vectors_per_class=[2, 2], rho=[0.1],
                                         classlabels_ints=[0, 1], post_transform=pt), 2),
                  ("SVMClassifier", dict(svm, coefficients=[1.0, -0.5, 0.3, -0.7, 0.2, 0.4, -1.0,
                                                            0.5], vectors_per_class=[1, 2, 1],
                                         rho=[0.1, -0.2, 0.3], classlabels_strings=["a", "b", "c"],
                                         post_transform=pt), 2)]
CASES += [("SVMRegressor", dict(coefficients=[1.0, -0.5, 0.3], rho=[0.2],
                                kernel_params=[0.0, 0.0, 0.0]), 1),
          ("SVMClassifier", dict(coefficients=[1.0, -0.5, 0.3, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0],
                                 rho=[0.2, 0.1, 0.0], kernel_params=[0.0, 0.0, 0.0],
                                 classlabels_ints=[3, 4, 5], post_transform="SOFTMAX"), 2)]


def _id(case):
    op, attrs, _ = case
    classes = len(attrs.get("classlabels_ints") or attrs.get("classlabels_strings") or [])
    return op + "-" + "-".join(str(attrs[k]) for k in ("post_transform", "kernel_type", "norm")
                               if k in attrs) + f"-{classes}"


def _inputs(op):
    X = RNG.normal(size=(5, 3))
    if op == "Imputer":
        X[1, 2] = X[3, 0] = np.nan
    if op == "Normalizer":
        X[2] = -np.abs(X[2])  # a row whose max is negative
    return X


def _model(op, attrs, outputs, X, out_types, loss=False):
    """One node on ``X``: outputs typed as ``out_types``; with ``loss`` the graph outputs
    ``Σ Y·U`` for its last output, ``X`` an initializer and ``U`` fed."""
    names = [f"y{k}" for k in range(outputs)]
    nodes = [helper.make_node(op, ["X"], names, domain=ML, **attrs)]
    x_info = helper.make_tensor_value_info("X", helper.np_dtype_to_tensor_dtype(X.dtype), X.shape)
    typed = [helper.make_tensor_value_info(n, t, s) for n, (t, s) in zip(names, out_types)]
    if loss:
        nodes += [helper.make_node("Mul", [names[-1], "U"], ["yu"]),
                  helper.make_node("ReduceSum", ["yu"], ["loss"], keepdims=0)]
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("U", TensorProto.DOUBLE, out_types[-1][1])],
            [helper.make_tensor_value_info("loss", TensorProto.DOUBLE, [])],
            initializer=[numpy_helper.from_array(X, "X")], value_info=typed)
    else:
        graph = helper.make_graph(nodes, "g", [x_info], typed)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid(ML, 3)])


def _untyped(op, attrs, outputs, X):
    graph = helper.make_graph(
        [helper.make_node(op, ["X"], [f"y{k}" for k in range(outputs)], domain=ML, **attrs)], "g",
        [helper.make_tensor_value_info("X", helper.np_dtype_to_tensor_dtype(X.dtype), X.shape)],
        [helper.make_value_info(f"y{k}", onnx.TypeProto()) for k in range(outputs)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid(ML, 3)])


def _types(values, float_type=None):
    return [(TensorProto.STRING if v.dtype.kind in "OU" else
             float_type if v.dtype.kind == "f" and float_type else
             helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for v in values]


def _onnxruntime(op, attrs, outputs, X):
    session = ort.InferenceSession(_untyped(op, attrs, outputs, X).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"X": X})


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_forward_matches_onnxruntime(case):
    op, attrs, outputs = case
    X = _inputs(op).astype(np.float32)
    want = _onnxruntime(op, attrs, outputs, X)
    got = onnxgrad.load(_model(op, attrs, outputs, X, _types(want))).run({"X": X})
    for k, w in enumerate(want):
        g = got[f"y{k}"]
        assert g.shape == w.shape
        if w.dtype.kind == "f":
            assert g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(g.astype(w.dtype), w)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_gradient_central_differences(case):
    op, attrs, outputs = case
    X = _inputs(op)
    plain_types = _types(_onnxruntime(op, attrs, outputs, X.astype(np.float32)),
                         TensorProto.DOUBLE)
    plain = onnxgrad.load(_model(op, attrs, outputs, X, plain_types))
    U = RNG.standard_normal(plain_types[-1][1])
    trainer = onnxgrad.Trainer(onnxgrad.load(_model(op, attrs, outputs, X, plain_types, loss=True)),
                               loss=None, output="loss", optimizer=onnxgrad.SGD(lr=0.0),
                               trainable=["X"])
    grad = trainer.gradients({"U": U}, None)["X"]
    assert grad.dtype == X.dtype and grad.shape == X.shape
    v = RNG.standard_normal(X.shape)
    eps = 1e-6

    def f(shift):
        return float(np.sum(U * plain.run({"X": X + shift * v})[f"y{outputs - 1}"]))

    numeric = (f(eps) - f(-eps)) / (2 * eps)
    analytic = float(np.nansum(grad * v))
    assert abs(analytic - numeric) <= 1e-8 + 1e-5 * (np.nansum(np.abs(grad * v)) + abs(numeric))


def test_refused_features_raise_model_errors():
    """Platt probabilities and PROBIT are refused by name, never computed wrongly."""
    X = _inputs("SVMClassifier").astype(np.float32)
    svc = dict(coefficients=[1.0, -0.5, 0.3, -0.7], vectors_per_class=[2, 2], rho=[0.1],
               support_vectors=SV, kernel_type="RBF", kernel_params=[0.5, 0.0, 0.0],
               classlabels_ints=[0, 1], prob_a=[1.0], prob_b=[0.0])
    types = [(TensorProto.INT64, [5]), (TensorProto.FLOAT, [5, 2])]
    with pytest.raises(ModelError, match="prob_a"):
        onnxgrad.load(_model("SVMClassifier", svc, 2, X, types)).run({"X": X})
    probit = dict(coefficients=[1.0, 2.0, 3.0], intercepts=[0.5], post_transform="PROBIT")
    with pytest.raises(ModelError, match="PROBIT"):
        model = _model("LinearRegressor", probit, 1, X, [(TensorProto.FLOAT, [5, 1])])
        onnxgrad.load(model).run({"X": X})
