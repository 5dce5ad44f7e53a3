"""The op database of the convolutional-network families: conv, pool,
normalization, dropout, resize (Resize, Upsample, Pad) and nonlinear.  Plain data.

Samples use ``op_db.Sample`` (see tests/op_db.py for the input specs).  Lists:

* ``SAMPLES``: forward against the reference (``ref``: "onnx" for the ONNX
  reference evaluator, "onnxruntime" where the reference is wrong or lacks the
  case) and, unless listed in ``FORWARD_ONLY``, float64 gradient checks of
  every differentiable input;
* ``FORWARD_ONLY``: ids of samples whose gradient a central difference of
  ``Model.run`` cannot check (training and inference differ: BatchNormalization
  without ``training_mode``, Dropout), tested by dedicated tests instead.
"""

from __future__ import annotations

from op_db import Sample as S

SAMPLES: list[S] = []
FORWARD_ONLY: set[str] = set()


def _fwd(sample):
    SAMPLES.append(sample)
    FORWARD_ONLY.add(sample.id)


# -- Conv ----------------------------------------------------------------------------------
for _x, _w, _attrs in [
    # 1-D
    ((2, 3, 7), (4, 3, 3), {}),
    ((2, 3, 7), (4, 3, 3), {"pads": [1, 2]}),
    ((2, 3, 9), (4, 3, 3), {"strides": [2], "dilations": [2]}),
    ((2, 4, 7), (6, 2, 3), {"group": 2, "pads": [1, 1]}),
    ((1, 3, 8), (2, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [3]}),
    ((1, 3, 8), (2, 3, 4), {"auto_pad": "SAME_LOWER"}),
    ((1, 3, 8), (2, 3, 3), {"auto_pad": "VALID", "strides": [2]}),
    # 2-D
    ((2, 3, 6, 5), (4, 3, 3, 2), {}),
    ((2, 3, 6, 5), (4, 3, 3, 3), {"pads": [1, 0, 2, 1], "strides": [2, 1]}),
    ((1, 3, 7, 6), (2, 3, 3, 2), {"dilations": [2, 1], "strides": [1, 2]}),
    ((1, 3, 5, 5), (3, 1, 3, 3), {"group": 3, "pads": [1, 1, 1, 1]}),              # depthwise
    ((1, 3, 5, 4), (6, 1, 3, 3), {"group": 3, "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ((1, 4, 5, 5), (4, 2, 2, 2), {"group": 2, "dilations": [2, 2]}),
    ((1, 2, 7, 6), (3, 2, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((1, 2, 6, 5), (3, 2, 2, 2), {"auto_pad": "SAME_LOWER"}),
    ((1, 2, 6, 5), (3, 2, 3, 2), {"auto_pad": "VALID", "strides": [2, 1]}),
    ((1, 2, 5, 5), (2, 2, 3, 3), {"kernel_shape": [3, 3], "pads": [2, 2, 2, 2]}),
    # 3-D
    ((1, 2, 4, 5, 4), (3, 2, 2, 3, 2), {"pads": [1, 0, 1, 0, 1, 1], "strides": [2, 1, 2]}),
    ((1, 4, 3, 4, 3), (2, 2, 2, 2, 2), {"group": 2, "dilations": [1, 2, 1]}),
    # 32 input channels per group or more: stride-1 input gradients by flipped kernels
    ((2, 32, 7), (3, 32, 3), {"pads": [1, 2]}),
    ((1, 32, 6, 5), (2, 32, 3, 2), {"pads": [4, 0, 1, 3], "dilations": [2, 1]}),
    ((1, 64, 4, 4), (4, 32, 3, 3), {"group": 2, "auto_pad": "SAME_LOWER"}),
    ((1, 32, 3, 4, 3), (2, 32, 2, 3, 2), {"pads": [1, 0, 1, 0, 1, 1]}),
]:
    _m = _w[0]
    SAMPLES.append(S("Conv", [("X", ("real", _x)), ("W", ("real", _w))], _attrs, 11))
    SAMPLES.append(S("Conv", [("X", ("real", _x)), ("W", ("real", _w)), ("B", ("real", (_m,)))],
                     _attrs, 22))
SAMPLES.append(S("Conv", [("X", ("real", (1, 2, 5, 5))), ("W", ("real", (3, 2, 3, 3))),
                          ("B", ("real", (3,)))], {"pads": [1, 1, 1, 1]}, 1))

# -- ConvTranspose -------------------------------------------------------------------------
# The reference evaluator mishandles group > 1: those compare with onnxruntime.
for _x, _w, _attrs, _ref in [
    ((2, 3, 4), (3, 2, 3), {}, "onnx"),
    ((2, 3, 4), (3, 2, 3), {"strides": [2], "pads": [1, 0], "output_padding": [1]}, "onnx"),
    ((1, 2, 5), (2, 3, 2), {"dilations": [2], "strides": [3]}, "onnx"),
    ((1, 4, 4), (4, 1, 3), {"group": 2, "strides": [2]}, "onnxruntime"),
    ((1, 3, 3, 4), (3, 2, 3, 3), {}, "onnx"),
    ((1, 3, 3, 4), (3, 2, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1],
                                  "output_padding": [1, 0]}, "onnx"),
    ((1, 2, 3, 3), (2, 2, 3, 2), {"strides": [2, 3], "output_shape": [8, 9]}, "onnx"),
    ((1, 2, 3, 3), (2, 2, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, "onnx"),
    ((1, 2, 3, 3), (2, 2, 2, 3), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}, "onnx"),
    ((1, 2, 3, 4), (2, 3, 2, 2), {"dilations": [2, 1], "pads": [0, 1, 1, 0]}, "onnx"),
    ((1, 3, 3, 3), (3, 1, 3, 3), {"group": 3, "strides": [2, 2], "pads": [1, 1, 1, 1]},
     "onnxruntime"),
    ((2, 4, 3, 2), (4, 2, 2, 2), {"group": 2, "strides": [1, 2]}, "onnxruntime"),
    ((1, 2, 2, 3, 2), (2, 2, 2, 2, 2), {"strides": [2, 2, 2]}, "onnx"),
    ((1, 2, 2, 2, 2), (2, 1, 3, 2, 2), {"pads": [1, 0, 0, 1, 0, 1], "strides": [2, 1, 1]},
     "onnx"),
]:
    _m = _w[1] * _attrs.get("group", 1)
    SAMPLES.append(S("ConvTranspose", [("X", ("real", _x)), ("W", ("real", _w))], _attrs, 11,
                     ref=_ref))
    SAMPLES.append(S("ConvTranspose", [("X", ("real", _x)), ("W", ("real", _w)),
                                       ("B", ("real", (_m,)))], _attrs, 22, ref=_ref))

# -- pooling -------------------------------------------------------------------------------
_POOL = [
    ((2, 3, 9), {"kernel_shape": [3], "strides": [2]}),
    ((2, 3, 9), {"kernel_shape": [3], "pads": [1, 1]}),
    ((2, 3, 9), {"kernel_shape": [2], "strides": [2], "ceil_mode": 1}),
    ((2, 2, 7, 6), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((2, 2, 7, 6), {"kernel_shape": [3, 3]}),                                      # overlapping
    ((2, 2, 7, 6), {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    ((1, 2, 8, 7), {"kernel_shape": [3, 2], "strides": [3, 2], "pads": [1, 0, 0, 1],
                    "ceil_mode": 1}),
    ((2, 2, 4, 4), {"kernel_shape": [2, 2], "strides": [2, 2]}),                  # tiling
    ((1, 2, 7, 6), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ((1, 2, 6, 6), {"kernel_shape": [2, 2], "auto_pad": "SAME_LOWER"}),
    ((1, 2, 7, 6), {"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "VALID"}),
    ((1, 2, 5, 4, 5), {"kernel_shape": [2, 2, 2], "strides": [2, 2, 2]}),
    ((1, 2, 5, 4, 5), {"kernel_shape": [3, 2, 3], "pads": [1, 0, 1, 1, 1, 0], "strides": [2, 1, 2]}),
]
for _x, _attrs in _POOL:
    # The reference evaluator fails on padded 1-D max pooling.
    _ref = "onnxruntime" if len(_x) == 3 and _attrs.get("pads") else "onnx"
    SAMPLES.append(S("MaxPool", [("X", ("real", _x))], _attrs, 12, ref=_ref))
    SAMPLES.append(S("AveragePool", [("X", ("real", _x))], _attrs, 11))
    if _attrs.get("pads") and "auto_pad" not in _attrs:
        SAMPLES.append(S("AveragePool", [("X", ("real", _x))], {**_attrs, "count_include_pad": 1},
                         11))
for _x, _attrs in [
    ((2, 3, 9), {"kernel_shape": [3], "dilations": [2]}),
    ((2, 2, 7, 6), {"kernel_shape": [2, 2], "dilations": [2, 2], "strides": [2, 1],
                    "pads": [1, 1, 0, 1]}),
    ((2, 2, 7, 7), {"kernel_shape": [2, 3], "dilations": [2, 2], "ceil_mode": 1,
                    "strides": [2, 2]}),
]:
    SAMPLES.append(S("MaxPool", [("X", ("real", _x))], _attrs, 12))
    SAMPLES.append(S("AveragePool", [("X", ("real", _x))], _attrs, 19))
    SAMPLES.append(S("AveragePool", [("X", ("real", _x))], {**_attrs, "count_include_pad": 1}, 19))
# ceil_mode where the last window would start in the end padding, so the output loses
# it: ONNX shape inference keeps it (an output one larger than the data), which the
# gradient harness's typed loss graph cannot absorb; forward only.
_CEIL = {"kernel_shape": [3, 2], "strides": [3, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1}
_fwd(S("MaxPool", [("X", ("real", (1, 2, 8, 7)))], _CEIL, 12))
_fwd(S("AveragePool", [("X", ("real", (1, 2, 8, 7)))], {**_CEIL, "count_include_pad": 1}, 11))
SAMPLES.append(S("MaxPool", [("X", ("real", (1, 2, 5, 5)))], {"kernel_shape": [2, 2]}, 1))
SAMPLES.append(S("AveragePool", [("X", ("real", (1, 2, 5, 5)))], {"kernel_shape": [2, 2]}, 7))
for _x in [(2, 3, 5), (2, 3, 4, 5), (1, 2, 3, 2, 3)]:
    SAMPLES.append(S("GlobalAveragePool", [("X", ("real", _x))], {}, 1))
    # The reference evaluator's GlobalMaxPool gets 1-D and 3-D shapes wrong.
    SAMPLES.append(S("GlobalMaxPool", [("X", ("real", _x))], {}, 22, ref="onnxruntime"))

# -- normalization -------------------------------------------------------------------------
_BN = [("X", ("real", (4, 3, 2, 2))), ("scale", ("real", (3,))), ("B", ("real", (3,))),
       ("mean", ("real", (3,))), ("var", ("pos", (3,)))]
_BN2 = [("X", ("real", (5, 3))), ("scale", ("real", (3,))), ("B", ("real", (3,))),
        ("mean", ("real", (3,))), ("var", ("pos", (3,)))]
_BN3 = [("X", ("real", (3, 2, 4, 2, 2))), ("scale", ("real", (2,))), ("B", ("real", (2,))),
        ("mean", ("real", (2,))), ("var", ("pos", (2,)))]
for _ins in (_BN, _BN2, _BN3):
    SAMPLES.append(S("BatchNormalization", _ins, {"training_mode": 1}, 15))
    SAMPLES.append(S("BatchNormalization", _ins, {"training_mode": 1, "epsilon": 0.1,
                                                  "momentum": 0.7}, 14))
    _fwd(S("BatchNormalization", _ins, {}, 15))
# The reference evaluator computes batch statistics for opsets 6-13 (not inference).
_fwd(S("BatchNormalization", _BN, {"epsilon": 1e-3}, 9, ref="onnxruntime"))
_fwd(S("BatchNormalization", _BN, {"spatial": 1}, 7, ref="onnxruntime"))

for _x in [(2, 3, 4, 5), (2, 3, 6), (1, 2, 3, 2, 2)]:
    SAMPLES.append(S("InstanceNormalization", [("input", ("real", _x)), ("scale", ("real", (_x[1],))),
                                               ("B", ("real", (_x[1],)))], {}, 6))
SAMPLES.append(S("InstanceNormalization", [("input", ("real", (2, 3, 4))), ("scale", ("real", (3,))),
                                           ("B", ("real", (3,)))], {"epsilon": 0.01}, 22))
for _x, _g in [((2, 6, 3, 2), 3), ((2, 6, 3, 2), 2), ((2, 6, 5), 6), ((2, 4, 3), 1),
               ((1, 4, 2, 2, 2), 2)]:
    SAMPLES.append(S("GroupNormalization", [("X", ("real", _x)), ("scale", ("real", (_x[1],))),
                                            ("bias", ("real", (_x[1],)))], {"num_groups": _g}, 21))
SAMPLES.append(S("GroupNormalization", [("X", ("real", (2, 6, 3))), ("scale", ("real", (6,))),
                                        ("bias", ("real", (6,)))],
                 {"num_groups": 3, "epsilon": 0.01}, 21))

for _x, _axis, _s, _b in [
    ((2, 3, 4), -1, (4,), (4,)),
    ((2, 3, 4), 1, (3, 4), (3, 4)),
    ((2, 3, 4), 1, (4,), (1,)),
    ((2, 3, 4), 0, (2, 3, 4), None),
    ((3, 5), -2, (3, 5), (5,)),
    ((2, 2, 3, 3), 2, (3, 3), (3, 3)),
]:
    _ins = [("X", ("real", _x)), ("Scale", ("real", _s))]
    if _b is not None:
        _ins.append(("B", ("real", _b)))
    SAMPLES.append(S("LayerNormalization", _ins, {"axis": _axis}, 17))
SAMPLES.append(S("LayerNormalization", [("X", ("real", (3, 4))), ("Scale", ("real", (4,))),
                                        ("B", ("real", (4,)))], {"epsilon": 0.1}, 17))

for _x, _axis, _s in [((2, 3, 4), -1, (4,)), ((2, 3, 4), 1, (3, 4)), ((3, 5), 0, (3, 5)),
                      ((2, 3, 4), 1, (1, 4))]:
    SAMPLES.append(S("RMSNormalization", [("X", ("real", _x)), ("scale", ("real", _s))],
                     {"axis": _axis}, 23))

for _p in (1, 2):
    for _axis in (-1, 0, 1):
        # The reference evaluator's L1 norm forgets the absolute value.
        SAMPLES.append(S("LpNormalization", [("input", ("away0", (3, 4, 2)))],
                         {"p": _p, "axis": _axis}, 1, ref="onnx" if _p == 2 else "onnxruntime"))

# -- Dropout (forward in inference: the identity; training runs have their own tests) ------
# Fixed ("float") data: no central-difference or CPU/GPU gradient comparison can share
# a training run's random mask.
_D = ("float", [[0.5, -1.0, 2.0, 0.25], [1.5, -0.75, 0.0, 3.0], [-2.0, 1.0, -0.5, 0.125]])
_fwd(S("Dropout", [("data", _D)], {"ratio": 0.3}, 7))
_fwd(S("Dropout", [("data", _D)], {}, 10))
_fwd(S("Dropout", [("data", _D), ("ratio", ("float", 0.2))], {}, 13))
_fwd(S("Dropout", [("data", _D)], {"seed": 3}, 22))

# -- Pad -----------------------------------------------------------------------------------
for _mode in ("constant", "reflect", "edge"):
    SAMPLES.append(S("Pad", [("data", ("real", (3, 4)))],
                     {"mode": _mode, "pads": [1, 2, 2, 1]}, 2))
    # The reference evaluator rejects negative pads; onnxruntime rejects reflect pads
    # longer than the axis.
    for _pads, _ref in (([0, 1, 2, 2, 0, 1], "onnx"), ([1, 0, -1, 0, 2, 1], "onnxruntime"),
                        ([0, 0, 3, 0, 0, 3], "onnx")):
        SAMPLES.append(S("Pad", [("data", ("real", (2, 3, 5))), ("pads", ("int64", _pads))],
                         {"mode": _mode}, 11, ref=_ref))
    SAMPLES.append(S("Pad", [("data", ("real", (2, 3, 4, 4))),
                             ("pads", ("int64", [1, 2, 2, 1])), (None, ("float", 0.0)),
                             ("axes", ("int64", [2, -1]))], {"mode": _mode}, 18))
SAMPLES.append(S("Pad", [("data", ("real", (3, 4))), ("pads", ("int64", [1, 1, 0, 2])),
                         ("constant_value", ("float", 1.5))], {}, 13))
SAMPLES.append(S("Pad", [("data", ("real", (3, 4))), ("pads", ("int64", [2, 1, 0, 3]))],
                 {"mode": "wrap"}, 19))
SAMPLES.append(S("Pad", [("data", ("real", (2, 3, 4))), ("pads", ("int64", [1, 3])),
                         (None, ("float", 0.0)), ("axes", ("int64", [1]))], {"mode": "wrap"}, 19))

# -- Resize and Upsample -------------------------------------------------------------------
_X4 = ("X", ("real", (1, 2, 3, 4)))
_NOROI = (None, ("float", []))
for _attrs in [
    {"mode": "nearest"},
    {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
    {"mode": "nearest", "coordinate_transformation_mode": "align_corners",
     "nearest_mode": "round_prefer_ceil"},
    {"mode": "nearest", "nearest_mode": "ceil"},
    {"mode": "linear"},
    {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
    {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
    {"mode": "linear", "coordinate_transformation_mode": "asymmetric"},
    {"mode": "cubic"},
    {"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1},
]:
    SAMPLES.append(S("Resize", [_X4, _NOROI, ("scales", ("float32", [1, 1, 2, 1.5]))], _attrs, 13))
    SAMPLES.append(S("Resize", [_X4, _NOROI, ("scales", ("float32", [1, 1, 0.6, 0.5]))], _attrs, 13))
    SAMPLES.append(S("Resize", [_X4, _NOROI, (None, ("float", [])), ("sizes", ("int64", [1, 2, 5, 7]))],
                     _attrs, 13))
SAMPLES += [
    S("Resize", [("X", ("real", (2, 3, 5))), _NOROI, ("scales", ("float32", [1, 1, 1.6]))],
      {"mode": "linear"}, 13),
    S("Resize", [("X", ("real", (1, 1, 3, 4, 2))), _NOROI, ("scales", ("float32", [1, 1, 2, 0.5, 2]))],
      {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, 13),
    S("Resize", [_X4, ("roi", ("float32", [])), ("scales", ("float32", [1, 1, 2, 2]))],
      {"mode": "nearest"}, 11),
    S("Resize", [_X4, ("roi", ("float32", [0, 0, 0.2, 0.1, 1, 1, 0.9, 1.2])),
                 ("scales", ("float32", [1, 1, 2, 1.5]))],
      {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize",
       "extrapolation_value": 2.0}, 13),
    S("Resize", [_X4, _NOROI, ("scales", ("float32", [0.7, 0.5]))],
      {"mode": "linear", "axes": [2, 3], "antialias": 1}, 18),
    S("Resize", [_X4, _NOROI, ("scales", ("float32", [0.7, 0.6]))],
      {"mode": "cubic", "axes": [2, 3], "antialias": 1}, 18),
    S("Resize", [_X4, _NOROI, (None, ("float", [])), ("sizes", ("int64", [7, 5]))],
      {"mode": "nearest", "axes": [3, 2], "keep_aspect_ratio_policy": "not_larger"}, 18),
    S("Resize", [_X4, _NOROI, (None, ("float", [])), ("sizes", ("int64", [5, 7]))],
      {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": "not_smaller"}, 18),
    S("Resize", [_X4, _NOROI, ("scales", ("float32", [1, 1, 1.7, 0.6]))],
      {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"}, 19),
    S("Resize", [_X4, ("scales", ("float32", [1, 1, 2, 3]))], {"mode": "nearest"}, 10,
      ref="onnxruntime"),
    S("Resize", [_X4, ("scales", ("float32", [1, 1, 2, 1.5]))], {"mode": "linear"}, 10,
      ref="onnxruntime"),
    S("Upsample", [_X4, ("scales", ("float32", [1, 1, 2, 3]))], {"mode": "nearest"}, 9),
    S("Upsample", [_X4, ("scales", ("float32", [1, 1, 2, 2]))], {"mode": "linear"}, 9,
      ref="onnxruntime"),
    S("Upsample", [_X4], {"mode": "nearest", "scales": [1.0, 1.0, 3.0, 2.0]}, 7,
      ref="onnxruntime"),
]

# -- activations ---------------------------------------------------------------------------
_A = ("real", (3, 4))
_K = ("away0", (3, 4))   # inputs with a kink at 0
SAMPLES += [
    S("Clip", [("input", _A)], {"min": -0.5, "max": 0.7}, 6),
    S("Clip", [("input", _A)], {}, 6),
    S("Clip", [("input", _A), ("min", ("float", -0.5)), ("max", ("float", 0.7))], {}, 13),
    S("Clip", [("input", _A), ("min", ("float", 0.2))], {}, 11),
    S("Clip", [("input", _A), (None, ("float", 0)), ("max", ("float", 0.3))], {}, 12),
    S("Clip", [("input", _A)], {}, 13),
    S("PRelu", [("X", _K), ("slope", ("real", (4,)))], {}, 9),
    S("PRelu", [("X", _K), ("slope", ("real", (3, 4)))], {}, 16),
    S("PRelu", [("X", ("away0", (2, 3, 2, 2))), ("slope", ("real", (3, 1, 1)))], {}, 16),
    S("PRelu", [("X", _K), ("slope", ("real", (1,)))], {}, 7),
    S("HardSigmoid", [("X", _A)], {}, 6),
    S("HardSigmoid", [("X", _K)], {"alpha": 1.0, "beta": 0.0}, 22),
    S("HardSwish", [("X", _A)], {}, 14),
    S("Elu", [("X", _K)], {}, 6),
    S("Elu", [("X", _K)], {"alpha": 0.5}, 22),
    S("Selu", [("X", _K)], {}, 6),
    S("Selu", [("X", _K)], {"alpha": 1.5, "gamma": 2.0}, 22),
    S("Celu", [("X", _K)], {}, 12),
    S("Celu", [("X", _K)], {"alpha": 2.0}, 12),
    S("Softplus", [("X", _A)], {}, 1),
    S("Softsign", [("input", _K)], {}, 1),
    S("Hardmax", [("input", _K)], {}, 13),       # piecewise constant: a zero gradient
    # Opset 11 flattens to 2-D at axis: the reference evaluator takes axis as opset 13 does.
    S("Hardmax", [("input", _K)], {"axis": 0}, 11, ref="onnxruntime"),
    S("Mish", [("X", _A)], {}, 18),
    S("Gelu", [("X", _A)], {}, 20),
    S("Gelu", [("X", _A)], {"approximate": "tanh"}, 20),
    S("Erf", [("input", _A)], {}, 13),
    S("Erf", [("input", ("real", (2, 3, 4)))], {}, 9),
]
