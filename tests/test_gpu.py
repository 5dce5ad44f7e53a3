"""The same cases on CuPy: every op sample's gradients and forward outputs, and
training steps, agree with the CPU.  Skipped where no CUDA device exists."""

from __future__ import annotations


import numpy as np
import onnx
import pytest

import gradcheck as gc
import onnxgrad
from helpers import mlp_model
from onnxgrad.backend import get_backend
from onnxgrad.model import Model

pytestmark = pytest.mark.gpu


SAMPLES = gc.all_samples()
GRAD = [s for s in SAMPLES if gc.differentiable_inputs(s) and gc.definition(s).rule is not None]

#: Ops whose kernels cuDNN runs on the device; in float32 its heuristics may pick TF32
#: tensor-core engines (as PyTorch's and ONNX Runtime's defaults allow; README, "GPU").
CUDNN_OPS = {"Conv", "ConvTranspose"}


def run_on_device(model: Model, feeds: dict, device: str) -> dict[str, np.ndarray]:
    """Inference through a plan on ``device`` (Model.run itself runs on the CPU)."""
    backend = get_backend(device)
    plan = Model.make_plan(model.graph, backend, model.graph.outputs)
    env = {k: backend.asarray(v) for k, v in model.graph.initializers.items()}
    env.update({k: backend.asarray(v) for k, v in feeds.items()})
    return {k: backend.to_host(v) for k, v in plan.run(env).items()}


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.id for s in SAMPLES])
def test_forward_matches_cpu(sample):
    arrays = gc.materialize(sample, np.float32)
    model = onnxgrad.load(gc.build_model(sample, arrays, set(arrays)))
    cpu = model.run(dict(arrays))
    gpu = run_on_device(model, arrays, "cuda")
    tf32 = sample.op in CUDNN_OPS and not isinstance(get_backend("cuda").convolutions, str)
    for name, value in cpu.items():
        assert gpu[name].dtype == value.dtype and gpu[name].shape == value.shape
        if tf32:  # TF32's rounding (10-bit mantissas), relative to the result's scale
            np.testing.assert_allclose(gpu[name], value, rtol=0,
                                       atol=3e-3 * float(np.abs(value).max()), err_msg=name)
        else:
            np.testing.assert_allclose(gpu[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("sample", GRAD, ids=[s.id for s in GRAD])
def test_gradients_match_cpu(sample):
    names = gc.differentiable_inputs(sample)
    arrays = gc.materialize(sample, np.float64)
    _, y = gc.run_forward(sample, arrays)
    u = gc.projection_u(sample, y)
    cpu = gc.analytic_gradients(sample, arrays, names, u, device="cpu")
    gpu = gc.analytic_gradients(sample, arrays, names, u, device="cuda")
    for name in names:
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-7, atol=1e-9, err_msg=name)


def test_training_steps_match_cpu(tmp_path):
    proto = mlp_model(sizes=(8, 16, 4))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 8)).astype(np.float32)
    y = rng.integers(0, 4, 32)
    results = {}
    for device in ("cpu", "cuda"):
        model = onnxgrad.load(proto)
        trainer = onnxgrad.Trainer(model, optimizer=onnxgrad.AdamW(lr=0.01), device=device)
        losses = [trainer.step({"x": x}, y) for _ in range(5)]
        results[device] = (losses, model.parameters())
        model.save(tmp_path / f"{device}.onnx")
    np.testing.assert_allclose(results["cuda"][0], results["cpu"][0], rtol=1e-5)
    for name, value in results["cpu"][1].items():
        np.testing.assert_allclose(results["cuda"][1][name], value, rtol=1e-4, atol=1e-6)
    saved = onnxgrad.load(tmp_path / "cuda.onnx").parameters()
    for name, value in results["cuda"][1].items():
        np.testing.assert_array_equal(saved[name], value)
    onnx.checker.check_model(str(tmp_path / "cuda.onnx"))
