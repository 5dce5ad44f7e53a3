"""Make the reference data that lets the default test suite compare onnxgrad
with PyTorch (and onnxruntime / scikit-learn) without importing torch.

Run from the repository root in an environment with torch, onnxscript,
onnxruntime, scikit-learn and skl2onnx (after ``python models/make_digits.py``,
whose digits split part (c) reuses)::

    python tests/reference/make_reference.py

Everything is seeded; the files are a few KB each.  It writes into
``tests/reference/``:

(a) ``optimizers.npz`` -- torch.optim trajectories on fixed tensors.

    Three float32 parameters ``p0`` (3, 4), ``p1`` (5,), ``p2`` (2, 3, 2)
    (``p2``'s gradients are scaled by 1e-4 so Adam's ``eps`` matters) and
    ``N_STEPS`` = 4 fixed gradients for each.  Keys::

        meta                      0-d str: JSON {"params": [...], "n_steps": 4,
                                  "configs": {config: {"optimizer": "SGD"|"Adam"|"AdamW",
                                                       "kwargs": {...torch.optim kwargs...}}}}
        init/<p>                  initial value of parameter <p>
        grad/<p>/<k>              gradient of <p> fed at step k (k = 1..n_steps)
        <config>/<p>/<k>          torch's value of <p> after step k

    ``kwargs`` are exactly what was passed to torch.optim (and what
    ``onnxgrad.SGD/Adam/AdamW`` accept: same signatures).  ``betas`` is a
    JSON list.

(b) ``mlp_torchscript.onnx``, ``mlp_dynamo.onnx``, ``mlp.npz`` -- an MLP
    20-16-12-5 (Linear, Tanh, Linear, ReLU, Linear) exported by the
    TorchScript exporter (``dynamo=False``, opset 17; Linear -> Gemm) and by
    the dynamo exporter (``dynamo=True``, opset 18, whatever it emits).
    Input ``input`` (N x 20 float32), output ``logits`` (N x 5).  Both files
    are checked against torch in onnxruntime.  The two exporters name the
    initializers differently; they are matched to torch parameters by value
    (directly or transposed) and every per-parameter array is stored *in the
    ONNX initializer's layout* under its initializer name.  (With torch 2.13
    both exporters emit Gemm(transB=1) and keep torch's parameter names,
    "0.weight" ... "4.bias"; the dynamo file also carries per-node
    metadata_props.  Tests must read the names from ``meta``, not assume
    them.)  Keys::

        meta                      0-d str: JSON {"exporters": ["torchscript", "dynamo"],
                                  "files": {exporter: file name},
                                  "mapping": {exporter: {torch param: {"initializer": name,
                                                                      "transposed": bool}}},
                                  "sgd": {"lr": 0.1, "momentum": 0.9}, "sgd_steps": 2,
                                  "adamw": {"lr": 0.01}, "adamw_steps": 3}
        x, y                      the batch: float32 (8, 20), int64 (8,)
        logits                    torch's output for x with the initial weights
        loss                      mean cross-entropy at the initial weights (0-d)
        sgd_losses, adamw_losses  loss before each step (what Trainer.step returns)
        <exporter>/init/<name>    initial value of initializer <name>
        <exporter>/grad/<name>    d mean-cross-entropy / d <name>
        <exporter>/sgd/<name>     value after 2 steps of SGD(lr=0.1, momentum=0.9)
        <exporter>/adamw/<name>   value after 3 steps of AdamW(lr=0.01) (fresh start)

    Every step uses the same batch (x, y).

(c) ``sklearn_mlp.onnx`` -- sklearn MLPClassifier(hidden_layer_sizes=(16,))
    trained briefly on models/digits_train.npz, converted by skl2onnx
    (zipmap disabled, ai.onnx opset 17).  Input ``input`` (N x 64 float32),
    outputs ``label`` (int64) and ``probabilities`` (N x 10).  The value
    feeding its final Softmax -- the logits, what a Trainer must read with
    ``output=`` -- is SKLEARN_SOFTMAX_INPUT below, "add_result1" (the script
    asserts it; the Softmax's own output is "out_activations_result").  The
    label output goes through ArgMax and ai.onnx.ml.ArrayFeatureExtractor.
    It is under-trained on purpose (max_iter=15: about 59 % test accuracy).
"""

from __future__ import annotations

import json
import pathlib
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

from torch_training import run_torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# The name of the value feeding the final Softmax of sklearn_mlp.onnx
# (checked by make_sklearn() below; tests use it as Trainer(output=...)).
SKLEARN_SOFTMAX_INPUT = "add_result1"

# --------------------------------------------------------------------------
# (a) optimizers
# --------------------------------------------------------------------------
N_STEPS = 4
PARAM_SHAPES = {"p0": (3, 4), "p1": (5,), "p2": (2, 3, 2)}
GRAD_SCALE = {"p0": 1.0, "p1": 1.0, "p2": 1e-4}

OPTIMIZER_CONFIGS = {
    "sgd":                    ("SGD", dict(lr=0.1)),
    "sgd_momentum":           ("SGD", dict(lr=0.1, momentum=0.9)),
    "sgd_momentum_dampening": ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1)),
    "sgd_nesterov":           ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    "sgd_momentum_wd":        ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "adam":                   ("Adam", dict(lr=0.01)),
    "adam_wd":                ("Adam", dict(lr=0.01, weight_decay=0.1)),
    "adam_betas_eps":         ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6)),
    "adamw":                  ("AdamW", dict(lr=0.01)),
    "adamw_wd":               ("AdamW", dict(lr=0.01, weight_decay=0.1)),
}


def make_optimizers():
    rng = np.random.default_rng(1234)
    init = {p: rng.standard_normal(s).astype(np.float32)
            for p, s in PARAM_SHAPES.items()}
    grads = {p: [(rng.standard_normal(s) * GRAD_SCALE[p]).astype(np.float32)
                 for _ in range(N_STEPS)]
             for p, s in PARAM_SHAPES.items()}
    out = {}
    for p in PARAM_SHAPES:
        out[f"init/{p}"] = init[p]
        for k in range(N_STEPS):
            out[f"grad/{p}/{k + 1}"] = grads[p][k]

    meta = {"params": list(PARAM_SHAPES), "n_steps": N_STEPS, "configs": {}}
    for config, (cls, kwargs) in OPTIMIZER_CONFIGS.items():
        tensors = {p: torch.nn.Parameter(torch.from_numpy(init[p].copy()))
                   for p in PARAM_SHAPES}
        opt = getattr(torch.optim, cls)(list(tensors.values()), foreach=False,
                                        **kwargs)
        for k in range(N_STEPS):
            for p, t in tensors.items():
                t.grad = torch.from_numpy(grads[p][k].copy())
            opt.step()
            for p, t in tensors.items():
                out[f"{config}/{p}/{k + 1}"] = t.detach().numpy().copy()
        meta["configs"][config] = {
            "optimizer": cls,
            "kwargs": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in kwargs.items()}}
    out["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(HERE / "optimizers.npz", **out)
    print(f"optimizers.npz: {len(OPTIMIZER_CONFIGS)} configs, {N_STEPS} steps")


# --------------------------------------------------------------------------
# (b) MLP exported by both torch exporters
# --------------------------------------------------------------------------
MLP_FILES = {"torchscript": "mlp_torchscript.onnx", "dynamo": "mlp_dynamo.onnx"}
SGD_KW, SGD_STEPS = dict(lr=0.1, momentum=0.9), 2
ADAMW_KW, ADAMW_STEPS = dict(lr=0.01), 3


def make_mlp_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(20, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 12), torch.nn.ReLU(),
        torch.nn.Linear(12, 5))


def export_mlp(net, x):
    path = HERE / MLP_FILES["torchscript"]
    torch.onnx.export(
        net, (x,), str(path), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17, dynamo=False)
    path = HERE / MLP_FILES["dynamo"]
    prog = torch.onnx.export(
        net, (x,), dynamo=True, opset_version=18,
        input_names=["input"], output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False)
    prog.save(str(path), external_data=False)


def map_initializers(net, model):
    """torch parameter name -> (initializer name, transposed), by value."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    mapping = {}
    for pname, p in net.named_parameters():
        v = p.detach().numpy()
        hits = [(n, False) for n, a in inits.items()
                if a.shape == v.shape and np.array_equal(a, v)]
        if v.ndim == 2:
            hits += [(n, True) for n, a in inits.items()
                     if a.shape == v.T.shape and np.array_equal(a, v.T)]
        assert len(hits) == 1, (pname, hits)
        mapping[pname] = hits[0]
    assert len(mapping) == len(inits) or all(
        n in {h[0] for h in mapping.values()} or inits[n].dtype.kind != "f"
        for n in inits), f"unmatched float initializers in {model.graph.name}"
    return mapping


def make_mlp():
    net = make_mlp_net()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 20, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    export_mlp(net, x)

    out = {"x": x.numpy(), "y": y.numpy().astype(np.int64)}
    logits = net(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    net.zero_grad()
    loss.backward()
    out["logits"] = logits.detach().numpy()
    out["loss"] = np.array(loss.item(), np.float32)
    init = {n: p.detach().numpy().copy() for n, p in net.named_parameters()}
    grad = {n: p.grad.numpy().copy() for n, p in net.named_parameters()}
    net.zero_grad()
    sgd, out["sgd_losses"] = run_torch(net, x, y, torch.optim.SGD, SGD_KW, SGD_STEPS)
    adamw, out["adamw_losses"] = run_torch(net, x, y, torch.optim.AdamW, ADAMW_KW,
                                           ADAMW_STEPS)

    meta = {"exporters": list(MLP_FILES), "files": MLP_FILES, "mapping": {},
            "sgd": SGD_KW, "sgd_steps": SGD_STEPS,
            "adamw": ADAMW_KW, "adamw_steps": ADAMW_STEPS}
    for exporter, fname in MLP_FILES.items():
        model = onnx.load(str(HERE / fname))
        onnx.checker.check_model(model, full_check=True)
        sess = ort.InferenceSession(str(HERE / fname),
                                    providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"input": out["x"]})[0]
        np.testing.assert_allclose(got, out["logits"], rtol=1e-5, atol=1e-6)
        mapping = map_initializers(net, model)
        meta["mapping"][exporter] = {
            p: {"initializer": n, "transposed": t} for p, (n, t) in mapping.items()}
        for p, (n, t) in mapping.items():
            lay = (lambda a: a.T.copy()) if t else (lambda a: a)
            out[f"{exporter}/init/{n}"] = lay(init[p])
            out[f"{exporter}/grad/{n}"] = lay(grad[p])
            out[f"{exporter}/sgd/{n}"] = lay(sgd[p])
            out[f"{exporter}/adamw/{n}"] = lay(adamw[p])
        ops = sorted({nd.op_type for nd in model.graph.node})
        print(f"{fname}: ops {ops}, initializers "
              f"{ {p: n for p, (n, _) in mapping.items()} }")
    out["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(HERE / "mlp.npz", **out)


# --------------------------------------------------------------------------
# (c) scikit-learn MLPClassifier through skl2onnx
# --------------------------------------------------------------------------
def make_sklearn():
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    train = np.load(ROOT / "models" / "digits_train.npz")
    test = np.load(ROOT / "models" / "digits_test.npz")
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=15, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(train["input"], train["label"])
    onx = to_onnx(clf, initial_types=[("input", FloatTensorType([None, 64]))],
                  options={id(clf): {"zipmap": False}},
                  target_opset={"": 17, "ai.onnx.ml": 3})
    softmax = [n for n in onx.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1 and softmax[0].input[0] == SKLEARN_SOFTMAX_INPUT, (
        [(n.op_type, list(n.input)) for n in softmax])
    onnx.save(onx, str(HERE / "sklearn_mlp.onnx"))

    sess = ort.InferenceSession(str(HERE / "sklearn_mlp.onnx"),
                                providers=["CPUExecutionProvider"])
    label, proba = sess.run(None, {"input": test["input"]})
    np.testing.assert_allclose(proba, clf.predict_proba(test["input"]),
                               rtol=1e-4, atol=1e-5)
    print(f"sklearn_mlp.onnx: outputs {[o.name for o in onx.graph.output]}, "
          f"ops {[n.op_type for n in onx.graph.node]}, softmax input "
          f"{SKLEARN_SOFTMAX_INPUT!r}, test accuracy "
          f"{(label == test['label']).mean():.3f}")


def main():
    make_optimizers()
    make_mlp()
    make_sklearn()


if __name__ == "__main__":
    main()
