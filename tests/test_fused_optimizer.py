"""The fused GPU optimizer update, checked on the CPU: the CUDA kernel that
``DeviceUpdate`` launches is C, generated from the optimizer's one ``rule``; here
it is compiled by the host's C++ compiler (no fused multiply-adds, as nvcc is
told) and run on the scalars that ``begin_step`` writes for the device.  It
reproduces ``Optimizer.update`` bit for bit, through learning-rate changes, the
first momentum step and every weight-decay form, and through a momentum or beta1
that a schedule changes at every step (OneCycleLR): the hyper-parameters are
read at run time from the same rows as the step scalars, so a kernel depends on
the rule's structure only.  The CUDA kernels themselves are
compared with ``Optimizer.update`` in test_gpu_graphs.py; the multi-tensor kernel
that runs this body over many parameters at once, and the compiled CPU loop, are
tested in test_multi_tensor_optimizer.py."""

from __future__ import annotations

import ctypes
import hashlib
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
    # one file per body: a library loaded again from the same path is the one loaded first
    stem = "kernel_" + hashlib.sha1(body.encode()).hexdigest()[:12]
    source = where / f"{stem}.cpp"
    source.write_text(_HARNESS.replace("BODY", body))
    library = where / f"{stem}.so"
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
    body, names = update.source[2:4]
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


def _body(optimizer):
    return DeviceUpdate(optimizer, np, {"w": np.zeros(2)}).source[2]


def test_one_kernel_per_rule_structure_whatever_the_hyper_parameters():
    """Hyper-parameters and step scalars are items of the rows of ``h``; the rule's
    choices (which terms it has, which form a formula takes) make the kernel."""
    momentum = _body(onnxgrad.SGD(lr=0.1, momentum=0.9, weight_decay=0.5))
    assert momentum == _body(onnxgrad.SGD(lr=0.2, momentum=0.85, weight_decay=0.25))
    assert "(T)r[" in momentum and not any(v in momentum for v in ("0.9", "0.5", "0.1"))
    assert momentum != _body(onnxgrad.SGD(lr=0.1, momentum=0.9))  # no weight-decay term
    assert momentum != _body(onnxgrad.SGD(lr=0.1, momentum=0.9, weight_decay=0.5, nesterov=True))
    adam = _body(onnxgrad.Adam(lr=0.01, betas=(0.9, 0.999), eps=1e-8))
    assert adam == _body(onnxgrad.Adam(lr=0.02, betas=(0.8, 0.99), eps=1e-6))
    assert adam != _body(onnxgrad.Adam(lr=0.01, betas=(0.3, 0.999)))  # lerp's other form


def test_the_rows_hold_the_step_scalars_then_the_hyper_parameters():
    optimizer = onnxgrad.SGD(lr=0.1, momentum=0.9, dampening=0.25, weight_decay=0.5)
    update = DeviceUpdate(optimizer, np, {"w": np.zeros(2), "b": np.zeros(3)})
    constants = update.source[4]
    assert constants == (0.5, 0.9, 0.75)  # in the order the rule states them
    update.begin_step()
    assert update.host.tolist() == [[0.1, 1.0, *constants]] * 2  # lr, first step, constants
    device = update.device
    optimizer.momentum, optimizer.lr = 0.8, 0.05
    update.begin_step()
    assert update.device is device  # what a recorded step reads: the same array, new values
    assert update.host.tolist() == [[0.05, 0.0, 0.5, 0.8, 0.75]] * 2


def _cycling(name, base_momentum=0.85, max_momentum=0.95):
    """An optimizer of OPTIMIZERS and a OneCycleLR that changes its momentum or beta1
    at every step."""
    optimizer = OPTIMIZERS[name]()
    schedule = onnxgrad.OneCycleLR(optimizer, max_lr=4 * optimizer.lr, total_steps=10,
                                   base_momentum=base_momentum, max_momentum=max_momentum)
    assert schedule.cycle_momentum
    return optimizer, schedule


#: The optimizers whose momentum (SGD) or beta1 (Adam, AdamW) OneCycleLR cycles.
CYCLED = [name for name, make in OPTIMIZERS.items()
          if hasattr(make(), "betas") or getattr(make(), "momentum", 0)]


@pytest.mark.parametrize("name", CYCLED)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_momentum_that_changes_every_step_is_honoured(name, dtype, tmp_path):
    """Each launch of a step is "recorded" once (its arguments: the addresses of the
    rows, of static gradient buffers and of the state) and replayed at every later
    step after begin_step, as a CUDA graph replays it."""
    rng = np.random.default_rng(4)
    (plain, plain_schedule), (fused, fused_schedule) = _cycling(name), _cycling(name)
    a = {"w": rng.standard_normal((7, 5)).astype(dtype), "b": rng.standard_normal(5).astype(dtype)}
    b = {k: v.copy() for k, v in a.items()}
    buffers = {k: np.empty_like(v) for k, v in a.items()}
    update = DeviceUpdate(fused, np, b)
    body, names = update.source[2:4]
    run = getattr(_compiled(body, tmp_path), "run_float" if dtype == np.float32 else "run_double")
    recorded, seen = [], set()
    for step in range(9):
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in a.items()}
        plain.update(np, a, grads)
        update.begin_step()
        seen.add(update.source[2])
        for k in b:
            buffers[k][...] = grads[k]
        if not recorded:
            for k in b:
                states = [fused.state[k][n] for n in names] + [None] * (2 - len(names))
                recorded.append([ctypes.c_long(b[k].size), _pointer(buffers[k]),
                                 _pointer(update.device), ctypes.c_long(update.rows[k]),
                                 _pointer(b[k]), *map(_pointer, states)])
        for arguments in recorded:
            run(*arguments)
        plain_schedule.step()
        fused_schedule.step()
    assert seen == {body}  # one kernel for every momentum the schedule set
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    for k, state in plain.state.items():
        for key, value in state.items():
            np.testing.assert_array_equal(fused.state[k][key], value, err_msg=f"{k} {key}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_beta1_that_changes_the_rules_form_takes_the_other_kernel(dtype, tmp_path):
    """Adam's moment update takes one of two forms by 1 - beta1 (as torch's lerp):
    a beta1 that crosses 0.5 changes the kernel, and the rows move to a new array,
    so a step recorded with the former kernel is not replayed."""
    rng = np.random.default_rng(5)
    plain, plain_schedule = _cycling("adam", 0.4, 0.6)
    fused, fused_schedule = _cycling("adam", 0.4, 0.6)
    a = {"w": rng.standard_normal((7, 5)).astype(dtype), "b": rng.standard_normal(5).astype(dtype)}
    b = {k: v.copy() for k, v in a.items()}
    update = DeviceUpdate(fused, np, b)
    libraries, bodies, devices = {}, [], []
    for step in range(9):
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in a.items()}
        plain.update(np, a, grads)
        update.begin_step()
        body, names = update.source[2:4]
        if body not in libraries:
            libraries[body] = _compiled(body, tmp_path)
        if not bodies or body != bodies[-1]:
            bodies.append(body)
            assert all(update.device is not d for d in devices)
            devices.append(update.device)
        assert update.device is devices[-1]  # the same rows while the kernel stays
        run = getattr(libraries[body], "run_float" if dtype == np.float32 else "run_double")
        for k in b:
            states = [fused.state[k][n] for n in names]
            run(ctypes.c_long(b[k].size), _pointer(grads[k]), _pointer(update.device),
                ctypes.c_long(update.rows[k]), _pointer(b[k]), *map(_pointer, states))
        plain_schedule.step()
        fused_schedule.step()
    assert len(libraries) == 2 and len(bodies) == 3  # 0.6 down to 0.4 and back up
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
