"""Forward kernels of ai.onnx.ml ops without a differentiable input: TreeEnsembleRegressor
and TreeEnsembleClassifier (opsets 1 and 3), OneHotEncoder and FeatureVectorizer.

* One-node models against onnxruntime over attribute combinations: random forests with
  every node mode, NaN features, missing_value_tracks_true, base values, aggregates,
  post-transforms, int and string labels, binary models with one weight column; and
  against onnx's reference evaluator on the cases it computes alike.
* scikit-learn models exported by skl2onnx (tests/reference/make_ml_reference.py)
  through ``Model.run`` against onnxruntime; a OneHotEncoder + MLP pipeline trains with
  its encoder as a constant of the step, and so does a tree ensemble next to a weight.
* Errors name the node and what was expected.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxgrad
from onnxgrad.errors import DataError, ModelError, ShapeError, UnsupportedOpError

ML = "ai.onnx.ml"
REF = pathlib.Path(__file__).parent / "reference"
F, D, I64, I32, STR = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64,
                       TensorProto.INT32, TensorProto.STRING)
LEQ = ("BRANCH_LEQ",)
ALL = ("BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT", "BRANCH_EQ", "BRANCH_NEQ")
#: Thresholds and half the features come from this grid, so that BRANCH_EQ and ties hit.
GRID = np.array([-1.0, -0.5, 0.0, 0.5, 1.0], np.float32)


# -- builders -----------------------------------------------------------------------------------
def forest(seed, *, trees=4, depth=3, features=4, modes=LEQ, missing=False, width=1,
           per_leaf=1, prefix="target", sign=1, scale=1.0):
    """Attributes of random trees: full binary trees of random depth whose node ids are
    shuffled (each tree's root listed first), the weights listed in random order."""
    rng = np.random.default_rng(seed)
    a = {k: [] for k in ("nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_modes",
                         "nodes_values", "nodes_truenodeids", "nodes_falsenodeids",
                         "nodes_missing_value_tracks_true", f"{prefix}_treeids",
                         f"{prefix}_nodeids", f"{prefix}_ids", f"{prefix}_weights")}
    for t in range(trees):
        levels = int(rng.integers(1, depth + 1))
        count = 2 ** (levels + 1) - 1
        ids = np.concatenate([[0], rng.permutation(np.arange(1, count))])
        for i in range(count):
            leaf = i >= 2 ** levels - 1
            a["nodes_treeids"].append(t + 7)
            a["nodes_nodeids"].append(int(ids[i]))
            a["nodes_featureids"].append(0 if leaf else int(rng.integers(0, features)))
            a["nodes_modes"].append("LEAF" if leaf else str(rng.choice(modes)))
            a["nodes_values"].append(0.0 if leaf else float(rng.choice(GRID)))
            a["nodes_truenodeids"].append(0 if leaf else int(ids[2 * i + 1]))
            a["nodes_falsenodeids"].append(0 if leaf else int(ids[2 * i + 2]))
            a["nodes_missing_value_tracks_true"].append(int(missing and rng.random() < 0.5))
            if leaf:
                for k in rng.choice(width, size=min(per_leaf, width), replace=False):
                    w = float(np.float32(rng.normal() * scale))
                    a[f"{prefix}_treeids"].append(t + 7)
                    a[f"{prefix}_nodeids"].append(int(ids[i]))
                    a[f"{prefix}_ids"].append(int(k))
                    a[f"{prefix}_weights"].append(abs(w) if sign > 0 else w)
    order = rng.permutation(len(a[f"{prefix}_ids"]))
    for k in (f"{prefix}_treeids", f"{prefix}_nodeids", f"{prefix}_ids", f"{prefix}_weights"):
        a[k] = [a[k][i] for i in order]
    if not missing:
        del a["nodes_missing_value_tracks_true"]
    return a


def as_tensors(a, dtype, names):
    """Opset 3: the float lists ``names`` as ``*_as_tensor`` attributes of ``dtype``."""
    for name in names:
        if name in a:
            a[f"{name}_as_tensor"] = numpy_helper.from_array(np.array(a.pop(name), dtype))
    return a


def features(seed, n=60, width=4, dtype=np.float32, nan=True):
    """Rows mixing grid values and normal draws; with ``nan``, some NaN features."""
    rng = np.random.default_rng(seed)
    X = np.where(rng.random((n, width)) < 0.5, rng.choice(GRID, (n, width)),
                 rng.normal(size=(n, width)))
    if nan:
        X[::6, 1] = np.nan
        X[3::9, 0] = np.nan
    return X.astype(dtype)


def one_node(op, attrs, inputs, outputs, ml_opset=3, name="trees"):
    node = helper.make_node(op, [n for n, _, _ in inputs], [n for n, _, _ in outputs],
                            domain=ML, name=name, **attrs)
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs])
    return helper.make_model(graph, ir_version=9, opset_imports=[
        helper.make_opsetid("", 19), helper.make_opsetid(ML, ml_opset)])


def ort_run(proto, feeds):
    source = str(proto) if isinstance(proto, pathlib.Path) else proto.SerializeToString()
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def assert_outputs(got, want, rtol=1e-5, atol=1e-5, columns=None):
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype,
                                                           w.dtype)
        if w.dtype.kind in "OSUi":
            np.testing.assert_array_equal(g, w, err_msg=name)
        else:
            cols = slice(None) if columns is None else columns
            np.testing.assert_allclose(g[:, cols], w[:, cols], rtol=rtol, atol=atol,
                                       err_msg=name)


# -- TreeEnsembleRegressor ---------------------------------------------------------------------
# (aggregate_function, targets, post_transform, base_values, modes, missing tracks, opset 3)
REGRESSORS = [
    ("SUM", 1, "NONE", False, LEQ, False, False),
    ("SUM", 1, "NONE", True, ALL, True, False),
    ("AVERAGE", 1, "PROBIT", True, LEQ, False, False),
    ("MIN", 1, "NONE", True, ALL, True, False),
    ("MAX", 1, "LOGISTIC", False, LEQ, True, True),
    ("SUM", 3, "NONE", True, ALL, True, True),
    ("AVERAGE", 3, "SOFTMAX", True, ALL, False, False),
    ("MIN", 3, "LOGISTIC", False, ALL, True, False),
    ("MAX", 3, "SOFTMAX_ZERO", True, LEQ, False, True),
    ("SUM", 3, "PROBIT", False, ALL, False, False),
    ("AVERAGE", 2, "NONE", False, ("BRANCH_EQ", "BRANCH_NEQ", "BRANCH_LT"), True, True),
    ("MAX", 2, "NONE", True, ("BRANCH_GTE", "BRANCH_GT"), False, False),
]


@pytest.mark.parametrize("case", REGRESSORS, ids=["-".join(map(str, c[:4])) + f"-{i}"
                                                  for i, c in enumerate(REGRESSORS)])
def test_regressor_matches_onnxruntime(case):
    aggregate, width, post, base, modes, missing, opset3 = case
    seed = REGRESSORS.index(case)
    probit = post == "PROBIT"  # scores in (0, 1)
    a = forest(seed, modes=modes, missing=missing, width=width, per_leaf=min(width, 2),
               sign=1 if probit else -1, scale=0.05 if probit else 1.0)
    a.update(aggregate_function=aggregate, n_targets=width, post_transform=post)
    if base:
        a["base_values"] = [0.25 + 0.125 * i for i in range(width)]
    dtype = np.float64 if opset3 else np.float32
    if opset3:
        as_tensors(a, np.float64, ("nodes_values", "target_weights", "base_values"))
    proto = one_node("TreeEnsembleRegressor", a, [("X", D if opset3 else F, [None, 4])],
                     [("Y", F, [None, width])], ml_opset=3 if opset3 else 1)
    X = features(seed, dtype=dtype)
    assert_outputs(onnxgrad.load(proto).run({"X": X}), ort_run(proto, {"X": X}))


@pytest.mark.parametrize("aggregate", ["SUM", "AVERAGE", "MIN", "MAX"])
@pytest.mark.parametrize("width", [1, 3])
def test_regressor_matches_the_reference_evaluator(aggregate, width):
    """Every leaf weighs every target and no feature is NaN: the cases the reference
    evaluator computes as onnxruntime does."""
    a = forest(7, modes=ALL, width=width, per_leaf=width, sign=-1)
    a.update(aggregate_function=aggregate, n_targets=width, base_values=[0.5] * width)
    proto = one_node("TreeEnsembleRegressor", a, [("X", F, [None, 4])],
                     [("Y", F, [None, width])], ml_opset=1)
    X = features(7, nan=False)
    (want,) = ReferenceEvaluator(proto).run(None, {"X": X})
    np.testing.assert_allclose(onnxgrad.load(proto).run({"X": X})["Y"], want, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("aggregate", ["SUM", "AVERAGE", "MIN", "MAX"])
def test_regressor_with_a_one_leaf_tree_matches_onnxruntime(aggregate):
    """Tree 0 is a single leaf (a root that is a leaf); tree 1 a stump."""
    a = dict(nodes_treeids=[0, 1, 1, 1], nodes_nodeids=[0, 0, 1, 2], nodes_featureids=[0] * 4,
             nodes_modes=["LEAF", "BRANCH_LEQ", "LEAF", "LEAF"], nodes_values=[0, 0.5, 0, 0],
             nodes_truenodeids=[0, 1, 0, 0], nodes_falsenodeids=[0, 2, 0, 0],
             target_treeids=[0, 1, 1], target_nodeids=[0, 1, 2], target_ids=[0, 0, 0],
             target_weights=[3.0, 1.0, 2.0], n_targets=1, aggregate_function=aggregate)
    proto = one_node("TreeEnsembleRegressor", a, [("X", F, [None, 1])], [("Y", F, [None, 1])],
                     ml_opset=1)
    X = np.array([[0.0], [1.0], [np.nan]], np.float32)
    assert_outputs(onnxgrad.load(proto).run({"X": X}), ort_run(proto, {"X": X}))


def test_regressor_walks_large_batches_in_chunks():
    """3000 rows x 30 trees x 3 targets run in more than one chunk of rows."""
    a = forest(11, trees=30, depth=5, modes=ALL, missing=True, width=3, per_leaf=2, sign=-1)
    a.update(n_targets=3, base_values=[0.1, 0.2, 0.3])
    proto = one_node("TreeEnsembleRegressor", a, [("X", F, [None, 4])], [("Y", F, [None, 3])],
                     ml_opset=1)
    X = features(11, n=3000)
    got = onnxgrad.load(proto).run({"X": X})
    assert_outputs(got, ort_run(proto, {"X": X}))
    np.testing.assert_array_equal(onnxgrad.load(proto).run({"X": X[:7]})["Y"], got["Y"][:7])


def test_regressor_reads_a_vector_as_one_row():
    a = forest(3, width=2, per_leaf=2)
    a.update(n_targets=2)
    vector, matrix = (
        onnxgrad.load(one_node("TreeEnsembleRegressor", a, [("X", F, shape)],
                               [("Y", F, [None, 2])], ml_opset=1))
        for shape in ([4], [1, 4]))
    x = features(3, n=1, nan=False)
    np.testing.assert_array_equal(vector.run({"X": x[0]})["Y"], matrix.run({"X": x})["Y"])


# -- TreeEnsembleClassifier ------------------------------------------------------------------
# (classes, weights: "all" or the one class weighed, sign, base values, post, string labels)
CLASSIFIERS = [
    (3, "all", 1, 0, "NONE", False),
    (3, "all", -1, 3, "SOFTMAX", True),
    (4, "all", -1, 4, "LOGISTIC", False),
    (3, "all", 1, 0, "SOFTMAX_ZERO", True),
    (3, "all", -1, 3, "PROBIT", False),
    (2, 0, 1, 0, "NONE", False),        # scikit-learn's binary RandomForestClassifier
    (2, 0, -1, 1, "LOGISTIC", False),   # scikit-learn's binary GradientBoostingClassifier
    (2, 0, 1, 0, "LOGISTIC", True),
    (2, 0, -1, 0, "NONE", True),
    (2, 0, 1, 1, "PROBIT", False),
    (2, 1, -1, 2, "NONE", False),
    (2, 0, 1, 2, "SOFTMAX", False),
    (2, "all", 1, 0, "NONE", False),
    (2, "all", -1, 2, "SOFTMAX", True),
]


@pytest.mark.parametrize("case", CLASSIFIERS, ids=["-".join(map(str, c)) for c in CLASSIFIERS])
def test_classifier_matches_onnxruntime(case):
    classes, weighed, sign, n_base, post, strings = case
    seed = 100 + CLASSIFIERS.index(case)
    a = forest(seed, modes=ALL, missing=True, width=classes, prefix="class", sign=sign,
               per_leaf=2 if weighed == "all" else 1, scale=0.2 if post == "PROBIT" else 1.0)
    if weighed != "all":
        a["class_ids"] = [weighed] * len(a["class_ids"])
    a["post_transform"] = post
    if n_base:
        a["base_values"] = [0.25 - 0.125 * i for i in range(n_base)]
    if strings:
        a["classlabels_strings"] = [f"c{i}" for i in range(classes)]
    else:  # onnxruntime writes 0 and 1 for two labels weighed in both columns
        a["classlabels_int64s"] = [0, 1] if weighed == "all" and classes == 2 else \
            [5 + 3 * i for i in range(classes)]
    proto = one_node("TreeEnsembleClassifier", a, [("X", F, [None, 4])],
                     [("label", STR if strings else I64, [None]), ("Z", F, [None, classes])],
                     ml_opset=1)
    X = features(seed)
    # onnxruntime writes one score under PROBIT when one class is weighed
    columns = slice(0, 1) if post == "PROBIT" and weighed != "all" and n_base < 2 else None
    assert_outputs(onnxgrad.load(proto).run({"X": X}), ort_run(proto, {"X": X}),
                   columns=columns)


def test_classifier_as_tensor_attributes_and_int_features_match_onnxruntime():
    a = forest(21, modes=ALL, width=3, per_leaf=3, prefix="class", sign=-1)
    a.update(classlabels_int64s=[10, 20, 30], base_values=[0.1, 0.0, -0.1],
             post_transform="SOFTMAX")
    tensors = as_tensors(dict(a), np.float64, ("nodes_values", "class_weights", "base_values"))
    proto = one_node("TreeEnsembleClassifier", tensors, [("X", D, [None, 4])],
                     [("label", I64, [None]), ("Z", F, [None, 3])])
    X = features(21)
    assert_outputs(onnxgrad.load(proto).run({"X": X.astype(np.float64)}),
                   ort_run(proto, {"X": X.astype(np.float64)}))
    ints = one_node("TreeEnsembleClassifier", a, [("X", I64, [None, 4])],
                    [("label", I64, [None]), ("Z", F, [None, 3])], ml_opset=1)
    Xi = np.random.default_rng(21).integers(-2, 3, size=(40, 4)).astype(np.int64)
    assert_outputs(onnxgrad.load(ints).run({"X": Xi}), ort_run(ints, {"X": Xi}))


@pytest.mark.parametrize("classes,post", [(3, "NONE"), (3, "SOFTMAX"), (2, "NONE")])
def test_classifier_matches_the_reference_evaluator(classes, post):
    """Positive weights, no NaN features; two classes with one column of weights."""
    a = forest(31, modes=ALL, width=classes, per_leaf=classes if classes > 2 else 1,
               prefix="class")
    if classes == 2:
        a["class_ids"] = [0] * len(a["class_ids"])
    a.update(classlabels_strings=[f"k{i}" for i in range(classes)], post_transform=post)
    proto = one_node("TreeEnsembleClassifier", a, [("X", F, [None, 4])],
                     [("label", STR, [None]), ("Z", F, [None, classes])], ml_opset=1)
    X = features(31, nan=False)
    label, scores = ReferenceEvaluator(proto).run(None, {"X": X})
    got = onnxgrad.load(proto).run({"X": X})
    np.testing.assert_array_equal(got["label"], label.astype(object))
    np.testing.assert_allclose(got["Z"], scores, rtol=1e-5, atol=1e-6)


# -- errors ---------------------------------------------------------------------------------
def _stump(**changes):
    a = dict(nodes_treeids=[0, 0, 0], nodes_nodeids=[0, 1, 2], nodes_featureids=[1, 0, 0],
             nodes_modes=["BRANCH_LEQ", "LEAF", "LEAF"], nodes_values=[0.5, 0.0, 0.0],
             nodes_truenodeids=[1, 0, 0], nodes_falsenodeids=[2, 0, 0], target_treeids=[0, 0],
             target_nodeids=[1, 2], target_ids=[0, 0], target_weights=[1.0, 2.0], n_targets=1)
    a.update(changes)
    return one_node("TreeEnsembleRegressor", a, [("X", F, [None, 2])], [("Y", F, [None, 1])],
                    ml_opset=1)


@pytest.mark.parametrize("changes,error,message", [
    (dict(nodes_truenodeids=[9, 0, 0]), ModelError,
     r"node 'trees' \(TreeEnsembleRegressor\): nodes_truenodeids names node 9 of tree 0"),
    (dict(target_nodeids=[1, 5]), ModelError, "target_nodeids names node 5 of tree 0"),
    (dict(nodes_featureids=[3, 0, 0]), ShapeError, "reads feature 3 but X has 2 features"),
    (dict(nodes_modes=["BRANCH_LEQ", "BRANCH_LEQ", "LEAF"], nodes_truenodeids=[1, 0, 0],
          nodes_falsenodeids=[2, 2, 0]), ModelError, "form a cycle"),
    (dict(nodes_modes=["BRANCH_MAYBE", "LEAF", "LEAF"]), ModelError,
     "nodes_modes must be among .*BRANCH_MAYBE"),
    (dict(nodes_nodeids=[0, 1, 1]), ModelError, "node 1 of tree 0 is listed twice"),
    (dict(post_transform="SQUARE"), ModelError, "post_transform must be one of"),
    (dict(aggregate_function="MEDIAN"), ModelError, "aggregate_function must be one of"),
    (dict(base_values=[1.0, 2.0]), ModelError, "2 base_values for 1 targets"),
    (dict(target_ids=[0, 1]), ModelError, r"target or class ids must lie in \[0, 1\)"),
])
def test_regressor_errors_name_the_node(changes, error, message):
    with pytest.raises(error, match=message):
        onnxgrad.load(_stump(**changes)).run({"X": np.zeros((2, 2), np.float32)})


def test_classifier_errors_name_the_node():
    a = forest(1, width=3, per_leaf=3, prefix="class")
    for changes, message in ((dict(classlabels_int64s=[1]), "needs two or more class labels"),
                             (dict(classlabels_int64s=[1, 2, 3], base_values=[0.5, 0.5]),
                              "2 base_values for 3 classes")):
        proto = one_node("TreeEnsembleClassifier", {**a, **changes}, [("X", F, [None, 4])],
                         [("label", I64, [None]), ("Z", F, [None, 3])], ml_opset=1,
                         name="forest")
        with pytest.raises(ModelError, match=rf"node 'forest' \(TreeEnsembleClassifier\): "
                                             rf"{message}"):
            onnxgrad.load(proto).run({"X": np.zeros((2, 4), np.float32)})


# -- OneHotEncoder -----------------------------------------------------------------------------
INT_CATS, DUPLICATED = [3, 1, 2, 9], [3, 1, 2, 9, 1]


@pytest.mark.parametrize("elem,X", [
    (I64, np.array([[1, 5, 3], [2, 2, 9]], np.int64)),
    (F, np.array([[1.7, 5, -3], [2, np.nan, 9.2]], np.float32)),
    (D, np.array([1.0, 3.0, 2.5, -0.5])),
])
@pytest.mark.parametrize("cats", [INT_CATS, DUPLICATED], ids=["cats", "repeated"])
def test_one_hot_encoder_numbers_match_onnxruntime(elem, X, cats):
    proto = one_node("OneHotEncoder", dict(cats_int64s=cats), [("X", elem, list(X.shape))],
                     [("Y", F, [None] * (X.ndim + 1))], ml_opset=1, name="onehot")
    assert_outputs(onnxgrad.load(proto).run({"X": X}), ort_run(proto, {"X": X}))


@pytest.mark.parametrize("X", [np.array([["a", "b"], ["zz", "c"]], dtype=object),
                               np.array(["b", "a", "c"], dtype=object)])
def test_one_hot_encoder_strings_match_onnxruntime_and_the_reference(X):
    proto = one_node("OneHotEncoder", dict(cats_strings=["c", "a", "b"]),
                     [("X", STR, list(X.shape))], [("Y", F, [None] * (X.ndim + 1))],
                     ml_opset=1, name="onehot")
    got = onnxgrad.load(proto).run({"X": X})
    assert_outputs(got, ort_run(proto, {"X": X}))
    np.testing.assert_array_equal(got["Y"], ReferenceEvaluator(proto).run(None, {"X": X})[0])


def test_one_hot_encoder_int64_matches_the_reference():
    X = np.array([[1, 5, 3], [2, 2, 9]], np.int64)
    proto = one_node("OneHotEncoder", dict(cats_int64s=INT_CATS), [("X", I64, [2, 3])],
                     [("Y", F, [2, 3, 4])], ml_opset=1)
    np.testing.assert_array_equal(onnxgrad.load(proto).run({"X": X})["Y"],
                                  ReferenceEvaluator(proto).run(None, {"X": X})[0])


def test_one_hot_encoder_unknown_category_without_zeros_is_a_data_error():
    proto = one_node("OneHotEncoder", dict(cats_strings=["a", "b"], zeros=0),
                     [("X", STR, [None])], [("Y", F, [None, 2])], ml_opset=1, name="onehot")
    model = onnxgrad.load(proto)
    np.testing.assert_array_equal(model.run({"X": np.array(["b", "a"], dtype=object)})["Y"],
                                  [[0, 1], [1, 0]])
    with pytest.raises(DataError, match=r"node 'onehot' \(OneHotEncoder\): X holds 'zz', which "
                                        r"is not among its 2 categories, and zeros is 0"):
        model.run({"X": np.array(["a", "zz"], dtype=object)})


def test_one_hot_encoder_needs_categories_of_the_input_type():
    proto = one_node("OneHotEncoder", dict(cats_strings=["a"]), [("X", I64, [None])],
                     [("Y", F, [None, 1])], ml_opset=1, name="onehot")
    with pytest.raises(ModelError, match="numeric input X needs cats_int64s"):
        onnxgrad.load(proto).run({"X": np.array([1], np.int64)})


# -- FeatureVectorizer ----------------------------------------------------------------------
@pytest.mark.parametrize("elem,dtype", [(F, np.float32), (D, np.float64), (I64, np.int64),
                                        (I32, np.int32)])
@pytest.mark.parametrize("dims", [[3, 1, 4], [2, 3, 1], [0, 1, 8]])
def test_feature_vectorizer_matches_onnxruntime(elem, dtype, dims):
    feeds = {"A": np.arange(6).reshape(2, 3).astype(dtype), "B": np.array([[7], [8]], dtype),
             "C": (np.arange(8).reshape(2, 2, 2) * 1.5).astype(dtype)}
    proto = one_node("FeatureVectorizer", dict(inputdimensions=dims),
                     [(k, elem, list(v.shape)) for k, v in feeds.items()],
                     [("Y", F, [None, sum(dims)])], ml_opset=1, name="vectorize")
    assert_outputs(onnxgrad.load(proto).run(feeds), ort_run(proto, feeds))


def test_feature_vectorizer_matches_the_reference_and_reads_a_vector_as_one_row():
    feeds = {"A": np.arange(6, dtype=np.float32).reshape(2, 3),
             "B": np.array([[7.5], [8.5]], np.float32)}
    proto = one_node("FeatureVectorizer", dict(inputdimensions=[2, 3]),
                     [("A", F, [2, 3]), ("B", F, [2, 1])], [("Y", F, [2, 5])], ml_opset=1)
    np.testing.assert_array_equal(onnxgrad.load(proto).run(feeds)["Y"],
                                  ReferenceEvaluator(proto).run(None, feeds)[0])
    vector = one_node("FeatureVectorizer", dict(inputdimensions=[4]), [("A", F, [3])],
                      [("Y", F, [1, 4])], ml_opset=1)
    feed = {"A": np.array([1, 2, 3], np.float32)}
    assert_outputs(onnxgrad.load(vector).run(feed), ort_run(vector, feed))


def test_feature_vectorizer_errors_name_the_node():
    proto = one_node("FeatureVectorizer", dict(inputdimensions=[2, 1]),
                     [("A", F, [None, 2]), ("B", F, [None, 1])], [("Y", F, [None, 3])],
                     ml_opset=1, name="vectorize")
    with pytest.raises(ShapeError, match=r"node 'vectorize' \(FeatureVectorizer\): input 1 has "
                                         r"3 rows, input 0 has 2"):
        onnxgrad.load(proto).run({"A": np.zeros((2, 2), np.float32),
                                  "B": np.zeros((3, 1), np.float32)})
    short = one_node("FeatureVectorizer", dict(inputdimensions=[2]),
                     [("A", F, [None, 2]), ("B", F, [None, 1])], [("Y", F, [None, 3])],
                     ml_opset=1, name="vectorize")
    with pytest.raises(ModelError, match="inputdimensions must give one size"):
        onnxgrad.load(short).run({"A": np.zeros((2, 2), np.float32),
                                  "B": np.zeros((2, 1), np.float32)})


def test_feature_vectorizer_gradient_is_refused_not_zero():
    nodes = [helper.make_node("FeatureVectorizer", ["w"], ["v"], domain=ML, inputdimensions=[3],
                              name="vectorize"),
             helper.make_node("ReduceSum", ["v"], ["loss"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("loss", F, [])],
                              [numpy_helper.from_array(np.ones((1, 3), np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19),
                                                    helper.make_opsetid(ML, 1)])
    with pytest.raises(UnsupportedOpError, match="FeatureVectorizer"):
        onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss",
                         trainable=["w"]).gradients({}, None)


# -- training next to constant ml ops ----------------------------------------------------------
def test_tree_ensemble_runs_as_a_constant_of_a_training_step():
    """Y = trees(X) + X @ W: the gradient of W is that of a constant offset."""
    a = forest(41, modes=ALL, width=2, per_leaf=2, sign=-1)
    a.update(n_targets=2)
    nodes = [helper.make_node("TreeEnsembleRegressor", ["X"], ["T"], domain=ML, name="trees",
                              **a),
             helper.make_node("MatMul", ["X", "W"], ["L"]),
             helper.make_node("Add", ["T", "L"], ["Y"])]
    W = np.random.default_rng(41).normal(size=(4, 2)).astype(np.float32)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", F, [None, 4])],
                              [helper.make_tensor_value_info("Y", F, [None, 2])],
                              [numpy_helper.from_array(W, "W")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19),
                                                    helper.make_opsetid(ML, 1)])
    X, y = features(41, n=32, nan=False), np.random.default_rng(1).normal(size=(32, 2))
    y = y.astype(np.float32)
    trees = ort_run(one_node("TreeEnsembleRegressor", a, [("X", F, [None, 4])],
                             [("T", F, [None, 2])], ml_opset=1), {"X": X})["T"]
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss="mse", output="Y",
                               optimizer=onnxgrad.SGD(lr=0.05))
    grads = trainer.gradients({"X": X}, y)
    assert set(grads) == {"W"}
    residual = trees + X @ W - y
    np.testing.assert_allclose(grads["W"], 2 * X.T @ residual / residual.size, rtol=1e-4,
                               atol=1e-5)
    losses = [trainer.step({"X": X}, y) for _ in range(5)]
    assert losses[-1] < losses[0]


# -- scikit-learn models exported by skl2onnx ----------------------------------------------------
def _sklearn_feeds(name):
    rng = np.random.default_rng(5)
    if name == "sklearn_onehot_mlp.onnx":
        X = np.concatenate([rng.integers(0, 5, size=(40, 1)), rng.normal(size=(40, 2))], axis=1)
        return {"X": X.astype(np.float32)}  # category 4 is unknown: a row of zeros
    if name == "sklearn_onehot_strings.onnx":
        colors = np.array(["red", "green", "blue", "amber", "purple"], dtype=object)
        return {"S": colors[rng.integers(0, 5, size=(40, 2))]}
    X = rng.normal(size=(60, 5)).astype(np.float32)
    X[::7, 2] = np.nan
    return {"X": X}


SKLEARN = ["sklearn_gbr.onnx", "sklearn_rf3.onnx", "sklearn_rf2.onnx", "sklearn_gbc2.onnx",
           "sklearn_onehot_mlp.onnx", "sklearn_onehot_strings.onnx"]


@pytest.mark.parametrize("name", SKLEARN)
def test_sklearn_model_runs_as_in_onnxruntime(name):
    path = REF / name
    feeds = _sklearn_feeds(name)
    got = onnxgrad.load(path).run(feeds)
    want = ort_run(path, feeds)
    assert_outputs(got, want, rtol=1e-5, atol=1e-6)


def test_sklearn_onehot_pipeline_trains_its_mlp(tmp_path):
    """The OneHotEncoder runs as a constant of each step; the MLP's weights train and the
    saved model runs in onnxruntime."""
    path = REF / "sklearn_onehot_mlp.onnx"
    feeds = _sklearn_feeds("sklearn_onehot_mlp.onnx")
    X = feeds["X"]
    target = ((X[:, 1] + (X[:, 0] == 2)) > 0.5).astype(np.float32)[:, None]
    trainer = onnxgrad.Trainer(onnxgrad.load(path), loss="bce_with_logits", output="add_result1",
                               optimizer=onnxgrad.Adam(lr=1e-2))
    assert {"coefficient", "intercepts", "coefficient1", "intercepts1"} <= \
        set(trainer.model.parameters())
    losses = [trainer.step(feeds, target) for _ in range(20)]
    assert losses[-1] < losses[0]
    trainer.model.save(tmp_path / "trained.onnx")
    trained = onnx.load(str(tmp_path / "trained.onnx"))
    assert_outputs(onnxgrad.load(trained).run(feeds), ort_run(tmp_path / "trained.onnx", feeds),
                   rtol=1e-5, atol=1e-6)
