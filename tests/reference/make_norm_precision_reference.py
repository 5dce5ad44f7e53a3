"""PyTorch's float32 and float64 gradients on two ill-conditioned normalization
stacks, for tests/test_norm_precision.py.  Run with torch installed:

    python tests/reference/make_norm_precision_reference.py   # writes norm_precision.npz beside it

``bn``: an input whose channels sit at 1000 with a spread of 1, then LAYERS
blocks of BatchNormalization (batch statistics over 2 × 2 × 2 = 8 values per
channel), ReLU and a 3×3 convolution.  ``ln``: the same offset on a
(batch, tokens, features) input, then LAYERS blocks of LayerNormalization, tanh
and a matrix product.  The loss is ``sum(out · U)``.  All values are float32
numbers, so that the float64 runs see exactly the float32 problem.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
LAYERS, CHANNELS, FEATURES = 6, 16, 16
SHAPES = {"bn": (2, CHANNELS, 2, 2), "ln": (2, 4, FEATURES)}


def case_arrays(kind: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The case's input, weights and loss weights, as float32."""
    rng = np.random.default_rng(seed)
    shape = SHAPES[kind]
    out = {"x": rng.normal(1000.0, 1.0, shape), "U": rng.normal(0.0, 1.0, shape)}
    for i in range(LAYERS):
        if kind == "bn":
            out[f"W{i}"] = rng.normal(0.0, 1 / np.sqrt(9 * CHANNELS), (CHANNELS, CHANNELS, 3, 3))
        else:
            out[f"W{i}"] = rng.normal(0.0, 1 / np.sqrt(FEATURES), (FEATURES, FEATURES))
    return {k: v.astype(np.float32) for k, v in out.items()}


def torch_gradients(kind: str, arrays: dict[str, np.ndarray], dtype) -> dict[str, np.ndarray]:
    weights = [torch.tensor(arrays[f"W{i}"], dtype=dtype, requires_grad=True) for i in range(LAYERS)]
    h = torch.tensor(arrays["x"], dtype=dtype)
    for w in weights:
        if kind == "bn":
            h = torch.nn.functional.batch_norm(h, None, None, training=True, eps=1e-5)
            h = torch.nn.functional.conv2d(torch.relu(h), w, padding=1)
        else:
            h = torch.nn.functional.layer_norm(h, (FEATURES,), eps=1e-5)
            h = torch.tanh(h) @ w
    (h * torch.tensor(arrays["U"], dtype=dtype)).sum().backward()
    return {f"W{i}": w.grad.double().numpy() for i, w in enumerate(weights)}


def relative_error(got: dict, want: dict) -> float:
    """The largest relative (Frobenius) error over the parameters."""
    return max(float(np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k])) for k in want)


def main() -> None:
    torch.set_num_threads(1)
    out = {}
    for kind in SHAPES:
        arrays = case_arrays(kind)
        g64 = torch_gradients(kind, arrays, torch.float64)
        g32 = torch_gradients(kind, arrays, torch.float32)
        out.update({f"{kind}/{k}": v for k, v in arrays.items()})
        out.update({f"{kind}/grad64/{k}": v for k, v in g64.items()})
        out[f"{kind}/torch_float32_error"] = np.float64(relative_error(g32, g64))
        print(f"{kind}: PyTorch float32 gradient error against float64 "
              f"{out[f'{kind}/torch_float32_error']:.2e}")
    np.savez_compressed(HERE / "norm_precision.npz", **out)


if __name__ == "__main__":
    main()
