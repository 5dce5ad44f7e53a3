"""Make the scikit-learn models (exported by skl2onnx) that tests/test_ml_forward.py runs
through onnxgrad and onnxruntime.

Run from the repository root in an environment with scikit-learn, skl2onnx and
onnxruntime (``pip install -e .[reference,test]``)::

    python tests/reference/make_ml_reference.py

Everything is seeded; each file is at most a few tens of KB.  The test draws its own
feeds from the same distributions (with NaN features, unknown categories and colors).
It writes into ``tests/reference/``:

- ``sklearn_gbr.onnx``: GradientBoostingRegressor (20 trees of depth 3) on 5 float
  features; TreeEnsembleRegressor (ai.onnx.ml 1), input ``X`` (N, 5) float32.
- ``sklearn_rf3.onnx``: RandomForestClassifier (8 trees of depth 5) with three string
  labels; TreeEnsembleClassifier with ``classlabels_strings``.
- ``sklearn_rf2.onnx``: RandomForestClassifier (8 trees of depth 4), two int labels:
  one column of weights.
- ``sklearn_gbc2.onnx``: GradientBoostingClassifier (10 trees of depth 2), two int
  labels: one column of weights, a base value and LOGISTIC.
- ``sklearn_onehot_mlp.onnx``: ColumnTransformer (OneHotEncoder on column 0, whose
  values are categories 0-3, and StandardScaler on columns 1-2) then MLPClassifier;
  input ``X`` (N, 3) float32, outputs ``label`` and ``probabilities``; the MLP's logit
  is ``add_result1``.
- ``sklearn_onehot_strings.onnx``: OneHotEncoder on two string columns then
  LogisticRegression; input ``S`` (N, 2) strings.

Each model's onnxruntime outputs are checked against scikit-learn's predictions.
"""

from __future__ import annotations

import pathlib
import warnings

import numpy as np
import onnx
import onnxruntime as ort

HERE = pathlib.Path(__file__).resolve().parent
COLORS = np.array(["red", "green", "blue", "amber"], dtype=object)


def features(n: int, seed: int) -> np.ndarray:
    """(n, 5) standard normal float32 features."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype(np.float32)


def categories(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) float32 rows: a category 0-3 and two numbers; and (n, 2) color strings."""
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.integers(0, 4, size=(n, 1)), rng.normal(size=(n, 2))], axis=1)
    S = COLORS[rng.integers(0, len(COLORS), size=(n, 2))]
    return X.astype(np.float32), S


def _ort(onx, feeds):
    sess = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _save(onx, name):
    onnx.save(onx, str(HERE / name))
    print(f"{name}: {(HERE / name).stat().st_size} bytes, ops "
          f"{sorted({n.op_type for n in onx.graph.node})}")


def main():
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import (GradientBoostingClassifier, GradientBoostingRegressor,
                                  RandomForestClassifier)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    X = features(300, seed=0)
    y = X[:, 0] * 2 + X[:, 1] ** 2 - X[:, 2] * X[:, 3]
    test = features(50, seed=1)

    gbr = GradientBoostingRegressor(n_estimators=20, max_depth=3, random_state=0).fit(X, y)
    onx = to_onnx(gbr, initial_types=[("X", FloatTensorType([None, 5]))])
    np.testing.assert_allclose(_ort(onx, {"X": test})[0][:, 0], gbr.predict(test), rtol=1e-4,
                               atol=1e-4)
    _save(onx, "sklearn_gbr.onnx")

    labels3 = np.array(["low", "mid", "high"], dtype=object)[np.digitize(y, [0.0, 2.0])]
    rf3 = RandomForestClassifier(n_estimators=8, max_depth=5, random_state=0).fit(X, labels3)
    onx = to_onnx(rf3, initial_types=[("X", FloatTensorType([None, 5]))],
                  options={id(rf3): {"zipmap": False}})
    label, proba = _ort(onx, {"X": test})
    assert (label == rf3.predict(test)).all()
    np.testing.assert_allclose(proba, rf3.predict_proba(test), rtol=1e-4, atol=1e-5)
    _save(onx, "sklearn_rf3.onnx")

    labels2 = (y > 1).astype(np.int64)
    for name, clf in (
            ("sklearn_rf2.onnx",
             RandomForestClassifier(n_estimators=8, max_depth=4, random_state=0)),
            ("sklearn_gbc2.onnx",
             GradientBoostingClassifier(n_estimators=10, max_depth=2, random_state=0))):
        clf.fit(X, labels2)
        onx = to_onnx(clf, initial_types=[("X", FloatTensorType([None, 5]))],
                      options={id(clf): {"zipmap": False}})
        label, proba = _ort(onx, {"X": test})
        assert (label == clf.predict(test)).all()
        np.testing.assert_allclose(proba, clf.predict_proba(test), rtol=1e-4, atol=1e-5)
        _save(onx, name)

    C, S = categories(300, seed=0)
    target = ((C[:, 1] + (C[:, 0] == 2)) > 0.5).astype(np.int64)
    Ct, St = categories(50, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = Pipeline([
            ("pre", ColumnTransformer([("onehot", OneHotEncoder(handle_unknown="ignore"), [0]),
                                       ("scale", StandardScaler(), [1, 2])])),
            ("mlp", MLPClassifier(hidden_layer_sizes=(8,), max_iter=60, random_state=0)),
        ]).fit(C, target)
    onx = to_onnx(mlp, initial_types=[("X", FloatTensorType([None, 3]))],
                  options={id(mlp.steps[-1][1]): {"zipmap": False}})
    assert "OneHotEncoder" in {n.op_type for n in onx.graph.node}
    assert "add_result1" in {o for n in onx.graph.node for o in n.output}
    label, proba = _ort(onx, {"X": Ct})
    assert (label == mlp.predict(Ct)).all()
    np.testing.assert_allclose(proba, mlp.predict_proba(Ct), rtol=1e-4, atol=1e-5)
    _save(onx, "sklearn_onehot_mlp.onnx")

    colors = ((S[:, 0] == "red") | (S[:, 1] == "blue")).astype(np.int64)
    lr = Pipeline([("onehot", OneHotEncoder(handle_unknown="ignore")),
                   ("lr", LogisticRegression())]).fit(S, colors)
    onx = to_onnx(lr, initial_types=[("S", StringTensorType([None, 2]))],
                  options={id(lr.steps[-1][1]): {"zipmap": False}})
    label, proba = _ort(onx, {"S": St})
    assert (label == lr.predict(St)).all()
    np.testing.assert_allclose(proba, lr.predict_proba(St), rtol=1e-4, atol=1e-5)
    _save(onx, "sklearn_onehot_strings.onnx")


if __name__ == "__main__":
    main()
