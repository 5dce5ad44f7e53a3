"""``onnxgrad convert``: training steps as standard ONNX models, run in stock onnxruntime.

* Every op sample with a gradient (float32; those of the other databases where
  the gradient passes through a private kernel): one SGD step with lr 1 of the
  converted model, run in onnxruntime, moves each weight by exactly the
  gradient onnxgrad computes; the private ops that have no standard form yet
  are a listed set.  MatMul of operands whose ranks only run time decides, too.
* The shipped models and torch.onnx exports: N steps in onnxruntime, each
  state output copied to its input, give the weights, optimizer state and
  running statistics of N ``Trainer.step`` calls, and of PyTorch.
* The step model passes ``onnx.checker`` with ``full_check``, holds only
  standard ops, and names its state in metadata.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
from onnx import helper, numpy_helper
import pytest

import gradcheck as gc
import onnxgrad
from onnxgrad.convert import STATE_KEY, eval_model, state_mapping, step_model
from onnxgrad.errors import ModelError

ort = pytest.importorskip("onnxruntime")

ROOT = pathlib.Path(__file__).resolve().parent.parent
REF = ROOT / "tests" / "reference"

#: Private ops whose standard form is not written yet: converting a model whose
#: training graph holds one fails with a message that names it.
NOT_YET: set[str] = set()

#: Ops of the other sample databases (tests/op_db_transformer.py, the node-suite ops of
#: tests/test_more_ops.py) whose gradients pass through private kernels; their samples
#: join op_db's and op_db_cnn's here.
MORE_OPS = {"Einsum", "Max", "Min", "GatherND", "CumProd", "TensorScatter", "ReduceMax",
            "ReduceMin", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare",
            "ReduceProd", "ReduceLogSum", "LpPool", "MaxUnpool", "RotaryEmbedding", "SwiGLU",
            "Attention"}

#: Ops of tests/test_vision_gradients.py and tests/test_more_gradients.py whose gradients
#: have a standard form (RoiAlign's where sampling_ratio > 0: see _has_standard_form).
VISION_OPS = {"LRN", "MeanVarianceNormalization", "Det", "Compress", "Col2Im",
              "GlobalLpPool", "DequantizeLinear", "AffineGrid", "GridSample",
              "MaxRoiPool", "RoiAlign", "DeformConv"}


def _has_standard_form(sample) -> bool:
    """RoiAlign with sampling_ratio 0 takes ceil(size / bins) samples per bin, a number
    the rois' values decide at run time: its gradients have no standard form (and
    converting it is refused, test_roi_align_with_run_time_sample_counts_is_refused)."""
    return not (sample.op == "RoiAlign" and int(sample.attrs.get("sampling_ratio", 0)) <= 0)


def _session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session, feeds):
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def _more_samples():
    """The samples of MORE_OPS elsewhere, as op_db samples, and MaxPools that need
    MaxPoolGrad."""
    import op_db_transformer
    import test_more_ops
    import test_more_gradients
    import test_vision_gradients
    from op_db import Sample

    # an absent input, (None, None) there, is (None, (kind, value)) in op_db's format
    found = [Sample(s.op, [(n, spec or ("float", 0.0)) for n, spec in s.inputs], s.attrs,
                    s.opset, tol=s.tol)
             for s in op_db_transformer.SAMPLES
             if s.op in MORE_OPS and s.outputs == 1 and s.grad]
    def inputs(s):  # op_db_transformer's "unit" kind (in [-0.9, 0.9]) as fixed floats
        rng = np.random.default_rng(0)
        return [(n, ("float", rng.uniform(-0.9, 0.9, spec[1]).tolist()))
                if spec and spec[0] == "unit" else (n, spec or ("float", 0.0))
                for n, spec in s.inputs]

    found += [Sample(s.op, inputs(s), s.attrs, s.opset, tol=s.tol)
              for s in test_vision_gradients.SAMPLES + test_more_gradients.SAMPLES
              if s.op in VISION_OPS and s.outputs == 1 and s.grad and _has_standard_form(s)]
    found += [s for s in test_more_ops.SAMPLES if s.op in MORE_OPS]
    # DFT and STFT (tests/test_signal_attention_gradients.py, op_db_transformer's format)
    import test_signal_attention_gradients as signal

    found += [Sample(s.op, [(n, spec or ("float", 0.0)) for n, spec in s.inputs], s.attrs,
                     s.opset, tol=s.tol)
              for s in signal.SIGNAL_SAMPLES if s.outputs == 1 and s.grad]
    # MaxPool with storage_order 1: its gradient recomputes the argmax (MaxPoolGrad)
    found += [Sample("MaxPool", [("X", ("real", shape))], {**attrs, "storage_order": 1}, 12)
              for shape, attrs in [((2, 2, 7, 6), {"kernel_shape": [3, 3]}),
                                   ((1, 2, 7, 6), {"kernel_shape": [3, 3], "strides": [2, 2],
                                                   "pads": [1, 1, 1, 1]}),
                                   ((2, 2, 7, 6), {"kernel_shape": [2, 2], "strides": [2, 2],
                                                   "ceil_mode": 1}),
                                   ((2, 3, 9), {"kernel_shape": [3], "dilations": [2]})]]
    return found


SAMPLES = [s for s in gc.all_samples() + _more_samples()
           if gc.differentiable_inputs(s) and gc.definition(s).rule is not None]


#: Samples whose step model computes another function than the sample's own model, for a
#: reason outside the standard forms: sample id -> reason.  Each is a strict xfail.
KNOWN_FAILURES: dict[str, str] = {}


def _assert_one_step_moves_by_the_gradients(proto, arrays, names, tol=2e-4):
    """The step model of ``proto`` (a model whose inputs are all initializers, its
    output ``loss``) holds no private op, and one SGD step (lr 1) of it, in onnxruntime
    where onnxruntime runs the model's own ops, moves each of ``names`` by exactly the
    gradient ``Trainer.gradients`` gives."""
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=names)
    want = trainer.gradients({}, None)
    step = step_model(onnxgrad.load(proto), onnxgrad.SGD(lr=1.0), loss=None, output="loss",
                      trainable=names)
    assert not [n.op_type for n in step.graph.node if n.domain == "onnxgrad"]
    if _refused_by_onnxruntime(proto, {}) is None:
        got = _run(_session(step), {})
    else:
        got = onnxgrad.load(step).run({})
    for name in names:
        moved = arrays[name].astype(np.float64) - got[f"{name}.next"]
        scale = max(np.abs(want[name]).max(), 1.0)
        np.testing.assert_allclose(moved, want[name], rtol=tol, atol=tol * scale, err_msg=name)


def _params():
    for sample in SAMPLES:
        marks = ()
        if sample.id in KNOWN_FAILURES:
            marks = pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[sample.id])
        yield pytest.param(sample, id=sample.id, marks=marks)


def _refused_by_onnxruntime(proto, feeds) -> str | None:
    """Why onnxruntime cannot run ``proto`` (a sample's own model), or None."""
    try:
        _session(proto).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no public base
        return str(exc)
    return None


@pytest.mark.parametrize("sample", list(_params()))
def test_one_step_moves_weights_by_the_gradient(sample):
    """Run in onnxruntime; where onnxruntime cannot run the sample's forward op itself
    (SwiGLU's Swish-24, reflect pads longer than the axis), the step model runs in
    onnxgrad's own runtime, which still checks the standard forms it holds."""
    names = gc.differentiable_inputs(sample)
    arrays = gc.materialize(sample, np.float32)
    if any(arrays[name].size == 0 for name in names):
        pytest.skip("an empty input: no weight to move")
    _, y = gc.run_forward(sample, arrays)
    u = gc.projection_u(sample, y)
    want = gc.analytic_gradients(sample, arrays, names, u)
    proto = gc.build_model(sample, arrays, set(), loss_input=u)
    try:
        onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        pytest.skip(f"onnx's shape inference refuses the sample's own model: {exc}")
    model = onnxgrad.load(proto)
    try:
        step = step_model(model, onnxgrad.SGD(lr=1.0), loss=None, output="loss", trainable=names)
    except ModelError as exc:
        missing = [op for op in NOT_YET if f"onnxgrad::{op}," in str(exc)]
        if missing:
            pytest.skip(f"no standard form yet for {missing[0]}")
        raise
    feeds = {"U": u.reshape(-1, 1)}
    if _refused_by_onnxruntime(proto, feeds) is None:
        got = _run(_session(step), feeds)
    else:
        got = onnxgrad.load(step).run(feeds)
    for name in names:
        moved = arrays[name].astype(np.float64) - got[f"{name}.next"]
        scale = max(np.abs(want[name]).max(), 1.0)
        np.testing.assert_allclose(moved, want[name], rtol=2e-4, atol=2e-4 * scale, err_msg=name)


def _attention_multi_output_cases():
    """Attention samples whose loss reads present_key/present_value or qk_matmul_output
    too (tests/test_remaining_gradients.py, tests/op_db_transformer.py): the outputs the
    loss reads, their -inf entries (masked) left out of it."""
    import op_db_transformer
    import test_remaining_gradients as rg

    cases = [(s, tuple(range(4))) for s in rg.FINITE] + list(rg.MASKED)
    cases += [(s, tuple(range(s.outputs))) for s in op_db_transformer.SAMPLES
              if s.op == "Attention" and s.outputs > 1 and s.grad]
    return cases


@pytest.mark.parametrize("case", _attention_multi_output_cases(),
                         ids=lambda c: f"{c[0].id}-out{''.join(map(str, c[1]))}")
def test_attention_outputs_in_onnxruntime(case):
    """AttentionGrad with gradients from its cache and qk_matmul_output outputs: one SGD
    step (lr 1) of the step model moves Q, K, V, a float mask and the cache by exactly
    onnxgrad's gradients."""
    from test_transformer_ops import make_model, materialize

    sample, outputs = case
    arrays = materialize(sample, np.float32)
    names = [n for n, spec in sample.inputs if n is not None and spec[0] == "real"]
    ins = ["" if n is None else n for n, _ in sample.inputs]
    outs = [f"y{k}" if k in outputs or k == 0 else "" for k in range(max(outputs) + 1)]
    forward = onnxgrad.load(make_model(sample, arrays, set(arrays)))  # every output
    ys = forward.run(dict(arrays), outputs=[f"y{k}" for k in outputs])
    rng = np.random.default_rng(len(sample.id))
    from helpers import finite_projection_loss

    inits = [numpy_helper.from_array(rng.standard_normal(ys[f"y{k}"].shape).astype(np.float32),
                                     f"U_y{k}") for k in outputs]
    nodes = [helper.make_node(sample.op, ins, outs, **sample.attrs)] + \
        finite_projection_loss([f"y{k}" for k in outputs])
    graph = helper.make_graph(
        nodes, "l", [], [helper.make_tensor_value_info("loss", onnx.TensorProto.FLOAT, [])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()] + inits
        + [numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", sample.opset)])
    _assert_one_step_moves_by_the_gradients(proto, arrays, names)


def _recurrent_cases():
    """The RNN, GRU and LSTM samples of tests/op_db_transformer.py, with a loss on Y and
    on the final states."""
    import op_db_transformer

    return [(s._replace(opset=max(s.opset, 14)), tuple(range(s.outputs)))  # the loss's IsInf
            for s in op_db_transformer.SAMPLES if s.op in ("RNN", "GRU", "LSTM") and s.grad]


@pytest.mark.parametrize("case", _recurrent_cases(),
                         ids=lambda c: f"{c[0].id}-out{''.join(map(str, c[1]))}")
def test_recurrent_outputs_in_onnxruntime(case):
    """RNNGrad, GRUGrad and LSTMGrad (backpropagation through time, unrolled): one SGD
    step of the step model moves X, W, R, B, the initial states and P by onnxgrad's
    gradients."""
    test_attention_outputs_in_onnxruntime(case)


def _recurrent_cases():
    """LinearAttention (tests/test_signal_attention_gradients.py) and CausalConvWithState
    (tests/test_more_ops.py) samples, with the outputs the loss reads: Y, the carried state,
    or both (their gradients' standard forms take dY and dState, either one absent)."""
    import test_more_ops
    import test_signal_attention_gradients as signal

    samples = signal.LINEAR_SAMPLES + [s for s in test_more_ops.SAMPLES
                                        if s.op == "CausalConvWithState"]
    return [(s, outs) for s in samples for outs in ((0,), (1,), (0, 1))]


@pytest.mark.parametrize("case", _recurrent_cases(),
                         ids=lambda c: f"{c[0].id}-out{''.join(map(str, c[1]))}")
def test_recurrent_state_ops_in_the_step_model(case):
    """LinearAttentionGrad and CausalConvWithStateGrad in standard ops: one SGD step (lr 1)
    of the step model, which holds no private op, moves every float input by onnxgrad's
    gradients (in onnxgrad's runtime where onnxruntime lacks the opset-27 op)."""
    sample, outputs = case
    rng = np.random.default_rng(len(sample.id))
    low = {"real": -2.0, "pos": 0.5}
    arrays = {n: rng.uniform(low[spec[0]], 2.0, spec[1]).astype(np.float32)
              for n, spec in sample.inputs if n is not None}
    names = list(arrays)
    ins = ["" if n is None else n for n, _ in sample.inputs]
    while ins[-1] == "":
        ins.pop()
    node = helper.make_node(sample.op, ins, ["y0", "y1"], **sample.attrs)
    opsets = [helper.make_opsetid("", sample.opset)]

    def model(nodes, outs, inits):
        graph = helper.make_graph(nodes, "l", [], outs, [numpy_helper.from_array(a, n)
                                                         for n, a in inits.items()])
        return helper.make_model(graph, opset_imports=opsets)

    ranks = (3, 4 if sample.op == "LinearAttention" else 3)
    ys = onnxgrad.load(model([node], [helper.make_tensor_value_info(f"y{k}", onnx.TensorProto.FLOAT,
                                                                    [None] * r)
                                      for k, r in enumerate(ranks)], arrays)).run({})
    nodes, terms, us = [node], [], {}
    for k in outputs:
        y = f"y{k}"
        us[f"U_{y}"] = rng.standard_normal(ys[y].shape).astype(np.float32)
        nodes += [helper.make_node("Mul", [y, f"U_{y}"], [f"{y}_u"]),
                  helper.make_node("ReduceSum", [f"{y}_u"], [f"{y}_t"], keepdims=0)]
        terms.append(f"{y}_t")
    nodes.append(helper.make_node("Sum", terms, ["loss"]))
    proto = model(nodes, [helper.make_tensor_value_info("loss", onnx.TensorProto.FLOAT, [])],
                  {**arrays, **us})
    _assert_one_step_moves_by_the_gradients(proto, arrays, names)


def _flex_cases():
    """FlexAttention cases of tests/test_signal_attention_gradients.py, with float32 and
    softmax_precision variants of those without subgraphs."""
    import test_signal_attention_gradients as signal

    cases = [(hq, hkv, attrs, np.float64) for hq, hkv, attrs in signal.FLEX_CASES]
    cases += [(2, 2, {}, np.float32), (4, 2, {"scale": 0.3}, np.float32),
              (2, 1, {"softmax_precision": onnx.TensorProto.DOUBLE}, np.float32),
              (2, 2, {"softmax_precision": onnx.TensorProto.FLOAT}, np.float64)]
    return cases


@pytest.mark.parametrize("case", _flex_cases(),
                         ids=lambda c: f"{c[0]}x{c[1]}-{sorted(c[2])}-{np.dtype(c[3]).name}")
def test_flex_attention_in_the_step_model(case):
    """FlexAttentionGrad in standard ops: one SGD step (lr 1) of the step model, which holds
    no private op, moves Q, K and V by onnxgrad's gradients.  With score_mod or prob_mod
    (subgraphs) it has no standard form yet, and converting is refused by name."""
    import test_signal_attention_gradients as signal

    hq, hkv, attrs, dtype = case
    arrays = signal._flex_arrays(hq, hkv)
    if attrs.get("score_mod") is signal.CAUSAL:
        arrays = signal._causal_mask(arrays)
    arrays = {n: a.astype(dtype) if a.dtype.kind == "f" else a for n, a in arrays.items()}
    proto = signal._flex_model(arrays, attrs)
    if dtype == np.float32:
        proto.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    names = ["Q", "K", "V"]
    if "score_mod" in attrs or "prob_mod" in attrs:
        with pytest.raises(ModelError, match="FlexAttentionGrad"):
            step_model(onnxgrad.load(proto), onnxgrad.SGD(lr=1.0), loss=None, output="loss",
                       trainable=names)
        return
    _assert_one_step_moves_by_the_gradients(proto, arrays, names,
                                            tol=2e-4 if dtype == np.float32 else 1e-10)


def _roi_align_samples(ratio):
    """RoiAlign's samples of tests/test_remaining_gradients.py (rois inside, partly outside
    and across the image's edge), as op_db samples: with sampling_ratio > 0 or 0."""
    import test_remaining_gradients as rg
    from op_db import Sample

    return [Sample(s.op, s.inputs, s.attrs, s.opset, tol=s.tol) for s in rg.ROI_SAMPLES
            if (int(s.attrs.get("sampling_ratio", 0)) > 0) == ratio]


@pytest.mark.parametrize("sample", _roi_align_samples(True), ids=lambda s: s.id)
def test_roi_align_rois_in_onnxruntime(sample):
    """RoiAlignGrad and RoiAlignRoisGrad in standard ops: one SGD step (lr 1) of the step
    model, with X and rois both trained, moves each by exactly onnxgrad's gradient."""
    names = ["X", "rois"]
    arrays = gc.materialize(sample, np.float32)
    _, y = gc.run_forward(sample, arrays)
    u = gc.projection_u(sample, y)
    want = gc.analytic_gradients(sample, arrays, names, u)
    model = onnxgrad.load(gc.build_model(sample, arrays, set(), loss_input=u))
    step = step_model(model, onnxgrad.SGD(lr=1.0), loss=None, output="loss", trainable=names)
    got = _run(_session(step), {"U": u.reshape(-1, 1)})
    for name in names:
        moved = arrays[name].astype(np.float64) - got[f"{name}.next"]
        scale = max(np.abs(want[name]).max(), 1.0)
        assert np.abs(want[name]).max() > 0, name
        np.testing.assert_allclose(moved, want[name], rtol=2e-4, atol=2e-4 * scale, err_msg=name)


@pytest.mark.parametrize("sample", _roi_align_samples(False)[:1], ids=lambda s: s.id)
def test_roi_align_with_run_time_sample_counts_is_refused(sample):
    """sampling_ratio=0: the number of samples per bin follows the rois' values, so
    RoiAlignGrad has no standard form and converting names it."""
    arrays = gc.materialize(sample, np.float32)
    u = gc.projection_u(sample, gc.run_forward(sample, arrays)[1])
    model = onnxgrad.load(gc.build_model(sample, arrays, set(), loss_input=u))
    with pytest.raises(ModelError, match=r"onnxgrad::RoiAlignGrad.*cannot be written in "
                                         r"standard ONNX ops yet"):
        step_model(model, onnxgrad.SGD(lr=1.0), loss=None, output="loss", trainable=["X"])


def _ml_cases(svm=False):
    import test_ml_gradients
    return [c for c in test_ml_gradients.CASES if c[0].startswith("SVM") == svm]


@pytest.mark.parametrize("case", _ml_cases(), ids=lambda c: f"{c[0]}-{sorted(c[1].items())}")
def test_ml_linear_gradients_in_onnxruntime(case):
    """The ai.onnx.ml linear models, Scaler, Normalizer and Imputer (tests/test_ml_gradients.py,
    float32): one SGD step (lr 1) of the step model in onnxruntime moves X by the gradient
    onnxgrad computes (NaN entries of Imputer's X stay NaN)."""
    import test_ml_gradients as ml

    op_type, attrs, outputs = case
    X = ml._inputs(op_type).astype(np.float32)
    names = [f"y{k}" for k in range(outputs)]
    types = ml._types(ml._onnxruntime(op_type, attrs, outputs, X))
    shape = types[-1][1]
    graph = helper.make_graph(
        [helper.make_node(op_type, ["X"], names, domain=ml.ML, **attrs),
         helper.make_node("Mul", [names[-1], "U"], ["yu"]),
         helper.make_node("ReduceSum", ["yu"], ["loss"], keepdims=0)], "g",
        [helper.make_tensor_value_info("U", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("loss", onnx.TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(X, "X")],
        value_info=[helper.make_tensor_value_info(n, t, s) for n, (t, s) in zip(names, types)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                     helper.make_opsetid(ml.ML, 3)])
    U = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    model = onnxgrad.load(proto)
    trainer = onnxgrad.Trainer(model, loss=None, output="loss", optimizer=onnxgrad.SGD(lr=0.0),
                               trainable=["X"])
    want = trainer.gradients({"U": U}, None)["X"]
    step = step_model(onnxgrad.load(proto), onnxgrad.SGD(lr=1.0), loss=None, output="loss",
                      trainable=["X"])
    assert not [n.op_type for n in step.graph.node if n.domain == "onnxgrad"]
    got = _run(_session(step), {"U": U})["X.next"]
    np.testing.assert_allclose(got, X.astype(np.float64) - want, rtol=2e-5, atol=2e-5)


def _ml_id(case):
    import test_ml_gradients
    return test_ml_gradients._id(case)


@pytest.mark.parametrize("case", _ml_cases(svm=True), ids=_ml_id)
def test_ml_svm_gradients_in_onnxruntime(case):
    """SVMRegressor and SVMClassifier (every kernel and post-transform of
    tests/test_ml_gradients.py): as the linear models above."""
    test_ml_linear_gradients_in_onnxruntime(case)


def _optimizer_params():
    import test_more_gradients
    return list(test_more_gradients._optimizer_params())


@pytest.mark.parametrize("op_type,attrs,states,n,t", _optimizer_params())
def test_preview_training_gradients_in_the_step_model(op_type, attrs, states, n, t):
    """Momentum, Adagrad and Adam (ai.onnx.preview.training, the cases of
    tests/test_more_gradients.py, float64): one SGD step (lr 1) of the step model moves R and
    every tensor input by the gradient onnxgrad computes.  onnxruntime has no kernels for
    that domain, so onnxgrad runs the step model; it holds no private op."""
    import test_more_gradients as tm

    arrays, outputs = tm._optimizer_case(op_type, attrs, states, n, t)
    floats = [k for k, a in arrays.items() if a.dtype == np.float64]
    proto = tm._optimizer_model(op_type, attrs, arrays, outputs, wrt=floats)
    rng = np.random.default_rng(1)
    feeds = {"T": arrays["T"], **{f"U_{y}": rng.standard_normal((2, 3)) for y in outputs}}
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=floats)
    want = trainer.gradients(feeds, None)
    step = step_model(onnxgrad.load(proto), onnxgrad.SGD(lr=1.0), loss=None, output="loss",
                      trainable=floats)
    assert not [n.op_type for n in step.graph.node if n.domain == "onnxgrad"]
    got = onnxgrad.load(step).run(feeds)
    for name in floats:
        np.testing.assert_allclose(got[f"{name}.next"], arrays[name] - want[name], rtol=1e-12,
                                   atol=1e-12, err_msg=name)


# -- whole models -----------------------------------------------------------------------


def train_in_onnxruntime(step, feeds, steps, lr=None):
    """``steps`` runs of ``step``, each state output copied to its input; the losses and
    the last state (by input name)."""
    session, mapping = _session(step), state_mapping(step)
    state, losses = {}, []
    for i in range(steps):
        if lr is not None:
            state["lr"] = np.asarray(lr(i), dtype=np.float32)
        out = _run(session, {**feeds, **state})
        losses.append(float(out["loss"]))
        state = {mapping[name]: value for name, value in out.items() if name in mapping}
    return losses, state


def _digits(n=32):
    data = np.load(ROOT / "models" / "digits_train.npz")
    return data["input"][:n], data["label"][:n].astype(np.int64)


SHIPPED = {
    "digits_mlp-sgd": ("digits_mlp.onnx", "cross_entropy",
                       lambda: onnxgrad.SGD(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "digits_mlp-sgd-dampening": ("digits_mlp.onnx", "cross_entropy",
                                 lambda: onnxgrad.SGD(lr=0.05, momentum=0.9, dampening=0.3)),
    "digits_mlp-sgd-nesterov": ("digits_mlp.onnx", "cross_entropy",
                                lambda: onnxgrad.SGD(lr=0.05, momentum=0.9, nesterov=True)),
    "digits_mlp-adam": ("digits_mlp.onnx", "cross_entropy",
                        lambda: onnxgrad.Adam(lr=0.01, weight_decay=1e-3)),
    "digits_mlp-adamw": ("digits_mlp.onnx", "cross_entropy", lambda: onnxgrad.AdamW(lr=0.01)),
    "digits_cnn-sgd": ("digits_cnn.onnx", "cross_entropy",
                       lambda: onnxgrad.SGD(lr=0.05, momentum=0.9)),
    "tiny_lm-sgd": ("tiny_lm.onnx", onnxgrad.CrossEntropy(class_axis=-1),
                    lambda: onnxgrad.SGD(lr=0.1, momentum=0.9)),
}


@pytest.mark.parametrize("case", list(SHIPPED))
def test_steps_in_onnxruntime_equal_trainer_steps(case):
    """4 steps, the learning rate lowered before the third: weights, optimizer state
    and running statistics equal those of 4 Trainer steps."""
    file, loss, make = SHIPPED[case]
    model = onnxgrad.load(ROOT / "models" / file)
    if file == "tiny_lm.onnx":
        corpus = np.load(ROOT / "models" / "tiny_lm_corpus.npz")
        feeds, target = {"tokens": corpus["tokens"][:8]}, corpus["label"][:8]
    else:
        x, target = _digits()
        feeds = {model.graph.inputs[0]: x}
    step = step_model(model, make(), loss=loss)
    base = make().lr
    rates = [float(np.float32(r)) for r in (base, base, base * 0.4, base * 0.4)]
    losses, state = train_in_onnxruntime(step, {**feeds, "target": target}, 4,
                                         lr=lambda i: rates[i])
    optimizer = make()
    trainer = onnxgrad.Trainer(onnxgrad.load(ROOT / "models" / file), loss=loss,
                               optimizer=optimizer)
    want_losses = []
    for rate in rates:
        optimizer.lr = rate
        want_losses.append(trainer.step(feeds, target))
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    params = trainer.model.parameters()
    for name in trainer.trainable:
        np.testing.assert_allclose(state[name], params[name], rtol=1e-5, atol=1e-6, err_msg=name)
        for key, value in optimizer.state[name].items():
            if key != "step":
                np.testing.assert_allclose(state[f"{name}.{key}"], value, rtol=1e-4, atol=1e-6,
                                           err_msg=f"{name}.{key}")
    for name, value in params.items():  # running statistics
        if name in state and name not in trainer.trainable:
            np.testing.assert_allclose(state[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    if "step" in state:
        assert int(state["step"]) == 4


def test_step_model_is_standard_and_declares_its_state():
    model = onnxgrad.load(ROOT / "models" / "digits_cnn.onnx")
    step = step_model(model, onnxgrad.AdamW(lr=0.01))
    onnx.checker.check_model(step, full_check=True)
    assert {n.domain for n in step.graph.node} <= {"", "ai.onnx"}
    assert not step.functions
    mapping = json.loads(next(p.value for p in step.metadata_props if p.key == STATE_KEY))
    inputs = [i.name for i in step.graph.input]
    outputs = [o.name for o in step.graph.output]
    assert outputs[0] == "loss" and outputs[1:] == list(mapping)
    assert inputs[:2] == ["input", "target"] and set(mapping.values()) == set(inputs[2:])
    initial = {t.name for t in step.graph.initializer}
    assert set(inputs[2:]) <= initial  # every state input has its first value
    assert {"lr", "step"} <= set(inputs)
    statistics = {x for n in model.graph.nodes if n.op_type == "BatchNormalization"
                  for x in n.inputs[3:5]}
    assert statistics and statistics <= set(inputs)
    trained = onnxgrad.Trainer(model).trainable
    for name in trained:
        assert {name, f"{name}.exp_avg", f"{name}.exp_avg_sq"} <= set(inputs)


CNN = np.load(REF / "cnn.npz")
CNN_META = json.loads(str(CNN["meta"]))
TRANSFORMER = np.load(REF / "transformer.npz")
TRANSFORMER_META = json.loads(str(TRANSFORMER["meta"]))
TORCH_CASES = ([("cnn", net, kind) for net in CNN_META["nets"] for kind in ("sgd", "adamw")]
               + [("transformer", exporter, kind) for exporter in TRANSFORMER_META["exporters"]
                  for kind in ("sgd", "adamw")])


@pytest.mark.parametrize("family,net,kind", TORCH_CASES,
                         ids=[f"{f}-{n}-{k}" for f, n, k in TORCH_CASES])
def test_torch_exports_train_in_onnxruntime_to_torch_weights(family, net, kind):
    """torch.onnx exports, converted with SGD(momentum) and AdamW, trained in stock
    onnxruntime: PyTorch's losses and weights (tests/reference/make_*_reference.py)."""
    if family == "cnn":
        data, meta = CNN, CNN_META
        path = REF / meta["nets"][net]["file"]
        names = meta["nets"][net]["params"] + meta["nets"][net]["buffers"]
        feeds, target, loss = {"input": data[f"{net}/x"]}, data[f"{net}/y"], "cross_entropy"
        prefix = net
        trainable = None
    else:
        data, meta = TRANSFORMER, TRANSFORMER_META
        path = REF / meta["files"][net]
        names = sorted(m["initializer"] for m in meta["mapping"][net].values())
        feeds, target, loss = {"tokens": data["tokens"]}, data["label"], "cross_entropy"
        prefix = net
        trainable = names
    make = onnxgrad.SGD if kind == "sgd" else onnxgrad.AdamW
    step = step_model(onnxgrad.load(path), make(**meta[kind]), loss=loss, trainable=trainable)
    losses, state = train_in_onnxruntime(step, {**feeds, "target": target}, meta[f"{kind}_steps"])
    want_losses = data[f"{net}/{kind}_losses"] if family == "cnn" else data[f"{kind}_losses"]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-4, atol=1e-5)
    for name in names:
        if family == "transformer" and kind == "adamw" and name == \
                meta["mapping"][net]["layer.self_attn.in_proj_bias"]["initializer"]:
            continue  # a zero gradient in exact arithmetic: Adam scales rounding noise to ±lr
        np.testing.assert_allclose(state[name], data[f"{prefix}/{kind}/{name}"], rtol=1e-4,
                                   atol=1e-5 if family == "cnn" else 1e-6, err_msg=name)


@pytest.mark.parametrize("a_shape,b_shape", [
    ((3,), (3, 4)), ((2, 3), (3,)), ((3,), (3,)), ((2, 3), (3, 4)), ((2, 1, 3, 4), (5, 4, 2)),
    ((2, 3), (4, 3, 5)), ((2, 3, 4), (4, 5)), ((4,), (2, 4, 3)), ((2, 2, 3), (3,))])
def test_matmul_of_ranks_known_at_run_time(a_shape, b_shape):
    """MatMul of operands whose ranks only the fed shapes decide (the gradient is the
    private MatMulGrad, written in shape arithmetic and Einsum): the step in onnxruntime
    moves each weight by the Trainer's gradient."""
    from helpers import helper, make_model

    rng = np.random.default_rng(len(a_shape) * 10 + len(b_shape))
    weights = {"W": rng.standard_normal(int(np.prod(a_shape))).astype(np.float32),
               "V": rng.standard_normal(int(np.prod(b_shape))).astype(np.float32)}
    nodes = [helper.make_node("Reshape", ["W", "a_shape"], ["A"]),
             helper.make_node("Reshape", ["V", "b_shape"], ["B"]),
             helper.make_node("MatMul", ["A", "B"], ["Y"]),
             helper.make_node("Mul", ["Y", "Y"], ["Y2"]),
             helper.make_node("ReduceSum", ["Y2"], ["loss"], keepdims=0)]
    proto = make_model(nodes, [("a_shape", np.int64, ["ra"]), ("b_shape", np.int64, ["rb"])],
                       [("loss", np.float32, [])], weights, opset=17)
    feeds = {"a_shape": np.array(a_shape, np.int64), "b_shape": np.array(b_shape, np.int64)}
    step = step_model(onnxgrad.load(proto), onnxgrad.SGD(lr=1.0), loss=None, output="loss")
    assert "Einsum" in {n.op_type for n in step.graph.node}  # the run-time-rank form
    got = _run(_session(step), feeds)
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0))
    want = trainer.gradients(feeds, None)
    for name, value in weights.items():
        np.testing.assert_allclose(value - got[f"{name}.next"], want[name], rtol=1e-4,
                                   atol=1e-4 * max(np.abs(want[name]).max(), 1.0), err_msg=name)


def test_dropout_trains_in_the_step_model():
    from helpers import helper, make_model

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
             helper.make_node("Dropout", ["h"], ["logits"], name="drop")]
    proto = make_model(nodes, [("x", np.float32, ["N", 6])], [("logits", np.float32, ["N", 3])],
                       {"w": rng.standard_normal((3, 6)).astype(np.float32),
                        "b": np.zeros(3, np.float32)}, opset=13)
    step = step_model(onnxgrad.load(proto), onnxgrad.SGD(lr=0.0))
    x, y = np.ones((64, 6), np.float32), np.zeros(64, np.int64)
    losses, _ = train_in_onnxruntime(step, {"x": x, "target": y}, 3)
    assert len(set(losses)) == 3  # lr 0: only the masks change the loss


# -- the command line -------------------------------------------------------------------


def test_convert_and_apply_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from onnxgrad.tools.cli import main

    runner = CliRunner()
    model = ROOT / "models" / "digits_mlp.onnx"
    step_path, eval_path = tmp_path / "step.onnx", tmp_path / "step.eval.onnx"
    result = runner.invoke(main, ["convert", str(model), "--optimizer", "sgd", "--lr", "0.05",
                                  "--momentum", "0.9", "--freeze", "0.*", "--out", str(step_path)])
    assert result.exit_code == 0, result.output
    assert "2 trained parameters" in result.output and eval_path.exists()
    step = onnx.load(step_path)
    x, y = _digits(64)
    _, state = train_in_onnxruntime(step, {"input": x, "target": y}, 5)
    frozen = onnxgrad.load(model).parameters()
    assert set(json.loads(next(p.value for p in step.metadata_props
                               if p.key == "onnxgrad.trained"))) == {"2.weight", "2.bias"}
    # The evaluation model takes the current weights as inputs.
    got = _run(_session(onnx.load(eval_path)), {"input": x, "2.weight": state["2.weight"],
                                               "2.bias": state["2.bias"]})
    trained_path = tmp_path / "trained.onnx"
    np.savez(tmp_path / "state.npz", **state)
    result = runner.invoke(main, ["apply", str(model), str(tmp_path / "state.npz"),
                                  "--out", str(trained_path)])
    assert result.exit_code == 0, result.output
    assert "left out" in result.output and "lr" in result.output
    trained = onnxgrad.load(trained_path)
    np.testing.assert_array_equal(trained.parameters()["2.weight"], state["2.weight"])
    np.testing.assert_array_equal(trained.parameters()["0.weight"], frozen["0.weight"])
    want = _run(_session(onnx.load(trained_path)), {"input": x})
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--out", "{model}"], "is the input model"),
    (["--out", "{tmp}/a.onnx", "--eval-out", "{tmp}/a.onnx"], "name the same file"),
    (["--out", "{tmp}/missing/a.onnx"], "does not exist"),
    (["--optimizer", "rmsprop"], "unknown optimizer"),
    (["--loss", "mse", "--class-axis", "1"], "apply to class losses"),
])
def test_convert_refuses_bad_options(tmp_path, args, message):
    from click.testing import CliRunner

    from onnxgrad.tools.cli import main

    model = ROOT / "models" / "digits_mlp.onnx"
    args = [a.format(model=model, tmp=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "step.onnx")]
    result = CliRunner().invoke(main, ["convert", str(model), *args])
    assert result.exit_code != 0 and message in result.output, result.output


def test_an_op_without_a_standard_form_is_named(tmp_path):
    from helpers import helper, make_model

    rng = np.random.default_rng(1)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Tanh", ["v_in"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", onnx.TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", onnx.TensorProto.FLOAT, ["N", 3])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["v0"], name="matmul"),
             helper.make_node("Loop", ["trips", "", "v0"], ["logits"], name="loop", body=body)]
    proto = make_model(nodes, [("x", np.float32, ["N", 4])], [("logits", np.float32, ["N", 3])],
                       {"W": rng.standard_normal((4, 3)).astype(np.float32),
                        "trips": np.array(2, np.int64)}, opset=17)
    with pytest.raises(ModelError, match=r"node 'loop/LoopGrad' \(onnxgrad::"
                                         r"LoopGrad.*cannot be written in standard "
                                         r"ONNX ops yet"):
        step_model(onnxgrad.load(proto), onnxgrad.SGD(lr=0.1))


def test_set_parameters_checks_then_writes_in_place():
    model = onnxgrad.load(ROOT / "models" / "digits_mlp.onnx")
    before = model.parameters()
    with pytest.raises(onnxgrad.DataError, match="'nope' is not an initializer"):
        model.set_parameters({"2.bias": np.zeros_like(before["2.bias"]), "nope": np.zeros(1)})
    with pytest.raises(onnxgrad.DataError, match=r"has shape \[10\], got a value of shape \[3\]"):
        model.set_parameters({"2.bias": np.zeros(3)})
    np.testing.assert_array_equal(model.parameters()["2.bias"], before["2.bias"])  # untouched
    trainer = onnxgrad.Trainer(model, optimizer=onnxgrad.SGD(lr=0.0))
    model.set_parameters({"2.bias": np.ones(10)})
    x, y = _digits(4)
    assert trainer.step({"input": x}, y) > 0
    np.testing.assert_array_equal(model.parameters()["2.bias"], np.ones(10, np.float32))
    out = model.run({"input": x})
    assert np.isfinite(list(out.values())[0]).all()


# -- the step as the model's own training algorithm (TrainingInfoProto) ------------------


def test_training_info_model_trains_as_the_trainer():
    from onnxgrad.convert import training_info_model

    path = ROOT / "models" / "digits_mlp.onnx"
    proto = training_info_model(onnxgrad.load(path), onnxgrad.Adam(lr=0.01))
    onnx.checker.check_model(proto, full_check=True)
    (info_proto,) = proto.training_info
    own = {t.name for t in info_proto.algorithm.initializer}
    assert "step" in own and "lr" in own and not own & {t.name for t in proto.graph.initializer}
    info = onnxgrad.TrainingInfo(onnxgrad.load(proto))
    assert info.inputs == ["input", "target"]
    trainer = onnxgrad.Trainer(onnxgrad.load(path), optimizer=onnxgrad.Adam(lr=0.01))
    x, y = _digits()
    for _ in range(3):
        loss = info.step({"input": x, "target": y})["loss"]
        np.testing.assert_allclose(loss, trainer.step({"input": x}, y), rtol=1e-5)
    got, want = info.model.parameters(), trainer.model.parameters()
    for name in trainer.trainable:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert int(info.state["step"]) == 3


def test_training_info_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from onnxgrad.tools.cli import main

    runner = CliRunner()
    model = ROOT / "models" / "digits_mlp.onnx"
    carrying, trained = tmp_path / "training.onnx", tmp_path / "trained.onnx"
    result = runner.invoke(main, ["convert", str(model), "--optimizer", "sgd", "--lr", "0.1",
                                  "--training-info", "--out", str(carrying)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["train", str(carrying), "--training-info", "--data",
                                  str(ROOT / "models" / "digits_train.npz"), "--steps", "20",
                                  "--out", str(trained), "-q"])
    assert result.exit_code == 0, result.output
    x, y = _digits(256)
    before = _run(_session(onnx.load(model)), {"input": x})["logits"]
    after = _run(_session(onnx.load(trained)), {"input": x})["logits"]

    def cross_entropy(logits):
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -log_prob[np.arange(len(y)), y].mean()

    assert cross_entropy(after) < 0.8 * cross_entropy(before)
    assert (after.argmax(1) == y).mean() > (before.argmax(1) == y).mean()


def test_initial_state_model_and_plain_state_inputs_train_alike():
    from onnxgrad.convert import split_initial_state

    model = onnxgrad.load(ROOT / "models" / "digits_cnn.onnx")
    inline = step_model(model, onnxgrad.Adam(lr=0.01))
    plain, initial = split_initial_state(inline)
    states = set(state_mapping(inline).values())
    assert not states & {t.name for t in plain.graph.initializer}
    session = _session(plain)
    assert states <= {i.name for i in session.get_inputs()}  # required inputs now
    state = _run(_session(initial), {})
    assert set(state) == states
    x, y = _digits()
    want, _ = train_in_onnxruntime(inline, {"input": x, "target": y}, 3)
    mapping = state_mapping(plain)
    got = []
    for _ in range(3):
        out = _run(session, {"input": x, "target": y, **state})
        got.append(float(out["loss"]))
        state = {mapping[n]: v for n, v in out.items() if n in mapping}
    np.testing.assert_array_equal(got, want)
    evaluation = eval_model(model, ["head.weight"], defaults=False)
    assert "head.weight" in {i.name for i in _session(evaluation).get_inputs()}


def test_binary_cross_entropy_steps_in_onnxruntime_equal_trainer_steps():
    from helpers import mlp_model

    proto = mlp_model(sizes=(4, 6, 1))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 4)).astype(np.float32)
    t = (rng.random((16, 1)) > 0.5).astype(np.float32)
    step = step_model(onnxgrad.load(proto), onnxgrad.SGD(lr=0.1, momentum=0.9),
                      loss="bce_with_logits")
    losses, state = train_in_onnxruntime(step, {"x": x, "target": t}, 3)
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss="bce_with_logits",
                               optimizer=onnxgrad.SGD(lr=0.1, momentum=0.9))
    np.testing.assert_allclose(losses, [trainer.step({"x": x}, t) for _ in range(3)], rtol=1e-5)
    params = trainer.model.parameters()
    for name in trainer.trainable:
        np.testing.assert_allclose(state[name], params[name], rtol=1e-5, atol=1e-6, err_msg=name)


def _upsample_model(mode, scales, constant=True):
    from onnx import TensorProto
    node = helper.make_node("Upsample", ["x", "s"], ["y"], mode=mode, name="up")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])]
    inits = [numpy_helper.from_array(np.asarray(scales, np.float32), "s")] if constant else []
    if not constant:
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [4]))
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, None, None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])


@pytest.mark.parametrize("mode, scales", [("nearest", [1, 1, 1.25, 1.25]), ("nearest", [1, 1, 0.75, 0.75]),
                                          ("linear", [1, 1, 2, 1.5])])
def test_upgraded_upsample_computes_what_it_computed(mode, scales):
    """onnx's version converter gives the Resize it makes the new op's defaults; the
    old op's asymmetric coordinates and rounding are written on it."""
    from onnxgrad.convert import _upgraded
    proto = _upsample_model(mode, scales)
    x = np.random.default_rng(0).standard_normal((1, 1, 4, 4)).astype(np.float32)
    want = onnxgrad.load(proto).run({"x": x})["y"]
    got = _run(_session(_upgraded(proto, "up.onnx")), {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scales, constant, says", [
    ([1, 1, 2, 0.5], True, "upsamples some axes and downsamples others"),
    ([1, 1, 2, 2], False, "takes its scales at run time"),
])
def test_an_upsample_whose_rounding_opset_18_cannot_say_is_refused(scales, constant, says):
    from onnxgrad.convert import _upgraded
    with pytest.raises(ModelError, match=says) as info:
        _upgraded(_upsample_model("nearest", scales, constant), "up.onnx")
    assert "'up'" in str(info.value) and "up.onnx" in str(info.value)
