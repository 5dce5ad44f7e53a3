"""Training-step speed and memory: onnxgrad against PyTorch eager, in one run.

For each model (see benchmarks/models.py) the same weights train in both:
one step is forward, mean cross-entropy, backward and an SGD(momentum=0.9)
update.  After a warm-up the two take turns in rounds of a quarter second,
the first step of each round untimed (``--interleave steps``: step by step,
all timed); the script prints the
median step time of each and the ratio onnxgrad / PyTorch, at each thread
count asked for (onnxgrad's kernel pool and PyTorch both get that many
threads; onnxgrad runs NumPy's BLAS single-threaded inside its pool).  With --memory it also measures, at each thread count, the peak
resident memory that a training run adds, each framework in a process of its
own.  The header names the BLAS, the kernel it runs on this CPU, whether
onnxgrad's compiled kernels run, and the cores.

    python benchmarks/bench_step.py                       # all models, 1 and 2 threads
    python benchmarks/bench_step.py --models mlp --threads 1 --seconds 5
    python benchmarks/bench_step.py --models resnet18 --profile
    python benchmarks/bench_step.py --device cuda         # CuPy against PyTorch CUDA
    python benchmarks/bench_step.py --device cuda --cuda-graphs on,off

On machines where OPENBLAS_CORETYPE forces an older kernel (e.g. Haswell on a
CPU that has AVX-512), take timings with it unset, so that OpenBLAS picks the
kernel a user's NumPy picks on that CPU:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_step.py

Needs the `bench` extra (torch) besides onnxgrad itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import torch
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import onnxgrad  # noqa: E402
from models import CASES, export  # noqa: E402
from onnxgrad.threads import available_cores  # noqa: E402

LR, MOMENTUM = 0.01, 0.9


def set_threads(n: int) -> None:
    """``n`` threads for PyTorch and for onnxgrad's kernel pool (0: leave them)."""
    if n:
        torch.set_num_threads(n)
        onnxgrad.set_num_threads(n)


def blas_name() -> str:
    """The BLAS libraries NumPy loaded and the kernel each runs, e.g. "openblas SkylakeX"."""
    libs = [f"{i['internal_api']} {i.get('architecture', '?')}" for i in threadpool_info()
            if i["user_api"] == "blas"]
    return ", ".join(libs) or "no BLAS found"


def compiled_name() -> str:
    """Whether onnxgrad's compiled CPU kernels run, and numba's version."""
    from onnxgrad.ops import compiled

    return f"kernels {compiled.status()}"


def setup(name: str, device: str, onnx_path: str | None = None, cuda_graphs: bool = True):
    """Both frameworks' trainers for ``name`` with the same initial weights."""
    case = CASES[name]
    torch.manual_seed(0)
    net = case.factory()
    gen = torch.Generator().manual_seed(1)
    x = case.make_input(gen)
    y = torch.randint(0, case.classes, (case.batch,), generator=gen)
    proto = onnx.load(onnx_path) if onnx_path else onnx.load_from_string(export(net, x))
    model = onnxgrad.load(proto)
    trainer = onnxgrad.Trainer(model, loss="cross_entropy",
                               optimizer=onnxgrad.SGD(lr=LR, momentum=MOMENTUM), device=device,
                               cuda_graphs=cuda_graphs)
    xn, yn = x.numpy(), y.numpy()
    tdev = torch.device("cuda" if device == "cuda" else "cpu")
    net = net.to(tdev).train()
    xt, yt = x.to(tdev), y.to(tdev)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    loss_fn = torch.nn.CrossEntropyLoss()

    def onnxgrad_step():
        return trainer.step({"input": xn}, yn)

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(xt), yt)
        loss.backward()
        opt.step()
        return loss.item()  # the same host synchronisation onnxgrad's step does

    return trainer, onnxgrad_step, torch_step


#: Seconds each framework runs per round when steps alternate in rounds.
ROUND_SECONDS = 0.25


def time_pair(step_a, step_b, warmup: float, seconds: float,
              interleave: str = "rounds") -> tuple[list[float], list[float]]:
    """Step times of two training steps that take turns on the machine.

    ``rounds``: each framework runs for :data:`ROUND_SECONDS` (two steps at least)
    at a time, and the first step after a switch is not timed: PyTorch's OpenMP
    threads spin for a while after its steps (onnxgrad's pool threads block), and
    that step absorbs the other framework's spinning threads and cache contents.
    ``steps``: one step of each in turn, all timed."""
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        step_a()
        step_b()
    a, b = [], []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or min(len(a), len(b)) < 5:
        if interleave == "steps":
            t0 = time.perf_counter()
            step_a()
            t1 = time.perf_counter()
            step_b()
            t2 = time.perf_counter()
            a.append(t1 - t0)
            b.append(t2 - t1)
            continue
        for step, times in ((step_a, a), (step_b, b)):
            step()  # not timed: the first step after the other framework's
            stop = time.perf_counter() + ROUND_SECONDS
            while True:
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
                if t0 >= stop:
                    break
    return a, b


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child_memory(name: str, framework: str, onnx_path: str, steps: int, threads: int) -> None:
    """Peak resident memory added by ``steps`` training steps (printed as JSON)."""
    with threadpool_limits(threads):
        set_threads(threads)
        _, og_step, torch_step = setup(name, "cpu", onnx_path)
        step = og_step if framework == "onnxgrad" else torch_step
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark
            f.write("5")
        for _ in range(steps):
            step()
        peak = _rss_kib("VmHWM")
    print(json.dumps({"added_mib": (peak - before) / 1024}))


def memory(name: str, threads: list[int], steps: int = 3) -> dict[int, dict[str, float]]:
    """Peak memory added by a training run, by thread count, then by framework."""
    case = CASES[name]
    torch.manual_seed(0)
    net = case.factory()
    x = case.make_input(torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.onnx")
        with open(path, "wb") as f:
            f.write(export(net, x))
        return {n: {framework: child_run(name, framework, path, steps, n)
                    for framework in ("onnxgrad", "torch")} for n in threads}


def child_run(name: str, framework: str, path: str, steps: int, threads: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child-memory", name, framework, path,
                          str(steps), str(threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["added_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (CPU)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per case")
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds of timing per case")
    parser.add_argument("--interleave", default="rounds", choices=["rounds", "steps"],
                        help="rounds: each framework runs %.2f s at a time, the first step after "
                             "a switch untimed; steps: one step of each in turn, all timed"
                             % ROUND_SECONDS)
    parser.add_argument("--memory", action="store_true", help="also measure peak training memory (CPU)")
    parser.add_argument("--profile", action="store_true", help="print onnxgrad's time by op type")
    parser.add_argument("--torch-fp32-conv", action="store_true",
                        help="PyTorch's convolutions in full float32 (its default on CUDA is "
                             "TF32, which onnxgrad does not use)")
    parser.add_argument("--cuda-graphs", default="on",
                        help="on, off or on,off: record onnxgrad's steps as CUDA graphs (cuda)")
    parser.add_argument("--child-memory", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        name, framework, path, steps, threads = args.child_memory
        child_memory(name, framework, path, int(steps), int(threads))
        return

    if args.torch_fp32_conv:
        torch.backends.cudnn.allow_tf32 = False
    names = [m for m in args.models.split(",") if m]
    threads = [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [0]
    modes = [m == "on" for m in args.cuda_graphs.split(",")] if args.device == "cuda" else [True]
    print(f"onnxgrad {onnxgrad.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
          + (", PyTorch convolutions " + ("float32" if args.torch_fp32_conv else "TF32 (default)")
             if args.device == "cuda" else "")
          + f", BLAS {blas_name()}, {compiled_name()}, {available_cores()} cores, "
          + ("steps alternate in rounds" if args.interleave == "rounds" else "steps alternate"))
    column = "graphs" if args.device == "cuda" else "threads"
    print(f"{'model':<12} {column:>7} {'onnxgrad ms':>12} {'torch ms':>10} {'ratio':>7}")
    for name in names:
        for n, graphs in [(n, g) for n in threads for g in modes]:
            with threadpool_limits(n or None):
                set_threads(n)
                trainer, og_step, torch_step = setup(name, args.device, cuda_graphs=graphs)
                a, b = time_pair(og_step, torch_step, args.warmup, args.seconds, args.interleave)
                ma, mb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
                label = ("on" if graphs else "off") if args.device == "cuda" else n
                print(f"{name:<12} {label:>7} {ma:12.2f} {mb:10.2f} {ma / mb:7.2f}", flush=True)
                if trainer.graphs is not None and trainer.graphs.refused:
                    print("\n".join(trainer.graphs.describe()), flush=True)
                if args.profile:
                    trainer.profile = onnxgrad.Profile()
                    for _ in range(5):
                        og_step()
                    print(trainer.profile.report(), flush=True)
                    trainer.profile = None
    if args.memory and args.device == "cpu":
        print(f"\n{'model':<12} {'threads':>7} {'onnxgrad MiB':>13} {'torch MiB':>10} {'ratio':>7}"
              f"   (peak memory a training run adds)")
        for name in names:
            for n, m in memory(name, threads).items():
                print(f"{name:<12} {n:>7} {m['onnxgrad']:13.1f} {m['torch']:10.1f} "
                      f"{m['onnxgrad'] / m['torch']:7.2f}", flush=True)


if __name__ == "__main__":
    main()
