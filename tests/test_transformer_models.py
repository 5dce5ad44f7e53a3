"""End to end: transformers exported by torch.onnx, trained by onnxgrad.

* A model around ``nn.TransformerEncoderLayer`` (token embedding + learned
  positions, GELU feed-forward, LayerNorm, mean pooling, linear head),
  exported by the TorchScript exporter (opset 17, its Shape/Gather/Concat/
  Reshape arithmetic kept) and by the dynamo exporter (opset 18): forward
  equals onnxruntime and torch, gradients equal torch's, and after 2
  SGD(momentum) steps and 3 AdamW steps the weights equal torch.optim's.
  Reference data: tests/reference/make_transformer_reference.py.
* The same TorchScript graph converted to float64: the whole block's
  gradients against central differences.
* models/tiny_lm.onnx, a causal character LM with logits N x T x V: forward
  equals onnxruntime, and a few AdamW steps with
  ``CrossEntropy(class_axis=-1)`` (classes on the last axis) lower the
  held-out perplexity.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import onnxgrad

HERE = pathlib.Path(__file__).resolve().parent
REF = HERE / "reference"
MODELS = HERE.parent / "models"

DATA = np.load(REF / "transformer.npz")
META = json.loads(str(DATA["meta"]))
EXPORTERS = META["exporters"]


def path_of(exporter):
    return REF / META["files"][exporter]


def names_of(exporter):
    return sorted(m["initializer"] for m in META["mapping"][exporter].values())


def expected(exporter, kind):
    return {n: DATA[f"{exporter}/{kind}/{n}"] for n in names_of(exporter)}


def ort_run(source, feeds):
    source = str(source) if isinstance(source, pathlib.Path) else source
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def assert_params(got, want, rtol, atol, what):
    assert set(want) <= set(got), f"{what}: missing {sorted(set(want) - set(got))}"
    for n, w in want.items():
        np.testing.assert_allclose(got[n], w, rtol=rtol, atol=atol, err_msg=f"{what}: {n}")


def trainer_for(exporter, optimizer):
    # The dynamo file keeps a few float constants (the attention's scale…) as
    # initializers; torch does not train them, so name the parameters.
    return onnxgrad.Trainer(onnxgrad.load(path_of(exporter)), loss="cross_entropy",
                            optimizer=optimizer, trainable=names_of(exporter))


# -- the encoder-layer classifier, both exporters ----------------------------------------------

@pytest.mark.parametrize("exporter", EXPORTERS)
def test_forward_matches_onnxruntime_and_torch(exporter):
    model = onnxgrad.load(path_of(exporter))
    feeds = {"tokens": DATA["tokens"]}
    got = model.run(feeds)["logits"]
    np.testing.assert_allclose(got, ort_run(path_of(exporter), feeds)["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, DATA["logits"], rtol=1e-5, atol=1e-5)
    tokens = DATA["tokens"][:3]  # another batch size (the dynamic axis)
    np.testing.assert_allclose(model.run({"tokens": tokens})["logits"],
                               ort_run(path_of(exporter), {"tokens": tokens})["logits"],
                               rtol=1e-5, atol=1e-6)


def test_torchscript_graph_keeps_its_shape_arithmetic():
    ops = {n.op_type for n in onnx.load(str(path_of("torchscript"))).graph.node}
    assert {"Shape", "Gather", "Concat", "Reshape", "Unsqueeze", "Range", "Slice"} <= ops


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_gradients_match_torch(exporter):
    trainer = trainer_for(exporter, onnxgrad.SGD(lr=0.1))
    before = trainer.model.parameters()
    grads = trainer.gradients({"tokens": DATA["tokens"]}, DATA["label"])
    assert set(grads) == set(names_of(exporter))
    assert_params(grads, expected(exporter, "grad"), 2e-3, 1e-6, f"{exporter} gradients")
    after = trainer.model.parameters()
    for n in before:
        np.testing.assert_array_equal(before[n], after[n], err_msg=f"gradients() moved {n}")


def test_torchscript_default_trainable_set_is_the_torch_parameters():
    trainer = onnxgrad.Trainer(onnxgrad.load(path_of("torchscript")), loss="cross_entropy")
    assert sorted(trainer.trainable) == names_of("torchscript")


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_optimizer_steps_match_torch(exporter, kind, tmp_path):
    if kind == "sgd":
        optimizer, steps = onnxgrad.SGD(**META["sgd"]), META["sgd_steps"]
    else:
        optimizer, steps = onnxgrad.AdamW(**META["adamw"]), META["adamw_steps"]
    trainer = trainer_for(exporter, optimizer)
    feeds = {"tokens": DATA["tokens"]}
    losses = [trainer.step(feeds, DATA["label"]) for _ in range(steps)]
    np.testing.assert_allclose(losses, DATA[f"{kind}_losses"], rtol=1e-4, atol=1e-5)
    got, want = trainer.model.parameters(), expected(exporter, kind)
    if kind == "adamw":
        # The key bias has a zero gradient in exact arithmetic: both sides step on
        # rounding noise, which Adam scales to +-lr (see make_transformer_reference.py).
        bias = META["mapping"][exporter]["layer.self_attn.in_proj_bias"]["initializer"]
        key = slice(16, 32)
        lr = META["adamw"]["lr"]
        np.testing.assert_allclose(got[bias][key], want[bias][key], atol=2 * lr * steps)
        got[bias][key] = want[bias][key]
    assert_params(got, want, 1e-4, 2e-5, f"{exporter} after {steps} {kind} steps")
    # The saved file: same graph, trained weights, runs in onnxruntime as in onnxgrad.
    out = tmp_path / "trained.onnx"
    trainer.model.save(out)
    saved = onnx.load(str(out))
    original = onnx.load(str(path_of(exporter)))
    assert [n.op_type for n in saved.graph.node] == [n.op_type for n in original.graph.node]
    np.testing.assert_allclose(ort_run(out, feeds)["logits"], trainer.model.run(feeds)["logits"],
                               rtol=1e-5, atol=1e-6)


# -- the whole block in float64 against central differences -----------------------------------------

def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model computing in float64: initializers, Constant values, Cast targets and
    graph inputs/outputs of type float become double."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(t).astype(np.float64), t.name))
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Constant" and a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64)))
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    del g.value_info[:]
    return out


def _cross_entropy(logits, label):
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(label)), label].mean())


def test_transformer_block_gradients_match_finite_differences():
    proto = to_float64(onnx.load(str(path_of("torchscript"))))
    feeds = {"tokens": DATA["tokens"][:3]}
    label = DATA["label"][:3]
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss="cross_entropy",
                               optimizer=onnxgrad.SGD(lr=0.0))
    grads = trainer.gradients(feeds, label)
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert set(grads) == set(names_of("torchscript"))
    rng = np.random.default_rng(0)
    eps = 1e-6
    for name, grad in sorted(grads.items()):
        assert grad.dtype == np.float64
        v = rng.standard_normal(grad.shape)

        def loss_at(shift):
            shifted = onnx.ModelProto()
            shifted.CopyFrom(proto)
            for t in shifted.graph.initializer:
                if t.name == name:
                    t.CopyFrom(numpy_helper.from_array(weights[name] + shift * v, name))
            return _cross_entropy(onnxgrad.load(shifted).run(feeds)["logits"], label)

        numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        analytic = float(np.sum(grad * v))
        assert abs(analytic - numeric) <= 1e-7 + 1e-5 * (abs(numeric) + np.abs(grad * v).sum()), \
            f"{name}: analytic {analytic!r} vs numeric {numeric!r}"


# -- the tiny causal language model -------------------------------------------------------------------

LM = MODELS / "tiny_lm.onnx"


def perplexity(model, data) -> float:
    logits = model.run({"tokens": data["tokens"]})["logits"].astype(np.float64)  # N x T x V
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(logp, data["label"][..., None], axis=-1)
    return math.exp(-picked.mean())


def test_tiny_lm_files_and_forward():
    train, val = np.load(MODELS / "tiny_lm_corpus.npz"), np.load(MODELS / "tiny_lm_val.npz")
    proto = onnx.load(str(LM))
    vocab = json.loads({p.key: p.value for p in proto.metadata_props}["vocab"])
    for data in (train, val):
        assert set(data.files) == {"tokens", "label"}
        assert data["tokens"].dtype == data["label"].dtype == np.int64
        assert data["tokens"].shape == data["label"].shape
        np.testing.assert_array_equal(data["tokens"][:, 1:], data["label"][:, :-1])
        assert 0 <= data["tokens"].min() and data["label"].max() < len(vocab)
    model = onnxgrad.load(LM)
    tokens = val["tokens"][:5]
    got = model.run({"tokens": tokens})["logits"]
    assert got.shape == tokens.shape + (len(vocab),)
    np.testing.assert_allclose(got, ort_run(LM, {"tokens": tokens})["logits"], rtol=1e-4, atol=1e-5)
    assert {"Trilu", "Where", "Range", "Gather"} <= {n.op_type for n in proto.graph.node}


def test_tiny_lm_loss_reads_classes_on_the_last_axis():
    train = np.load(MODELS / "tiny_lm_corpus.npz")
    model = onnxgrad.load(LM)
    batch = {"tokens": train["tokens"][:4]}
    trainer = onnxgrad.Trainer(model, loss=onnxgrad.CrossEntropy(class_axis=-1),
                               optimizer=onnxgrad.SGD(lr=0.0))
    loss = trainer.step(batch, train["label"][:4])
    logits = model.run(batch)["logits"].astype(np.float64)
    V = logits.shape[-1]
    assert loss == pytest.approx(_cross_entropy(logits.reshape(-1, V), train["label"][:4].reshape(-1)),
                                 rel=1e-5)


def test_tiny_lm_fine_tuning_lowers_held_out_perplexity(tmp_path):
    train, val = np.load(MODELS / "tiny_lm_corpus.npz"), np.load(MODELS / "tiny_lm_val.npz")
    model = onnxgrad.load(LM)
    before = perplexity(model, val)
    trainer = onnxgrad.Trainer(model, loss=onnxgrad.CrossEntropy(class_axis=-1),
                               optimizer=onnxgrad.AdamW(lr=3e-3))
    rng = np.random.default_rng(0)
    for _ in range(25):
        pick = rng.integers(0, len(train["tokens"]), 32)
        trainer.step({"tokens": train["tokens"][pick]}, train["label"][pick])
    after = perplexity(model, val)
    assert after < 0.95 * before, (before, after)
    out = tmp_path / "tiny_lm_tuned.onnx"
    model.save(out)
    np.testing.assert_allclose(ort_run(out, {"tokens": val["tokens"][:2]})["logits"],
                               model.run({"tokens": val["tokens"][:2]})["logits"], rtol=1e-4, atol=1e-5)


# -- CuPy (skipped without a CUDA device) ---------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_gradients_and_adamw_steps_on_cuda_match_torch(exporter):
    trainer = onnxgrad.Trainer(onnxgrad.load(path_of(exporter)), loss="cross_entropy",
                               optimizer=onnxgrad.AdamW(**META["adamw"]),
                               trainable=names_of(exporter), device="cuda")
    feeds = {"tokens": DATA["tokens"]}
    grads = trainer.gradients(feeds, DATA["label"])
    assert_params(grads, expected(exporter, "grad"), 2e-3, 1e-6, f"{exporter} cuda gradients")
    losses = [trainer.step(feeds, DATA["label"]) for _ in range(META["adamw_steps"])]
    np.testing.assert_allclose(losses, DATA["adamw_losses"], rtol=1e-4, atol=1e-5)
    got, want = trainer.model.parameters(), expected(exporter, "adamw")
    bias = META["mapping"][exporter]["layer.self_attn.in_proj_bias"]["initializer"]
    got[bias][16:32] = want[bias][16:32]  # zero gradient in exact arithmetic (see above)
    assert_params(got, want, 1e-4, 2e-5, f"{exporter} cuda AdamW")


@pytest.mark.gpu
def test_tiny_lm_steps_on_cuda_match_cpu():
    train = np.load(MODELS / "tiny_lm_corpus.npz")
    losses = {}
    for device in ("cpu", "cuda"):
        trainer = onnxgrad.Trainer(onnxgrad.load(LM), loss=onnxgrad.CrossEntropy(class_axis=-1),
                                   optimizer=onnxgrad.AdamW(lr=3e-3), device=device)
        losses[device] = [trainer.step({"tokens": train["tokens"][i:i + 16]},
                                       train["label"][i:i + 16]) for i in range(0, 80, 16)]
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=1e-4)
