"""Checkpoints: a training run's whole state in one file, written atomically, no pickle.

The file is a NumPy ``.npz`` archive: each array under ``weights/<name>`` or
``optimizer/<parameter>/<state name>``, and ``meta``, a JSON string with
everything else (format and version, the optimizer's type and settings, step
and epoch counters, random-number state, schedule and training-loop state).
It is read with ``allow_pickle=False``: loading a checkpoint runs no code.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any

import numpy as np

from onnxgrad.errors import CheckpointError, OnnxgradError
from onnxgrad.exporter import write_atomic

FORMAT = "onnxgrad-checkpoint"
VERSION = 1


def save(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` (as ``Trainer.state_dict`` returns it) to ``path``, atomically."""
    arrays: dict[str, np.ndarray] = {}
    for name, value in state["weights"].items():
        arrays[f"weights/{name}"] = np.asarray(value)
    scalars: dict[str, dict[str, Any]] = {}
    for param, entries in state["optimizer"]["state"].items():
        for key, value in entries.items():
            if isinstance(value, np.ndarray):
                arrays[f"optimizer/{param}/{key}"] = value
            else:
                scalars.setdefault(param, {})[key] = value
    meta = {key: value for key, value in state.items() if key not in ("weights", "optimizer")}
    meta["optimizer"] = {k: v for k, v in state["optimizer"].items() if k != "state"}
    meta["optimizer"]["scalars"] = scalars
    meta.update(format=FORMAT, version=VERSION)
    arrays["meta"] = np.array(json.dumps(meta))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        write_atomic(path, buffer.getvalue(), "the checkpoint")
    except OnnxgradError as exc:
        raise CheckpointError(str(exc)) from exc


def load(path: str | os.PathLike) -> dict[str, Any]:
    """The state stored in ``path``; :class:`CheckpointError` for anything that is not a
    complete checkpoint of this format."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: the checkpoint has no readable 'meta' entry") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an onnxgrad checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')} is not "
                              f"supported (this onnxgrad reads version {VERSION})")
    weights, optimizer_state = {}, {}
    for key, value in arrays.items():
        kind, _, rest = key.partition("/")
        if kind == "weights":
            weights[rest] = value
        elif kind == "optimizer":
            param, _, name = rest.rpartition("/")
            optimizer_state.setdefault(param, {})[name] = value
    optimizer = dict(meta.pop("optimizer"))
    for param, entries in optimizer.pop("scalars", {}).items():
        optimizer_state.setdefault(param, {}).update(entries)
    optimizer["state"] = optimizer_state
    for key in ("format", "version"):
        meta.pop(key)
    return {"weights": weights, "optimizer": optimizer, **meta}
