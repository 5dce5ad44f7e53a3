"""Gradient rules (and forward kernels) of vision and other ops: GridSample,
AffineGrid, LRN, MeanVarianceNormalization, Det, Compress, Col2Im, GlobalLpPool,
MaxRoiPool, RoiAlign and DeformConv (RoiAlign's rois: tests/test_remaining_gradients.py).

Forward outputs are checked against onnx's ReferenceEvaluator (onnxruntime where
the reference lacks the op), gradients in float64 against central differences,
with the harness of tests/test_transformer_ops.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from op_db_transformer import Sample as S
from test_transformer_ops import _onnxruntime_run, check_gradient, differentiable, make_model, \
    materialize, out_names, reference_run

import onnxgrad

SAMPLES: list[S] = []

# -- GridSample, AffineGrid ----------------------------------------------------------------
for _pad in ("zeros", "border", "reflection"):
    for _align in (0, 1):
        for _mode in ("linear", "nearest", "cubic"):
            SAMPLES.append(S("GridSample", [("X", ("real", (2, 3, 4, 5))),
                                            ("grid", ("real", (2, 3, 2, 2)))],
                             {"mode": _mode, "padding_mode": _pad, "align_corners": _align}, 20))
        SAMPLES.append(S("GridSample", [("X", ("real", (1, 2, 3, 4, 3))),
                                        ("grid", ("real", (1, 2, 3, 2, 3)))],
                         {"padding_mode": _pad, "align_corners": _align}, 20))
SAMPLES += [
    S("GridSample", [("X", ("real", (1, 2, 4, 4))), ("grid", ("unit", (1, 3, 3, 2)))],
      {"mode": "bilinear"}, 16),
    S("GridSample", [("X", ("real", (1, 2, 4, 4))), ("grid", ("unit", (1, 3, 3, 2)))],
      {"mode": "bicubic", "align_corners": 1}, 16),
]
for _align in (0, 1):
    SAMPLES += [S("AffineGrid", [("theta", ("real", (2, 2, 3))), ("size", ("int64", [2, 3, 4, 5]))],
                  {"align_corners": _align}, 20),
                S("AffineGrid", [("theta", ("real", (1, 3, 4))),
                                 ("size", ("int64", [1, 2, 3, 2, 4]))],
                  {"align_corners": _align}, 20)]

# -- LRN, MeanVarianceNormalization, Det, Compress, Col2Im -------------------------------------
SAMPLES += [
    # (onnx's reference LRN loops over as many channels as the batch has items: N == C here)
    S("LRN", [("X", ("real", (2, 2, 3, 2)))], {"size": 3}, 13),
    S("LRN", [("X", ("real", (3, 3, 2, 1)))], {"size": 5, "alpha": 0.5, "beta": 0.6, "bias": 2.0},
      13),
    S("LRN", [("X", ("real", (4, 4, 2, 3)))], {"size": 2, "alpha": 0.3, "beta": 1.2}, 1),
    S("LRN", [("X", ("real", (3, 3, 2, 2)))], {"size": 1, "alpha": 1.0}, 13),
    S("MeanVarianceNormalization", [("X", ("real", (2, 3, 4, 2)))], {"axes": [0, 2, 3]}, 13),
    S("MeanVarianceNormalization", [("X", ("real", (2, 3, 4)))], {"axes": [1]}, 13),
    S("MeanVarianceNormalization", [("X", ("real", (3, 2, 4)))], {"axes": [0, 2]}, 9),
    S("Det", [("X", ("real", (3, 3)))], {}, 11),
    S("Det", [("X", ("real", (2, 2, 4, 4)))], {}, 22),
    S("Det", [("X", ("float", [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.5, -1.0, 2.0]]))], {}, 11),
    S("Det", [("X", ("float", [[[0.0, 0.0], [0.0, 0.0]], [[1.5, 0.0], [0.0, 0.0]]]))], {}, 11),
    S("Compress", [("input", ("real", (3, 4))), ("condition", ("bool", [True, False, True]))],
      {"axis": 0}, 11),
    S("Compress", [("input", ("real", (3, 4))), ("condition", ("bool", [False, True, True]))],
      {"axis": -1}, 11),
    S("Compress", [("input", ("real", (2, 3))), ("condition", ("bool", [1, 0, 0, 1, 1]))],
      {}, 9),
    S("Col2Im", [("input", ("real", (2, 4, 6))), ("image_shape", ("int64", [3, 4])),
                 ("block_shape", ("int64", [2, 2]))], {}, 18),
    S("Col2Im", [("input", ("real", (1, 6, 4))), ("image_shape", ("int64", [5, 5])),
                 ("block_shape", ("int64", [2, 3]))],
      {"strides": [2, 2], "pads": [1, 0, 0, 1], "dilations": [2, 1]}, 18),
    S("Col2Im", [("input", ("real", (1, 8, 8))), ("image_shape", ("int64", [3, 3, 3])),
                 ("block_shape", ("int64", [2, 2, 2]))], {}, 18),
]

# -- GlobalLpPool, MaxRoiPool --------------------------------------------------------------------
ROIS = [[0, 1, 1, 5, 4], [1, 0.4, 2.6, 7, 7], [0, -2, -1, 3, 2], [1, 6, 6, 4, 3],
        [0, 2.5, 0, 2.5, 9]]
SAMPLES += [
    S("GlobalLpPool", [("X", ("real", (2, 3, 4, 5)))], {}, 12),
    S("GlobalLpPool", [("X", ("real", (2, 3, 4)))], {"p": 3}, 12),
    S("GlobalLpPool", [("X", ("real", (1, 2, 3, 2, 2)))], {"p": 1}, 12),
    S("MaxRoiPool", [("X", ("real", (2, 3, 8, 9))), ("rois", ("float", ROIS))],
      {"pooled_shape": [2, 3]}, 12),
    S("MaxRoiPool", [("X", ("real", (2, 2, 6, 7))), ("rois", ("float", ROIS))],
      {"pooled_shape": [3, 2], "spatial_scale": 0.5}, 12),
    S("MaxRoiPool", [("X", ("real", (2, 2, 5, 5))), ("rois", ("float", ROIS))],
      {"pooled_shape": [1, 1], "spatial_scale": 1.5}, 12),
]

# -- RoiAlign, DeformConv -------------------------------------------------------------------------
BOXES = [[0.5, 0.8, 4.2, 5.1], [1.3, 0.2, 6.4, 3.3], [-1.5, 2.0, 2.5, 7.5], [2.0, 2.0, 2.6, 2.3]]
for _mode in ("avg", "max"):
    SAMPLES += [
        S("RoiAlign", [("X", ("real", (2, 3, 6, 7))), ("rois", ("float", BOXES)),
                       ("batch_indices", ("int64", [0, 1, 1, 0]))],
          {"mode": _mode, "output_height": 2, "output_width": 3}, 16),
        S("RoiAlign", [("X", ("real", (2, 2, 5, 6))), ("rois", ("float", BOXES)),
                       ("batch_indices", ("int64", [1, 0, 1, 0]))],
          {"mode": _mode, "output_height": 3, "output_width": 2, "sampling_ratio": 2,
           "spatial_scale": 0.8, "coordinate_transformation_mode": "output_half_pixel"}, 16),
        S("RoiAlign", [("X", ("real", (1, 2, 5, 5))), ("rois", ("float", BOXES)),
                       ("batch_indices", ("int64", [0, 0, 0, 0]))],
          {"mode": _mode, "output_height": 2, "output_width": 2, "spatial_scale": 1.3}, 10),
    ]
SAMPLES += [
    S("DeformConv", [("X", ("real", (1, 2, 4, 5))), ("W", ("real", (3, 2, 2, 2))),
                     ("offset", ("real", (1, 8, 3, 4)))], {"kernel_shape": [2, 2]}, 19),
    S("DeformConv", [("X", ("real", (2, 4, 5, 7))), ("W", ("real", (2, 2, 3, 3))),
                     ("offset", ("real", (2, 36, 3, 3))), ("B", ("real", (2,))),
                     ("mask", ("pos", (2, 18, 3, 3)))],
      {"pads": [1, 0, 1, 0], "strides": [2, 1], "dilations": [1, 2], "group": 2,
       "offset_group": 2}, 19),
    S("DeformConv", [("X", ("real", (1, 3, 4, 4))), ("W", ("real", (2, 3, 2, 3))),
                     ("offset", ("real", (1, 12, 4, 2))), (None, None), ("mask", ("real", (1, 6, 4, 2)))],
      {"pads": [1, 0, 0, 0]}, 22),
    S("DeformConv", [("X", ("real", (2, 2, 5, 5))), ("W", ("real", (4, 1, 3, 3))),
                     ("offset", ("real", (2, 36, 2, 2))), ("B", ("real", (4,)))],
      {"strides": [2, 2], "group": 2, "offset_group": 2}, 19),
]


def _ids(samples):
    return [s.id for s in samples]


#: (op, opset) checked against onnxruntime: onnx's reference evaluator lacks GlobalLpPool
#: and MaxRoiPool, and gives RoiAlign-10 the half-pixel coordinates of RoiAlign-16.
ONNXRUNTIME = {("GlobalLpPool", 12), ("MaxRoiPool", 12), ("RoiAlign", 10)}


@pytest.mark.parametrize("sample", SAMPLES, ids=_ids(SAMPLES))
def test_forward_matches_reference(sample):
    arrays = materialize(sample, np.float32)
    model = make_model(sample, arrays, set(arrays))
    run = _onnxruntime_run if (sample.op, sample.opset) in ONNXRUNTIME else reference_run
    want = run(model, dict(arrays))
    got = onnxgrad.load(model).run(dict(arrays))
    for y, w in zip(out_names(sample), want):
        assert got[y].shape == w.shape, y
        np.testing.assert_allclose(got[y], w, rtol=1e-4, atol=1e-5, err_msg=y)


GRAD_CASES = [(s, n) for s in SAMPLES if s.grad for n in differentiable(s)]


@pytest.mark.parametrize("sample,name", GRAD_CASES, ids=[f"{s.id}-d{n}" for s, n in GRAD_CASES])
def test_gradient(sample, name):
    check_gradient(sample, name)


def test_global_lp_pool_with_a_fractional_p():
    """GlobalLpPool-1 takes a float p (no reference runs it): the formula, and its gradient
    kernel against central differences."""
    from onnxgrad.ops.pool import GlobalLpPool1, GlobalLpPoolGrad

    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, (2, 3, 4))
    (Y,) = GlobalLpPool1(np, X, p=2.5)
    np.testing.assert_allclose(Y, np.sum(np.abs(X) ** 2.5, axis=2, keepdims=True) ** 0.4)
    U, V = rng.standard_normal(Y.shape), rng.standard_normal(X.shape)
    (dX,) = GlobalLpPoolGrad(np, U, X, Y, p=2.5)
    eps = 1e-6
    numeric = (np.sum(U * GlobalLpPool1(np, X + eps * V, p=2.5)[0])
               - np.sum(U * GlobalLpPool1(np, X - eps * V, p=2.5)[0])) / (2 * eps)
    np.testing.assert_allclose(np.sum(dX * V), numeric, rtol=1e-6)
