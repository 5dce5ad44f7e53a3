"""The ``ai.onnx.ml`` map ops (ZipMap, DictVectorizer, CastMap) and map-typed values.

* each op on small hand-built models against onnxruntime (where onnxruntime's Python
  binding can feed the map type; by hand where it cannot), with missing and unknown
  keys, int and string keys;
* map feeds are checked against the declared key and value types;
* none of the three has a gradient: asking for one raises UnsupportedOpError by node;
* scikit-learn classifiers exported by skl2onnx with their default ZipMap run as in
  onnxruntime (labels, and probabilities as a list of dicts); one fine-tunes on the
  scores before its ZipMap and, saved, still runs in onnxruntime with the ZipMap intact;
* ``onnxgrad inspect`` names the map type, ``onnxgrad predict`` writes a ZipMap output
  as class predictions and refuses other non-tensor outputs by name.
"""

from __future__ import annotations

import csv

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import onnxgrad
from onnxgrad.autodiff import build_gradients
from onnxgrad.errors import DataError, ModelError, ShapeError, UnsupportedOpError
from onnxgrad.ir import Graph, Node, ValueInfo
from onnxgrad.tools.cli import main

ML = "ai.onnx.ml"
F, D, I64, STR = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.STRING


# -- builders -----------------------------------------------------------------------------------
def map_type(key, value):
    return helper.make_map_type_proto(key, helper.make_tensor_type_proto(value, []))


def one_node(node, inputs, outputs):
    graph = helper.make_graph([node], "maps", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(ML, 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def ort_run(model, feeds):
    source = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _assert_tensor_like_onnxruntime(model, feed):
    """onnxgrad's output ``Y`` for the map ``X = feed`` is onnxruntime's, bit for bit."""
    got = onnxgrad.load(model).run({"X": feed})["Y"]
    want = ort_run(model, {"X": feed})["Y"]
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def zipmap_model(labels, shape):
    kind = I64 if "classlabels_int64s" in labels else STR
    node = helper.make_node("ZipMap", ["X"], ["Z"], domain=ML, name="zip", **labels)
    return one_node(node, [helper.make_tensor_value_info("X", F, shape)],
                    [helper.make_value_info("Z", helper.make_sequence_type_proto(
                        map_type(kind, F)))])


def dict_vectorizer_model(key, value, **vocabulary):
    node = helper.make_node("DictVectorizer", ["X"], ["Y"], domain=ML, name="dv", **vocabulary)
    return one_node(node, [helper.make_value_info("X", map_type(key, value))],
                    [helper.make_tensor_value_info("Y", value, [1, None])])


def cast_map_model(value, out, **attrs):
    node = helper.make_node("CastMap", ["X"], ["Y"], domain=ML, name="cm", **attrs)
    return one_node(node, [helper.make_value_info("X", map_type(I64, value))],
                    [helper.make_tensor_value_info("Y", out, [1, None])])


def assert_same_maps(got, want, rtol=0.0, atol=0.0):
    """Lists of dicts with the same keys, in the same order, and close values."""
    assert isinstance(got, list) and len(got) == len(want)
    for g, w in zip(got, want):
        assert isinstance(g, dict) and list(g) == list(w), (g, w)
        assert all(type(k) is type(kw) for k, kw in zip(g, w))
        assert all(type(v) is float for v in g.values())  # Python floats, as onnxruntime gives
        np.testing.assert_allclose(list(g.values()), list(w.values()), rtol=rtol, atol=atol)


# -- ZipMap -------------------------------------------------------------------------------------
ZIPMAP_CASES = [
    (dict(classlabels_int64s=[5, 7]), [None, 2], np.array([[.1, .9], [.3, .7]], np.float32)),
    (dict(classlabels_int64s=[3, -1, 0]), [None, 3],
     np.random.default_rng(0).random((6, 3), dtype=np.float32)),
    (dict(classlabels_strings=["a", "b", "c"]), [1, 3], np.array([[.1, .2, .7]], np.float32)),
    (dict(classlabels_strings=["a", "b", "c"]), [3], np.array([.1, .2, .7], np.float32)),
    (dict(classlabels_strings=["x", "y"]), [None, 2], np.zeros((0, 2), np.float32)),
    (dict(classlabels_strings=["b", "a", "B", "a"]), [None, 4],  # sorted; "a" twice: the last
     np.arange(8, dtype=np.float32).reshape(2, 4)),
]


@pytest.mark.parametrize("labels,shape,X", ZIPMAP_CASES)
def test_zipmap_matches_onnxruntime(labels, shape, X):
    model = zipmap_model(labels, shape)
    got = onnxgrad.load(model).run({"X": X})["Z"]
    assert_same_maps(got, ort_run(model, {"X": X})["Z"])  # bit for bit


def test_zipmap_refuses_bad_columns_and_labels():
    model = zipmap_model(dict(classlabels_int64s=[0, 1, 2]), [None, None])
    with pytest.raises(ShapeError, match="zip.*2 columns for 3 class labels"):
        onnxgrad.load(model).run({"X": np.zeros((4, 2), np.float32)})
    both = helper.make_node("ZipMap", ["X"], ["Z"], domain=ML, name="zip2",
                            classlabels_int64s=[0], classlabels_strings=["a"])
    model = helper.make_model(helper.make_graph(
        [both], "g", [helper.make_tensor_value_info("X", F, [None, 1])],
        [helper.make_value_info("Z", helper.make_sequence_type_proto(map_type(I64, F)))]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ML, 1)])
    with pytest.raises(ModelError, match="zip2.*exactly one of classlabels_int64s"):
        onnxgrad.load(model).run({"X": np.zeros((1, 1), np.float32)})


def test_map_types_are_loaded():
    graph = onnxgrad.load(zipmap_model(dict(classlabels_strings=["a"]), [None, 1])).graph
    info = graph.info["Z"]
    assert info.kind == "sequence" and info.element.kind == "map"
    assert info.element.key == np.dtype(object) and info.element.element.dtype == np.float32
    assert info.type_str() == "seq(map(string, float32))"
    graph = onnxgrad.load(dict_vectorizer_model(I64, D, int64_vocabulary=[1])).graph
    assert graph.info["X"].type_str() == "map(int64, float64)"


# -- DictVectorizer -----------------------------------------------------------------------------
DICT_CASES = [  # (key, value, vocabulary, feed): all onnxruntime can feed from Python
    (STR, F, dict(string_vocabulary=["a", "c", "b", "z"]), {"a": 4.0, "c": 8.0}),  # the spec's
    (STR, F, dict(string_vocabulary=["a", "b"]), {"b": 1.5, "unknown": 3.0}),  # unknown: ignored
    (I64, F, dict(int64_vocabulary=[3, 1, 2]), {1: 4.0, 5: 8.0, 2: -1.25}),
    (I64, F, dict(int64_vocabulary=[10, 20]), {20: 2.5}),
]


@pytest.mark.parametrize("key,value,vocabulary,feed", DICT_CASES)
def test_dict_vectorizer_matches_onnxruntime(key, value, vocabulary, feed):
    model = dict_vectorizer_model(key, value, **vocabulary)
    _assert_tensor_like_onnxruntime(model, feed)


def test_dict_vectorizer_int_string_and_double_values():
    """map(string, int64), map(int64, string) and map(*, double), which onnxruntime's
    binding cannot feed."""
    model = dict_vectorizer_model(STR, D, string_vocabulary=["p", "q", "r"])
    got = onnxgrad.load(model).run({"X": {"r": 0.1, "p": 1e-300}})["Y"]
    assert got.dtype == np.float64 and got.tolist() == [[1e-300, 0.0, 0.1]]
    model = dict_vectorizer_model(I64, D, int64_vocabulary=[10, 20])
    assert onnxgrad.load(model).run({"X": {20: 2.5, 30: 1.0}})["Y"].tolist() == [[0.0, 2.5]]
    model = dict_vectorizer_model(STR, I64, string_vocabulary=["a", "c", "b"])
    got = onnxgrad.load(model).run({"X": {"c": 7, "a": -2}})["Y"]
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [[-2, 7, 0]])
    model = dict_vectorizer_model(I64, STR, int64_vocabulary=[2, 4, 6])
    got = onnxgrad.load(model).run({"X": {6: "six", 2: "two"}})["Y"]
    assert got.dtype == object
    assert got.tolist() == [["two", "", "six"]]
    empty = onnxgrad.load(dict_vectorizer_model(STR, F, string_vocabulary=["a", "b"]))
    got = empty.run({"X": {}})["Y"]  # onnxruntime refuses an empty map; all keys missing: 0
    assert got.dtype == np.float32 and got.tolist() == [[0.0, 0.0]]


def test_map_feeds_are_checked():
    model = onnxgrad.load(dict_vectorizer_model(STR, F, string_vocabulary=["a"]))
    with pytest.raises(DataError, match="'X' is a map: expected a dict"):
        model.run({"X": np.zeros(3, np.float32)})
    with pytest.raises(DataError, match="'X' is a map with string keys, got key 3"):
        model.run({"X": {3: 1.0}})
    with pytest.raises(DataError, match="'X' is a map of float32"):
        model.run({"X": {"a": "text"}})
    assert model.run({"X": {"a": 2}})["Y"].tolist() == [[2.0]]  # an int for a float: fine
    assert model.run({"X": {b"a": 2.5}})["Y"].tolist() == [[2.5]]  # bytes keys as str
    ints = onnxgrad.load(dict_vectorizer_model(I64, F, int64_vocabulary=[1]))
    with pytest.raises(DataError, match="'X' is a map with integer keys, got key 'a'"):
        ints.run({"X": {"a": 1.0}})
    assert ints.run({"X": {np.int64(1): np.float64(0.5)}})["Y"].tolist() == [[0.5]]


# -- CastMap ------------------------------------------------------------------------------------
CAST_CASES = [  # (attributes, output type, feed) on map(int64, float)
    (dict(cast_to="TO_FLOAT", map_form="DENSE"), F, {3: 1.5, 1: 2.5, -4: 0.25}),
    (dict(cast_to="TO_INT64", map_form="DENSE"), I64, {3: 1.5, 1: -2.7, 0: 9.99}),
    (dict(cast_to="TO_STRING", map_form="DENSE"), STR, {3: 1.5, 1: 2.0, 2: 0.1}),
    (dict(cast_to="TO_FLOAT", map_form="SPARSE", max_map=5), F, {3: 1.5, 1: 2.5}),
    (dict(cast_to="TO_INT64", map_form="SPARSE", max_map=4), I64, {0: 7.9, 2: -3.2}),
    (dict(cast_to="TO_STRING", map_form="SPARSE", max_map=3), STR, {1: 0.5}),  # pad "0.f"
    (dict(cast_to="TO_FLOAT", map_form="SPARSE", max_map=2), F, {3: 1.5, 1: 2.5}),  # 3 dropped
    (dict(), F, {2: 1.0, 1: 2.0}),  # the defaults: TO_FLOAT, DENSE
]


@pytest.mark.parametrize("attrs,out,feed", CAST_CASES)
def test_cast_map_matches_onnxruntime(attrs, out, feed):
    model = cast_map_model(F, out, **attrs)
    _assert_tensor_like_onnxruntime(model, feed)


def test_cast_map_of_strings():
    """map(int64, string), which onnxruntime's binding cannot feed."""
    feed = {4: "2.5", 0: "-1", 2: "7"}
    for cast_to, out, dense, sparse in [
            ("TO_FLOAT", F, [[-1.0, 7.0, 2.5]], [[-1.0, 0.0, 7.0, 0.0, 2.5]]),
            ("TO_INT64", I64, [[-1, 7, 2]], [[-1, 0, 7, 0, 2]]),
            ("TO_STRING", STR, [["-1", "7", "2.5"]], [["-1", "0.f", "7", "0.f", "2.5"]])]:
        got = onnxgrad.load(cast_map_model(STR, out, cast_to=cast_to)).run({"X": feed})["Y"]
        assert got.tolist() == dense
        got = onnxgrad.load(cast_map_model(STR, out, cast_to=cast_to, map_form="SPARSE",
                                           max_map=5)).run({"X": feed})["Y"]
        assert got.tolist() == sparse
    with pytest.raises(DataError, match="cm.*cannot cast"):
        onnxgrad.load(cast_map_model(STR, F)).run({"X": {1: "one"}})


def test_cast_map_refuses_negative_sparse_keys_and_bad_attributes():
    model = onnxgrad.load(cast_map_model(F, F, map_form="SPARSE", max_map=3))
    with pytest.raises(DataError, match="cm.*from 0 on.*-1"):
        model.run({"X": {-1: 1.0, 0: 2.0}})
    bad = cast_map_model(F, F)
    bad.graph.node[0].attribute.append(helper.make_attribute("map_form", "PACKED"))
    del bad.graph.node[0].attribute[:-1]
    with pytest.raises(ModelError, match="cm.*DENSE or SPARSE"):
        onnxgrad.load(bad).run({"X": {0: 1.0}})


def test_a_map_input_feeds_a_training_step(tmp_path):
    """DictVectorizer in front of trainable weights: the map is fed to Trainer.step as a
    dict, the weights train, and the saved model runs in onnxruntime."""
    nodes = [helper.make_node("DictVectorizer", ["X"], ["V"], domain=ML, name="dv",
                              string_vocabulary=["a", "b", "c"]),
             helper.make_node("MatMul", ["V", "W"], ["Y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_value_info("X", map_type(STR, F))],
                              [helper.make_tensor_value_info("Y", F, [1, 2])],
                              [onnx.numpy_helper.from_array(np.ones((3, 2), np.float32), "W")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(ML, 1)])
    proto.ir_version = 8
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss="mse",
                               optimizer=onnxgrad.SGD(lr=0.1))
    feed, target = {"X": {"c": 2.0, "a": 1.0}}, np.zeros((1, 2), np.float32)
    grads = trainer.gradients(feed, target)  # d/dW mean((V @ W)^2) = V^T (V @ W)
    np.testing.assert_allclose(grads["W"], [[3.0, 3.0], [0.0, 0.0], [6.0, 6.0]])
    losses = [trainer.step(feed, target) for _ in range(3)]
    assert losses == sorted(losses, reverse=True) and losses[0] == 9.0
    path = tmp_path / "dv.onnx"
    trainer.model.save(path)
    np.testing.assert_allclose(ort_run(str(path), feed)["Y"],
                               trainer.model.run(feed)["Y"], rtol=1e-6)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "X  map(string, float32)" in result.output


# -- no gradient through maps -------------------------------------------------------------------
@pytest.mark.parametrize("op_type,value", [("ZipMap", ValueInfo(np.dtype(np.float32), (2, 2))),
                                           ("DictVectorizer", ValueInfo(kind="map")),
                                           ("CastMap", ValueInfo(kind="map"))])
def test_gradient_through_a_map_op_is_refused_by_name(op_type, value):
    attrs = {"ZipMap": {"classlabels_int64s": [0, 1]},
             "DictVectorizer": {"int64_vocabulary": [0, 1]}, "CastMap": {}}[op_type]
    graph = Graph(nodes=[Node(op_type, ["P"], ["Y"], attrs, name="the_map_op", domain=ML)],
                  inputs=["P", "seed"], outputs=["Y"], info={"P": value},
                  opsets={"": 17, ML: 1})
    with pytest.raises(UnsupportedOpError, match=f"gradient rule for op '{op_type}'.*the_map_op"):
        build_gradients(graph, "Y", ["P"], seed="seed")


# -- scikit-learn classifiers with their default ZipMap -----------------------------------------
@pytest.fixture(scope="module")
def iris():
    from sklearn.datasets import load_iris
    X, y = load_iris(return_X_y=True)
    return X.astype(np.float32), y


def _export(estimator, X, **kwargs):
    from skl2onnx import to_onnx
    return to_onnx(estimator, X[:1], target_opset={"": 17, ML: 1}, **kwargs)


def _classifiers(iris):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    X, y = iris
    names = np.array(["setosa", "versicolor", "virginica"], dtype=object)
    return {
        "logistic": LogisticRegression(max_iter=300).fit(X, y),
        "logistic_strings": LogisticRegression(max_iter=300).fit(X, names[y]),
        "forest": RandomForestClassifier(n_estimators=4, max_depth=4, random_state=0).fit(X, y),
    }


@pytest.mark.parametrize("which", ["logistic", "logistic_strings", "forest"])
def test_sklearn_classifier_with_zipmap_runs_as_in_onnxruntime(iris, which):
    X, _ = iris
    proto = _export(_classifiers(iris)[which], X)
    assert proto.graph.node[-1].op_type == "ZipMap" or any(
        n.op_type == "ZipMap" for n in proto.graph.node)
    feeds = {"X": X[::7]}
    got = onnxgrad.load(proto).run(feeds)
    want = ort_run(proto, feeds)
    assert set(got) == set(want) == {"output_label", "output_probability"}
    assert got["output_label"].dtype == want["output_label"].dtype
    np.testing.assert_array_equal(got["output_label"], want["output_label"])
    assert_same_maps(got["output_probability"], want["output_probability"], rtol=1e-5,
                     atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*failed to converge")  # scikit-learn's ConvergenceWarning
def test_sklearn_logistic_regression_finetunes_under_its_zipmap(iris, tmp_path):
    """Exported with MatMul/Add (LinearClassifier's coefficients are attributes, so
    nothing could train): the scores before Softmax and ZipMap train, the ZipMap stays."""
    X, y = iris
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(max_iter=5).fit(X, y)  # under-fitted: room to improve
    proto = _export(clf, X, black_op={"LinearClassifier"})
    nodes = {n.op_type: n for n in proto.graph.node}
    assert nodes["ZipMap"].input[0] == nodes["Softmax"].output[0]
    scores = nodes["Softmax"].input[0]

    with pytest.raises(ModelError, match="'output_probability' is a seq\\(map\\(int64, "
                                         "float32\\)\\).*ZipMap.*output='probabilities'"):
        onnxgrad.Trainer(onnxgrad.load(proto), loss="cross_entropy",
                         output="output_probability")

    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss="cross_entropy", output=scores,
                               optimizer=onnxgrad.Adam(lr=0.05))
    assert set(trainer.model.parameters()) >= {"coef", "intercept"}
    losses = [trainer.step({"X": X}, y) for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0], losses

    path = tmp_path / "tuned.onnx"
    trainer.model.save(path)
    saved = onnx.load(str(path))
    assert [n.op_type for n in saved.graph.node] == [n.op_type for n in proto.graph.node]
    feeds = {"X": X}
    want = ort_run(str(path), feeds)
    got = onnxgrad.load(path).run(feeds)
    np.testing.assert_array_equal(got["output_label"], want["output_label"])
    assert_same_maps(got["output_probability"], want["output_probability"], rtol=1e-5,
                     atol=1e-6)
    before = ort_run(proto, feeds)
    assert (want["output_label"] == y).mean() >= (before["output_label"] == y).mean()
    assert want["output_probability"][0] != before["output_probability"][0]


# -- the CLI ------------------------------------------------------------------------------------
def test_inspect_shows_the_map_type(iris, tmp_path):
    X, _ = iris
    path = tmp_path / "lr.onnx"
    onnx.save(_export(_classifiers(iris)["logistic"], X), str(path))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "output_probability  seq(map(int64, float32))" in result.output
    assert "ai.onnx.ml::ZipMap" in result.output


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_writes_a_zipmap_output_as_classes(iris, tmp_path):
    X, _ = iris
    clf = _classifiers(iris)["logistic_strings"]
    path = tmp_path / "lr.onnx"
    onnx.save(_export(clf, X), str(path))
    data = tmp_path / "x.npz"
    np.savez(data, X=X[::10])
    want = clf.predict_proba(X[::10])

    out = tmp_path / "p.csv"
    result = CliRunner().invoke(main, ["predict", str(path), "--data", str(data), "--out",
                                       str(out), "--output", "output_probability",
                                       "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    rows = _csv(out)
    assert list(rows[0]) == ["index", "class", "prob_setosa", "prob_versicolor",
                             "prob_virginica"]
    assert [r["class"] for r in rows] == list(clf.predict(X[::10]))
    got = np.array([[float(r[f"prob_{c}"]) for c in clf.classes_] for r in rows])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

    result = CliRunner().invoke(main, ["predict", str(path), "--data", str(data), "--out",
                                       str(out)])  # the default: the string labels
    assert result.exit_code == 0, result.output
    assert [r["output_label_0"] for r in _csv(out)] == list(clf.predict(X[::10]))

    result = CliRunner().invoke(main, ["predict", str(path), "--data", str(data), "--out",
                                       str(out), "--output", "output_probability",
                                       "--classes", "no"])
    assert result.exit_code == 0, result.output
    assert list(_csv(out)[0])[1:] == [f"output_probability_{c}" for c in clf.classes_]


def test_predict_refuses_a_sequence_of_tensors_by_name(tmp_path):
    node = helper.make_node("SplitToSequence", ["X"], ["S"], axis=1, keepdims=1)
    proto = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", F, [None, 2])],
        [helper.make_value_info("S", helper.make_sequence_type_proto(
            helper.make_tensor_type_proto(F, [None, 1])))]),
        opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "seq.onnx"
    onnx.save(proto, str(path))
    data = tmp_path / "x.npz"
    np.savez(data, X=np.ones((3, 2), np.float32))
    result = CliRunner().invoke(main, ["predict", str(path), "--data", str(data), "--out",
                                       str(tmp_path / "p.csv")])
    assert result.exit_code != 0
    assert "'S' is a seq(float32)" in result.output and "--output" in result.output
