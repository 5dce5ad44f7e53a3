// The training loop of onnxgrad's step models, shared by the page (onnxruntime-web)
// and the Node test (onnxruntime-node): run the step model, copy each state output
// to the input it replaces, repeat.  `ort` is the runtime's module.

/** The assets that examples/web/make_assets.py writes, read through `read(name)`
 * (a function that returns the file's bytes as an ArrayBuffer or Uint8Array). */
export async function loadAssets(read) {
  const bytes = async (name) => {
    const data = await read(name);
    return data instanceof ArrayBuffer ? new Uint8Array(data) : Uint8Array.from(data);
  };
  const meta = JSON.parse(new TextDecoder().decode(await bytes("digits.json")));
  const split = async (name) => ({
    x: new Float32Array((await bytes(`digits_${name}_x.bin`)).buffer),
    y: new BigInt64Array((await bytes(`digits_${name}_y.bin`)).buffer),
    ...meta[name],
  });
  return {
    meta,
    stepModel: await bytes("digits_step.onnx"),
    initModel: await bytes("digits_step.init.onnx"),
    evalModel: await bytes("digits_eval.onnx"),
    train: await split("train"),
    test: await split("test"),
  };
}

/** `steps` training steps on consecutive batches of the training data; then the
 * test accuracy of the trained weights.  `onStep(step, loss)` is called after each. */
export async function trainDigits(ort, assets, { steps = 60, batchSize = 32, lr, onStep } = {}) {
  const { meta, train, test } = assets;
  const options = { logSeverityLevel: 3 };  // errors only: state inputs are initializers by design
  const session = await ort.InferenceSession.create(assets.stepModel, options);
  const features = train.features;
  const batches = Math.floor(train.count / batchSize);
  const initial = await ort.InferenceSession.create(assets.initModel, options);
  const state = await initial.run({});  // the first value of every state input
  if (lr !== undefined) state.lr = new ort.Tensor("float32", Float32Array.from([lr]), []);
  const losses = [];
  for (let step = 0; step < steps; step += 1) {
    const start = (step % batches) * batchSize;
    const feeds = {
      [meta.input]: new ort.Tensor("float32", train.x.slice(start * features,
        (start + batchSize) * features), [batchSize, features]),
      target: new ort.Tensor("int64", train.y.slice(start, start + batchSize), [batchSize]),
      ...state,
    };
    const outputs = await session.run(feeds);
    for (const [output, input] of Object.entries(meta.state)) state[input] = outputs[output];
    losses.push(Number(outputs.loss.data[0]));
    if (onStep) await onStep(step, losses[step]);
  }
  const accuracy = await testAccuracy(ort, assets, state);
  return { losses, accuracy, state };
}

/** The accuracy on the test data of the evaluation model with the weights of `state`. */
export async function testAccuracy(ort, assets, state) {
  const { meta, test } = assets;
  const evaluator = await ort.InferenceSession.create(assets.evalModel, { logSeverityLevel: 3 });
  const feeds = { [meta.input]: new ort.Tensor("float32", test.x, [test.count, test.features]) };
  for (const name of meta.trained) feeds[name] = state[name];
  const logits = (await evaluator.run(feeds))[meta.output];
  const classes = logits.dims[1];
  let right = 0;
  for (let i = 0; i < test.count; i += 1) {
    let best = 0;
    for (let c = 1; c < classes; c += 1) {
      if (logits.data[i * classes + c] > logits.data[i * classes + best]) best = c;
    }
    if (BigInt(best) === test.y[i]) right += 1;
  }
  return right / test.count;
}

/** The tensors of `state` as a NumPy .npz archive (stored, uncompressed), which
 * `onnxgrad apply MODEL weights.npz --out TRAINED.onnx` writes into the model. */
export function npz(state) {
  const files = Object.entries(state).map(([name, tensor]) => [`${name}.npy`, npy(tensor)]);
  return zip(files);
}

function npy(tensor) {
  const descr = { float32: "<f4", int64: "<i8" }[tensor.type];
  if (!descr) throw new Error(`cannot write a ${tensor.type} tensor as .npy`);
  const shape = tensor.dims.length === 1 ? `${tensor.dims[0]},` : tensor.dims.join(", ");
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${shape}), }`;
  header += " ".repeat(63 - ((header.length + 10) % 64)) + "\n";
  const head = new Uint8Array(10 + header.length);
  head.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, header.length & 255, header.length >> 8]);
  head.set(new TextEncoder().encode(header), 10);
  const body = new Uint8Array(tensor.data.buffer, tensor.data.byteOffset, tensor.data.byteLength);
  const out = new Uint8Array(head.length + body.length);
  out.set(head);
  out.set(body, head.length);
  return out;
}

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 255] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function zip(files) {
  const parts = [];
  const central = [];
  let offset = 0;
  for (const [name, data] of files) {
    const nameBytes = new TextEncoder().encode(name);
    const crc = crc32(data);
    const local = new DataView(new ArrayBuffer(30));
    local.setUint32(0, 0x04034b50, true);
    local.setUint16(4, 20, true);
    local.setUint32(14, crc, true);
    local.setUint32(18, data.length, true);
    local.setUint32(22, data.length, true);
    local.setUint16(26, nameBytes.length, true);
    const entry = new DataView(new ArrayBuffer(46));
    entry.setUint32(0, 0x02014b50, true);
    entry.setUint16(4, 20, true);
    entry.setUint16(6, 20, true);
    entry.setUint32(16, crc, true);
    entry.setUint32(20, data.length, true);
    entry.setUint32(24, data.length, true);
    entry.setUint16(28, nameBytes.length, true);
    entry.setUint32(42, offset, true);
    parts.push(new Uint8Array(local.buffer), nameBytes, data);
    central.push(new Uint8Array(entry.buffer), nameBytes);
    offset += 30 + nameBytes.length + data.length;
  }
  const size = central.reduce((total, part) => total + part.length, 0);
  const end = new DataView(new ArrayBuffer(22));
  end.setUint32(0, 0x06054b50, true);
  end.setUint16(8, files.length, true);
  end.setUint16(10, files.length, true);
  end.setUint32(12, size, true);
  end.setUint32(16, offset, true);
  return new Blob([...parts, ...central, new Uint8Array(end.buffer)],
    { type: "application/zip" });
}
