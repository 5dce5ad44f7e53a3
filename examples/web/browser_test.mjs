// Drive the page in headless Chromium (playwright-core, the system's Chromium):
// train STEPS steps and print the page's results as JSON.
//   node browser_test.mjs URL STEPS        (CHROMIUM names the browser; default /usr/bin/chromium)
import { chromium } from "playwright-core";

const [url, steps] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  page.on("console", (message) => console.error(`page: ${message.text()}`));
  page.on("pageerror", (error) => console.error(`page error: ${error}`));
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("ready")
                             || (window.onnxgradDemo && window.onnxgradDemo.error), null,
                             { timeout: 60000 });
  await page.fill("#steps", String(steps));
  await page.click("#train");
  await page.waitForFunction(() => window.onnxgradDemo.done, null, { timeout: 180000 });
  const result = await page.evaluate(async () => {
    const link = document.getElementById("download");
    let weights = null;
    if (!link.hidden) {  // the offered file, as base64
      const bytes = new Uint8Array(await (await fetch(link.href)).arrayBuffer());
      weights = btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join(""));
    }
    return { ...window.onnxgradDemo, status: document.getElementById("status").textContent,
             weights };
  });
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
