"""Data-parallel training: one process per rank, gradients averaged between them.

Every rank holds the whole model and trains on its own share of each batch.
A :class:`Communicator` moves arrays between the ranks (all-reduce, broadcast,
barrier): :class:`MPIComm` over MPI (mpi4py), for CPUs and clusters, and
:class:`NCCLComm` over NCCL (CuPy's ``cupy.cuda.nccl``), one process per GPU,
which MPI starts and whose unique id it broadcasts.  A trainer given one
(``Trainer(model, ..., comm=MPIComm())``) does this in each step:

- the executor hands over each gradient as soon as it is complete; a
  :class:`GradientReducer` copies it, divided by the number of ranks ``N``,
  into a bucket and starts the bucket's non-blocking all-reduce (a sum) as
  soon as the bucket is full, while the backward pass goes on (buckets start
  in a fixed order, the same on every rank);
- so each rank updates with the average of the ranks' gradients.  A mean loss
  already averages over the local batch, so with equal local batches that is
  the gradient of the mean loss over the union of the ranks' batches: ``N``
  ranks at batch ``B`` take the step one process takes at batch ``N·B``, up to
  float rounding (a loss whose mean has a denominator of its own per batch,
  with ``ignore_index`` or class weights, is averaged per rank, as in DDP);
- the loss is averaged with them, and a loss that is not finite on any rank
  stops every rank before anything is updated.

Launch with ``mpiexec -n N python script.py`` (or ``mpiexec -n N onnxgrad
train ...``).  Every rank must build its trainer from the same model and
options: the trainer compares their hashes at start-up and refuses to go on
otherwise (:func:`check_same`).  A step is a collective call: every rank calls
``step`` (and ``gradients``) the same number of times.  An exception on one
rank leaves the others waiting in their next collective; :func:`abort_on_error`
ends them all (MPI Abort) after printing the rank's message, as ``onnxgrad
train`` does.

With ``sync_batchnorm=True`` BatchNormalization normalises with the statistics
of the union of the ranks' batches (:func:`use_sync_batchnorm`); by default each
rank uses its own batch's, as PyTorch's DDP does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import traceback
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from onnxgrad.autodiff import PRIVATE_DOMAIN, PRIVATE_OPSET
from onnxgrad.errors import ModelError, OnnxgradError
from onnxgrad.ir import Graph
from onnxgrad.ops import lookup

#: Gradient bytes per bucket, at most (a larger gradient has a bucket of its own).
BUCKET_BYTES = 1 << 20

#: Environment variables in which MPI launchers give the number of ranks they started.
LAUNCHER_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
LAUNCHER_RANK = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


# -- communicators ---------------------------------------------------------------------------
class Pending:
    """A collective operation in flight."""

    def wait(self) -> None:
        """Return when the result is in the array (on a GPU: once work queued after this
        call on the stream that started the operation sees it)."""

    def done(self) -> bool:
        """Whether it has finished (with MPI this also lets it progress)."""
        return True


class Communicator:
    """The ranks of a data-parallel job and collective operations between them.

    Arrays are reduced and broadcast in place.  Each implementation works on
    the arrays of its device and also accepts the other kind (copied through
    the host or the device).  Every rank must call the same collectives in the
    same order.
    """

    #: This process's rank, and the number of ranks.
    rank: int = 0
    size: int = 1
    #: Gradient bytes per bucket of a trainer using this communicator.
    bucket_bytes: int = BUCKET_BYTES

    def allreduce(self, array: Any) -> None:
        """Sum ``array`` over the ranks, in place."""
        self.allreduce_async(array).wait()

    def allreduce_async(self, array: Any) -> Pending:  # pragma: no cover - abstract
        """Start summing ``array`` over the ranks, in place; the array must not be read
        or written until the returned operation's ``wait``."""
        raise NotImplementedError

    def broadcast(self, array: Any, root: int = 0) -> None:  # pragma: no cover - abstract
        """Give every rank ``root``'s values of ``array``, in place."""
        raise NotImplementedError

    def barrier(self) -> None:  # pragma: no cover - abstract
        """Return when every rank has called it."""
        raise NotImplementedError

    def abort(self, code: int = 1) -> None:  # pragma: no cover - abstract
        """End every rank's process with status ``code``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rank {self.rank} of {self.size}>"


class _MPIPending(Pending):
    def __init__(self, request, finish: Callable[[], None] | None = None):
        self._request, self._finish = request, finish

    def wait(self) -> None:
        self._request.Wait()
        if self._finish is not None:
            self._finish()
            self._finish = None

    def done(self) -> bool:
        return bool(self._request.Test())


class MPIComm(Communicator):
    """MPI through mpi4py: ``comm`` is an ``mpi4py.MPI.Comm`` (default ``COMM_WORLD``).

    Works on NumPy arrays; CuPy arrays are copied through the host (for GPUs,
    :class:`NCCLComm` reduces on the device).  Needs mpi4py (``pip install
    'onnxgrad[mpi]'``, or mpi4py built against a cluster's own MPI).
    """

    def __init__(self, comm: Any = None):
        self.MPI = _mpi4py()
        self.comm = self.MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        launched = launched_size()
        if comm is None and launched > 1 and self.size == 1:
            version = self.MPI.Get_library_version().splitlines()[0].strip()
            raise OnnxgradError(
                f"the launcher started {launched} ranks ({_launcher_variable()}), but mpi4py's MPI "
                f"({version}) sees this process alone: mpiexec comes from another MPI than "
                "mpi4py's; launch with the mpiexec of the MPI mpi4py was built for")
        self._local: tuple[int, int] | None = None

    @property
    def local(self) -> tuple[int, int]:
        """This rank's index among the ranks on its machine, and their number."""
        if self._local is None:
            node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
            self._local = (node.Get_rank(), node.Get_size())
            node.Free()
        return self._local

    def allreduce(self, array: Any) -> None:
        host, back = _on_host(array)
        self.comm.Allreduce(self.MPI.IN_PLACE, _contiguous(host), op=self.MPI.SUM)
        back()

    def allreduce_async(self, array: Any) -> Pending:
        host, back = _on_host(array)
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, _contiguous(host), op=self.MPI.SUM)
        return _MPIPending(request, back)

    def broadcast(self, array: Any, root: int = 0) -> None:
        host, back = _on_host(array)
        self.comm.Bcast(_contiguous(host), root=root)
        back()

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)


def _mpi4py():
    try:
        from mpi4py import MPI  # noqa: PLC0415 - an optional dependency
    except ImportError as exc:
        launched = launched_size()
        where = (f"this process is one of {launched} ranks ({_launcher_variable()}), and "
                 if launched > 1 else "")
        raise OnnxgradError(
            f"{where}data-parallel training needs mpi4py, which is not installed: pip install "
            "'onnxgrad[mpi]' (mpi4py and MPICH), or pip install mpi4py built against the "
            f"cluster's own MPI ({exc})") from None
    return MPI


def _contiguous(array: Any) -> Any:
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        raise OnnxgradError(f"collectives need contiguous arrays; got one of shape "
                            f"{list(array.shape)} with strides {list(array.strides)}")
    return array


def _on_host(array: Any) -> tuple[np.ndarray, Callable[[], None]]:
    """``array`` as a host array, and what copies the host's values back into it."""
    if isinstance(array, np.ndarray):
        return array, lambda: None
    host = array.get()  # a CuPy array: its device's work up to now is done first
    return host, lambda: array.set(host)


class _NCCLPending(Pending):
    def __init__(self, event, stream, finish: Callable[[], None] | None = None):
        self._event, self._stream, self._finish = event, stream, finish

    def wait(self) -> None:
        self._stream.wait_event(self._event)
        if self._finish is not None:
            self._event.synchronize()
            self._finish()
            self._finish = None

    def done(self) -> bool:
        return bool(self._event.done)


def _unique_id_slots(unique: Any) -> np.ndarray:
    """NCCL's unique id as MPI broadcasts it: its 128 bytes, then 1 where CuPy gives ids
    as ``bytes`` (CuPy 14) and 0 where as a tuple of ints (earlier CuPy).  ``unique`` is
    rank 0's id; the other ranks pass None and receive it."""
    slots = np.zeros(129, dtype=np.int64)
    if unique is not None:
        as_bytes = isinstance(unique, (bytes, bytearray))
        slots[:128] = np.frombuffer(bytes(unique), dtype=np.int8) if as_bytes else unique
        slots[128] = as_bytes
    return slots


def _unique_id(slots: np.ndarray) -> Any:
    """The id in the form this CuPy's ``NcclCommunicator`` takes (see _unique_id_slots)."""
    values = slots[:128]
    return values.astype(np.int8).tobytes() if slots[128] else tuple(int(v) for v in values)


class NCCLComm(Communicator):
    """NCCL between GPUs, one process (rank) per GPU, over CuPy arrays.

    ``mpi`` (default: a new :class:`MPIComm`) starts it: rank 0 makes NCCL's
    unique id and broadcasts it.  ``device`` is this rank's GPU (default: the
    rank's index among the ranks of its machine, modulo the GPUs there); it is
    made the current device, so create the communicator before the trainer.

    Collectives run on a stream of their own, in the order they are called, and
    wait for the work queued before them on the current stream; ``wait`` makes
    the current stream wait for them, without stopping the host.  NumPy arrays
    are copied through the device.
    """

    _TYPES = {"b": "NCCL_INT8", "B": "NCCL_UINT8", "i": "NCCL_INT32", "I": "NCCL_UINT32",
              "l": "NCCL_INT64", "q": "NCCL_INT64", "L": "NCCL_UINT64", "Q": "NCCL_UINT64",
              "e": "NCCL_FLOAT16", "f": "NCCL_FLOAT32", "d": "NCCL_FLOAT64"}

    def __init__(self, mpi: MPIComm | None = None, device: int | None = None):
        from onnxgrad.backend import get_backend, nccl_modules  # noqa: PLC0415

        self.mpi = MPIComm() if mpi is None else mpi
        self.rank, self.size = self.mpi.rank, self.mpi.size
        cupy, nccl = nccl_modules()
        if not getattr(nccl, "available", True):
            raise OnnxgradError("NCCLComm: this CuPy was built without NCCL; install the "
                                "NCCL library (pip install nvidia-nccl-cu12) or use MPIComm")
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDA driver missing or broken
            raise OnnxgradError(f"NCCLComm on rank {self.rank}: CuPy cannot reach a CUDA "
                                f"device ({exc})") from None
        if count < 1:
            raise OnnxgradError(f"NCCLComm on rank {self.rank}: no CUDA device was found")
        self.device = self.mpi.local[0] % count if device is None else int(device)
        if not 0 <= self.device < count:
            raise OnnxgradError(f"NCCLComm on rank {self.rank}: device {self.device} does not "
                                f"exist; this machine has {count} GPU(s)")
        # The device first: the CUDA backend makes its stream and cuBLAS handle on the
        # current device when first used.
        cupy.cuda.Device(self.device).use()
        get_backend("cuda")
        self._cupy, self._nccl = cupy, nccl
        uid = _unique_id_slots(nccl.get_unique_id() if self.rank == 0 else None)
        self.mpi.broadcast(uid)
        self.comm = nccl.NcclCommunicator(self.size, _unique_id(uid), self.rank)
        self._stream = cupy.cuda.Stream(non_blocking=True)

    def _start(self, array: Any, call: Callable[[Any, int, int], None]) -> Pending:
        cupy = self._cupy
        finish = None
        if isinstance(array, np.ndarray):
            host = array
            array = device = cupy.asarray(host)
            finish = lambda: device.get(out=host)  # noqa: E731
        _contiguous(array)
        kind = self._TYPES.get(array.dtype.char)
        if kind is None:
            raise OnnxgradError(f"NCCLComm: arrays of {array.dtype} cannot be reduced")
        current = cupy.cuda.get_current_stream()
        self._stream.wait_event(current.record())
        call(array, getattr(self._nccl, kind), self._stream.ptr)
        return _NCCLPending(self._stream.record(), current, finish)

    def allreduce_async(self, array: Any) -> Pending:
        return self._start(array, lambda a, kind, stream: self.comm.allReduce(
            a.data.ptr, a.data.ptr, a.size, kind, self._nccl.NCCL_SUM, stream))

    def broadcast(self, array: Any, root: int = 0) -> None:
        self._start(array, lambda a, kind, stream: self.comm.bcast(
            a.data.ptr, a.size, kind, root, stream)).wait()

    def barrier(self) -> None:
        self._stream.synchronize()
        self.mpi.barrier()

    def abort(self, code: int = 1) -> None:
        self.comm.abort()
        self.mpi.abort(code)


def launched_size() -> int:
    """The number of ranks an MPI launcher started this process among (1 if none did)."""
    for name in LAUNCHER_SIZE:
        text = os.environ.get(name, "").strip()
        if text.isdigit():
            return int(text)
    return 1


def _launcher_variable() -> str:
    return next((f"{n}={os.environ[n]}" for n in LAUNCHER_SIZE if n in os.environ), "")


def launched_rank() -> int | None:
    """This process's rank as the launcher gives it (None if no launcher did)."""
    for name in LAUNCHER_RANK:
        text = os.environ.get(name, "").strip()
        if text.isdigit():
            return int(text)
    return None


def from_launcher() -> MPIComm | None:
    """An :class:`MPIComm` of the ranks ``mpiexec`` started this process among, or None
    when it runs alone; a clear error when they are several and mpi4py is missing."""
    return MPIComm() if launched_size() > 1 else None


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, OnnxgradError) else f"{type(exc).__name__}: {exc}"


#: Seconds a failing rank waits between printing its message and ending every rank:
#: the launcher relays each rank's output through its own processes, and ending the
#: job at once can drop the message that says why.
ABORT_GRACE = 0.5


@contextlib.contextmanager
def abort_on_error(comm: Communicator | None,
                   describe: Callable[[BaseException], str] = _describe) -> Iterator[None]:
    """Run the block; if it raises, print ``Error: rank R of N: <message>`` on stderr and
    end every rank (MPI Abort), so that none waits forever in a collective.

    ``describe`` turns the exception into the message (by default: an onnxgrad error's
    own, else its type and text); with the environment variable ONNXGRAD_DEBUG set,
    the traceback is printed too.  The status is 1.  A ``SystemExit`` keeps its status
    (and its message, if it has one rather than a number) and Ctrl-C ends with 130,
    both without a message of their own.  With no communicator, or one rank, the
    exception goes on as it came.
    """
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - every failure must end every rank
        if comm is None or comm.size == 1 or (isinstance(exc, SystemExit) and not exc.code):
            raise
        code, message = 1, None
        if isinstance(exc, SystemExit):
            code = exc.code if isinstance(exc.code, int) else 1
            message = None if isinstance(exc.code, int) else str(exc.code)
        elif isinstance(exc, KeyboardInterrupt):
            code = 130
        else:
            message = describe(exc)
        stream = sys.__stderr__
        if os.environ.get("ONNXGRAD_DEBUG"):
            traceback.print_exception(exc, file=stream)
        if message is not None:
            stream.write(f"Error: rank {comm.rank} of {comm.size}: {message}\n")
        for output in (sys.stdout, sys.stderr, stream):
            output.flush()
        time.sleep(ABORT_GRACE)  # the launcher forwards output asynchronously
        comm.abort(code)
        os._exit(code)  # MPI_Abort may return before the launcher ends this process


# -- start-up check and data sharding ----------------------------------------------------------
def digest(value: Any) -> bytes:
    """sha256 of ``value``: bytes as they are, anything else as canonical JSON (values
    that JSON cannot hold by their ``repr``, which must not depend on the process)."""
    if not isinstance(value, bytes):
        value = json.dumps(value, sort_keys=True, default=repr).encode()
    return hashlib.sha256(value).digest()


def model_digest(model) -> str:
    """sha256 (hexadecimal) of a Model: its graph (the ModelProto without weights) and
    every initializer's name, type, shape and values."""
    h = hashlib.sha256(model._proto.SerializeToString(deterministic=True))
    for name, value in sorted(model._weights().items()):
        h.update(f"{name}:{value.dtype.str}:{list(value.shape)}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def check_same(comm: Communicator, items: Mapping[str, Any], where: str) -> None:
    """Refuse to go on unless every rank has the same ``items`` (name -> value; compared
    by :func:`digest`).  Raises :class:`OnnxgradError` on every rank, naming the ranks
    and items that differ from rank 0's; a collective call."""
    names = list(items)
    table = np.zeros((comm.size, len(names), 32), dtype=np.uint8)
    table[comm.rank] = [np.frombuffer(digest(items[k]), dtype=np.uint8) for k in names]
    comm.allreduce(table)
    differ = {r: [k for i, k in enumerate(names) if (table[r, i] != table[0, i]).any()]
              for r in range(1, comm.size)}
    differ = {r: keys for r, keys in differ.items() if keys}
    if not differ:
        return
    if comm.rank in differ:
        shown = "; ".join(f"{k} here: {_preview(items[k])}" for k in differ[comm.rank])
        raise OnnxgradError(f"{where}: rank {comm.rank} was started with a different "
                            f"{', '.join(differ[comm.rank])} than rank 0 ({shown}); every rank "
                            "must start with the same model, data and options")
    listed = "; ".join(f"rank {r}: {', '.join(keys)}" for r, keys in sorted(differ.items()))
    raise OnnxgradError(f"{where}: ranks were started with a different model, data or "
                        f"options than rank 0 ({listed}); every rank must start with the same")


def _preview(value: Any) -> str:
    if isinstance(value, bytes):
        return f"sha256 {hashlib.sha256(value).hexdigest()[:12]}"
    text = json.dumps(value, sort_keys=True, default=repr)
    return text if len(text) <= 120 else text[:117] + "..."


def shard(order: np.ndarray, rank: int, size: int) -> np.ndarray:
    """Rank ``rank``'s share of an epoch's sample ``order``, as PyTorch's DistributedSampler
    takes it: ``order`` repeated from its start up to a multiple of ``size``, then every
    ``size``-th sample from ``rank`` on.  Every rank gets the same number of samples."""
    total = -(-len(order) // size) * size
    return np.resize(order, total)[rank::size]


# -- gradient buckets -------------------------------------------------------------------------
class _Bucket:
    def __init__(self, dtype):
        self.dtype, self.names, self.size = dtype, [], 0
        self.buffer: Any = None
        self.missing = 0
        self.pending: Pending | None = None


class GradientReducer:
    """Averages a step's gradients over the ranks of ``comm``, in buckets.

    ``weights`` (name -> array) are the trained weights.  A step calls
    :meth:`begin`, then :meth:`add` for each gradient as the backward pass
    completes it, then :meth:`finish`.  The buckets hold gradients of one type
    each, up to ``comm.bucket_bytes``, in the order the gradients become
    complete, and a full bucket starts its all-reduce at once if every bucket
    before it has started (so that every rank starts them in the same order).
    Until the first step that order is guessed (the weights' reversed); that
    step's order, as rank 0 saw it, lays the buckets out from then on, as
    PyTorch's DDP rebuilds its buckets after the first iteration.
    """

    def __init__(self, comm: Communicator, xp: Any, weights: Mapping[str, Any]):
        self.comm, self.xp = comm, xp
        self.names = list(weights)
        #: name -> dtype, shape, size, and whether the weight is stored column-major (its
        #: gradient is kept so too, which the update and the copy read fastest)
        self._like = {name: (w.dtype, tuple(w.shape), w.size,
                             bool(w.flags.f_contiguous and not w.flags.c_contiguous))
                      for name, w in weights.items()}
        self._layout(self.names[::-1])
        self._loss = xp.zeros(1, dtype=np.float64)
        self._loss_pending: Pending | None = None
        self._next = 0
        self._arrival: list[str] = []
        self._learn = True  # lay the buckets out again after the first overlapped step
        self._seen: list[str] | None = None

    def _layout(self, order: list[str]) -> None:
        self.buckets: list[_Bucket] = []
        self._slots: dict[str, tuple[_Bucket, int, tuple]] = {}
        open_: dict[Any, _Bucket] = {}
        for name in order:
            dtype, shape, size, _ = self._like[name]
            bucket = open_.get(dtype)
            if bucket is None or (bucket.names and
                                  (bucket.size + size) * dtype.itemsize > self.comm.bucket_bytes):
                bucket = open_[dtype] = _Bucket(dtype)
                self.buckets.append(bucket)
            self._slots[name] = (bucket, bucket.size)
            bucket.names.append(name)
            bucket.size += size
        for bucket in self.buckets:
            bucket.buffer = self.xp.empty(bucket.size, dtype=bucket.dtype)
        self._views = {name: self._view(name) for name in order}

    def _view(self, name: str) -> Any:
        """``name``'s part of its bucket, shaped (and laid out) like the weight."""
        bucket, offset = self._slots[name]
        _, shape, size, fortran = self._like[name]
        part = bucket.buffer[offset:offset + size]
        return part.reshape(shape[::-1]).T if fortran else part.reshape(shape)

    @property
    def order(self) -> list[str]:
        """The gradients in the buckets' order."""
        return [name for bucket in self.buckets for name in bucket.names]

    def begin(self, loss: Any = None) -> None:
        """Start a step; ``loss`` (this rank's) is averaged with the gradients.  A step
        with a loss is one whose gradients come as the backward pass completes them."""
        if self._seen is not None:  # the first such step's order, as rank 0 saw it
            index = np.array([self.names.index(name) for name in self._seen], dtype=np.int64)
            self.comm.broadcast(index)
            self._seen = None
            order = [self.names[i] for i in index]
            if order != self.order:
                self._layout(order)
        for bucket in self.buckets:
            bucket.missing, bucket.pending = len(bucket.names), None
        self._next = 0
        self._arrival = []
        self._loss_pending = None
        if loss is not None:
            self._loss[...] = loss
            self._loss /= self.comm.size
            self._loss_pending = self.comm.allreduce_async(self._loss)

    def add(self, name: str, grad: Any) -> None:
        """Take ``name``'s complete gradient, divided by the number of ranks (exact for a
        power of two), so that the sum is the average; start every bucket that is
        ready in turn."""
        bucket = self._slots[name][0]
        self.xp.divide(grad, self.comm.size, out=self._views[name])
        bucket.missing -= 1
        self._arrival.append(name)
        while self._next < len(self.buckets) and not self.buckets[self._next].missing:
            ready = self.buckets[self._next]
            ready.pending = self.comm.allreduce_async(ready.buffer)
            self._next += 1
        for started in self.buckets[:self._next]:  # MPI progresses when asked
            if not started.pending.done():
                break

    def finish(self) -> tuple[dict[str, Any], float | None]:
        """Wait for every bucket; the averaged gradients (name -> array, views of the
        buckets, valid until the next step) and the averaged loss (None if not given)."""
        if self._next < len(self.buckets):
            late = [n for n in self.names if n not in self._arrival]
            raise OnnxgradError(f"rank {self.comm.rank}: the step ended without the gradient "
                                f"of {late[0]!r} ({len(late)} missing)")
        for bucket in self.buckets:
            bucket.pending.wait()
        grads = {name: self._views[name] for name in self.names}
        loss = None
        if self._loss_pending is not None:
            self._loss_pending.wait()
            loss = float(_to_host(self._loss)[0])
            if self._learn:
                self._learn, self._seen = False, list(self._arrival)
        return grads, loss

    def average(self, grads: Mapping[str, Any]) -> dict[str, Any]:
        """The average over the ranks of ``grads`` (every trained weight's), at once."""
        self.begin()
        for name in self.order:
            self.add(name, grads[name])
        return self.finish()[0]


def _to_host(array: Any) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else array.get()


# -- synchronized BatchNormalization ---------------------------------------------------------
def use_sync_batchnorm(graph: Graph, inference_nodes=frozenset()) -> list[str]:
    """Make the training graph's BatchNormalization nodes (but ``inference_nodes``) and
    their gradients use the statistics of the union of the ranks' batches: they become
    the private ops SyncBatchNormalization and SyncBatchNormalizationGrad, which reduce
    through the run's communicator.  Returns the names of the nodes changed."""
    synced = {}
    for node in graph.nodes:
        if node.op_type != "BatchNormalization" or node.domain != "" \
                or node.name in inference_nodes:
            continue
        attrs = lookup(node.op_type, node.domain, node.opset, node.name).resolve_attrs(
            node.attrs, node.name)
        if len(node.outputs) < 5 or not all(node.outputs[3:5]):
            raise ModelError(f"node {node.name!r}: sync_batchnorm needs a training graph, "
                             "whose BatchNormalization nodes keep their batch statistics")
        node.attrs = {"epsilon": attrs["epsilon"], "momentum": attrs["momentum"],
                      "spatial": attrs.get("spatial", 1),
                      "training_mode": attrs.get("training_mode", 0)}
        node.op_type, node.domain, node.opset = "SyncBatchNormalization", PRIVATE_DOMAIN, \
            PRIVATE_OPSET
        synced[tuple(node.outputs[3:5])] = node
    for node in graph.nodes:
        if node.op_type == "BatchNormalizationGrad" and node.domain == PRIVATE_DOMAIN \
                and tuple(node.inputs[3:5]) in synced:
            node.op_type = "SyncBatchNormalizationGrad"
            node.inputs = node.inputs[:5]  # dY, X, scale and the batch statistics
            node.attrs = {"epsilon": node.attrs.get("epsilon", 1e-5)}
    graph.opsets.setdefault(PRIVATE_DOMAIN, PRIVATE_OPSET)
    return [node.name for node in synced.values()]
