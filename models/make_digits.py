"""Make the small digits model and data shipped with onnxgrad.

Run from the repository root, in an environment that has torch and
scikit-learn (torch is needed only here, never by onnxgrad itself)::

    python models/make_digits.py

It writes, next to this script:

``digits_train.npz`` / ``digits_test.npz``
    scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``,
    shipped with scikit-learn, no download), pixels scaled from 0..16 to
    [0, 1] as float32, split deterministically (seed 0, stratified) into
    1437 training and 360 test samples.  Keys: ``"input"`` (float32, N x 64)
    and ``"label"`` (int64, N).

``digits_mlp.onnx``
    a 64-32-10 MLP (Linear, ReLU, Linear) made with torch and exported with
    the TorchScript exporter (``dynamo=False``, opset 17, dynamic batch axis).
    Input ``"input"`` (float32, batch x 64), output ``"logits"`` (float32,
    batch x 10).  It is *deliberately under-trained*: pretrained for a few
    SGD epochs on a small pretraining subset of the training split, so that
    it is a real classifier (roughly 70-85 % test accuracy) that fine-tuning
    with onnxgrad on the full training split visibly improves.

Everything is seeded, so running the script again gives the same arrays and,
with the same torch version, the same weights.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = pathlib.Path(__file__).resolve().parent
SEED = 0
N_TEST = 360
N_PRETRAIN = 150      # size of the pretraining subset (taken from the train split)
PRETRAIN_EPOCHS = 3
PRETRAIN_LR = 0.1
PRETRAIN_BATCH = 16


def make_data():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=N_TEST, random_state=SEED, stratify=y)
    np.savez_compressed(HERE / "digits_train.npz", input=x_tr, label=y_tr)
    np.savez_compressed(HERE / "digits_test.npz", input=x_te, label=y_te)
    return x_tr, y_tr, x_te, y_te


def accuracy(net, x, y):
    with torch.no_grad():
        return float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def main():
    x_tr, y_tr, x_te, y_te = make_data()
    print(f"data: train {x_tr.shape}, test {x_te.shape}")

    torch.manual_seed(SEED)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

    rng = np.random.default_rng(SEED)
    sub = rng.permutation(len(x_tr))[:N_PRETRAIN]
    xs, ys = torch.from_numpy(x_tr[sub]), torch.from_numpy(y_tr[sub])
    opt = torch.optim.SGD(net.parameters(), lr=PRETRAIN_LR, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(PRETRAIN_EPOCHS):
        order = torch.from_numpy(rng.permutation(N_PRETRAIN))
        for i in range(0, N_PRETRAIN, PRETRAIN_BATCH):
            idx = order[i:i + PRETRAIN_BATCH]
            opt.zero_grad()
            loss_fn(net(xs[idx]), ys[idx]).backward()
            opt.step()

    net.eval()
    torch.onnx.export(
        net, (torch.zeros(1, 64),), str(HERE / "digits_mlp.onnx"),
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17, dynamo=False)
    print(f"pretrained on {N_PRETRAIN} samples for {PRETRAIN_EPOCHS} epochs: "
          f"train accuracy {accuracy(net, x_tr, y_tr):.3f}, "
          f"test accuracy {accuracy(net, x_te, y_te):.3f}")


if __name__ == "__main__":
    main()
