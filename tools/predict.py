"""``onnxgrad predict``: a model's outputs on data, as a CSV file."""

from __future__ import annotations

import csv
import io
import os

import click
import numpy as np

from onnxgrad.errors import DataError
from onnxgrad.exporter import write_atomic

from .common import (
    CONTEXT,
    boundary,
    data_source,
    load_model,
    output_runner,
    read_dataset,
    threads_option,
)


@click.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, metavar="DATA",
              help="The inputs: any data source train takes (targets, if present, are ignored).")
@click.option("--out", "out_path", required=True, metavar="FILE.csv",
              help="Where to write the predictions.")
@click.option("--input-key", "input_keys", multiple=True, metavar="[INPUT=]KEY",
              help="Key of the data that feeds a model input (as for train).")
@click.option("--feature-columns", default=None, metavar="A,B,...",
              help="For a table: the feature columns, in order (as for train).")
@click.option("--mean", default=None, metavar="M[,M,M]", help="For an image folder (as for train).")
@click.option("--std", default=None, metavar="S[,S,S]", help="For an image folder (as for train).")
@click.option("--output", default=None, metavar="VALUE",
              help="The value to write. Default: the first graph output.")
@click.option("--classes", default="auto", type=click.Choice(["auto", "yes", "no"]),
              show_default=True,
              help="Write class predictions (the class index and the probability of each "
                   "class): 'auto' for an output of shape [N, C] with C > 1.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@threads_option
@boundary
def predict(model, data, out_path, input_keys, feature_columns, mean, std, output, classes,
            batch_size):
    """Run MODEL on DATA and write one CSV row per sample.

    For a classifier (an output of shape [N, C]): the row's index, the class
    index with the highest score, and the probability of each class (the
    softmax of the scores; the output itself where the model ends in Softmax).
    For a sequence of maps (a scikit-learn classifier's ZipMap output, e.g.
    --output output_probability): the class with the highest probability and
    the probability of each class, in columns named after the map's keys.
    For other models: the output's values, flattened per sample.

    \b
    Examples:
      onnxgrad predict digits_trained.onnx --data models/digits_test.npz --out predictions.csv
    """
    if batch_size < 1:
        raise click.ClickException(f"--batch-size must be at least 1 (got {batch_size})")
    for path in (model, data):
        if os.path.abspath(out_path) == os.path.abspath(path):
            raise click.ClickException(f"--out {out_path!r} is an input file; choose another")
    m = load_model(model)
    output = output or m.graph.outputs[0]
    ds = read_dataset(data, m, input_keys, None, need_target=False,
                      source=data_source(None, feature_columns, mean, std))
    run = output_runner(m, output)
    values = []
    n = len(ds)
    for start in range(0, n, batch_size):
        index = np.arange(start, min(start + batch_size, n))
        values.append(run({k: v[index] for k, v in ds.feeds.items()}))
    info = m.graph.info.get(output)
    if any(isinstance(v, (list, tuple, dict)) or v is None for v in values) or (
            info is not None and info.kind != "tensor"):
        buffer, as_classes = _write_maps(m, output, values, classes)
        write_atomic(out_path, buffer.getvalue().encode(), "the predictions")
        kind = "class predictions" if as_classes else f"values of {output!r}"
        click.echo(f"wrote {out_path}: {kind} for {n} samples of {ds.path}")
        return
    result = np.concatenate([np.asarray(v) for v in values])
    as_classes = classes == "yes" or (classes == "auto" and result.ndim == 2
                                      and result.shape[1] > 1 and result.dtype.kind in "fiu")
    if as_classes and result.ndim != 2:
        raise DataError(f"--classes yes needs an output of shape [N, C]; {output!r} has shape "
                        f"{list(result.shape)}")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if as_classes:
        producer = next((node for node in m.graph.nodes if output in node.outputs), None)
        if producer is not None and producer.op_type == "Softmax":
            probs = result
        else:
            shifted = result - result.max(axis=1, keepdims=True)
            probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        writer.writerow(["index", "class"] + [f"prob_{c}" for c in range(result.shape[1])])
        for i, row in enumerate(probs):
            writer.writerow([i, int(row.argmax())] + [f"{p:.6g}" for p in row])
    else:
        flat = result.reshape(len(result), -1)
        writer.writerow(["index"] + [f"{output}_{j}" for j in range(flat.shape[1])])
        text = flat.dtype.kind in "OSUb"  # string labels (skl2onnx), booleans
        for i, row in enumerate(flat):
            writer.writerow([i] + [str(v) if text else f"{v:.7g}" for v in row])
    write_atomic(out_path, buffer.getvalue().encode(), "the predictions")
    kind = "class predictions" if as_classes else f"values of {output!r}"
    click.echo(f"wrote {out_path}: {kind} for {n} samples of {ds.path}")


def _write_maps(model, output: str, batches: list, classes: str) -> tuple[io.StringIO, bool]:
    """The CSV of a sequence of maps, one per sample (ZipMap's class -> probability): the
    class with the highest value and each class's value (with --classes no: the values
    only); any other non-tensor output is refused by name."""
    info = model.graph.info.get(output)
    described = info.type_str() if info is not None else "not a tensor"
    rows = [row for batch in batches if isinstance(batch, (list, tuple)) for row in batch]
    if (not all(isinstance(b, (list, tuple)) for b in batches)
            or not all(isinstance(r, dict) for r in rows)):
        raise DataError(f"predict writes a tensor or a sequence of maps (ZipMap's output); "
                        f"{output!r} is a {described}: choose another --output")
    keys = list(rows[0]) if rows else []
    for i, row in enumerate(rows):
        if list(row) != keys:
            raise DataError(f"{output!r}: the map of sample {i} has keys {list(row)}, the first "
                            f"has {keys}; predict writes maps with the same keys")
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                  for row in rows for v in row.values())
    if classes == "yes" and not numeric:
        raise DataError(f"--classes yes needs numeric values; {output!r} maps to strings")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    as_classes = classes != "no" and numeric

    def fmt(v):
        return f"{v:.7g}" if isinstance(v, float) else str(v)

    if as_classes:
        writer.writerow(["index", "class"] + [f"prob_{k}" for k in keys])
        for i, row in enumerate(rows):
            best = max(keys, key=lambda k: row[k]) if keys else ""
            writer.writerow([i, best] + [f"{row[k]:.6g}" for k in keys])
    else:
        writer.writerow(["index"] + [f"{output}_{k}" for k in keys])
        for i, row in enumerate(rows):
            writer.writerow([i] + [fmt(row[k]) for k in keys])
    return buffer, as_classes
