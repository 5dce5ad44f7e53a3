"""PyTorch's forward pass, gradients and SGD steps on a small scripted model that
builds lists of tensors, for tests/test_sequence_gradients.py.  Run with torch
installed:

    python tests/reference/make_sequence_reference.py

The model (seeded, float32) splits a linear layer's output into chunks of two
rows, transforms each chunk in a loop that appends to a list and concatenates
the list; then it builds a second list column by column and stacks it, before a
linear head to 3 classes; mean cross-entropy.  ``torch.jit.script`` keeps the
lists, and the TorchScript exporter (``dynamo=False``, opset 17) writes them as
sequence ops: SplitToSequence, SequenceEmpty, Loops whose bodies read a sequence
(SequenceAt) and append to the one they carry (SequenceInsert), and
ConcatFromSequence with and without ``new_axis``.

It writes into ``tests/reference/``:

* ``sequence_torchscript.onnx``;
* ``sequence.npz``::

      x, label             the batch (5 rows: the last chunk has one row)
      logits               the forward pass
      grad/<parameter>     each parameter's gradient of the loss
      losses               losses of STEPS SGD(lr, momentum) steps
      trained/<parameter>  the parameters after those steps
"""

from __future__ import annotations

import pathlib
from typing import List

import numpy as np
import torch

from torch_training import cross_entropy_steps

HERE = pathlib.Path(__file__).resolve().parent
STEPS, LR, MOMENTUM = 3, 0.1, 0.9
BATCH, FEATURES, HIDDEN, CLASSES = 5, 6, 8, 3


class ChunkNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(FEATURES, HIDDEN)
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, HIDDEN))
        self.head = torch.nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        chunks = torch.split(self.fc(x), 2, dim=0)
        outs: List[torch.Tensor] = []
        for c in chunks:
            outs.append(torch.tanh(c) * self.gain)
        h = torch.cat(outs, dim=0)
        cols: List[torch.Tensor] = []
        for i in range(h.size(1)):
            cols.append(torch.sigmoid(h[:, i]) * h[:, i])
        return self.head(torch.stack(cols, dim=1))


def main() -> None:
    torch.manual_seed(0)
    model = ChunkNet()
    x = torch.randn(BATCH, FEATURES)
    label = torch.randint(0, CLASSES, (BATCH,))
    torch.onnx.export(torch.jit.script(model), (x,), str(HERE / "sequence_torchscript.onnx"),
                      input_names=["x"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    out = {"x": x.numpy(), "label": label.numpy()}
    with torch.no_grad():
        out["logits"] = model(x).numpy()
    torch.nn.functional.cross_entropy(model(x), label).backward()
    for name, param in model.named_parameters():
        out[f"grad/{name}"] = param.grad.numpy().copy()
    model.zero_grad()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses = cross_entropy_steps(model, x, label, optimizer, STEPS)
    out["losses"] = np.array(losses)
    for name, param in model.named_parameters():
        out[f"trained/{name}"] = param.detach().numpy().copy()
    np.savez_compressed(HERE / "sequence.npz", **out)


if __name__ == "__main__":
    main()
