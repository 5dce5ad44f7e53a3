"""PyTorch's weights after SGD(momentum) steps on the shipped digits MLP with
``clip_grad_norm_`` and with gradient accumulation, for tests/test_clip_accumulate.py.
Run with torch installed:

    python tests/reference/make_clip_reference.py      # writes clip.npz beside it
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import torch
from onnx import numpy_helper

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS, BATCH, MICRO = 4, 32, 4


def net():
    weights = {t.name: numpy_helper.to_array(t) for t in
               onnx.load(str(ROOT / "models" / "digits_mlp.onnx")).graph.initializer}
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(weights[name].copy()))
    return model


def main() -> None:
    data = np.load(ROOT / "models" / "digits_train.npz")
    x = torch.from_numpy(data["input"][:STEPS * BATCH].copy())
    y = torch.from_numpy(data["label"][:STEPS * BATCH].astype(np.int64))
    out = {}
    for max_norm in (0.5, 100.0):
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for i in range(STEPS):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[i * BATCH:(i + 1) * BATCH]),
                                                     y[i * BATCH:(i + 1) * BATCH])
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            out[f"clip{max_norm}/norm{i}"] = norm.numpy()
            opt.step()
        for name, param in model.named_parameters():
            out[f"clip{max_norm}/{name}"] = param.detach().numpy().copy()
    # Accumulation: MICRO micro-batches of BATCH / MICRO, each loss divided by MICRO.
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    micro = BATCH // MICRO
    for i in range(STEPS):
        opt.zero_grad()
        for j in range(MICRO):
            lo = i * BATCH + j * micro
            loss = torch.nn.functional.cross_entropy(model(x[lo:lo + micro]), y[lo:lo + micro])
            (loss / MICRO).backward()
        opt.step()
    for name, param in model.named_parameters():
        out[f"accumulate/{name}"] = param.detach().numpy().copy()
    path = pathlib.Path(__file__).with_name("clip.npz")
    np.savez(path, **out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
