// The dashboard's browser test: starts `colony demo --keep-running` (a live local swarm that
// trains, serves Hogwild! jobs, routes and patches), opens node 0's dashboard in headless
// Debian Chromium through playwright-core, and checks that the peers, the loss chart and a
// Hogwild! job appear and then update; that the page asks nothing of any other host; and that
// it fits a phone's width. Saves screenshots (laptop and phone) under target/browser/.
//
//   node tests/browser/dashboard.mjs        (after `cargo build -p colony-daemon --bin colony`)
//
// Env: COLONY_BIN (default target/debug/colony), CHROMIUM (default /usr/bin/chromium),
// COLONY_BROWSER_OUT (default target/browser).
import { spawn } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const bin = process.env.COLONY_BIN || path.join(root, "target/debug/colony");
const browserPath = process.env.CHROMIUM || "/usr/bin/chromium";
const out = process.env.COLONY_BROWSER_OUT || path.join(root, "target/browser");
mkdirSync(out, { recursive: true });

const t0 = Date.now();
const phase = (what) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(6)} s] ${what}`);

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function waitFor(what, seconds, probe) {
  const deadline = Date.now() + seconds * 1000;
  let last;
  while (Date.now() < deadline) {
    try {
      const v = await probe();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`timed out after ${seconds} s waiting for ${what}${last ? ": " + last.message : ""}`);
}

const port = await freePort();
const base = `http://127.0.0.1:${port}`;
let log = "";
const demo = spawn(bin, ["demo", "--keep-running", "--http", `127.0.0.1:${port}`], {
  cwd: root,
  env: { ...process.env, COLONY_LOG: process.env.COLONY_LOG || "warn" },
  stdio: ["ignore", "pipe", "pipe"],
});
demo.stdout.on("data", (d) => (log += d));
demo.stderr.on("data", (d) => (log += d));
let demoExit = null;
demo.on("exit", (code, signal) => (demoExit = { code, signal }));

let browser;
let failed = false;
try {
  phase(`colony demo on ${base}`);
  await waitFor("the node's HTTP API", 120, async () => {
    if (demoExit) throw new Error(`colony demo exited early: ${JSON.stringify(demoExit)}\n${log}`);
    const r = await fetch(`${base}/healthz`);
    return r.ok;
  });

  browser = await chromium.launch({
    executablePath: browserPath,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
      "--disable-component-update", "--no-first-run", "--disable-default-apps", "--disable-sync"],
  });
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
  const page = await context.newPage();
  const foreign = [];
  page.on("request", (req) => {
    const u = new URL(req.url());
    if (u.hostname !== "127.0.0.1" && u.protocol !== "data:") foreign.push(req.url());
  });
  const consoleErrors = [];
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));

  await page.goto(`${base}/`);
  phase("page loaded");
  await page.waitForSelector("#conn.on", { timeout: 30_000 });
  phase("live updates connected");

  // The swarm: node 0 sees the three other nodes, each with its role.
  await page.waitForFunction(() => document.querySelectorAll("#peers-table tbody tr").length >= 3, null, { timeout: 60_000 });
  const roles = await page.$$eval("#peers-table tbody tr", (rows) => rows.map((r) => r.children[1].textContent));
  if (!roles.every((r) => r === "node" || r === "client")) throw new Error(`unexpected roles ${roles}`);
  phase(`peers: ${roles.length} (${roles.join(", ")})`);

  // Training: a loss chart with points, then more points as the swarm keeps training.
  const lossPoints = () => page.evaluate(() => {
    let n = 0;
    for (const [k, c] of window.colony.charts) if (k.startsWith("loss:")) n += c.data[0].length;
    return n;
  });
  await page.waitForFunction(() => {
    for (const [k, c] of window.colony.charts) if (k.startsWith("loss:") && c.data[0].length >= 2) return true;
    return false;
  }, null, { timeout: 240_000, polling: 500 });
  const canvases = await page.$$(".run .loss-chart canvas");
  if (canvases.length === 0) throw new Error("no loss chart canvas");
  const firstLoss = await lossPoints();
  phase(`loss chart: ${firstLoss} points`);

  // Inference: a Hogwild! job with its workers side by side, writing.
  await page.waitForFunction(() => {
    const pres = [...document.querySelectorAll("#hogwild .job .worker pre")];
    return pres.length >= 2 && pres.some((p) => p.textContent.trim().length > 0);
  }, null, { timeout: 240_000, polling: 500 });
  const workerText = () => page.$$eval("#hogwild .job .worker pre", (ps) => ps.map((p) => p.textContent).join("\u0000"));
  const firstText = await workerText();
  const workers = await page.$$eval("#hogwild .job:first-child .worker", (w) => w.length);
  phase(`Hogwild job on the page with ${workers} workers`);

  // Both update: more loss points, and the workers' text changes (more tokens, or a new job).
  await waitFor("the loss chart to grow", 240, async () => (await lossPoints()) > firstLoss);
  phase(`loss chart grew to ${await lossPoints()} points`);
  await waitFor("the Hogwild workers' text to change", 240, async () => (await workerText()) !== firstText);
  phase("Hogwild text updated");
  await page.waitForFunction(() => document.querySelectorAll("#shards-table tbody tr").length >= 2, null, { timeout: 60_000 });
  await page.waitForFunction(() => document.querySelectorAll("#chain-table tbody tr").length >= 3, null, { timeout: 60_000 });
  phase("shard map and patch log shown");
  // After its steps the demo keeps training in a second run: its card appears and fills.
  await page.waitForFunction(() => {
    const live = (window.colony.last?.runs || []).find((r) => r.active && r.run.endsWith("-live"));
    return live && live.history.filter((p) => p.kind === "averaged").length >= 2;
  }, null, { timeout: 240_000, polling: 500 });
  phase("the live run is charted");

  await page.screenshot({ path: path.join(out, "dashboard.png"), fullPage: true });

  // A phone: nothing wider than the screen.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(1500);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 1) throw new Error(`the page is ${overflow}px wider than a phone's screen`);
  await page.screenshot({ path: path.join(out, "dashboard-phone.png"), fullPage: false });
  phase("phone layout fits");

  if (foreign.length) throw new Error(`the page asked other hosts: ${foreign.join(", ")}`);
  if (consoleErrors.length) throw new Error(`errors in the page: ${consoleErrors.join("; ")}`);
  phase(`ok; screenshots in ${out}`);
} catch (e) {
  failed = true;
  console.error(`dashboard test failed: ${e.stack || e}`);
  writeFileSync(path.join(out, "demo.log"), log);
  console.error(`colony demo's output is in ${path.join(out, "demo.log")}`);
} finally {
  if (browser) await browser.close().catch(() => {});
  if (!demoExit) {
    demo.kill("SIGINT");
    await waitFor("colony demo to stop", 30, async () => demoExit !== null).catch(() => demo.kill("SIGKILL"));
  }
}
process.exit(failed ? 1 : 0);
