"""Cases of tests/test_compiled.py: Winograd convolutions."""

from __future__ import annotations

from compiled_cases import Case
from onnxgrad.ops import winograd
from op_db import Sample


def _conv(x, w, bias=False):
    """A 3×3 stride-1 Conv padded to keep the size: with 32 channels or more and
    8×8 outputs or more its forward pass, flipped-kernel input gradient and
    weight gradient run as Winograd, F(4×4, 3×3) where the batch has 64 tiles of
    4×4 outputs or more (``winograd.F4_MIN_TILES``), F(2×2, 3×3) otherwise."""
    inputs = [("X", ("real", x)), ("W", ("real", w))]
    if bias:
        inputs.append(("B", ("real", (w[0],))))
    return Sample("Conv", inputs, {"pads": [1, 1, 1, 1]}, 11)


_KERNELS = ((winograd, "_input_kernel"), (winograd, "_output_kernel"),
            (winograd, "_grad_tiles_kernel"))
_KERNELS4 = ((winograd, "_input_kernel"), (winograd, "_output_kernel"),
             (winograd, "_grad_tiles_kernel4"))

CASES = [
    # odd width: the last tile of each row is cropped
    Case("winograd_conv3x3", _conv((4, 32, 12, 10), (32, 32, 3, 3), bias=True), _KERNELS,
         small=_conv((1, 32, 8, 8), (32, 32, 3, 3))),
    # odd height and width, more output channels than input channels
    Case("winograd_conv3x3_ragged", _conv((2, 32, 9, 11), (40, 32, 3, 3)), _KERNELS,
         small=_conv((1, 32, 9, 9), (32, 32, 3, 3))),
    # F(4×4): 8 × 4 × 4 tiles
    Case("winograd4_conv3x3", _conv((8, 32, 16, 16), (32, 32, 3, 3), bias=True), _KERNELS4,
         small=_conv((4, 32, 16, 16), (32, 32, 3, 3))),
    # F(4×4), ragged: outputs 15 × 13 and 14 × 13, the last tile of each row and
    # column cropped; more output channels than input channels
    Case("winograd4_conv3x3_ragged", _conv((5, 32, 15, 13), (40, 32, 3, 3)), _KERNELS4,
         small=_conv((4, 32, 14, 13), (32, 32, 3, 3))),
]
