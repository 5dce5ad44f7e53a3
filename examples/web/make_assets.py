"""Build the files the web example serves: the shipped digits classifier's training
step as a standard ONNX model (onnxgrad convert), its evaluation model, and the
digits data as raw little-endian arrays.

    python examples/web/make_assets.py [OUT_DIR]      # default: examples/web/build
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

import onnxgrad
from onnxgrad.convert import (
    eval_model,
    split_initial_state,
    state_mapping,
    step_model,
    trained_parameters,
)
from onnxgrad.exporter import save_atomic

HERE = pathlib.Path(__file__).resolve().parent
MODELS = HERE.parent.parent / "models"
#: The optimizer the page trains with.
OPTIMIZER = {"lr": 0.05, "momentum": 0.9}


def build(out: pathlib.Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    model = onnxgrad.load(MODELS / "digits_mlp.onnx")
    # onnxruntime-web and -node feed only inputs without initializers: the first state
    # comes from a model of its own, and the evaluation model takes plain inputs.
    step, initial = split_initial_state(step_model(model, onnxgrad.SGD(**OPTIMIZER)))
    save_atomic(step, out / "digits_step.onnx")
    save_atomic(initial, out / "digits_step.init.onnx")
    save_atomic(eval_model(model, trained_parameters(step), defaults=False),
                out / "digits_eval.onnx")
    meta = {"optimizer": {"name": "sgd", **OPTIMIZER}, "input": model.graph.inputs[0],
            "output": model.graph.outputs[0], "trained": trained_parameters(step),
            "state": state_mapping(step)}
    for split in ("train", "test"):
        data = np.load(MODELS / f"digits_{split}.npz")
        x = np.ascontiguousarray(data["input"], dtype="<f4")
        y = np.ascontiguousarray(data["label"], dtype="<i8")
        (out / f"digits_{split}_x.bin").write_bytes(x.tobytes())
        (out / f"digits_{split}_y.bin").write_bytes(y.tobytes())
        meta[split] = {"count": int(x.shape[0]), "features": int(x.shape[1])}
    (out / "digits.json").write_text(json.dumps(meta, indent=1))
    return meta


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "build"
    build(target)
    print(f"wrote the web example's assets to {target}")
