"""Cases of tests/test_compiled.py: depthwise and grouped convolutions."""

from __future__ import annotations

from compiled_cases import Case
from onnxgrad.ops import depthwise
from op_db import Sample


def _conv(x, w, attrs):
    return Sample("Conv", [("X", ("real", x)), ("W", ("real", w)), ("B", ("real", (w[0],)))],
                  attrs, 11)


_DW_KERNELS = ((depthwise, "_direct_forward_kernel"), (depthwise, "_direct_input_grad_kernel"),
               (depthwise, "_direct_weight_grad_kernel"))

# The first two layers have enough work (depthwise.PARALLEL_MIN_WORK) for their tiles of
# channels to run on the thread pool.  The small samples have outputs of more than 10
# positions per kernel tap, which the NumPy form runs by the taps method, where the
# compiled kernels are.
CASES = [
    Case("depthwise_asym_pads", _conv((32, 64, 16, 16), (64, 1, 3, 3),
                                      {"group": 64, "pads": [1, 0, 2, 1]}),
         _DW_KERNELS, small=_conv((2, 2, 12, 12), (2, 1, 3, 3),
                                  {"group": 2, "pads": [1, 0, 2, 1]})),
    Case("depthwise_stride2_asym_pads", _conv((32, 64, 33, 32), (64, 1, 3, 3),
                                              {"group": 64, "strides": [2, 2],
                                               "pads": [1, 0, 0, 1]}),
         _DW_KERNELS, small=_conv((1, 2, 21, 20), (2, 1, 3, 3),
                                  {"group": 2, "strides": [2, 2], "pads": [1, 0, 0, 1]})),
    Case("depthwise_x2", _conv((8, 16, 16, 16), (32, 1, 3, 3),
                               {"group": 16, "pads": [1, 1, 1, 1]}),
         _DW_KERNELS, small=_conv((2, 2, 12, 12), (4, 1, 3, 3),
                                  {"group": 2, "pads": [1, 1, 1, 1]})),
    Case("depthwise_dilated", _conv((8, 16, 20, 20), (16, 1, 3, 3),
                                    {"group": 16, "dilations": [2, 2], "pads": [2, 2, 2, 2]}),
         _DW_KERNELS, small=_conv((1, 2, 12, 12), (2, 1, 3, 3),
                                  {"group": 2, "dilations": [2, 1], "pads": [2, 1, 1, 0]})),
    Case("one_channel_to_6", _conv((16, 1, 28, 28), (6, 1, 5, 5), {"pads": [2, 2, 2, 2]}),
         _DW_KERNELS, small=_conv((1, 1, 14, 14), (6, 1, 5, 5), {"pads": [2, 1, 2, 1]})),
    Case("depthwise_1d_stride2", _conv((16, 32, 200), (64, 1, 5),
                                       {"group": 32, "strides": [2], "pads": [2, 1]}),
         _DW_KERNELS, small=_conv((1, 2, 110), (4, 1, 5),
                                  {"group": 2, "strides": [2], "pads": [2, 1]})),
    Case("group8_4ch", _conv((16, 32, 16, 16), (32, 4, 3, 3), {"group": 8, "pads": [1, 1, 1, 1]}),
         _DW_KERNELS, small=_conv((2, 4, 10, 10), (4, 2, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]})),
    Case("group16_2ch_stride2_dilated", _conv((16, 32, 31, 30), (48, 2, 3, 3),
                                              {"group": 16, "strides": [2, 2], "dilations": [1, 2],
                                               "pads": [1, 2, 0, 1]}),
         _DW_KERNELS, small=_conv((1, 4, 21, 20), (6, 2, 3, 3),
                                  {"group": 2, "strides": [2, 2], "dilations": [1, 2],
                                   "pads": [1, 2, 0, 1]})),
    Case("group4_3ch_1d", _conv((16, 12, 120), (8, 3, 5), {"group": 4, "pads": [2, 1]}),
         _DW_KERNELS, small=_conv((1, 6, 80), (4, 3, 5), {"group": 2, "pads": [2, 1]})),
]
