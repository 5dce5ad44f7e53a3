// Train the digits step model in Node with onnxruntime-node, as the page does in the
// browser, and write the result (losses, test accuracy, the state as .npz) for the
// test to compare with Python:  node node_train.mjs ASSET_DIR STEPS OUT.json OUT.npz
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";

import * as ort from "onnxruntime-node";

import { loadAssets, npz, trainDigits } from "./trainer.mjs";

const [dir, steps, jsonPath, npzPath] = process.argv.slice(2);
const assets = await loadAssets((name) => readFile(path.join(dir, name)));
const result = await trainDigits(ort, assets, { steps: Number(steps) });
await writeFile(jsonPath, JSON.stringify({ losses: result.losses, accuracy: result.accuracy }));
await writeFile(npzPath, Buffer.from(await npz(result.state).arrayBuffer()));
console.log(`trained ${steps} steps: loss ${result.losses[0].toFixed(4)} -> ` +
            `${result.losses.at(-1).toFixed(4)}, test accuracy ${result.accuracy.toFixed(4)}`);
