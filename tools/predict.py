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
        values.append(np.asarray(run({k: v[index] for k, v in ds.feeds.items()})))
    result = np.concatenate(values)
    as_classes = classes == "yes" or (classes == "auto" and result.ndim == 2
                                      and result.shape[1] > 1)
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
        for i, row in enumerate(flat):
            writer.writerow([i] + [f"{v:.7g}" for v in row])
    write_atomic(out_path, buffer.getvalue().encode(), "the predictions")
    kind = "class predictions" if as_classes else f"values of {output!r}"
    click.echo(f"wrote {out_path}: {kind} for {n} samples of {ds.path}")
