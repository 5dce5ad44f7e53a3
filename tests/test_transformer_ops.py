"""Forward and gradient checks for the ops of tests/op_db_transformer.py.

* Forward: onnxgrad's outputs against ``onnx.reference.ReferenceEvaluator`` on
  one-node models (float32), every input fed at run time.
* Gradients (float64): for each differentiable floating-point input, the
  projection ⟨∂loss/∂x, v⟩ of the analytic gradient from the public API
  (``Trainer(loss=None).gradients``) against central differences of
  ``Model.run``, with ``loss = Σ_k ⟨Y_k, U_k⟩`` over the node's float outputs
  (this harness handles several outputs: Split, TopK).
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxgrad
from onnxgrad.errors import UnsupportedOpError
from onnxgrad.ops import lookup

from op_db_transformer import OPS, SAMPLES

FLOAT_KINDS = {"real": (-2, 2), "pos": (0.5, 2), "unit": (-0.9, 0.9), "gt1": (1.2, 3)}
DIFF_KINDS = set(FLOAT_KINDS) | {"away0"}


def _rng(sample, seed=0):
    return np.random.default_rng(zlib.crc32(sample.id.encode()) + seed)


def materialize(sample, dtype) -> dict[str, np.ndarray]:
    rng = _rng(sample)
    out = {}
    for name, spec in sample.inputs:
        if name is None:
            continue
        kind, arg = spec
        if kind in FLOAT_KINDS:
            a = rng.uniform(*FLOAT_KINDS[kind], size=arg).astype(dtype)
        elif kind == "away0":
            a = (rng.uniform(0.3, 2, size=arg) * rng.choice([-1.0, 1.0], size=arg)).astype(dtype)
        elif kind == "float":
            a = np.array(arg, dtype=dtype)
        else:
            a = np.array(arg, dtype=kind)
        out[name] = np.asarray(a)
    return out


def _attr(value):
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return numpy_helper.from_array(np.array(value[1], dtype=value[0]))
    return value


RECURRENT = ("RNN", "GRU", "LSTM")


def _onnxruntime_run(model, feeds) -> list[np.ndarray]:
    import onnxruntime as ort  # noqa: PLC0415

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _recurrent_reference(model, feeds) -> list[np.ndarray]:
    """onnxruntime's outputs for a recurrent node: the reference evaluator ignores
    ``direction``, ``activations`` and ``sequence_lens``.  onnxruntime runs time-major
    layouts only, so ``layout=1`` is run as its time-major twin (inputs and outputs
    transposed)."""
    node = model.graph.node[0]
    if not any(a.name == "layout" and a.i == 1 for a in node.attribute):
        return _onnxruntime_run(model, feeds)
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    for a in twin.graph.node[0].attribute:
        if a.name == "layout":
            a.i = 0
    swap = {"X": (1, 0, 2), "initial_h": (1, 0, 2), "initial_c": (1, 0, 2)}
    twin_feeds = {n: np.transpose(v, swap[n]) if n in swap else v for n, v in feeds.items()}
    for vi in list(twin.graph.input) + list(twin.graph.output):
        vi.type.tensor_type.ClearField("shape")
    del twin.graph.value_info[:]
    y, *states = _onnxruntime_run(twin, twin_feeds)
    return [np.transpose(y, (2, 0, 1, 3))] + [np.transpose(s, (1, 0, 2)) for s in states]


def reference_run(model, feeds) -> list[np.ndarray]:
    """The ONNX reference's outputs; onnxruntime's where the reference cannot run the
    case (its Mean does not broadcast, though the spec says it does) or runs it wrong."""
    if model.graph.node[0].op_type in RECURRENT:
        return _recurrent_reference(model, feeds)
    try:
        return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, feeds)]
    except Exception:  # noqa: BLE001 - a limitation of the reference, not of onnxgrad
        return _onnxruntime_run(model, feeds)


def out_names(sample):
    return [f"y{k}" for k in range(sample.outputs)]


def make_model(sample, arrays, as_inputs, loss_shapes=None) -> onnx.ModelProto:
    """The sample's node; ``as_inputs`` are graph inputs, other arrays initializers.
    With ``loss_shapes`` ({output: shape}) the graph outputs ``loss = Σ ⟨Y_k, U_k⟩``."""
    ins = ["" if n is None else n for n, _ in sample.inputs]
    while ins and ins[-1] == "":
        ins.pop()
    node = helper.make_node(sample.op, ins, out_names(sample),
                            **{k: _attr(v) for k, v in sample.attrs.items()})
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
              for n, a in arrays.items() if n in as_inputs]
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items() if n not in as_inputs]
    nodes, outputs = [node], []
    if loss_shapes is None:
        outputs = [helper.make_value_info(y, onnx.TypeProto()) for y in out_names(sample)]
    else:
        terms = []
        for y, shape in loss_shapes.items():
            size = int(np.prod(shape))
            inputs.append(helper.make_tensor_value_info(f"U_{y}", onnx.TensorProto.DOUBLE, [size, 1]))
            nodes += [helper.make_node("Flatten", [y], [f"{y}_row"], axis=0),
                      helper.make_node("MatMul", [f"{y}_row", f"U_{y}"], [f"{y}_u"]),
                      helper.make_node("ReduceSum", [f"{y}_u"], [f"{y}_term"], keepdims=0)]
            terms.append(f"{y}_term")
        total = terms[0]
        for i, t in enumerate(terms[1:]):
            nodes.append(helper.make_node("Add", [total, t], [f"sum{i}"]))
            total = f"sum{i}"
        nodes.append(helper.make_node("Identity", [total], ["loss"]))
        outputs = [helper.make_tensor_value_info("loss", onnx.TensorProto.DOUBLE, [])]
    graph = helper.make_graph(nodes, "one_node", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", sample.opset)])
    model.ir_version = 8 if sample.opset <= 17 else \
        helper.find_min_ir_version_for([helper.make_opsetid("", sample.opset)])
    if loss_shapes is None:  # type the outputs: by shape inference, else as the reference computes them
        inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.output}
        typed = [inferred.get(y) for y in out_names(sample)]
        if not all(t is not None and t.type.tensor_type.elem_type and
                   t.type.tensor_type.HasField("shape") for t in typed):
            ref = reference_run(model, {n: arrays[n] for n in as_inputs})
            typed = [helper.make_tensor_value_info(y, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                     for y, v in zip(out_names(sample), ref)]
        del model.graph.output[:]
        model.graph.output.extend(typed)
    onnx.checker.check_model(model)
    return model


def differentiable(sample) -> list[str]:
    d = lookup(sample.op, "", sample.opset)
    return [n for i, (n, spec) in enumerate(sample.inputs)
            if n is not None and spec[0] in DIFF_KINDS and d.is_differentiable(i)]


def _ids(samples):
    return [s.id for s in samples]


# -- forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sample", SAMPLES, ids=_ids(SAMPLES))
def test_forward_matches_reference(sample):
    arrays = materialize(sample, np.float32)
    model = make_model(sample, arrays, set(arrays))
    want = reference_run(model, dict(arrays))
    got = onnxgrad.load(model).run(dict(arrays))
    for y, w in zip(out_names(sample), want):
        w = np.asarray(w)
        g = got[y]
        assert g.dtype == w.dtype, f"{y}: {g.dtype} vs reference {w.dtype}"
        assert g.shape == w.shape, f"{y}: {g.shape} vs reference {w.shape}"
        if w.dtype.kind == "f":
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=y)
        else:
            np.testing.assert_array_equal(g, w, err_msg=y)


@pytest.mark.parametrize("sample", [s for s in SAMPLES if any(
    n and spec[0] == "int64" for n, spec in s.inputs)][:40], ids=lambda s: s.id)
def test_forward_with_constant_inputs(sample):
    """Integer inputs as initializers: the planner folds or binds them (host inputs stay NumPy)."""
    arrays = materialize(sample, np.float32)
    feeds = {n: a for n, a in arrays.items() if a.dtype.kind == "f"}
    model = make_model(sample, arrays, set(feeds))
    want = reference_run(model, feeds)
    got = onnxgrad.load(model).run(feeds)
    for y, w in zip(out_names(sample), want):
        np.testing.assert_allclose(got[y], w, rtol=1e-5, atol=1e-6, err_msg=y)


# -- gradients -------------------------------------------------------------------------------

GRAD_CASES = [(s, n) for s in SAMPLES if s.grad for n in differentiable(s)]


def check_gradient(sample, name):
    tol = {"eps": 1e-6, "rtol": 1e-5, "atol": 1e-8, **(sample.tol or {})}
    arrays = materialize(sample, np.float64)
    plain = onnxgrad.load(make_model(sample, arrays, set(arrays)))
    ys = plain.run(dict(arrays))
    rng = _rng(sample, 1)
    us = {y: rng.standard_normal(v.shape) for y, v in ys.items() if v.dtype.kind == "f"}
    assert us, f"{sample.id}: no floating-point output"
    loss_model = make_model(sample, arrays, set(), loss_shapes={y: u.shape for y, u in us.items()})
    trainer = onnxgrad.Trainer(onnxgrad.load(loss_model), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=[name])
    feeds = {f"U_{y}": u.reshape(-1, 1) for y, u in us.items()}
    grad = trainer.gradients(feeds, None)[name]
    x = arrays[name]
    assert grad.dtype == x.dtype and grad.shape == x.shape, \
        f"gradient of {name}: {grad.dtype}{grad.shape}, input {x.dtype}{x.shape}"
    v = _rng(sample, 2).standard_normal(x.shape)

    def f(shift):
        out = plain.run({**arrays, name: x + shift * v})
        return sum(float(np.sum(u * out[y])) for y, u in us.items())

    numeric = (f(tol["eps"]) - f(-tol["eps"])) / (2 * tol["eps"])
    analytic = float(np.sum(grad * v))
    magnitude = float(np.sum(np.abs(grad * v))) + abs(numeric)
    assert abs(analytic - numeric) <= tol["atol"] + tol["rtol"] * magnitude, \
        f"{sample.id} d/d{name}: analytic {analytic!r} vs numeric {numeric!r}"


@pytest.mark.parametrize("sample,name", GRAD_CASES, ids=[f"{s.id}-d{n}" for s, n in GRAD_CASES])
def test_gradient(sample, name):
    check_gradient(sample, name)


# -- coverage and special cases ------------------------------------------------------------------

def test_every_op_has_a_sample_and_float_ops_a_gradient():
    for name in OPS:
        assert any(s.op == name for s in SAMPLES)
    differentiable_ops = {s.op for s, _ in GRAD_CASES}
    for name in ["Gather", "GatherElements", "GatherND", "ScatterElements", "ScatterND", "Where",
                 "TopK", "Trilu", "CumSum", "Concat", "Split", "Slice", "Expand", "Tile", "Einsum",
                 "Sin", "Cos", "Min", "Max", "Mean", "ReduceMax", "ReduceL2", "ReduceLogSumExp",
                 "ReduceSumSquare", "ReduceProd", "Attention"]:
        assert name in differentiable_ops, name


def _single(op_type, inputs, attrs, inits, out_shape, opset=18):
    """A model computing loss = sum(op(...) * U) where U is fed."""
    nodes = [helper.make_node(op_type, list(inputs), ["y"], **attrs),
             helper.make_node("Mul", ["y", "U"], ["yu"]),
             helper.make_node("ReduceSum", ["yu"], ["loss"], keepdims=0)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("U", onnx.TensorProto.DOUBLE, out_shape)],
        [helper.make_tensor_value_info("loss", onnx.TensorProto.DOUBLE, [])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_gather_gradient_adds_repeated_indices():
    W = np.arange(12, dtype=np.float64).reshape(4, 3)
    idx = np.array([[1, 1, 3], [1, 0, -1]], dtype=np.int64)
    model = _single("Gather", ["W", "idx"], {}, {"W": W, "idx": idx}, [2, 3, 3])
    tr = onnxgrad.Trainer(onnxgrad.load(model), loss=None, output="loss",
                          optimizer=onnxgrad.SGD(lr=0.0))
    U = np.random.default_rng(0).standard_normal((2, 3, 3))
    grad = tr.gradients({"U": U})["W"]
    want = np.zeros_like(W)
    np.add.at(want, idx % 4, U)
    np.testing.assert_allclose(grad, want, rtol=1e-12)
    assert grad[1].any() and not grad[2].any()


def test_reduce_prod_gradient_is_exact_with_zeros():
    X = np.array([[0.0, 2.0, 3.0], [0.0, 0.0, 4.0], [1.0, 2.0, 3.0]])
    model = _single("ReduceProd", ["X", "axes"], {"keepdims": 0},
                    {"X": X, "axes": np.array([1], dtype=np.int64)}, [3])
    tr = onnxgrad.Trainer(onnxgrad.load(model), loss=None, output="loss",
                          optimizer=onnxgrad.SGD(lr=0.0))
    grad = tr.gradients({"U": np.ones(3)})["X"]
    np.testing.assert_allclose(grad, [[6.0, 0.0, 0.0], [0.0, 0.0, 0.0], [6.0, 3.0, 2.0]])


def test_reduce_max_ties_share_the_gradient():
    X = np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0]])
    model = _single("ReduceMax", ["X"], {"axes": [1], "keepdims": 0}, {"X": X}, [2], opset=13)
    tr = onnxgrad.Trainer(onnxgrad.load(model), loss=None, output="loss",
                          optimizer=onnxgrad.SGD(lr=0.0))
    grad = tr.gradients({"U": np.ones(2)})["X"]
    np.testing.assert_allclose(grad, [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])


def test_shape_subgraph_stays_on_host_and_folds():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape, as the TorchScript exporter writes it."""
    X = onnx.helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["N", 6])
    nodes = [
        helper.make_node("Shape", ["X"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "two", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["X", "shape"], ["Y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    graph = helper.make_graph(nodes, "g", [X], [helper.make_tensor_value_info(
        "Y", onnx.TensorProto.FLOAT, ["N", 2, 3])], initializer=inits)
    model = onnxgrad.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.arange(30, dtype=np.float32).reshape(5, 6)
    out = model.run({"X": x}, outputs=["shape", "Y"])
    assert out["shape"].dtype == np.int64 and list(out["shape"]) == [5, 2, -1]
    np.testing.assert_array_equal(out["Y"], x.reshape(5, 2, 3))


# -- CuPy: the same samples on a CUDA device (skipped without one) ---------------------------------

def _analytic(sample, arrays, name, us, device):
    loss_model = make_model(sample, arrays, set(), loss_shapes={y: u.shape for y, u in us.items()})
    trainer = onnxgrad.Trainer(onnxgrad.load(loss_model), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=[name], device=device)
    return trainer.gradients({f"U_{y}": u.reshape(-1, 1) for y, u in us.items()}, None)[name]


@pytest.mark.gpu
@pytest.mark.parametrize("sample", SAMPLES, ids=_ids(SAMPLES))
def test_forward_on_cuda_matches_cpu(sample):
    from onnxgrad.backend import get_backend
    from onnxgrad.model import Model

    arrays = materialize(sample, np.float32)
    # integer inputs as initializers: bound into the plan (host inputs stay NumPy)
    feeds = {n: a for n, a in arrays.items() if a.dtype.kind == "f"}
    model = onnxgrad.load(make_model(sample, arrays, set(feeds)))
    cpu = model.run(dict(feeds))
    backend = get_backend("cuda")
    plan = Model.make_plan(model.graph, backend, model.graph.outputs)
    env = {k: backend.asarray(v) for k, v in model.graph.initializers.items()}
    env.update({k: backend.asarray(v) for k, v in feeds.items()})
    gpu = {k: backend.to_host(v) for k, v in plan.run(env).items()}
    for y, want in cpu.items():
        assert gpu[y].dtype == want.dtype and gpu[y].shape == want.shape, y
        if want.dtype.kind == "f":
            np.testing.assert_allclose(gpu[y], want, rtol=1e-5, atol=1e-6, err_msg=y)
        else:
            np.testing.assert_array_equal(gpu[y], want, err_msg=y)


@pytest.mark.gpu
@pytest.mark.parametrize("sample,name", GRAD_CASES, ids=[f"{s.id}-d{n}" for s, n in GRAD_CASES])
def test_gradient_on_cuda_matches_cpu(sample, name):
    arrays = materialize(sample, np.float64)
    ys = onnxgrad.load(make_model(sample, arrays, set(arrays))).run(dict(arrays))
    rng = _rng(sample, 1)
    us = {y: rng.standard_normal(v.shape) for y, v in ys.items() if v.dtype.kind == "f"}
    cpu = _analytic(sample, arrays, name, us, "cpu")
    gpu = _analytic(sample, arrays, name, us, "cuda")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("shape,axis", [((2, 3, 5), -1), ((2, 3, 5), 1), ((4,), 0)])
def test_layer_norm_gradient_reads_the_forward_statistics(shape, axis):
    """LayerNormalizationGrad gives the same dX and dScale from the forward pass's
    Mean and InvStdDev (as in training graphs) as when it computes them again."""
    from onnxgrad.ops.normalization import LayerNormalization, LayerNormalizationGrad

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    scale = rng.standard_normal(shape[axis:] if axis >= 0 else shape[axis:])
    dy = rng.standard_normal(shape)
    _, mean, inv = LayerNormalization(np, x, scale, axis=axis)
    with_stats = LayerNormalizationGrad(np, dy, x, scale, mean, inv, axis=axis)
    again = LayerNormalizationGrad(np, dy, x, scale, axis=axis)
    for a, b in zip(with_stats, again):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
