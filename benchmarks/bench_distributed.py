"""Data-parallel throughput: N processes under ``mpiexec -n N`` (one thread each) against
one process with one thread, training the same model at the same batch per process.

It prints the samples per second of each and the scaling efficiency: the N-process
throughput over N times the single process's (1.0 is perfect scaling).  Each run
times whole training steps (forward, backward, gradient all-reduce, SGD update)
between two barriers, after a warm-up.  A third row runs the N processes without
a communicator, each training alone: what the machine gives N processes, before
any communication.  Needs mpi4py and an MPI (``pip install 'onnxgrad[mpi]'``); no
PyTorch.

    python benchmarks/bench_distributed.py                      # mlp and cnn, 2 processes
    python benchmarks/bench_distributed.py --models mlp --steps 400 --processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

#: model -> (batch per process, input shape of one sample)
MODELS = {"mlp": (128, (784,)), "cnn": (64, (1, 28, 28))}


def build(name: str):
    """The model as an onnx.ModelProto: ``mlp`` 784-512-512-10 with ReLU; ``cnn`` two
    3×3 convolutions (8 and 16 channels, ReLU, 2×2 max-pool) and a linear layer."""
    rng = np.random.default_rng(0)
    inits, nodes = {}, []

    def weight(key, *shape):
        fan_in = int(np.prod(shape[1:]))
        inits[key] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        return key

    if name == "mlp":
        prev, sizes = "x", (784, 512, 512, 10)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            out = "logits" if i == len(sizes) - 2 else f"z{i}"
            inits[f"b{i}"] = np.zeros(b, np.float32)
            nodes.append(helper.make_node("Gemm", [prev, weight(f"W{i}", b, a), f"b{i}"], [out],
                                          transB=1))
            if out != "logits":
                nodes.append(helper.make_node("Relu", [out], [f"h{i}"]))
                prev = f"h{i}"
    else:
        prev = "x"
        for i, (cin, cout) in enumerate(((1, 8), (8, 16))):
            inits[f"cb{i}"] = np.zeros(cout, np.float32)
            nodes += [helper.make_node("Conv", [prev, weight(f"cw{i}", cout, cin, 3, 3), f"cb{i}"],
                                       [f"c{i}"], pads=[1, 1, 1, 1]),
                      helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
                      helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], kernel_shape=[2, 2],
                                       strides=[2, 2])]
            prev = f"p{i}"
        inits["fb"] = np.zeros(10, np.float32)
        nodes += [helper.make_node("Flatten", [prev], ["f"]),
                  helper.make_node("Gemm", ["f", weight("fw", 10, 16 * 7 * 7), "fb"], ["logits"],
                                   transB=1)]
    shape = ["N", *MODELS[name][1]]
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def worker(name: str, steps: int, warmup: int, alone: bool) -> None:
    """One process's part: train (``alone``: without the others), time ``steps`` steps;
    rank 0 prints a JSON line."""
    import onnxgrad  # noqa: PLC0415 - after the thread count is set in the environment
    from onnxgrad import distributed  # noqa: PLC0415

    comm = distributed.from_launcher()
    rank, size = (0, 1) if comm is None else (comm.rank, comm.size)
    batch, sample = MODELS[name]
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((batch, *sample)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    trainer = onnxgrad.Trainer(onnxgrad.load(build(name)), comm=None if alone else comm,
                               optimizer=onnxgrad.SGD(lr=0.01, momentum=0.9))
    with distributed.abort_on_error(comm):
        for _ in range(warmup):
            trainer.step({"x": x}, y)
        if comm is not None:
            comm.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step({"x": x}, y)
        if comm is not None:
            comm.barrier()
        seconds = time.perf_counter() - start
    if rank == 0:
        print(json.dumps({"processes": size, "alone": alone,
                          "threads": onnxgrad.get_num_threads(),
                          "step_ms": 1e3 * seconds / steps,
                          "samples_per_s": steps * batch * size / seconds}), flush=True)


def run(argv: list[str], processes: int, alone: bool = False) -> dict:
    env = {**os.environ, "ONNXGRAD_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--worker", *argv, *(["--alone"] if alone else [])]
    if processes > 1:
        beside = pathlib.Path(sys.executable).parent / "mpiexec"
        mpiexec = str(beside) if beside.exists() else shutil.which("mpiexec")
        if mpiexec is None:
            sys.exit("mpiexec not found: pip install 'onnxgrad[mpi]' (mpi4py and MPICH)")
        command = [mpiexec, "-n", str(processes), *command]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
    parser.add_argument("--alone", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.steps, args.warmup, args.alone)
        return
    n = args.processes
    print(f"{'model':<6} {'batch':>5}  {'run':<22} {'step ms':>8}  {'samples/s':>10}  efficiency")
    for name in args.models.split(","):
        argv = ["--model", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        one, many, alone = run(argv, 1), run(argv, n), run(argv, n, alone=True)
        batch = MODELS[name][0]
        for result, label in ((one, "1 process"), (many, f"{n} processes"),
                              (alone, f"{n} processes, each alone")):
            efficiency = result["samples_per_s"] / (result["processes"] * one["samples_per_s"])
            print(f"{name:<6} {batch:>5}  {label:<22} {result['step_ms']:>8.2f}  "
                  f"{result['samples_per_s']:>10.0f}  {efficiency:.2f}")


if __name__ == "__main__":
    main()
