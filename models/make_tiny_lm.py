"""Make the tiny causal character-level language model and its data.

Run from the repository root (needs torch, only for this script; seeded)::

    python models/make_tiny_lm.py

It writes into ``models/``:

* ``tiny_lm.onnx`` -- a causal character LM: token embedding + learned
  positions (d_model 32), two ``nn.TransformerEncoderLayer`` blocks (4 heads,
  feed-forward 64, GELU, dropout 0) under a causal mask computed in the graph
  (Trilu), a final LayerNorm and a linear head over the vocabulary.  Input
  ``tokens`` (int64 N x 32), output ``logits`` (float32 N x 32 x V).  The
  classes are on the *last* axis: train it with
  ``onnxgrad.CrossEntropy(class_axis=-1)``; the perplexity is
  exp(mean cross-entropy).  Exported by the TorchScript exporter, opset 17,
  dynamic batch axis (the tracer fixes the sequence length inside the
  attention's reshapes), without constant folding, so the mask's
  ConstantOfShape/Trilu/Where arithmetic stays in the graph.  The
  vocabulary (characters, in token order) is in the model's metadata under
  ``vocab`` (a JSON list).  It is pretrained only briefly (40 AdamW steps),
  so fine-tuning visibly lowers the held-out perplexity (about 13.4 to 11.7
  after 40 steps of AdamW(lr=3e-3), batch 32).
* ``tiny_lm_corpus.npz`` -- training windows of the first 90 % of the text:
  ``tokens`` int64 (N, 32) and ``label`` int64 (N, 32), the next character
  of each position.
* ``tiny_lm_val.npz`` -- the same from the held-out last 10 % of the text.

The text (``TEXT`` below, a few hundred words) was written for this project.
"""

from __future__ import annotations

import json
import math
import pathlib
import warnings

import numpy as np
import onnx
import torch

HERE = pathlib.Path(__file__).resolve().parent
D_MODEL, HEADS, FF, LAYERS, CONTEXT = 32, 4, 64, 2, 32
TRAIN_STRIDE, VAL_STRIDE = 4, 8
PRETRAIN_STEPS, BATCH, LR = 40, 32, 3e-3

TEXT = """\
the lighthouse keeper kept a small notebook in which she wrote down the weather, the ships
that passed and the birds that rested on the rail of the gallery. in the spring the notebook
filled with terns and swallows, in the autumn with geese that flew south in long uneven lines.
every evening she climbed the one hundred and twelve steps, wiped the salt from the glass,
trimmed the wick and lit the lamp. the light turned all night, and the ships that saw it knew
where the rocks were and where the channel ran deep and safe.
in the winter the storms came in from the west. the waves broke over the harbour wall and the
spray reached the windows of the kitchen. on those nights she did not sleep much. she sat by the
stove with a cup of tea, listened to the wind and counted the seconds between the flashes of
the lamp above her. when the count was right she knew that the machine was turning and that
the light was reaching the sea.
in the village across the bay people said that she talked to the gulls. it was true. she told
them about the weather, about the ships, about the letters that came from her brother in the
city, who wrote that the streets were loud and the nights were never dark. she told the gulls
that she would not live in a place where the nights were never dark, because then no one would
need a light to find the way home.
one summer a boy from the village rowed across the bay and asked whether he could learn the
work. she showed him how to clean the lens, how to wind the clock that turned the lamp, how to
read the barometer and how to write the notebook. he learned quickly. by the end of the summer
he could climb the steps without stopping and light the lamp before the sun went down.
years later, when the light was made automatic and no keeper was needed, the boy, now a man,
kept the notebooks in a wooden box. sometimes he read them to his children: wind from the
north west, rain in the afternoon, two fishing boats and a ferry, a heron on the rail.
the children liked the herons best.
"""


def vocabulary(text: str) -> list[str]:
    return sorted(set(text))


def windows(ids: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    starts = range(0, len(ids) - CONTEXT - 1, stride)
    tokens = np.stack([ids[s:s + CONTEXT] for s in starts]).astype(np.int64)
    label = np.stack([ids[s + 1:s + CONTEXT + 1] for s in starts]).astype(np.int64)
    return tokens, label


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, D_MODEL)
        self.pos = torch.nn.Embedding(CONTEXT, D_MODEL)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, dim_feedforward=FF, dropout=0.0,
                                             activation="gelu", batch_first=True)
            for _ in range(LAYERS))
        self.norm = torch.nn.LayerNorm(D_MODEL)
        self.head = torch.nn.Linear(D_MODEL, vocab)

    def forward(self, tokens):
        T = tokens.shape[1]
        positions = torch.arange(T, device=tokens.device)
        h = self.tok(tokens) + self.pos(positions)
        future = torch.ones(T, T, dtype=torch.bool, device=tokens.device).triu(1)
        mask = torch.zeros(T, T, device=tokens.device).masked_fill(future, float("-inf"))
        for layer in self.layers:
            h = layer(h, src_mask=mask)
        return self.head(self.norm(h))  # N x T x V


def cross_entropy(logits, label):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             label.reshape(-1))


def main():
    torch.manual_seed(0)
    vocab = vocabulary(TEXT)
    ids = np.array([vocab.index(c) for c in TEXT], dtype=np.int64)
    cut = int(len(ids) * 0.9)
    train_x, train_y = windows(ids[:cut], TRAIN_STRIDE)
    val_x, val_y = windows(ids[cut - CONTEXT:], VAL_STRIDE)

    net = TinyLM(len(vocab))
    opt = torch.optim.AdamW(net.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(1)
    tx, ty = torch.from_numpy(train_x), torch.from_numpy(train_y)
    net.train()
    for _ in range(PRETRAIN_STEPS):
        pick = torch.randint(0, len(tx), (BATCH,), generator=gen)
        loss = cross_entropy(net(tx[pick]), ty[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    with torch.no_grad():
        train_loss = cross_entropy(net(tx), ty).item()
        val_loss = cross_entropy(net(torch.from_numpy(val_x)), torch.from_numpy(val_y)).item()

    path = HERE / "tiny_lm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (tx[:2],), str(path), input_names=["tokens"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          do_constant_folding=False,
                          dynamic_axes={"tokens": {0: "batch"}, "logits": {0: "batch"}})
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"vocab": json.dumps(vocab),
                                        "note": "logits N x T x V: class axis -1"})
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    np.savez_compressed(HERE / "tiny_lm_corpus.npz", tokens=train_x, label=train_y)
    np.savez_compressed(HERE / "tiny_lm_val.npz", tokens=val_x, label=val_y)

    import onnxruntime as ort  # the exported file must agree with torch
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = net(torch.from_numpy(val_x[:3])).numpy()
    got = sess.run(["logits"], {"tokens": val_x[:3]})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    ops = sorted({n.op_type for n in model.graph.node})
    print(f"tiny_lm.onnx: vocab {len(vocab)}, {sum(p.numel() for p in net.parameters())} "
          f"parameters, {len(model.graph.node)} nodes, ops {ops}")
    print(f"train windows {train_x.shape}, val windows {val_x.shape}; perplexity after "
          f"pretraining: train {math.exp(train_loss):.2f}, val {math.exp(val_loss):.2f}")


if __name__ == "__main__":
    main()
