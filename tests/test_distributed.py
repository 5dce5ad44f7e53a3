"""Data-parallel training (onnxgrad.distributed): sharding, gradient buckets and
synchronized BatchNormalization in one process, then real runs of 2 ranks under
``mpiexec -n 2`` (tests/mpi_worker.py and ``onnxgrad train``).

The MPI tests need mpiexec and mpi4py (the ``test`` extra brings both: MPICH's
wheel and mpi4py); without them they skip, saying so, unless ONNXGRAD_REQUIRE_MPI
is set (as .ci/run sets it), under which they fail.  Ranks run one thread each.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

import onnxgrad
from onnxgrad import distributed, loop
from onnxgrad.tools.cli import main
from helpers import mlp_model
import mpi_worker as W

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
#: A hung run fails the test after this many seconds.
TIMEOUT = 60


class Loopback(distributed.Communicator):
    """``size`` ranks that all hold the same arrays (a sum is ``size`` times each), in one
    process; broadcasts keep this rank's values."""

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = rank, size

    def allreduce_async(self, array):
        array *= self.size
        return distributed.Pending()

    def broadcast(self, array, root=0):
        pass

    def barrier(self):
        pass


# -- one process -------------------------------------------------------------------------------
def _sampler(n: int, rank: int, size: int, order: list[int]) -> list[int]:
    """torch.utils.data.DistributedSampler's indices (drop_last=False), written out."""
    total = -(-n // size) * size
    padded = list(order)
    while len(padded) < total:
        padded += order[:total - len(padded)]
    return padded[rank:total:size]


@pytest.mark.parametrize("n,size", [(10, 2), (11, 2), (7, 3), (2, 4), (1, 2), (12, 4)])
def test_shard_is_distributed_samplers(n, size):
    order = list(np.random.default_rng(n).permutation(n))
    shards = [distributed.shard(np.array(order), r, size) for r in range(size)]
    for rank, got in enumerate(shards):
        assert got.tolist() == _sampler(n, rank, size, order)
    assert {len(s) for s in shards} == {-(-n // size)}
    assert set(np.concatenate(shards).tolist()) == set(range(n))


class _Recorder:
    """What loop.fit needs of a trainer, recording the rows of each batch."""

    def __init__(self, comm=None):
        self.comm, self.epoch, self.steps, self.loop_state = comm, 0, 0, {}
        self.stop_training, self.batches = False, []

    def step(self, feeds, target):
        self.batches.append(feeds["i"].tolist())
        self.steps += 1
        return 0.0

    def finish_accumulation(self):
        return False


def test_fit_shards_each_epoch_so_that_a_step_is_one_large_batch():
    """Each rank's step k takes B rows; together they are the single process's step k at
    batch 2B, in each epoch (one seeded permutation per epoch, the same on every rank)."""
    data = ({"i": np.arange(44)}, np.zeros(44, np.int64))
    ranks = [_Recorder(Loopback(r, 2)) for r in range(2)]
    for recorder in ranks:
        loop.fit(recorder, data, epochs=3, batch_size=4, seed=7)
    alone = _Recorder()
    loop.fit(alone, data, epochs=3, batch_size=8, seed=7)
    assert len(ranks[0].batches) == len(ranks[1].batches) == len(alone.batches) == 18
    for a, b, both in zip(ranks[0].batches, ranks[1].batches, alone.batches):
        assert sorted(a + b) == sorted(both)
    epochs = [sorted(sum(ranks[0].batches[6 * e:6 * e + 6], [])) for e in range(3)]
    assert epochs[0] != epochs[1]  # a new permutation each epoch
    assert not set(sum(ranks[0].batches[:6], [])) & set(sum(ranks[1].batches[:6], []))


def test_fit_refuses_batches_without_a_length():
    trainer = _Recorder(Loopback())
    batches = iter([({"i": np.arange(3)}, None)])
    with pytest.raises(onnxgrad.DataError, match="no length"):
        loop.fit(trainer, batches, epochs=1)


def test_buckets_follow_the_backward_order_within_their_size():
    comm = Loopback()
    comm.bucket_bytes = 64
    weights = {"a": np.zeros(4, np.float32), "b": np.zeros(20, np.float32),
               "c": np.zeros(3, np.float64), "d": np.zeros(2, np.float32),
               "e": np.zeros(5, np.float32)}
    reducer = distributed.GradientReducer(comm, np, weights)
    assert [b.names for b in reducer.buckets] == [["e", "d"], ["c"], ["b"], ["a"]]
    grads = {k: np.arange(v.size, dtype=v.dtype) + 1 for k, v in weights.items()}
    reducer.begin(np.float32(2.5))
    for name in ["e", "c", "d", "a"]:
        reducer.add(name, grads[name])
    assert reducer.buckets[0].pending is not None and reducer.buckets[1].pending is not None
    assert reducer.buckets[2].pending is None  # waits for "b"; "a" is full, but comes after
    with pytest.raises(onnxgrad.OnnxgradError, match="without the gradient of 'b'"):
        reducer.finish()
    reducer.add("b", grads["b"])
    averaged, loss = reducer.finish()
    assert loss == 2.5
    for name, grad in grads.items():
        np.testing.assert_array_equal(averaged[name], grad)
    reducer.begin(np.float32(1.0))  # laid out again in the order the gradients came
    assert [b.names for b in reducer.buckets] == [["e", "d", "a"], ["c"], ["b"]]
    averaged = reducer.average(grads)
    for name, grad in grads.items():
        np.testing.assert_array_equal(averaged[name], grad)


class _Spy(Loopback):
    """Records the gradients handed over and the all-reduces started, in order."""

    def __init__(self):
        super().__init__()
        self.events = []

    def allreduce_async(self, array):
        self.events.append(("reduce", array.size))
        return super().allreduce_async(array)


def test_buckets_start_while_the_backward_pass_runs():
    comm = _Spy()
    comm.bucket_bytes = 200
    trainer = onnxgrad.Trainer(onnxgrad.load(mlp_model((6, 16, 16, 3))), comm=comm)
    add = trainer._reducer.add
    trainer._reducer.add = lambda name, grad: (comm.events.append(("grad", name)),
                                               add(name, grad))
    feeds, target = W.mlp_data()
    for step in range(2):
        comm.events.clear()
        trainer.step({"x": feeds["x"][:8]}, target[:8])
        kinds = [kind for kind, _ in comm.events]
        assert kinds[0] == "reduce"  # the loss, before the first gradient
        first_bucket = kinds.index("reduce", 1)
        last_gradient = len(kinds) - 1 - kinds[::-1].index("grad")
        assert first_bucket < last_gradient, comm.events
        assert kinds.count("reduce") == 1 + len(trainer._reducer.buckets) >= 4


def _trainers(model, comm, optimizer, sync_batchnorm=False, **options):
    """A trainer without a communicator and one with ``comm``; ``optimizer()`` makes
    each one's optimizer."""
    plain = onnxgrad.Trainer(onnxgrad.load(model), optimizer=optimizer(), **options)
    ranked = onnxgrad.Trainer(onnxgrad.load(model), optimizer=optimizer(), comm=comm,
                              sync_batchnorm=sync_batchnorm, **options)
    return plain, ranked


@pytest.mark.parametrize("options", [{}, {"sync_batchnorm": True}])
def test_one_rank_trains_as_one_process(options):
    """Through the communicator (buckets, averaged loss, synchronized BatchNormalization
    on one rank), steps equal a trainer's without one."""
    comm = Loopback()
    comm.bucket_bytes = 100
    plain, ranked = _trainers(W.bn_model(), comm, lambda: onnxgrad.Adam(lr=0.01), seed=1,
                              **options)
    assert len(ranked._reducer.buckets) > 1
    feeds, target = W.bn_data()
    for step in range(3):
        rows = slice(8 * step, 8 * step + 8)
        a = plain.step({"x": feeds["x"][rows]}, target[rows])
        b = ranked.step({"x": feeds["x"][rows]}, target[rows])
        assert b == pytest.approx(a, rel=1e-6)
    for name, value in plain.model.parameters().items():
        np.testing.assert_allclose(ranked.model.parameters()[name], value, rtol=2e-5, atol=1e-6,
                                   err_msg=name)
    grads = ranked.gradients({"x": feeds["x"][:8]}, target[:8])
    for name, value in plain.gradients({"x": feeds["x"][:8]}, target[:8]).items():
        np.testing.assert_allclose(grads[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    assert ranked.evaluate([({"x": feeds["x"]}, target)])["loss"] == pytest.approx(
        plain.evaluate([({"x": feeds["x"]}, target)])["loss"], rel=1e-5)


def test_sync_batchnorm_rewrites_the_training_graph():
    trainer = onnxgrad.Trainer(onnxgrad.load(W.bn_model()), comm=Loopback(), sync_batchnorm=True)
    ops = {n.op_type for n in trainer.graph.nodes}
    assert {"SyncBatchNormalization", "SyncBatchNormalizationGrad"} <= ops
    assert not {"BatchNormalization", "BatchNormalizationGrad"} & ops


def test_clipping_and_accumulation_average_over_ranks():
    plain, ranked = _trainers(mlp_model((6, 16, 3)), Loopback(),
                              lambda: onnxgrad.SGD(lr=0.5, momentum=0.9))
    for trainer in (plain, ranked):
        trainer.clip_grad_norm, trainer.accumulate = 0.1, 2
    feeds, target = W.mlp_data()
    for step in range(4):
        rows = slice(8 * step, 8 * step + 8)
        assert ranked.step({"x": feeds["x"][rows]}, target[rows]) == pytest.approx(
            plain.step({"x": feeds["x"][rows]}, target[rows]), rel=1e-6)
    for name, value in plain.model.parameters().items():
        np.testing.assert_allclose(ranked.model.parameters()[name], value, rtol=1e-5, atol=1e-7)


def test_misuse_is_refused_clearly():
    model = onnxgrad.load(mlp_model())
    with pytest.raises(onnxgrad.OnnxgradError, match="sync_batchnorm=True .* needs comm="):
        onnxgrad.Trainer(model, sync_batchnorm=True)
    with pytest.raises(onnxgrad.OnnxgradError, match="comm must be an onnxgrad.distributed"):
        onnxgrad.Trainer(model, comm=object())


@pytest.mark.parametrize("form", ["bytes", "tuple"])
def test_nccl_unique_ids_cross_mpi_in_the_form_cupy_gives(form):
    """CuPy 14 gives NCCL's unique id as 128 bytes, earlier CuPy as a tuple of 128 signed
    ints; the other ranks hand NcclCommunicator the same form, with the same values."""
    raw = bytes(np.random.default_rng(0).integers(0, 256, 128, dtype=np.uint8))
    unique = raw if form == "bytes" else tuple(int(v) for v in np.frombuffer(raw, np.int8))
    sent = distributed._unique_id_slots(unique)
    received = distributed._unique_id_slots(None)
    received[:] = sent  # what the broadcast does
    assert distributed._unique_id(received) == unique
    assert type(distributed._unique_id(received)) is type(unique)


def test_ranks_without_mpi4py_get_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py raises ImportError
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "1")
    with pytest.raises(onnxgrad.OnnxgradError, match=r"one of 2 ranks \(PMI_SIZE=2\).*"
                                                     r"needs mpi4py.*onnxgrad\[mpi\]"):
        distributed.MPIComm()
    result = CliRunner().invoke(main, ["train", "models/digits_mlp.onnx", "--data",
                                       "models/digits_train.npz", "--out",
                                       str(tmp_path / "t.onnx")])
    assert result.exit_code == 1
    assert "Error: rank 1: this process is one of 2 ranks (PMI_SIZE=2)" in result.output
    assert "pip install 'onnxgrad[mpi]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "t.onnx").exists()


# -- two ranks under mpiexec -----------------------------------------------------------------
def _mpiexec() -> str:
    """mpiexec of the MPI mpi4py uses: MPICH's wheel puts it beside the interpreter."""
    beside = pathlib.Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    missing = [what for what, ok in (("mpiexec", found), ("mpi4py",
                                      importlib.util.find_spec("mpi4py"))) if not ok]
    if missing:
        why = (f"{' and '.join(missing)} not installed: the test extra brings them "
               "(pip install '.[test]': mpi4py and MPICH's wheel, which has no Windows build)")
        if os.environ.get("ONNXGRAD_REQUIRE_MPI"):
            pytest.fail(f"{why}; ONNXGRAD_REQUIRE_MPI is set")
        pytest.skip(why)
    return found


def _launch(*commands: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``mpiexec -n 1 CMD0 : -n 1 CMD1`` (one command: ``-n 2 CMD``), one thread per rank."""
    argv = [_mpiexec()]
    if len(commands) == 1:
        argv += ["-n", "2", *commands[0]]
    else:
        for i, command in enumerate(commands):
            argv += ([":"] if i else []) + ["-n", "1", *command]
    env = {**os.environ, "ONNXGRAD_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("ONNXGRAD_DEBUG", None)
    try:
        return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(argv)} hung for {timeout} s; output: {exc.stdout} {exc.stderr}")


def _worker(case: str, out) -> subprocess.CompletedProcess:
    result = _launch([sys.executable, str(TESTS / "mpi_worker.py"), case, str(out)])
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "onnxgrad.tools.cli", "train", *args]


def _assert_states_equal(got, expected: dict, prefix: str, rtol: float, atol: float):
    for name, value in expected.items():
        np.testing.assert_allclose(got[f"{prefix}/{name}"], value, rtol=rtol, atol=atol,
                                   err_msg=f"{prefix}/{name}")
    stored = [k for k in got.files if k.split("/")[:2] in ([prefix, "weights"],
                                                           [prefix, "optimizer"])]
    assert sorted(stored) == sorted(f"{prefix}/{k}" for k in expected)


def test_two_ranks_at_batch_b_equal_one_process_at_2b(tmp_path):
    """Weights and optimizer state after 12 steps of SGD with momentum and of AdamW, and
    the losses, within float32 rounding."""
    out = tmp_path / "ranks.npz"
    _worker("equivalence", out)
    got = np.load(out)
    for name, optimizer in W.optimizers().items():
        trainer = onnxgrad.Trainer(onnxgrad.load(mlp_model((6, 16, 3))), optimizer=optimizer,
                                   seed=5)
        history = trainer.fit(W.mlp_data(), epochs=W.EPOCHS, batch_size=2 * W.BATCH, seed=3)
        assert trainer.steps == 12
        expected = {k.split("/", 1)[1]: v for k, v in W.flat_state(trainer, name).items()}
        assert any("/exp_avg_sq" in k or "/momentum_buffer" in k for k in expected)
        _assert_states_equal(got, expected, name, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[f"{name}/losses"], [h["step_loss"] for h in history],
                                   rtol=1e-6)
        assert got[f"{name}/samples"].tolist() == [W.SAMPLES] * W.EPOCHS


def test_sync_batchnorm_uses_the_statistics_of_both_ranks(tmp_path):
    """Running statistics and weights after 4 steps equal one process's at twice the batch
    with sync_batchnorm; without it, each rank's own batch statistics differ."""
    out = tmp_path / "bn.npz"
    _worker("sync_batchnorm", out)
    got = np.load(out)
    trainer = onnxgrad.Trainer(onnxgrad.load(W.bn_model()), optimizer=onnxgrad.SGD(lr=0.1))
    trainer.fit(W.bn_data(), epochs=1, batch_size=8, seed=3)
    expected = {k.split("/", 1)[1]: v for k, v in W.flat_state(trainer, "x").items()}
    assert trainer.steps == 4 and "weights/mean" in expected
    _assert_states_equal(got, expected, "sync", rtol=1e-5, atol=1e-6)
    for name in ("weights/mean", "weights/var"):
        assert np.abs(got[f"local/{name}"] - expected[name]).max() > 1e-3


def test_a_failing_rank_ends_every_rank(tmp_path):
    started = time.monotonic()
    result = _launch([sys.executable, str(TESTS / "mpi_worker.py"), "fail", str(tmp_path)])
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "Error: rank 1 of 2: RuntimeError: boom on rank 1 at step 3" in result.stderr
    assert elapsed < 20, f"took {elapsed:.1f} s"
    pids = [int((tmp_path / f"rank{rank}.pid").read_text()) for rank in range(2)]
    deadline = time.monotonic() + 5  # mpiexec may return while its kill takes effect
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_running, pids)), f"ranks {pids} still run"


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (an ended one that no parent has reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def test_ranks_with_different_models_are_refused(tmp_path):
    result = _worker("mismatch", tmp_path)
    assert ("refused on rank 1: onnxgrad.Trainer: rank 1 was started with a different model "
            "than rank 0 (model here: \"") in result.stdout
    assert ("refused on rank 0: onnxgrad.Trainer: ranks were started with a different model, "
            "data or options than rank 0 (rank 1: model)") in result.stdout


def test_cli_ranks_with_different_options_are_refused(tmp_path):
    common = ["models/digits_mlp.onnx", "--data", "models/digits_train.npz", "--out",
              str(tmp_path / "t.onnx")]
    result = _launch(_cli(*common, "--lr", "0.01"), _cli(*common, "--lr", "0.02"))
    assert result.returncode != 0
    # Both ranks refuse; the first to end the job prints its side (the other may not).
    assert ("Error: rank 1 of 2: onnxgrad train: rank 1 was started with a different --lr "
            "than rank 0 (--lr here: 0.02)" in result.stderr or
            "Error: rank 0 of 2: onnxgrad train: ranks were started with a different model, "
            "data or options than rank 0 (rank 1: --lr)" in result.stderr), result.stderr
    assert not (tmp_path / "t.onnx").exists()


def test_cli_error_on_one_rank_ends_the_run(tmp_path):
    """Rank 1's targets lie outside the model's classes (same shapes: the start-up check
    passes); its error in the first step ends rank 0, which waits in that step, with the
    message of rank 1."""
    data = dict(np.load(ROOT / "models/digits_train.npz"))
    data["label"] = np.full_like(data["label"], 12)
    np.savez(tmp_path / "bad.npz", **data)
    out = tmp_path / "t.onnx"
    started = time.monotonic()
    result = _launch(_cli("models/digits_mlp.onnx", "--data", "models/digits_train.npz",
                          "--out", str(out), "--quiet"),
                     _cli("models/digits_mlp.onnx", "--data", str(tmp_path / "bad.npz"),
                          "--out", str(out), "--quiet"))
    assert result.returncode != 0, result.stderr
    assert "Error: rank 1 of 2: " in result.stderr, result.stderr
    assert "target class indices must lie in [0, 10)" in result.stderr, result.stderr
    # Rank 0's data is good: if it speaks at all (its collective may fail before the
    # launcher ends it), it is not about the data.
    rank0 = [line for line in result.stderr.splitlines() if line.startswith("Error: rank 0")]
    assert not any("target class" in line for line in rank0), result.stderr
    assert time.monotonic() - started < 20
    assert not out.exists()


def test_cli_trains_on_two_ranks_and_resumes(tmp_path):
    """Rank 0 alone prints and writes; a run resumed from its checkpoint (which rank 0
    reads and broadcasts) ends as the uninterrupted one, bit for bit."""
    common = ["models/digits_mlp.onnx", "--data", "models/digits_train.npz", "--val",
              "models/digits_test.npz", "--batch-size", "16", "--optimizer", "sgd",
              "--momentum", "0.9", "--quiet"]
    whole = _launch(_cli(*common, "--epochs", "2", "--out", str(tmp_path / "whole.onnx"),
                         "--log", str(tmp_path / "log.csv")))
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.count("saved ") == 1 and whole.stdout.count("before:") == 1
    assert "of batch size 16 per rank on 2 ranks (32 samples per step)" in whole.stdout
    assert whole.stderr == ""
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 3  # header, 2 epochs
    first = _launch(_cli(*common, "--epochs", "1", "--out", str(tmp_path / "first.onnx"),
                         "--checkpoint-dir", str(tmp_path / "ckpt")))
    assert first.returncode == 0, first.stderr
    resumed = _launch(_cli(*common, "--epochs", "2", "--out", str(tmp_path / "resumed.onnx"),
                           "--resume", str(tmp_path / "ckpt")))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a = onnxgrad.load(tmp_path / "whole.onnx").parameters()
    b = onnxgrad.load(tmp_path / "resumed.onnx").parameters()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_cli_sync_batchnorm_matches_one_process_at_twice_the_batch(tmp_path):
    """The digits CNN (Conv, BatchNormalization, ...) on an even number of samples: 2 ranks
    at batch 16 with --sync-batchnorm end where one process at batch 32 does."""
    data = dict(np.load(ROOT / "models/digits_train.npz"))
    np.savez(tmp_path / "even.npz", **{k: v[:1400] for k, v in data.items()})
    common = ["models/digits_cnn.onnx", "--data", str(tmp_path / "even.npz"), "--epochs", "1",
              "--optimizer", "sgd", "--lr", "0.05", "--quiet"]
    ranks = _launch(_cli(*common, "--batch-size", "16", "--sync-batchnorm", "--out",
                         str(tmp_path / "ranks.onnx")))
    assert ranks.returncode == 0, ranks.stderr
    alone = CliRunner().invoke(main, ["train", *common, "--batch-size", "32", "--out",
                                      str(tmp_path / "alone.onnx")])
    assert alone.exit_code == 0, alone.output
    a = onnxgrad.load(tmp_path / "alone.onnx").parameters()
    b = onnxgrad.load(tmp_path / "ranks.onnx").parameters()
    assert "features.1.running_var" in a  # the BatchNormalization's statistics
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5, err_msg=name)


# -- NCCL, on a GPU ----------------------------------------------------------------------------
NCCL_SCRIPT = """
import numpy as np, onnxgrad
from onnxgrad.distributed import NCCLComm
from helpers import mlp_model
import mpi_worker as W
comm = NCCLComm()
cupy = onnxgrad.backend.get_backend("cuda").xp
a = cupy.arange(5, dtype=cupy.float32)
comm.allreduce(a); comm.broadcast(a)
h = np.arange(3.0); comm.allreduce(h)
assert cupy.asnumpy(a).tolist() == [0, 1, 2, 3, 4] and h.tolist() == [0, 1, 2]
for model, options in ((mlp_model((6, 16, 3)), {}), (W.bn_model(), {"sync_batchnorm": True})):
    comm.bucket_bytes = 256
    plain = onnxgrad.Trainer(onnxgrad.load(model), device="cuda", optimizer=onnxgrad.AdamW(lr=0.01))
    ranked = onnxgrad.Trainer(onnxgrad.load(model), device="cuda", comm=comm,
                              optimizer=onnxgrad.AdamW(lr=0.01), **options)
    feeds, target = W.bn_data() if options else W.mlp_data()
    for step in range(3):
        rows = slice(8 * step, 8 * step + 8)
        la = plain.step({"x": feeds["x"][rows]}, target[rows])
        lb = ranked.step({"x": feeds["x"][rows]}, target[rows])
        assert abs(la - lb) <= 1e-5 * abs(la), (la, lb)
    p, r = plain.model.parameters(), ranked.model.parameters()
    for k in p:
        np.testing.assert_allclose(r[k], p[k], rtol=1e-4, atol=1e-5, err_msg=k)
print("nccl ok")
"""


@pytest.mark.gpu
def test_nccl_one_rank_trains_as_one_process():
    """NCCLComm's calls into cupy.cuda.nccl (unique id over MPI, all-reduce and broadcast
    on its stream, NumPy arrays through the device) and a trainer on it, on one GPU."""
    _mpiexec()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS),
                                                        os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", NCCL_SCRIPT], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "nccl ok" in result.stdout, result.stdout + result.stderr
