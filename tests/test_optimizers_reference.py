"""onnxgrad's SGD / Adam / AdamW against torch.optim, step by step.

The reference trajectories are in tests/reference/optimizers.npz (made by
tests/reference/make_reference.py with torch; torch is not needed here).

To feed an optimizer *given* gradients through the public API only, each
configuration trains a tiny ONNX graph whose loss is

    loss = sum_p ReduceSum(p * G_p)

with the parameters p as initializers and the gradients G_p as graph inputs,
so that d loss / d p = G_p exactly; Trainer(loss=None, output="loss").step
then applies the optimizer to exactly the stored gradients.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxgrad

REF = pathlib.Path(__file__).resolve().parent / "reference" / "optimizers.npz"
DATA = np.load(REF)
META = json.loads(str(DATA["meta"]))
PARAMS = META["params"]
N_STEPS = META["n_steps"]
CONFIGS = META["configs"]

RTOL, ATOL = 1e-5, 1e-6


def grad_probe_model() -> onnx.ModelProto:
    """loss = sum_p ReduceSum(p * G_p): d loss / d p == G_p."""
    inputs, inits, nodes, terms = [], [], [], []
    for p in PARAMS:
        init = DATA[f"init/{p}"]
        inits.append(numpy_helper.from_array(init, name=p))
        inputs.append(helper.make_tensor_value_info(
            f"G_{p}", TensorProto.FLOAT, list(init.shape)))
        nodes.append(helper.make_node("Mul", [p, f"G_{p}"], [f"prod_{p}"],
                                      name=f"mul_{p}"))
        nodes.append(helper.make_node("ReduceSum", [f"prod_{p}"], [f"sum_{p}"],
                                      name=f"sum_{p}", keepdims=0))
        terms.append(f"sum_{p}")
    acc = terms[0]
    for i, t in enumerate(terms[1:]):
        out = "loss" if i == len(terms) - 2 else f"acc_{i}"
        nodes.append(helper.make_node("Add", [acc, t], [out], name=f"add_{i}"))
        acc = out
    graph = helper.make_graph(
        nodes, "grad_probe", inputs,
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def make_optimizer(config: str):
    spec = CONFIGS[config]
    kwargs = dict(spec["kwargs"])
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return getattr(onnxgrad, spec["optimizer"])(**kwargs)


def feeds(step: int) -> dict[str, np.ndarray]:
    return {f"G_{p}": DATA[f"grad/{p}/{step}"] for p in PARAMS}


def test_probe_gradients_are_the_fed_gradients():
    model = onnxgrad.load(grad_probe_model())
    trainer = onnxgrad.Trainer(model, loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.1))
    grads = trainer.gradients(feeds(1), None)
    assert set(grads) == set(PARAMS)
    for p in PARAMS:
        np.testing.assert_array_equal(grads[p], DATA[f"grad/{p}/1"])
    # gradients() changes no weights
    for p, v in trainer.model.parameters().items():
        np.testing.assert_array_equal(v, DATA[f"init/{p}"])


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_optimizer_matches_torch(config):
    model = onnxgrad.load(grad_probe_model())
    trainer = onnxgrad.Trainer(model, loss=None, output="loss",
                               optimizer=make_optimizer(config))
    for step in range(1, N_STEPS + 1):
        before = trainer.model.parameters()
        f = feeds(step)
        loss = trainer.step(f, None)
        want_loss = sum(float(np.sum(before[p].astype(np.float64) * f[f"G_{p}"]))
                        for p in PARAMS)
        assert loss == pytest.approx(want_loss, rel=1e-4, abs=1e-5), (
            f"{config}: step {step} returned a loss that is not the pre-update loss")
        params = trainer.model.parameters()
        for p in PARAMS:
            np.testing.assert_allclose(
                params[p], DATA[f"{config}/{p}/{step}"], rtol=RTOL, atol=ATOL,
                err_msg=f"{config}: parameter {p} after step {step}")
