"""PyTorch's forward pass, gradients and SGD steps on small LSTM and GRU
classifiers, exported by both torch.onnx exporters, for
tests/test_recurrent_models.py.  Run with torch and onnxscript installed:

    python tests/reference/make_recurrent_reference.py

The models (seeded, float32): a two-layer bidirectional ``nn.LSTM`` or
``nn.GRU`` (input 4, hidden 6, batch_first) over a (4, 5, 4) sequence, the last
step's output into a linear head to 3 classes; mean cross-entropy.

It writes into ``tests/reference/``:

* ``{lstm,gru}_{torchscript,dynamo}.onnx`` -- the TorchScript exporter
  (``dynamo=False``, opset 17) and the dynamo exporter (``dynamo=True``,
  opset 18).  Both emit ONNX LSTM/GRU nodes whose W, R and B are torch's
  weights with the gates reordered (torch's i, f, g, o is ONNX's i, o, f, c)
  and split per direction: the same numbers, arranged differently.
* ``recurrent.npz``, keys per model ``lstm``/``gru``::

      {kind}/x, {kind}/label      the batch
      {kind}/logits               the forward pass
      {kind}/grad_values          every gradient entry of every parameter, sorted
                                  (the exporters rearrange the weights, so the test
                                  compares the multiset of values)
      {kind}/losses               losses of STEPS SGD(lr, momentum) steps
      {kind}/trained_logits       the forward pass after those steps
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

from torch_training import cross_entropy_steps

HERE = pathlib.Path(__file__).resolve().parent
STEPS, LR, MOMENTUM = 3, 0.1, 0.9
BATCH, SEQ, FEATURES, HIDDEN, CLASSES = 4, 5, 4, 6, 3


class Net(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        layer = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
        self.rnn = layer(FEATURES, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
        self.head = torch.nn.Linear(2 * HIDDEN, CLASSES)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def main() -> None:
    out = {}
    for seed, kind in enumerate(("lstm", "gru")):
        torch.manual_seed(seed)
        model = Net(kind)
        x = torch.randn(BATCH, SEQ, FEATURES)
        label = torch.randint(0, CLASSES, (BATCH,))
        for exporter, opset in (("torchscript", 17), ("dynamo", 18)):
            torch.onnx.export(model, (x,), str(HERE / f"{kind}_{exporter}.onnx"),
                              input_names=["x"], output_names=["logits"], opset_version=opset,
                              dynamo=exporter == "dynamo", external_data=False)
        with torch.no_grad():
            out[f"{kind}/logits"] = model(x).numpy()
        loss = torch.nn.functional.cross_entropy(model(x), label)
        loss.backward()
        out[f"{kind}/grad_values"] = np.sort(np.concatenate(
            [p.grad.numpy().ravel() for p in model.parameters()]))
        model.zero_grad()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        losses = cross_entropy_steps(model, x, label, optimizer, STEPS)
        with torch.no_grad():
            out[f"{kind}/trained_logits"] = model(x).numpy()
        out[f"{kind}/x"], out[f"{kind}/label"] = x.numpy(), label.numpy()
        out[f"{kind}/losses"] = np.array(losses)
    np.savez_compressed(HERE / "recurrent.npz", **out)


if __name__ == "__main__":
    main()
