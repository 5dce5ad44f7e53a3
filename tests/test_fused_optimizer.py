"""The fused GPU optimizer update, checked on the CPU: the CUDA kernel that
``DeviceUpdate`` launches is C, generated from the optimizer's one ``rule``; here
it is compiled by the host's C++ compiler (no fused multiply-adds, as nvcc is
told) and run on the scalars that ``begin_step`` writes for the device.  It
reproduces ``Optimizer.update`` bit for bit, through learning-rate changes, the
first momentum step and every weight-decay form.  The CUDA kernels themselves are
compared with ``Optimizer.update`` in test_gpu_graphs.py; the multi-tensor kernel
that runs this body over many parameters at once, and the compiled CPU loop, are
tested in test_multi_tensor_optimizer.py."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

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


_HARNESS = """
#include <cmath>
using std::sqrt;

template <typename T>
static void run(long n, const T* G, const double* h, long row, T* P, T* S0, T* S1) {
    for (long i = 0; i < n; ++i) {
        T g = G[i], p = P[i];
        T s0 = S0 ? S0[i] : T(0), s1 = S1 ? S1[i] : T(0);
        (void)s0; (void)s1;
        {
BODY
        }
        P[i] = p;
        if (S0) S0[i] = s0;
        if (S1) S1[i] = s1;
    }
}

extern "C" void run_float(long n, const float* G, const double* h, long row, float* P,
                          float* S0, float* S1) { run<float>(n, G, h, row, P, S0, S1); }
extern "C" void run_double(long n, const double* G, const double* h, long row, double* P,
                           double* S0, double* S1) { run<double>(n, G, h, row, P, S0, S1); }
"""


def _compiled(body: str, where) -> ctypes.CDLL:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine to run the kernel's C on the CPU")
    source = where / "kernel.cpp"
    source.write_text(_HARNESS.replace("BODY", body))
    library = where / "kernel.so"
    subprocess.run([compiler, "-O1", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC",
                    str(source), "-o", str(library)], check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(library))


def _pointer(array):
    return None if array is None else array.ctypes.data_as(ctypes.c_void_p)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_kernel_compiled_for_the_cpu_equals_update(name, dtype, tmp_path):
    rng = np.random.default_rng(0)
    plain, fused = OPTIMIZERS[name](), OPTIMIZERS[name]()
    a = {"w": rng.standard_normal((7, 5)).astype(dtype), "b": rng.standard_normal(5).astype(dtype)}
    b = {k: v.copy() for k, v in a.items()}
    update = DeviceUpdate(fused, np, b)
    _, _, body, names = update.source
    run = getattr(_compiled(body, tmp_path), "run_float" if dtype == np.float32 else "run_double")
    for step in range(7):
        if step == 4:
            plain.lr = fused.lr = plain.lr / 3
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in a.items()}
        plain.update(np, a, grads)
        update.begin_step()
        np.testing.assert_array_equal(update.device, update.host)  # the scalars "uploaded"
        for k in b:
            states = [fused.state[k][n] for n in names] + [None] * (2 - len(names))
            run(ctypes.c_long(b[k].size), _pointer(grads[k]), _pointer(update.device),
                ctypes.c_long(update.rows[k]), _pointer(b[k]), *map(_pointer, states))
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    for k, state in plain.state.items():
        for key, value in state.items():
            np.testing.assert_array_equal(fused.state[k][key], value, err_msg=f"{k} {key}")


def test_each_configuration_gets_its_own_kernel_and_static_choices_stay_out_of_it():
    """Hyper-parameters are constants of the kernel, step scalars rows of ``h``."""
    plain = DeviceUpdate(onnxgrad.SGD(lr=0.1), np, {"w": np.zeros(2)}).source[2]
    decayed = DeviceUpdate(onnxgrad.SGD(lr=0.1, weight_decay=0.5), np, {"w": np.zeros(2)}).source[2]
    assert plain != decayed and "(T)0.5" in decayed and "(T)0.5" not in plain
    assert "r[0]" in plain and "0.1" not in plain  # the learning rate changes between steps


def test_update_arrays_are_what_a_recorded_step_must_keep():
    params = {"w": np.zeros(3, np.float32)}
    update = DeviceUpdate(onnxgrad.Adam(lr=0.1), np, params)
    update.begin_step()
    arrays = update.arrays()
    state = update.optimizer.state["w"]
    assert arrays[0] is update.device and arrays[1] is params["w"]
    assert any(a is state["exp_avg"] for a in arrays) and any(a is state["exp_avg_sq"] for a in arrays)
