"""What each rank runs in tests/test_distributed.py: ``mpiexec -n 2 python mpi_worker.py
CASE OUT`` (the test reads OUT, which rank 0 writes, and the output)."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from onnx import helper

import onnxgrad
from onnxgrad.distributed import MPIComm, abort_on_error
from helpers import make_model, mlp_model

SAMPLES, BATCH, EPOCHS = 88, 8, 2  # per rank: 44 samples, 5 batches of 8 and one of 4


def mlp_data(seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((SAMPLES, 6)).astype(np.float32)
    return {"x": x}, rng.integers(0, 3, SAMPLES)


def bn_model(seed: int = 0):
    """Conv -> BatchNormalization -> Relu -> GlobalAveragePool -> Flatten -> Gemm, on
    [N, 2, 5, 5] images: input "x", output "logits"."""
    rng = np.random.default_rng(seed)
    inits = {"W": (0.4 * rng.standard_normal((3, 2, 3, 3))).astype(np.float32),
             "scale": (1 + 0.1 * rng.standard_normal(3)).astype(np.float32),
             "B": (0.1 * rng.standard_normal(3)).astype(np.float32),
             "mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32),
             "Wf": (0.5 * rng.standard_normal((3, 3))).astype(np.float32),
             "bf": np.zeros(3, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "B", "mean", "var"], ["n"],
                              name="bn", momentum=0.8),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "Wf", "bf"], ["logits"], name="fc", transB=1)]
    return make_model(nodes, [("x", np.float32, ["N", 2, 5, 5])],
                      [("logits", np.float32, ["N", 3])], inits)


def bn_data(seed: int = 2):
    rng = np.random.default_rng(seed)
    x = (2 + 3 * rng.standard_normal((32, 2, 5, 5))).astype(np.float32)
    return {"x": x}, rng.integers(0, 3, 32)


def optimizers():
    return {"sgd": onnxgrad.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3),
            "adamw": onnxgrad.AdamW(lr=0.01)}


def flat_state(trainer, prefix: str) -> dict[str, np.ndarray]:
    """The trainer's weights and optimizer state as flat arrays by name."""
    state = trainer.state_dict()
    out = {f"{prefix}/weights/{k}": v for k, v in state["weights"].items()}
    for param, entries in state["optimizer"]["state"].items():
        for key, value in entries.items():
            out[f"{prefix}/optimizer/{param}/{key}"] = np.asarray(value)
    return out


def equivalence(comm, out):
    """SGD with momentum and AdamW for EPOCHS epochs at BATCH per rank."""
    saved = {}
    for name, optimizer in optimizers().items():
        trainer = onnxgrad.Trainer(onnxgrad.load(mlp_model((6, 16, 3))), optimizer=optimizer,
                                   comm=comm, seed=5)
        history = trainer.fit(mlp_data(), epochs=EPOCHS, batch_size=BATCH, seed=3)
        saved.update(flat_state(trainer, name))
        saved[f"{name}/losses"] = np.array([h["step_loss"] for h in history])
        saved[f"{name}/samples"] = np.array([h["samples"] for h in history])
    if comm.rank == 0:
        np.savez(out, **saved)


def sync_batchnorm(comm, out):
    """One epoch of batches of 4 per rank, with and without sync_batchnorm."""
    saved = {}
    for sync in (True, False):
        trainer = onnxgrad.Trainer(onnxgrad.load(bn_model()), optimizer=onnxgrad.SGD(lr=0.1),
                                   comm=comm, sync_batchnorm=sync)
        trainer.fit(bn_data(), epochs=1, batch_size=4, seed=3)
        saved.update(flat_state(trainer, "sync" if sync else "local"))
    if comm.rank == 0:
        np.savez(out, **saved)


def fail(comm, out):
    """Rank 1 raises after 3 steps; rank 0 would step for minutes."""
    with open(os.path.join(out, f"rank{comm.rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    feeds, target = mlp_data()
    trainer = onnxgrad.Trainer(onnxgrad.load(mlp_model((6, 16, 3))), comm=comm)
    started = time.monotonic()
    for step in range(100_000):
        if comm.rank == 1 and step == 3:
            raise RuntimeError("boom on rank 1 at step 3")
        trainer.step({"x": feeds["x"][:BATCH]}, target[:BATCH])
        if time.monotonic() - started > 120:
            break


def mismatch(comm, out):
    """Rank 1 starts from other weights; each rank prints what it was told."""
    model = onnxgrad.load(mlp_model((6, 16, 3), seed=comm.rank))
    try:
        onnxgrad.Trainer(model, comm=comm)
    except onnxgrad.OnnxgradError as exc:
        print(f"refused on rank {comm.rank}: {exc}", flush=True)


def main():
    case, out = sys.argv[1], sys.argv[2]
    comm = MPIComm()
    with abort_on_error(comm):
        globals()[case](comm, out)


if __name__ == "__main__":
    main()
