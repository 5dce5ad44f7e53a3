// The page: load the assets, train on a click, draw the loss curve, report the test
// accuracy and offer the trained weights.  window.onnxgradDemo holds the results
// (the browser test reads them).
import { loadAssets, npz, testAccuracy, trainDigits } from "./trainer.mjs";

const ort = window.ort;
ort.env.wasm.wasmPaths = new URL("node_modules/onnxruntime-web/dist/", document.baseURI).href;
ort.env.wasm.numThreads = 1;

const status = document.getElementById("status");
const canvas = document.getElementById("curve");
const demo = (window.onnxgradDemo = { losses: [], accuracy: null, done: false, error: null });

function draw(losses) {
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  if (losses.length < 2) return;
  const top = Math.max(...losses);
  g.beginPath();
  losses.forEach((loss, i) => {
    const x = (i / (losses.length - 1)) * (canvas.width - 20) + 10;
    const y = canvas.height - 10 - (loss / top) * (canvas.height - 20);
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.strokeStyle = "#1a5fb4";
  g.lineWidth = 2;
  g.stroke();
}

try {
  const assets = await loadAssets((name) => fetch(`build/${name}`).then((r) => {
    if (!r.ok) throw new Error(`build/${name}: ${r.status} (run examples/web/serve.py)`);
    return r.arrayBuffer();
  }));
  const first = await ort.InferenceSession.create(assets.initModel, { logSeverityLevel: 3 });
  const before = await testAccuracy(ort, assets, await first.run({}));
  status.textContent = `ready: test accuracy before training ${(100 * before).toFixed(1)} %`;
  document.getElementById("train").addEventListener("click", async () => {
    demo.done = false;
    demo.losses = [];
    const steps = Number(document.getElementById("steps").value);
    const lr = Number(document.getElementById("lr").value);
    try {
      const result = await trainDigits(ort, assets, {
        steps, lr,
        onStep: async (step, loss) => {
          demo.losses.push(loss);
          if (step % 5 === 0 || step === steps - 1) {
            draw(demo.losses);
            status.textContent = `step ${step + 1}/${steps}: loss ${loss.toFixed(4)}`;
            await new Promise((resolve) => setTimeout(resolve, 0));
          }
        },
      });
      demo.accuracy = result.accuracy;
      status.textContent = `trained ${steps} steps: loss ${result.losses[0].toFixed(4)} → ` +
        `${result.losses.at(-1).toFixed(4)}; test accuracy ${(100 * before).toFixed(1)} % → ` +
        `${(100 * result.accuracy).toFixed(1)} %`;
      const link = document.getElementById("download");
      link.href = URL.createObjectURL(npz(result.state));
      link.hidden = false;
    } catch (error) {
      demo.error = String(error);
      status.textContent = `error: ${error}`;
    }
    demo.done = true;
  });
} catch (error) {
  demo.error = String(error);
  demo.done = true;
  status.textContent = `error: ${error}`;
}
