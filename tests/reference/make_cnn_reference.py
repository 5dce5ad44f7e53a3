"""Make the reference data that lets tests/test_cnn_models.py compare onnxgrad
with PyTorch on convolutional networks without importing torch.

Run from the repository root in an environment with torch and onnxruntime::

    python tests/reference/make_cnn_reference.py

Everything is seeded.  Three small networks are exported with the TorchScript
exporter (``dynamo=False``, opset 17) in eval mode, each file checked against
torch in onnxruntime:

``cnn_lenet.onnx``     LeNet-5 on 1x16x16 inputs: Conv(5x5, pad 2), ReLU,
                       MaxPool(2), Conv(5x5), ReLU, AveragePool(2), Flatten,
                       Gemm, ReLU, Gemm -> 10 logits.
``cnn_resnet.onnx``    a small ResNet: stem Conv-BN-ReLU, a basic block with an
                       identity shortcut, a strided basic block with a 1x1
                       Conv-BN shortcut, GlobalAveragePool, Flatten, Gemm -> 5
                       logits, on 3x8x8 inputs.  BatchNormalization nodes are
                       kept (training=PRESERVE on an eval-mode module: no
                       Conv-BN folding) and carry non-trivial running
                       statistics (a few train-mode passes before export) and
                       random affine weights.
``cnn_encdec.onnx``    an encoder-decoder on 3x16x16 inputs: Conv, LeakyRelu,
                       strided Conv, LeakyRelu, ConvTranspose (stride 2),
                       a Sigmoid gate on the skip connection (Mul), Concat,
                       Conv 1x1 -> 4 class logits per pixel (N x 4 x 16 x 16).

``cnn.npz`` holds, for each net ``<net>`` in ("lenet", "resnet", "encdec")::

    <net>/x, <net>/y           the batch: float32 input, int64 targets
                               (N for the classifiers, N x H x W for encdec)
    <net>/logits               torch's eval-mode output for x
    <net>/loss                 mean cross-entropy in TRAINING mode (0-d)
    <net>/sgd_losses           loss before each of 2 SGD(lr=0.05, momentum=0.9) steps
    <net>/adamw_losses         loss before each of 3 AdamW(lr=0.01) steps
    <net>/init/<name>          initial value of initializer <name>
    <net>/grad/<name>          d loss / d <name> in training mode (parameters only)
    <net>/sgd/<name>           value after the SGD steps (BN running statistics included)
    <net>/adamw/<name>         value after the AdamW steps, from a fresh start
    meta                       0-d str: JSON {"nets": {net: {"file", "params": [names],
                               "buffers": [names], "ops": [...]}}, "sgd": {...},
                               "sgd_steps": 2, "adamw": {...}, "adamw_steps": 3}

Initializers are matched to torch parameters and buffers by value; ``params``
lists the trainable ones, ``buffers`` the BatchNorm running statistics.  All
steps use the same batch, in train() mode (batch statistics; running
statistics updated once per step, torch's momentum 0.1 = ONNX momentum 0.9).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from torch_training import cross_entropy_steps

HERE = pathlib.Path(__file__).resolve().parent
SGD_KW, SGD_STEPS = dict(lr=0.05, momentum=0.9), 2
ADAMW_KW, ADAMW_STEPS = dict(lr=0.01), 3


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 5), nn.ReLU(), nn.AvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10))

    def forward(self, x):
        return self.head(self.features(x))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.block1 = Block(8, 8, 1)
        self.block2 = Block(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class EncDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1 = nn.Conv2d(3, 8, 3, padding=1)
        self.enc2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(16, 4, 1)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        e1 = self.act(self.enc1(x))
        e2 = self.act(self.enc2(e1))
        d = self.act(self.up(e2))
        skip = e1 * torch.sigmoid(self.gate(e1))
        return self.out(torch.cat([d, skip], dim=1))


def make_nets():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    lenet = LeNet()
    x_lenet = torch.randn(4, 1, 16, 16, generator=g)
    y_lenet = torch.randint(0, 10, (4,), generator=g)

    resnet = ResNet()
    with torch.no_grad():                   # non-trivial affine weights
        for m in resnet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.3, 0.3, generator=g)
    resnet.train()
    with torch.no_grad():                   # non-trivial running statistics
        for _ in range(3):
            resnet(torch.randn(6, 3, 8, 8, generator=g) * 1.5 + 0.3)
    x_resnet = torch.randn(6, 3, 8, 8, generator=g)
    y_resnet = torch.randint(0, 5, (6,), generator=g)

    encdec = EncDec()
    x_encdec = torch.randn(2, 3, 16, 16, generator=g)
    y_encdec = torch.randint(0, 4, (2, 16, 16), generator=g)
    return {"lenet": (lenet, x_lenet, y_lenet), "resnet": (resnet, x_resnet, y_resnet),
            "encdec": (encdec, x_encdec, y_encdec)}


def export(net, x, path):
    net.eval()
    torch.onnx.export(net, (x,), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False,
                      training=torch.onnx.TrainingMode.PRESERVE)


def state(net):
    """Parameters and BatchNorm running statistics (no num_batches_tracked)."""
    out = {n: p.detach().numpy().copy() for n, p in net.named_parameters()}
    for n, b in net.named_buffers():
        if n.endswith(("running_mean", "running_var")):
            out[n] = b.detach().numpy().copy()
    return out


def restore(net, saved):
    with torch.no_grad():
        for n, p in list(net.named_parameters()) + list(net.named_buffers()):
            if n in saved:
                p.copy_(torch.from_numpy(saved[n]))


def run_torch(net, x, y, opt_cls, kw, steps):
    """`steps` train-mode steps on (x, y): the state after them and the losses before each;
    then the initial state is put back."""
    snapshot = state(net)
    tracked = {n: b.clone() for n, b in net.named_buffers()}
    net.train()
    opt = opt_cls(net.parameters(), foreach=False, **kw)
    losses = cross_entropy_steps(net, x, y, opt, steps)
    after = state(net)
    restore(net, snapshot)
    with torch.no_grad():
        for n, b in net.named_buffers():
            b.copy_(tracked[n])
    return after, np.array(losses, np.float32)


def map_initializers(values, model):
    """torch name -> initializer name, by value (every float initializer matched once)."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    mapping = {}
    for name, v in values.items():
        hits = [n for n, a in inits.items() if a.shape == v.shape and np.array_equal(a, v)]
        assert len(hits) == 1, (name, hits)
        mapping[name] = hits[0]
    floats = {n for n, a in inits.items() if a.dtype.kind == "f"}
    assert floats == set(mapping.values()), floats - set(mapping.values())
    return mapping


def make_reference():
    out, meta = {}, {"nets": {}, "sgd": SGD_KW, "sgd_steps": SGD_STEPS,
                     "adamw": ADAMW_KW, "adamw_steps": ADAMW_STEPS}
    for key, (net, x, y) in make_nets().items():
        fname = f"cnn_{key}.onnx"
        export(net, x, HERE / fname)
        model = onnx.load(str(HERE / fname))
        onnx.checker.check_model(model, full_check=True)
        with torch.no_grad():
            net.eval()
            logits = net(x).numpy()
        sess = ort.InferenceSession(str(HERE / fname), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-5)

        init = state(net)
        params = [n for n, _ in net.named_parameters()]
        mapping = map_initializers(init, model)
        # gradients in training mode (batch statistics), state restored afterwards
        tracked = {n: b.clone() for n, b in net.named_buffers()}
        net.train()
        net.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        grad = {n: p.grad.numpy().copy() for n, p in net.named_parameters()}
        net.zero_grad()
        with torch.no_grad():
            for n, b in net.named_buffers():
                b.copy_(tracked[n])
        sgd, sgd_losses = run_torch(net, x, y, torch.optim.SGD, SGD_KW, SGD_STEPS)
        adamw, adamw_losses = run_torch(net, x, y, torch.optim.AdamW, ADAMW_KW, ADAMW_STEPS)

        out[f"{key}/x"] = x.numpy()
        out[f"{key}/y"] = y.numpy().astype(np.int64)
        out[f"{key}/logits"] = logits
        out[f"{key}/loss"] = np.array(loss.item(), np.float32)
        out[f"{key}/sgd_losses"] = sgd_losses
        out[f"{key}/adamw_losses"] = adamw_losses
        for t, name in mapping.items():
            out[f"{key}/init/{name}"] = init[t]
            out[f"{key}/sgd/{name}"] = sgd[t]
            out[f"{key}/adamw/{name}"] = adamw[t]
            if t in grad:
                out[f"{key}/grad/{name}"] = grad[t]
        ops = sorted({n.op_type for n in model.graph.node})
        meta["nets"][key] = {"file": fname,
                             "params": [mapping[t] for t in params],
                             "buffers": [mapping[t] for t in init if t not in params],
                             "ops": ops}
        print(f"{fname}: {(HERE / fname).stat().st_size} bytes, ops {ops}")
    out["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(HERE / "cnn.npz", **out)
    print(f"cnn.npz: {(HERE / 'cnn.npz').stat().st_size} bytes")


if __name__ == "__main__":
    make_reference()
