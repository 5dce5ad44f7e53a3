"""Reading data (``.npz`` archives, folders of ``.npy`` files, CSV and Parquet tables,
image folders) and checking it against a model.

Everything here raises :class:`onnxgrad.errors.DataError` with a message that
names the file, the key and the model input involved, so that the CLI can
print it on one line.  Inputs are cast to the model's element type where that
loses nothing a user would care about (float64 -> float32, int -> float);
anything else is an error.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np

from onnxgrad.errors import DataError
from onnxgrad.model import check_finite

#: Keys tried, in order, for the input of a single-input model whose own
#: input name is not a key of the data file.
INPUT_KEYS = ("input", "inputs", "x", "X", "data", "features")
#: Keys tried, in order, for the targets.
TARGET_KEYS = ("label", "labels", "y", "target", "targets")
#: Losses whose targets are integer class indices.
CLASSIFIER_LOSSES = ("cross_entropy", "nll")


def load_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of a ``.npz`` file, read into memory."""
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        raise DataError(f"data file {path!r} is a directory, not a .npz file")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as err:
        raise DataError(f"cannot read data file {path!r}: {err.strerror or err}") from None
    if magic == b"\x93NUMPY":
        raise DataError(f"data file {path!r} is a single .npy array; expected a .npz archive "
                        f"of named arrays (numpy.savez)")
    if not magic.startswith(b"PK"):
        raise DataError(f"data file {path!r} is not a .npz archive (numpy.savez writes one)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"cannot read data file {path!r} as a .npz archive: {reason}") from None
    if isinstance(archive, np.ndarray):
        raise DataError(f"data file {path!r} is a single .npy array; expected a .npz archive "
                        f"of named arrays (numpy.savez)")
    try:
        with archive:
            return {k: archive[k] for k in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"cannot read data file {path!r}: {reason}") from None


def _keys_present(arrays: dict[str, np.ndarray]) -> str:
    return ", ".join(repr(k) for k in arrays) or "none"


def _fmt_shape(shape) -> str:
    if shape is None:
        return "unknown"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


@dataclass
class Dataset:
    """Feeds for the model's inputs and (optionally) the targets, row-aligned."""

    path: str
    feeds: dict[str, np.ndarray]
    keys: dict[str, str]  # model input name -> key in the file
    target: np.ndarray | None = None
    target_key: str | None = None
    #: An image folder's class names, by class index.
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(next(iter(self.feeds.values())))

    def take(self, index: np.ndarray, path: str | None = None) -> "Dataset":
        return Dataset(
            path=path or self.path,
            feeds={k: v[index] for k, v in self.feeds.items()},
            keys=dict(self.keys),
            target=None if self.target is None else self.target[index],
            target_key=self.target_key,
        )

    def describe(self) -> str:
        keys = ", ".join(f"{name} <- {key!r}" for name, key in self.keys.items())
        if self.target_key is not None:
            keys += f"; target <- {self.target_key!r}"
        return f"{self.path} ({len(self)} samples; {keys})"


def parse_input_keys(specs: tuple[str, ...] | list[str], model_inputs: list[str]) -> dict[str, str]:
    """``--input-key`` values: ``KEY`` (single-input models) or ``INPUT=KEY``."""
    mapping: dict[str, str] = {}
    for spec in specs:
        if "=" in spec:
            name, key = spec.split("=", 1)
            if name not in model_inputs:
                raise DataError(f"--input-key {spec!r}: the model has no input {name!r} "
                                f"(inputs: {', '.join(map(repr, model_inputs))})")
        elif len(model_inputs) == 1:
            name, key = model_inputs[0], spec
        else:
            raise DataError(f"--input-key {spec!r}: the model has several inputs "
                            f"({', '.join(map(repr, model_inputs))}); write --input-key INPUT=KEY")
        if name in mapping:
            raise DataError(f"--input-key given twice for model input {name!r}")
        mapping[name] = key
    return mapping


def resolve_keys(arrays: dict[str, np.ndarray], path: str, model_inputs: list[str],
                 input_keys: dict[str, str], target_key: str | None,
                 need_target: bool) -> tuple[dict[str, str], str | None]:
    """Which key of the file feeds each model input, and which holds the targets."""
    keys: dict[str, str] = {}
    for name in model_inputs:
        if name in input_keys:
            key = input_keys[name]
            if key not in arrays:
                raise DataError(f"data file {path!r} has no key {key!r} (for model input {name!r}); "
                                f"keys present: {_keys_present(arrays)}")
        elif name in arrays:
            key = name
        elif len(model_inputs) == 1 and any(k in arrays for k in INPUT_KEYS):
            key = next(k for k in INPUT_KEYS if k in arrays)
        else:
            tried = dict.fromkeys((name,) + (INPUT_KEYS if len(model_inputs) == 1 else ()))
            raise DataError(f"data file {path!r} has no key for model input {name!r} (tried "
                            f"{', '.join(map(repr, tried))}); keys present: "
                            f"{_keys_present(arrays)}; choose one with --input-key")
        keys[name] = key
    if not need_target:
        return keys, None
    if target_key is not None:
        if target_key not in arrays:
            raise DataError(f"data file {path!r} has no key {target_key!r} (for the targets); "
                            f"keys present: {_keys_present(arrays)}")
    else:
        target_key = next((k for k in TARGET_KEYS if k in arrays and k not in keys.values()), None)
        if target_key is None:
            raise DataError(f"data file {path!r} has no target key (tried "
                            f"{', '.join(map(repr, TARGET_KEYS))}); keys present: "
                            f"{_keys_present(arrays)}; choose one with --target-key")
    if target_key in keys.values():
        raise DataError(f"key {target_key!r} of {path!r} cannot be both an input and the targets")
    return keys, target_key


def fit_input(arr: np.ndarray, name: str, key: str, path: str, dtype, shape) -> np.ndarray:
    """``arr`` checked against model input ``name`` (dtype, shape) and cast to its dtype."""
    where = f"key {key!r} of {path!r}"
    if arr.ndim == 0:
        raise DataError(f"{where} is a scalar; model input {name!r} expects a batch of shape "
                        f"{_fmt_shape(shape)}")
    mapped = isinstance(arr, np.memmap)
    if dtype is not None and arr.dtype != dtype:
        want, got = np.dtype(dtype), arr.dtype
        ok = (
            (want.kind == "f" and got.kind in "fiu")
            or (want.kind in "iu" and got.kind in "iu")
            or (want.kind == "b" and got.kind == "b")
        )
        if want.kind in "iu" and got.kind in "iu" and arr.size:
            info = np.iinfo(want)
            ok = ok and arr.min() >= info.min and arr.max() <= info.max
        if not ok:
            raise DataError(f"{where} has element type {got}, which does not fit model input "
                            f"{name!r}: expected {want}")
        if not mapped:  # a memory-mapped array is cast batch by batch, as it is read
            arr = arr.astype(want)
    if shape is not None:
        if arr.ndim != len(shape):
            raise DataError(f"{where} has shape {tuple(arr.shape)}, which does not fit model input "
                            f"{name!r}: expected {_fmt_shape(shape)} (rank {len(shape)}, got rank "
                            f"{arr.ndim})")
        for axis, (want, got) in enumerate(zip(shape[1:], arr.shape[1:]), start=1):
            if isinstance(want, int) and want != got:
                raise DataError(f"{where} has shape {tuple(arr.shape)}, which does not fit model "
                                f"input {name!r}: expected {_fmt_shape(shape)} (axis {axis} must "
                                f"be {want}, got {got})")
    return arr if mapped else np.ascontiguousarray(arr)


def build_dataset(arrays: dict[str, np.ndarray], path: str, keys: dict[str, str],
                  target_key: str | None, input_info: dict[str, tuple]) -> Dataset:
    """Check the arrays of a file against the model inputs; targets are checked later."""
    feeds = {}
    for name, key in keys.items():
        dtype, shape = input_info.get(name, (None, None))
        feeds[name] = fit_input(arrays[key], name, key, path, dtype, shape)
    target = None
    if target_key is not None:
        target = arrays[target_key]
        if target.ndim == 0:
            raise DataError(f"key {target_key!r} of {path!r} is a scalar; expected one target per sample")
    for name, key in keys.items():
        check_finite(feeds[name], f"key {key!r} of {path!r}")
    if target is not None and target.dtype.kind == "f":
        check_finite(target, f"key {target_key!r} of {path!r}")
    lengths = {key: len(feeds[name]) for name, key in keys.items()}
    if target is not None:
        lengths[target_key] = len(target)
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{k!r} has {n}" for k, n in lengths.items())
        raise DataError(f"arrays of {path!r} have different numbers of samples: {desc}")
    if not lengths or next(iter(lengths.values())) == 0:
        raise DataError(f"data file {path!r} holds no samples")
    return Dataset(path=path, feeds=feeds, keys=keys, target=target, target_key=target_key)


def fit_target(ds: Dataset, loss, output: str, out_shape: tuple[int, ...], out_dtype) -> None:
    """Check ``ds.target`` against the model output ``loss`` (an onnxgrad.Loss) reads;
    cast it in place.

    ``out_shape`` is the shape of the output for a batch of the data (any
    batch size: only axis 0 differs), with the classes on axis 1.
    """
    name = loss.name
    t = ds.target
    where = f"targets {ds.target_key!r} of {ds.path!r}"
    if loss.target == "class":
        if len(out_shape) < 2:
            raise DataError(f"loss {name!r} needs an output of shape [N, C, ...] (scores per "
                            f"class); output {output!r} has shape {list(out_shape)}")
        if t.dtype.kind == "f":
            if not np.all(np.isfinite(t)) or not np.all(t == np.round(t)):
                raise DataError(f"{where} are not integer class labels (element type {t.dtype}); "
                                f"loss {name!r} needs integer labels")
            t = t.astype(np.int64)
        elif t.dtype.kind not in "iu":
            raise DataError(f"{where} have element type {t.dtype}; loss {name!r} needs integer "
                            f"class labels")
        want = (len(t),) + tuple(out_shape[2:])
        if t.shape != want:
            raise DataError(f"{where} have shape {tuple(t.shape)}; output {output!r} has shape "
                            f"{['N'] + list(out_shape[1:])}, so loss {name!r} expects labels of "
                            f"shape {['N'] + list(out_shape[2:])}")
        classes = out_shape[1]
        valid = t if loss.ignore_index is None else t[t != loss.ignore_index]
        lo, hi = (int(valid.min()), int(valid.max())) if valid.size else (0, 0)
        if lo < 0 or hi >= classes:
            raise DataError(f"{where} range from {lo} to {hi}, out of range for the {classes} "
                            f"classes of output {output!r} (labels must be 0..{classes - 1})")
        ds.target = t.astype(np.int64)
        return
    if t.dtype.kind not in "fiub":
        raise DataError(f"{where} have element type {t.dtype}; loss {name!r} needs numbers")
    want = (len(t),) + tuple(out_shape[1:])
    if t.shape != want:
        if t.size == int(np.prod(want)) and t.ndim == 1:
            t = t.reshape(want)  # e.g. N targets for an N x 1 output
        else:
            raise DataError(f"{where} have shape {tuple(t.shape)}; loss {name!r} expects the shape "
                            f"of output {output!r}, {['N'] + list(out_shape[1:])}")
    t = t.astype(out_dtype if out_dtype is not None and np.dtype(out_dtype).kind == "f" else np.float32)
    if name == "bce_with_logits" and (t.min() < 0 or t.max() > 1):
        raise DataError(f"{where} range from {t.min():g} to {t.max():g}; loss 'bce_with_logits' "
                        f"needs targets in [0, 1]")
    ds.target = np.ascontiguousarray(t)


# -- other sources: folders of .npy files, tables, image folders ---------------------------

#: File name endings read as tables.
TABLES = (".csv", ".parquet", ".pq")
#: File name endings read as images in an image folder.
IMAGES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Source:
    """How to turn a table or an image folder into arrays (the CLI's data options)."""

    target_column: str | None = None
    feature_columns: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    #: The model input's shape (for images: [N, C, H, W]).
    input_shape: tuple | None = None


def load_data(path: str, source: Source | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The named arrays of a data source, and what it adds (an image folder's classes):

    * a ``.npz`` archive: its arrays;
    * a folder of ``.npy`` files: each file memory-mapped, named by its stem, so that
      arrays larger than memory are read batch by batch;
    * a ``.csv`` or ``.parquet`` table: ``features`` (float32, one column per feature
      column) and ``label`` (the target column);
    * a folder with one subfolder of images per class (torchvision's ImageFolder
      layout): ``input`` (float32 [N, C, H, W], resized to the model's input size and
      normalised with ``mean`` and ``std``) and ``label`` (the class index, classes in
      sorted order).
    """
    source = source or Source()
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        if any(n.endswith(".npy") for n in names):
            return _npy_folder(path, names), {}
        if any(os.path.isdir(os.path.join(path, n)) for n in names):
            return _image_folder(path, source)
        raise DataError(f"data folder {path!r} holds neither .npy files nor one subfolder of "
                        "images per class")
    ending = os.path.splitext(path)[1].lower()
    if ending in TABLES:
        return _table(path, ending, source), {}
    if source.target_column or source.feature_columns:
        raise DataError(f"--target-column and --feature-columns apply to .csv and .parquet "
                        f"tables, not to {path!r}")
    return load_npz(path), {}


def _npy_folder(path: str, names: list[str]) -> dict[str, np.ndarray]:
    arrays = {}
    for name in names:
        if name.endswith(".npy"):
            file = os.path.join(path, name)
            try:
                arrays[name[:-4]] = np.load(file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise DataError(f"cannot read {file!r} as a .npy array: {err}") from None
    return arrays


def _table(path: str, ending: str, source: Source) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    if ending == ".csv":
        columns = _read_csv(path)
    else:
        try:
            import pyarrow.parquet as pq  # noqa: PLC0415 - an optional extra
        except ImportError:
            raise DataError(f"reading {path!r} needs pyarrow: pip install 'onnxgrad[parquet]'") \
                from None
        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises many kinds
            raise DataError(f"cannot read {path!r} as a Parquet table: {err}") from None
        columns = {name: table.column(name).to_numpy(zero_copy_only=False)
                   for name in table.column_names}
    names = list(columns)
    target = source.target_column
    if target is None:
        target = next((k for k in TARGET_KEYS if k in columns), None)
        if target is None:
            raise DataError(f"table {path!r} has no target column (tried "
                            f"{', '.join(map(repr, TARGET_KEYS))}); its columns are "
                            f"{names[:12]}; choose one with --target-column")
    elif target not in columns:
        raise DataError(f"table {path!r} has no column {target!r}; its columns are {names[:12]}")
    features = list(source.feature_columns) or [n for n in names if n != target]
    missing = [n for n in features if n not in columns]
    if missing:
        raise DataError(f"table {path!r} has no column {missing[0]!r}; its columns are "
                        f"{names[:12]}")
    if target in features:
        raise DataError(f"column {target!r} of {path!r} cannot be both a feature and the target")
    matrix = np.empty((len(columns[target]), len(features)), dtype=np.float32)
    for i, name in enumerate(features):
        matrix[:, i] = _numeric(columns[name], name, path, "feature")
    return {"features": matrix, "label": _numeric(columns[target], target, path, "target")}


def _read_csv(path: str) -> dict[str, np.ndarray]:
    import csv  # noqa: PLC0415

    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read {path!r} as CSV: {err}") from None
    if len(rows) < 2:
        raise DataError(f"table {path!r} has no data rows under its header")
    header, body = rows[0], rows[1:]
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: line {number} has {len(row)} fields, the header "
                            f"{len(header)}")
    return {name: np.array([row[i] for row in body], dtype=object)
            for i, name in enumerate(header)}


def _numeric(values: np.ndarray, name: str, path: str, role: str) -> np.ndarray:
    """A column as numbers: integers stay int64 (class labels), the rest float."""
    if values.dtype.kind in "iufb":
        return values
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        bad = next(v for v in values if not _is_number(v))
        raise DataError(f"{role} column {name!r} of {path!r} is not numeric (e.g. {bad!r}); "
                        f"encode it as numbers, or leave it out with --feature-columns")
    if np.all(numbers == np.round(numbers)) and np.isfinite(numbers).all():
        return numbers.astype(np.int64)
    return numbers


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _image_folder(path: str, source: Source) -> tuple[dict[str, np.ndarray], dict]:
    try:
        from PIL import Image  # noqa: PLC0415 - an optional extra
    except ImportError:
        raise DataError(f"reading the image folder {path!r} needs Pillow: "
                        "pip install 'onnxgrad[images]'") from None
    shape = source.input_shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise DataError(f"an image folder ({path!r}) needs a model input of shape [N, C, H, W] "
                        f"with fixed C, H and W; the model's is {_fmt_shape(shape)}")
    channels, height, width = shape[1:]
    if channels not in (1, 3):
        raise DataError(f"images become 1 or 3 channels; the model input has {channels}")
    mean = np.array(source.mean or (0.0,), dtype=np.float32)
    std = np.array(source.std or (1.0,), dtype=np.float32)
    for name, values in (("--mean", mean), ("--std", std)):
        if values.size not in (1, channels):
            raise DataError(f"{name} gives {values.size} values; give 1 or {channels} (one per "
                            "channel)")
    if np.any(std == 0):
        raise DataError("--std must not be 0")
    classes = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
    images, labels = [], []
    for index, name in enumerate(classes):
        folder = os.path.join(path, name)
        for file in sorted(os.listdir(folder)):
            if not file.lower().endswith(IMAGES):
                continue
            where = os.path.join(folder, file)
            try:
                with Image.open(where) as image:
                    image = image.convert("L" if channels == 1 else "RGB")
                    image = image.resize((width, height), Image.BILINEAR)
                    pixels = np.asarray(image, dtype=np.float32) / 255.0
            except (OSError, ValueError) as err:
                raise DataError(f"cannot read the image {where!r}: {err}") from None
            pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
            images.append((pixels - mean.reshape(-1, 1, 1)) / std.reshape(-1, 1, 1))
            labels.append(index)
    if not images:
        raise DataError(f"image folder {path!r} holds no images ({', '.join(IMAGES)}) in its "
                        "class subfolders")
    return ({"input": np.stack(images).astype(np.float32),
             "label": np.array(labels, dtype=np.int64)}, {"classes": classes})
