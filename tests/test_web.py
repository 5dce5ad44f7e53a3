"""The converted digits step model trained outside Python: in Node with
onnxruntime-node (the same weights as onnxruntime in Python), and on the web page
of examples/web in headless Chromium with onnxruntime-web (the loss falls, the
accuracy rises, and the offered weights file goes back into the model with
``onnxgrad apply``).

These need Node.js, examples/web/node_modules (``npm ci`` there) and Chromium.
``.ci/run`` installs them and sets ONNXGRAD_REQUIRE_WEB=1, under which a missing
part fails the test instead of skipping it."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.web
ort = pytest.importorskip("onnxruntime")

ROOT = pathlib.Path(__file__).resolve().parent.parent
WEB = ROOT / "examples" / "web"
sys.path.insert(0, str(WEB))
from make_assets import build  # noqa: E402
from serve import server  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _require(condition: bool, what: str) -> None:
    if condition:
        return
    if os.environ.get("ONNXGRAD_REQUIRE_WEB"):
        pytest.fail(f"{what} (ONNXGRAD_REQUIRE_WEB is set: .ci/run installs it)")
    pytest.skip(f"{what}; .ci/run installs it (apt-get install chromium; npm ci in examples/web)")


def _node_package(name: str) -> None:
    _require(shutil.which("node") is not None, "Node.js is not installed")
    _require((WEB / "node_modules" / name).is_dir(),
             f"examples/web/node_modules/{name} is missing")


def _python_steps(assets: pathlib.Path, steps: int, batch: int = 32):
    """The page's loop in Python's onnxruntime: the initial state model, then ``steps``
    steps on consecutive batches."""
    meta = json.loads((assets / "digits.json").read_text())
    x = np.frombuffer((assets / "digits_train_x.bin").read_bytes(), "<f4").reshape(-1, 64)
    y = np.frombuffer((assets / "digits_train_y.bin").read_bytes(), "<i8")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    initial = ort.InferenceSession(str(assets / "digits_step.init.onnx"), options)
    step = ort.InferenceSession(str(assets / "digits_step.onnx"), options)
    state = dict(zip([o.name for o in initial.get_outputs()], initial.run(None, {})))
    names = [o.name for o in step.get_outputs()]
    losses = []
    batches = len(x) // batch
    for i in range(steps):
        start = (i % batches) * batch
        out = dict(zip(names, step.run(None, {"input": x[start:start + batch],
                                              "target": y[start:start + batch], **state})))
        losses.append(float(out["loss"]))
        state = {meta["state"][n]: v for n, v in out.items() if n in meta["state"]}
    return losses, state


def test_node_trains_to_the_weights_of_python(tmp_path):
    _node_package("onnxruntime-node")
    build(tmp_path)
    out_json, out_npz = tmp_path / "node.json", tmp_path / "node.npz"
    subprocess.run(["node", str(WEB / "node_train.mjs"), str(tmp_path), "25", str(out_json),
                    str(out_npz)], check=True, cwd=WEB, timeout=300)
    node = json.loads(out_json.read_text())
    losses, state = _python_steps(tmp_path, 25)
    np.testing.assert_allclose(node["losses"], losses, rtol=1e-5)
    with np.load(out_npz) as saved:
        assert set(saved.files) == set(state)
        for name in state:
            np.testing.assert_allclose(saved[name], state[name], rtol=1e-5, atol=1e-6,
                                       err_msg=name)
    assert node["accuracy"] > 0.85


@pytest.fixture
def site(tmp_path):
    """examples/web served from a folder of its own, with freshly built assets."""
    root = tmp_path / "site"
    root.mkdir()
    for name in ("index.html", "main.mjs", "trainer.mjs", "node_modules"):
        (root / name).symlink_to(WEB / name)
    build(root / "build")
    httpd = server(root, 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


def test_the_page_trains_in_chromium(site, tmp_path):
    _node_package("onnxruntime-web")
    _node_package("playwright-core")
    _require(os.path.exists(CHROMIUM), f"Chromium is not installed ({CHROMIUM})")
    done = subprocess.run(["node", str(WEB / "browser_test.mjs"), site, "60"], cwd=WEB,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    page = json.loads(done.stdout.strip().splitlines()[-1])
    assert page["error"] is None, page["error"]
    losses = page["losses"]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), losses
    assert page["accuracy"] > 0.85 and "test accuracy" in page["status"]
    # The offered weights go back into the model and keep the page's accuracy.
    weights = tmp_path / "weights.npz"
    weights.write_bytes(base64.b64decode(page["weights"]))
    trained = tmp_path / "trained.onnx"
    subprocess.run([sys.executable, "-m", "onnxgrad.tools.cli", "apply",
                    str(ROOT / "models" / "digits_mlp.onnx"), str(weights), "--out",
                    str(trained)], check=True, timeout=120)
    test = np.load(ROOT / "models" / "digits_test.npz")
    session = ort.InferenceSession(onnx.load(trained).SerializeToString())
    logits = session.run(None, {"input": test["input"]})[0]
    accuracy = (logits.argmax(1) == test["label"]).mean()
    assert abs(accuracy - page["accuracy"]) < 1e-9
