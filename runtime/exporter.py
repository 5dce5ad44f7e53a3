"""Writing models back to ONNX: the original graph with the current weights."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

from onnxgrad.errors import ModelError, OnnxgradError

#: Protobuf cannot serialise a message of 2 GiB or more.
_PROTOBUF_LIMIT = 2**31 - 1


def with_weights(skeleton: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``skeleton`` whose initializers hold ``weights`` (same names, types, dims)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(skeleton)
    for tensor in proto.graph.initializer:
        if tensor.name not in weights:
            raise ModelError(f"no value for initializer {tensor.name!r}")
        array = np.asarray(weights[tensor.name])
        filled = numpy_helper.from_array(array, tensor.name)
        if filled.data_type != tensor.data_type or list(filled.dims) != list(tensor.dims):
            raise ModelError(
                f"initializer {tensor.name!r}: weight has type {array.dtype} and shape "
                f"{list(array.shape)}, the model declares type "
                f"{onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)} and shape {list(tensor.dims)}")
        doc = tensor.doc_string
        tensor.CopyFrom(filled)
        tensor.doc_string = doc
    return proto


def _temporary(path: str, folder: str) -> str:
    """A new temporary file beside ``path`` (named after it and this process), with the
    mode ``path`` has, or ``0666 & ~umask`` for a new file; stale ones of ``path`` that
    dead processes left behind are removed first."""
    base = os.path.basename(path)
    _remove_stale(folder, base)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)
    return tmp


def _remove_stale(folder: str, base: str) -> None:
    prefix = f".{base}."
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # its writer is gone: the file is a leftover
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
        except OSError:
            pass  # alive (another user's process): leave it


def save_atomic(proto: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``proto`` to ``path`` so that a failure leaves an existing file intact.

    The model is written to a temporary file beside ``path`` (see :func:`_temporary`),
    fsync'd, and moved over it only when complete.  Models over protobuf's 2 GiB limit
    keep their tensors in ``<name>.data`` beside the file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ModelError(f"{path}: folder {folder} does not exist")
    if proto.ByteSize() <= _PROTOBUF_LIMIT:
        try:
            write_atomic(path, proto.SerializeToString(), "the model")
        except OnnxgradError as exc:
            raise ModelError(str(exc)) from exc
        return
    tmp = _temporary(path, folder)
    data_name = os.path.basename(path) + ".data"
    tmp_data = None
    try:
        tmp_data = os.path.basename(tmp) + ".data"
        onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=tmp_data, size_threshold=1024)
        # Point the tensors at the final data file name, then write again.
        for t in onnx.external_data_helper._get_all_tensors(proto):
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = data_name
        with open(tmp, "wb") as f:
            f.write(proto.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(folder, tmp_data), os.path.join(folder, data_name))
        os.replace(tmp, path)
    except OSError as exc:
        raise ModelError(f"{path}: cannot write the model ({exc})") from exc
    finally:
        for leftover in (tmp, tmp_data and os.path.join(folder, tmp_data)):
            if leftover and os.path.exists(leftover):
                os.unlink(leftover)


def write_atomic(path: str | os.PathLike, data: bytes, what: str = "the file") -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, fsync'd and moved
    over ``path`` only when complete: a failure leaves an existing file intact."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OnnxgradError(f"{path}: folder {folder} does not exist")
    tmp = _temporary(path, folder)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OnnxgradError(f"{path}: cannot write {what} ({exc})") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
