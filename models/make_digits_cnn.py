"""Make the small digits CNN shipped with onnxgrad (a vision model to fine-tune).

Run from the repository root, in an environment that has torch and
scikit-learn (torch is needed only here, never by onnxgrad itself), after
``models/make_digits.py`` has written the data::

    python models/make_digits_cnn.py

It reads the same data as the MLP, ``digits_train.npz`` / ``digits_test.npz``
(``"input"`` float32 N x 64 in [0, 1], ``"label"`` int64 N), and writes, next
to this script:

``digits_cnn.onnx``
    a small convolutional network for the 8x8 digits, made with torch and
    exported with the TorchScript exporter (``dynamo=False``, opset 17,
    dynamic batch axis).  Input ``"input"`` (float32, batch x 64: the
    flattened image, reshaped to batch x 1 x 8 x 8 inside the graph), output
    ``"logits"`` (float32, batch x 10).  Two parts::

        features  Conv2d(1, 8, 3, padding=1), BatchNorm2d(8), ReLU,
                  MaxPool2d(2), Conv2d(8, 16, 3, padding=1), ReLU,
                  AdaptiveAvgPool2d(1), Flatten          -> batch x 16
        head      Linear(16, 10)                          -> batch x 10

    The initializers keep torch's parameter names, so a glob selects a part:
    ``features.0.weight``, ``features.0.bias`` (first conv),
    ``features.1.weight``, ``features.1.bias``, ``features.1.running_mean``,
    ``features.1.running_var`` (batch norm), ``features.4.weight``,
    ``features.4.bias`` (second conv), ``head.weight``, ``head.bias``.
    ``--freeze 'features.*'`` trains only the head.

    The backbone is *pretrained*, the head is *not*: the whole network is
    trained on a small subset of the training split (300 samples, SGD),
    then the head is re-initialised with small seeded random weights and
    given only a few SGD steps on 32 samples (the backbone fixed).  The
    model therefore starts with a useful backbone and a poor test accuracy
    (about 45 %), which training only the head (the backbone frozen) on the
    full training split raises a lot.

Export notes: the exporter's default ``training=TrainingMode.EVAL`` folds
each BatchNorm into the preceding Conv (its eval peephole pass) and names
the folded weights ``onnx::Conv_…``, which would leave no BatchNormalization
node and no ``features.*`` names for the first conv.  The script therefore
exports the ``eval()`` model with ``training=TrainingMode.PRESERVE``: the
BatchNormalization node stays (inference form, with its running statistics
as initializers) and every initializer keeps its parameter name; constant
folding then only folds the shape of the reshape.

Everything is seeded, so running the script again gives, with the same torch
version, the same weights.
"""

from __future__ import annotations

import pathlib
import warnings

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
SEED = 0
N_PRETRAIN = 300      # size of the pretraining subset (taken from the train split)
PRETRAIN_EPOCHS = 30
PRETRAIN_LR = 0.1
PRETRAIN_BATCH = 16
HEAD_INIT_STD = 0.05  # std of the re-initialised head's weights (bias: zero)
N_HEAD = 32           # the new head sees only this many samples ...
HEAD_STEPS = 6        # ... for this many full-batch SGD steps
HEAD_LR = 0.05


class DigitsCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.features(x.view(-1, 1, 8, 8)))


def load(name):
    d = np.load(HERE / name)
    return d["input"].astype(np.float32), d["label"].astype(np.int64)


def accuracy(net, x, y):
    was_training = net.training
    net.eval()
    with torch.no_grad():
        acc = float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    net.train(was_training)
    return acc


def main():
    x_tr, y_tr = load("digits_train.npz")
    x_te, y_te = load("digits_test.npz")
    print(f"data: train {x_tr.shape}, test {x_te.shape}")

    torch.manual_seed(SEED)
    net = DigitsCNN()
    print(f"untrained: test accuracy {accuracy(net, x_te, y_te):.3f}")

    # Pretrain everything briefly on a small subset.
    rng = np.random.default_rng(SEED)
    sub = rng.permutation(len(x_tr))[:N_PRETRAIN]
    xs, ys = torch.from_numpy(x_tr[sub]), torch.from_numpy(y_tr[sub])
    opt = torch.optim.SGD(net.parameters(), lr=PRETRAIN_LR, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()
    for _ in range(PRETRAIN_EPOCHS):
        order = torch.from_numpy(rng.permutation(N_PRETRAIN))
        for i in range(0, N_PRETRAIN, PRETRAIN_BATCH):
            idx = order[i:i + PRETRAIN_BATCH]
            opt.zero_grad()
            loss_fn(net(xs[idx]), ys[idx]).backward()
            opt.step()
    print(f"pretrained on {N_PRETRAIN} samples for {PRETRAIN_EPOCHS} epochs: "
          f"train accuracy {accuracy(net, x_tr, y_tr):.3f}, "
          f"test accuracy {accuracy(net, x_te, y_te):.3f}")

    # Throw the head away: small seeded random weights, zero bias ...
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        net.head.weight.copy_(torch.randn(net.head.weight.shape, generator=gen) * HEAD_INIT_STD)
        net.head.bias.zero_()
    print(f"head re-initialised: train accuracy {accuracy(net, x_tr, y_tr):.3f}, "
          f"test accuracy {accuracy(net, x_te, y_te):.3f}")

    # ... and give the new head a few steps on a handful of samples (backbone fixed,
    # batch norm in inference mode), so that it is a weak classifier, not a random one.
    net.eval()
    opt = torch.optim.SGD(net.head.parameters(), lr=HEAD_LR)
    for _ in range(HEAD_STEPS):
        opt.zero_grad()
        loss_fn(net(xs[:N_HEAD]), ys[:N_HEAD]).backward()
        opt.step()
    print(f"head trained {HEAD_STEPS} steps on {N_HEAD} samples: "
          f"train accuracy {accuracy(net, x_tr, y_tr):.3f}, "
          f"test accuracy {accuracy(net, x_te, y_te):.3f}")

    path = HERE / "digits_cnn.onnx"
    with warnings.catch_warnings():
        # PRESERVE + constant folding warns that folding may mutate trainable
        # parameters; here it only folds the reshape's shape (checked below).
        warnings.filterwarnings("ignore", message="It is recommended that constant folding")
        torch.onnx.export(
            net, (torch.zeros(1, 64),), str(path),
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17, dynamo=False, do_constant_folding=True,
            training=torch.onnx.TrainingMode.PRESERVE)
    check(net, path, x_te)


def check(net, path, x):
    """The file keeps the parameter names and runs alike in torch, onnxruntime and onnxgrad."""
    import onnx

    proto = onnx.load(str(path))
    names = sorted(i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    expected = sorted(net.state_dict())
    expected.remove("features.1.num_batches_tracked")
    assert names == expected, (names, expected)
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" in ops, ops
    print(f"wrote {path.name} ({path.stat().st_size} bytes): ops {ops}")
    print(f"initializers: {names}")

    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"input": x})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
        print("onnxruntime: same logits as torch")
    try:
        import onnxgrad
    except ImportError:
        onnxgrad = None
    if onnxgrad is not None:
        got = onnxgrad.load(str(path)).run({"input": x})["logits"]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
        print("onnxgrad: same logits as torch")


if __name__ == "__main__":
    main()
