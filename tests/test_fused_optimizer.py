"""The fused GPU optimizer update's arithmetic, checked on the CPU: the scalars a
step writes for the kernel (Optimizer.scalars) and the kernel's NumPy reference
(Optimizer.reference) reproduce Optimizer.update bit for bit, through learning
rate changes, the first momentum step and every weight-decay form.  The CUDA
kernels themselves are compared with Optimizer.update in test_gpu_graphs.py."""

from __future__ import annotations

import numpy as np
import pytest

import onnxgrad
from onnxgrad.optimizers import DeviceUpdate

OPTIMIZERS = {
    "sgd": lambda: onnxgrad.SGD(lr=0.05),
    "sgd-decay": lambda: onnxgrad.SGD(lr=0.05, weight_decay=1e-2),
    "sgd-momentum-decay": lambda: onnxgrad.SGD(lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd-nesterov": lambda: onnxgrad.SGD(lr=0.05, momentum=0.9, nesterov=True),
    "sgd-dampening": lambda: onnxgrad.SGD(lr=0.05, momentum=0.9, dampening=0.3),
    "adam": lambda: onnxgrad.Adam(lr=0.01, weight_decay=1e-2),
    "adam-beta1-low": lambda: onnxgrad.Adam(lr=0.01, betas=(0.3, 0.99)),
    "adamw": lambda: onnxgrad.AdamW(lr=0.01),
    "adamw-no-decay": lambda: onnxgrad.AdamW(lr=0.01, weight_decay=0.0),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_of_the_kernel_equals_update(name, dtype):
    rng = np.random.default_rng(0)
    plain, fused = OPTIMIZERS[name](), OPTIMIZERS[name]()
    a = {"w": rng.standard_normal((7, 5)).astype(dtype), "b": rng.standard_normal(5).astype(dtype)}
    b = {k: v.copy() for k, v in a.items()}
    update = DeviceUpdate(fused, np, b)
    for step in range(7):
        if step == 4:
            plain.lr = fused.lr = plain.lr / 3
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in a.items()}
        plain.update(np, a, grads)
        update.begin_step()
        np.testing.assert_array_equal(update.device, update.host)  # the scalars "uploaded"
        for k in b:
            fused.reference(b[k], grads[k], fused.state[k], update.host[update.rows[k]])
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    for k, state in plain.state.items():
        for key, value in state.items():
            np.testing.assert_array_equal(fused.state[k][key], value, err_msg=f"{k} {key}")


def test_update_arrays_are_what_a_recorded_step_must_keep():
    params = {"w": np.zeros(3, np.float32)}
    update = DeviceUpdate(onnxgrad.Adam(lr=0.1), np, params)
    update.begin_step()
    arrays = update.arrays()
    state = update.optimizer.state["w"]
    assert arrays[0] is update.device and arrays[1] is params["w"]
    assert any(a is state["exp_avg"] for a in arrays) and any(a is state["exp_avg_sq"] for a in arrays)
