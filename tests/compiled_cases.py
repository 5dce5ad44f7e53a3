"""Cases of tests/test_compiled.py: normalization and activations."""

from __future__ import annotations

from typing import NamedTuple

from onnxgrad.ops import normalization
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

CASES = [
    Case("batchnorm", _bn((8, 48, 16, 16)), _BN_KERNELS, small=_bn((3, 4, 3, 2))),
    Case("batchnorm_2d", _bn((64, 200)), _BN_KERNELS, small=_bn((6, 3))),
    Case("batchnorm_3d_eps", _bn((4, 8, 4, 8, 8), {"epsilon": 0.1, "momentum": 0.7}, 14),
         _BN_KERNELS, small=_bn((2, 3, 2, 2, 3), {"epsilon": 0.1}, 14)),
]
