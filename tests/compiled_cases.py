"""Cases of tests/test_compiled.py: normalization and activations."""

from __future__ import annotations

from typing import NamedTuple

from onnxgrad.ops import activation, nonlinear, normalization
from op_db import Sample


class Case(NamedTuple):
    id: str
    sample: Sample
    kernels: tuple          # (module, name) of the compiled kernels the case runs
    small: Sample | None = None  # the same node at a size for central differences


def _bn(x, attrs=None, opset=15):
    c = x[1]
    return Sample("BatchNormalization", [("X", ("real", x)), ("scale", ("real", (c,))),
                                         ("B", ("real", (c,))), ("mean", ("real", (c,))),
                                         ("var", ("pos", (c,)))],
                  {"training_mode": 1, **(attrs or {})}, opset)


_BN_KERNELS = ((normalization, "_bn_kernel"), (normalization, "_bn_grad_kernel"))
# channels of few positions (normalization.ROWS_BELOW, GRAD_ROWS_BELOW)
_BN_ROWS = ((normalization, "_bn_rows_kernel"), (normalization, "_bn_grad_rows_kernel"))
_BN_ROWS_FORWARD = ((normalization, "_bn_rows_kernel"), (normalization, "_bn_grad_kernel"))

def _ln(x, axis=-1, bias=True, epsilon=1e-5):
    trailing = x[axis:]
    inputs = [("X", ("real", x)), ("Scale", ("real", trailing))]
    return Sample("LayerNormalization", inputs + ([("B", ("real", trailing))] if bias else []),
                  {"axis": axis, "epsilon": epsilon}, 17)


_LN_KERNELS = ((normalization, "_ln_kernel"), (normalization, "_ln_grad_kernel"))


def _clip(x, low, high):
    bounds = [("min", ("float", low)) if low is not None else (None, ("float", 0)),
              ("max", ("float", high)) if high is not None else (None, ("float", 0))]
    while bounds and bounds[-1][0] is None:
        bounds.pop()
    return Sample("Clip", [("input", ("real", x))] + bounds, {}, 13)


_CLIP_KERNELS = ((nonlinear, "_clip_kernel"), (nonlinear, "_clip_grad_kernel"))

_SOFTMAX_KERNELS = ((activation, "_shift_kernel"), (activation, "_scale_kernel"),
                    (activation, "_softmax_grad_kernel"))

CASES = [
    Case("layernorm", _ln((16, 64, 128)), _LN_KERNELS, small=_ln((3, 2, 5))),
    Case("layernorm_two_axes_no_bias", _ln((8, 32, 8, 16), axis=-2, bias=False, epsilon=0.1),
         _LN_KERNELS, small=_ln((2, 3, 4, 2), axis=-2, bias=False, epsilon=0.1)),
    Case("relu", Sample("Relu", [("X", ("real", (16, 32, 24, 24)))], {}, 14),
         ((activation, "_relu_kernel"), (activation, "_relu_grad_kernel")),
         small=Sample("Relu", [("X", ("real", (3, 5, 4)))], {}, 14)),
    Case("clip_both", _clip((16, 32, 24, 24), -0.5, 1.5), _CLIP_KERNELS,
         small=_clip((3, 5, 4), -0.5, 1.5)),
    Case("clip_min", _clip((1000, 300), 0.25, None), _CLIP_KERNELS, small=_clip((7, 4), 0.25, None)),
    Case("clip_max", _clip((1000, 300), None, 0.25), _CLIP_KERNELS, small=_clip((7, 4), None, 0.25)),
    Case("clip6_attributes", Sample("Clip", [("input", ("real", (64, 96, 9, 9)))],
                                    {"min": 0.0, "max": 1.0}, 6), _CLIP_KERNELS),
    Case("erf", Sample("Erf", [("input", ("real", (16, 64, 512)))], {}, 13),
         ((nonlinear, "_erf64_kernel"),), small=Sample("Erf", [("input", ("real", (3, 7)))], {}, 13)),
    Case("softmax", Sample("Softmax", [("input", ("real", (16, 4, 64, 64)))], {"axis": -1}, 13),
         _SOFTMAX_KERNELS, small=Sample("Softmax", [("input", ("real", (3, 2, 5)))], {"axis": -1}, 13)),
    Case("softmax_coerced_trailing_axes",
         Sample("Softmax", [("input", ("real", (8, 6, 5, 7)))], {"axis": 1}, 11, ref="onnxruntime"),
         _SOFTMAX_KERNELS,
         small=Sample("Softmax", [("input", ("real", (2, 3, 4)))], {"axis": 1}, 11)),
    Case("batchnorm", _bn((8, 48, 16, 16)), _BN_KERNELS, small=_bn((2, 2, 8, 16))),
    Case("batchnorm_2d", _bn((64, 200)), _BN_ROWS, small=_bn((6, 3))),
    Case("batchnorm_16_positions", _bn((32, 96, 4, 4)), _BN_ROWS, small=_bn((3, 5, 2, 2))),
    Case("batchnorm_64_positions", _bn((16, 40, 8, 8)), _BN_ROWS_FORWARD),
    Case("batchnorm_3d_eps", _bn((4, 8, 4, 8, 8), {"epsilon": 0.1, "momentum": 0.7}, 14),
         _BN_KERNELS, small=_bn((2, 2, 4, 4, 8), {"epsilon": 0.1}, 14)),
]
