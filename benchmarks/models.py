"""The benchmark models, in plain torch.nn, and their ONNX export.

Each entry gives a model factory, an input batch and class targets.  Sizes
follow the speed issue: an MLP 784-512-512-10 at batch 128, LeNet-5 at 64, a
CIFAR ResNet-18 at 32, a 2-layer transformer (d 128, seq 64) at 16, and a
scaled-down MobileNetV2 (3×64×64) at 32.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class MLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.AvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
                                  nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))

    def forward(self, x):
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3×3 conv, no max-pool), 32×32 inputs."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Block(nn.Module):
    """Pre-LayerNorm transformer layer: softmax attention and a GELU feed-forward."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.ff(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, vocab=1000, d=128, heads=4, layers=2, seq=64, classes=10):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(1, seq, d))
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        x = self.blocks(self.tok(tokens) + self.pos)
        return self.head(self.ln(x).mean(dim=1))


def conv_bn(cin, cout, kernel=1, stride=1, groups=1, act=True):
    """Conv (no bias), BatchNorm and, unless ``act`` is false, ReLU6."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand, 3×3 depthwise, 1×1 linear project; residual add
    when the stride is 1 and the channels match."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        expansion = [conv_bn(cin, hidden)] if expand != 1 else []
        self.body = nn.Sequential(*expansion, conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  conv_bn(hidden, cout, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) scaled down for 3×64×64 inputs: the first five stages
    of the paper's table (64×64 → 4×4) and a 1×1 conv to 320 channels, not 1280,
    before the pooled head."""

    STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]  # t, c, n, s

    def __init__(self, classes=10, last=320):
        super().__init__()
        layers, cin = [conv_bn(3, 32, 3, 2)], 32
        for t, c, n, s in self.STAGES:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn(cin, last))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(last, classes)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


@dataclass
class Case:
    name: str
    factory: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator], torch.Tensor]
    batch: int
    classes: int = 10


CASES = {
    "mlp": Case("mlp", MLP, lambda g: torch.rand(128, 784, generator=g), 128),
    "lenet5": Case("lenet5", LeNet5, lambda g: torch.rand(64, 1, 28, 28, generator=g), 64),
    "resnet18": Case("resnet18", ResNet18, lambda g: torch.rand(32, 3, 32, 32, generator=g), 32),
    "transformer": Case("transformer", Transformer,
                        lambda g: torch.randint(0, 1000, (16, 64), generator=g), 16),
    "mobilenetv2": Case("mobilenetv2", MobileNetV2, lambda g: torch.rand(32, 3, 64, 64, generator=g), 32),
}


def export(model: nn.Module, example: torch.Tensor) -> bytes:
    """ONNX bytes from torch.onnx's TorchScript exporter, dynamic batch.

    BatchNormalization stays a node of its own (TrainingMode.PRESERVE of an
    eval-mode model), not folded into the convolutions, so that onnxgrad's
    training steps use batch statistics as PyTorch's train() mode does.
    """
    buffer = io.BytesIO()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                          opset_version=17, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE)
    model.train()
    return buffer.getvalue()
