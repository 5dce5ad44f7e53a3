"""Make the reference data that lets tests/test_transformer_models.py compare
onnxgrad with PyTorch on a transformer without importing torch.

Run from the repository root in an environment with torch, onnxscript and
onnxruntime::

    python tests/reference/make_transformer_reference.py

The model (seeded, float32): token embedding (vocab 20, d_model 16) plus
learned positions (an ``nn.Embedding`` over ``arange(seq)``), one
``nn.TransformerEncoderLayer`` (2 heads, feed-forward 32, GELU, dropout 0.0,
batch_first, post-norm), a final LayerNorm, mean pooling over the sequence and
a linear head to 3 classes.  Input ``tokens`` (N x 8 int64), output
``logits`` (N x 3).  Every parameter is drawn at random (LayerNorm weights
and biases included): the TorchScript exporter merges initializers of equal
value, which would tie parameters that torch trains separately.

It writes into ``tests/reference/``:

* ``transformer_torchscript.onnx`` -- TorchScript exporter (``dynamo=False``,
  opset 17, ``do_constant_folding=False`` so the attention's packed
  ``in_proj_weight`` stays one initializer that the graph slices), with a
  dynamic batch axis: the graph keeps its Shape/Gather/Unsqueeze/Concat/
  Reshape arithmetic, Range for the positions and Erf for GELU.  (The
  sequence length stays 8: the tracer writes it into the attention's
  reshapes even where the axis is declared dynamic.)
* ``transformer_dynamo.onnx`` -- dynamo exporter (``dynamo=True``, opset 18,
  dynamic batch).  It stores some weights transposed (``val_*``) and folds
  the position lookup into an initializer equal to the position table.
* ``transformer.npz``, keys::

      meta                      0-d str: JSON {"exporters": [...], "files": {exporter: file},
                                "mapping": {exporter: {torch param: {"initializer": name,
                                                                     "transposed": bool}}},
                                "sgd": {"lr": 0.1, "momentum": 0.9}, "sgd_steps": 2,
                                "adamw": {"lr": 0.01}, "adamw_steps": 3}
      tokens, label             the batch: int64 (4, 8), int64 (4,)
      logits                    torch's output at the initial weights
      loss                      mean cross-entropy at the initial weights (0-d)
      sgd_losses, adamw_losses  the loss before each step
      <exporter>/init/<name>    initial value of initializer <name>
      <exporter>/grad/<name>    d mean-cross-entropy / d <name>
      <exporter>/sgd/<name>     value after 2 steps of SGD(lr=0.1, momentum=0.9)
      <exporter>/adamw/<name>   value after 3 steps of AdamW(lr=0.01) (fresh start)

  Per-parameter arrays are in the ONNX initializer's layout (transposed
  where the exporter transposed the weight).  Both files are checked against
  torch in onnxruntime before anything is written.

  The gradient of the attention's key bias (``in_proj_bias[16:32]``) is zero
  in exact arithmetic (it adds the same number to every score of a query);
  torch and onnxgrad both compute rounding noise there, which Adam's
  normalisation blows up to steps of size ``lr``: compare that slice loosely.
"""

from __future__ import annotations

import json
import pathlib
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

from torch_training import run_torch

HERE = pathlib.Path(__file__).resolve().parent
VOCAB, D_MODEL, HEADS, SEQ, FF, CLASSES, BATCH = 20, 16, 2, 8, 32, 3, 4
FILES = {"torchscript": "transformer_torchscript.onnx", "dynamo": "transformer_dynamo.onnx"}
SGD_KW, SGD_STEPS = dict(lr=0.1, momentum=0.9), 2
ADAMW_KW, ADAMW_STEPS = dict(lr=0.01), 3


class TinyTransformer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, D_MODEL)
        self.pos = torch.nn.Embedding(SEQ, D_MODEL)
        self.layer = torch.nn.TransformerEncoderLayer(
            D_MODEL, HEADS, dim_feedforward=FF, dropout=0.0, activation="gelu",
            batch_first=True)
        self.norm = torch.nn.LayerNorm(D_MODEL)
        self.head = torch.nn.Linear(D_MODEL, CLASSES)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.tok(tokens) + self.pos(positions)
        h = self.norm(self.layer(h))
        return self.head(h.mean(dim=1))


def make_net():
    torch.manual_seed(0)
    net = TinyTransformer()
    with torch.no_grad():  # distinct values everywhere (see the module docstring)
        for name, p in net.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name in ("tok.weight", "pos.weight"):
                p.mul_(0.5)
    return net


def export(net, tokens):
    torch.backends.mha.set_fastpath_enabled(False)  # the plain-ops path, as in training
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (tokens,), str(HERE / FILES["torchscript"]), input_names=["tokens"],
            output_names=["logits"], opset_version=17, dynamo=False, do_constant_folding=False,
            dynamic_axes={"tokens": {0: "batch"}, "logits": {0: "batch"}})
        prog = torch.onnx.export(
            net, (tokens,), dynamo=True, opset_version=18, input_names=["tokens"],
            output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False)
        prog.save(str(HERE / FILES["dynamo"]), external_data=False)


def map_initializers(net, model):
    """torch parameter -> (initializer name, transposed), by value; every float
    initializer that equals no parameter must be a constant of the graph."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    mapping = {}
    for pname, p in net.named_parameters():
        v = p.detach().numpy()
        hits = [(n, False) for n, a in inits.items() if a.shape == v.shape and np.array_equal(a, v)]
        if v.ndim == 2:
            hits += [(n, True) for n, a in inits.items()
                     if a.shape == v.T.shape and np.array_equal(a, v.T)]
        assert len(hits) == 1, (pname, hits)
        mapping[pname] = hits[0]
    return mapping


def main():
    net = make_net()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    tokens[0, :3] = 5  # a repeated token: the embedding gradient must add up
    label = torch.randint(0, CLASSES, (BATCH,), generator=g)
    export(net, tokens)

    out = {"tokens": tokens.numpy().astype(np.int64), "label": label.numpy().astype(np.int64)}
    net.train()  # dropout is 0.0: training mode computes what eval mode does
    logits = net(tokens)
    loss = torch.nn.functional.cross_entropy(logits, label)
    net.zero_grad()
    loss.backward()
    out["logits"] = logits.detach().numpy()
    out["loss"] = np.array(loss.item(), np.float32)
    init = {n: p.detach().numpy().copy() for n, p in net.named_parameters()}
    grad = {n: p.grad.numpy().copy() for n, p in net.named_parameters()}
    net.zero_grad()
    sgd, out["sgd_losses"] = run_torch(net, tokens, label, torch.optim.SGD, SGD_KW, SGD_STEPS)
    adamw, out["adamw_losses"] = run_torch(net, tokens, label, torch.optim.AdamW, ADAMW_KW,
                                           ADAMW_STEPS)

    meta = {"exporters": list(FILES), "files": FILES, "mapping": {},
            "sgd": SGD_KW, "sgd_steps": SGD_STEPS, "adamw": ADAMW_KW, "adamw_steps": ADAMW_STEPS}
    for exporter, fname in FILES.items():
        model = onnx.load(str(HERE / fname))
        onnx.checker.check_model(model, full_check=True)
        sess = ort.InferenceSession(str(HERE / fname), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"tokens": out["tokens"]})[0]
        np.testing.assert_allclose(got, out["logits"], rtol=1e-4, atol=1e-5)
        mapping = map_initializers(net, model)
        meta["mapping"][exporter] = {
            p: {"initializer": n, "transposed": t} for p, (n, t) in mapping.items()}
        for p, (n, t) in mapping.items():
            lay = (lambda a: a.T.copy()) if t else (lambda a: a)
            for kind, values in (("init", init), ("grad", grad), ("sgd", sgd), ("adamw", adamw)):
                out[f"{exporter}/{kind}/{n}"] = lay(values[p])
        ops = sorted({nd.op_type for nd in model.graph.node})
        print(f"{fname}: {len(model.graph.node)} nodes, ops {ops}")
    out["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(HERE / "transformer.npz", **out)
    print(f"transformer.npz: loss {out['loss']:.4f}, sgd losses {out['sgd_losses']}, "
          f"adamw losses {out['adamw_losses']}")


if __name__ == "__main__":
    main()
