"""Training steps in PyTorch for the reference scripts of this folder: the losses and
weights onnxgrad's tests compare theirs with.  Run with the scripts (``python
tests/reference/make_….py``), which import it from their own folder."""

from __future__ import annotations

import numpy as np
import torch


def cross_entropy_steps(model, x, label, optimizer, steps: int) -> list[float]:
    """``steps`` steps of ``optimizer`` on the mean cross-entropy of ``model(x)``
    against ``label``; the loss before each."""
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), label)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
    return losses


def run_torch(net, x, y, opt_cls, kw, steps: int):
    """``steps`` steps of a fresh ``opt_cls(**kw)`` (its single-tensor form) on (x, y):
    the parameters after them and the losses before each (float32); then the
    initial parameters are put back."""
    params = dict(net.named_parameters())
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    opt = opt_cls(params.values(), foreach=False, **kw)
    losses = cross_entropy_steps(net, x, y, opt, steps)
    after = {n: p.detach().numpy().copy() for n, p in params.items()}
    with torch.no_grad():                  # restore the initial weights
        for n, p in params.items():
            p.copy_(snapshot[n])
    return after, np.array(losses, np.float32)
