// The daemon against a hostile page, in a real browser (headless Chromium
// through playwright-core).  Run by tests/dashboard_spec.lua:
//   DAEMON=http://127.0.0.1:PORT  VICTIM=<id of a RUNNING run>
//   BINARY=<id of a run with bytes that are not UTF-8>
//   node tests/dashboard/hardening.test.js
// A page of another site (evil.test, a server of this script's own) tries
// a cross-site POST to cancel VICTIM (fetch with mode no-cors, and a form)
// and a DNS-rebinding read (evil.test resolves to 127.0.0.1 through
// Chromium's --host-resolver-rules, so the daemon sees Host: evil.test).
// Both must be refused, and VICTIM must still be running.  Then the
// dashboard shows BINARY's bytes.  Prints "ok N - ..." / "not ok N - ...".
"use strict";
const http = require("http");
const { chromium } = require("playwright-core");

const daemon = new URL(process.env.DAEMON);
const victim = process.env.VICTIM, binary = process.env.BINARY;
let n = 0, failed = 0;

async function check(name, fn) {
  n++;
  try { await fn(); console.log(`ok ${n} - ${name}`); }
  catch (e) { failed++; console.log(`not ok ${n} - ${name}\n# ${String(e.stack || e).split("\n").join("\n# ")}`); }
}

function getJSON(path) {
  return new Promise((resolve, reject) => {
    http.get(new URL(path, daemon), (res) => {
      let body = "";
      res.on("data", (c) => { body += c; });
      res.on("end", () => { try { resolve(JSON.parse(body)); } catch (e) { reject(new Error(body)); } });
    }).on("error", reject);
  });
}

const cancelURL = new URL(`/api/runs/${victim}/cancel`, daemon).href;
// The attacker's page: a no-cors fetch (a "simple" request: text/plain, no
// preflight) and a form posted into a frame, both with the full run id.
const evilPage = `<!doctype html><title>evil</title>
<iframe name="sink"></iframe>
<form id="f" method="POST" action="${cancelURL}" enctype="text/plain" target="sink">
<input name='{"x":"' value='"}'></form>
<script>
fetch(${JSON.stringify(cancelURL)}, { method: "POST", mode: "no-cors", body: "{}",
  headers: { "content-type": "text/plain" } }).then(() => { document.title = "fetched"; },
  () => { document.title = "fetch failed"; });
</script>`;

(async () => {
  const evil = http.createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
    res.end(evilPage);
  });
  await new Promise((r) => evil.listen(0, "127.0.0.1", r));
  const evilURL = `http://evil.test:${evil.address().port}/`;
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium", headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--host-resolver-rules=MAP evil.test 127.0.0.1"],
  });
  const page = await browser.newPage();
  const errors = [];
  try {
    await check("a cross-site POST (no-cors fetch and a form) is refused; the run is not cancelled", async () => {
      const answers = [];
      page.on("response", (r) => { if (r.url() === cancelURL) answers.push(r.status()); });
      await page.goto(evilURL);
      await page.waitForFunction(() => document.title !== "evil", null, { timeout: 30000 });
      await page.evaluate(() => document.getElementById("f").submit());
      const deadline = Date.now() + 30000;
      while (answers.length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      if (answers.length !== 2) throw new Error("the daemon answered " + answers.length + " of 2 requests: " + answers);
      if (answers.some((s) => s !== 403)) throw new Error("the daemon answered " + answers.join(", ") + " (403 expected)");
      const run = await getJSON(`/api/runs/${victim}`);
      if (run.state !== "RUNNING") throw new Error("the run is " + run.state);
    });

    await check("a DNS-rebinding read (Host: evil.test) is refused and shows nothing", async () => {
      const port = daemon.port;
      for (const path of ["/api/runs", `/api/runs/${victim}`, "/"]) {
        const r = await page.goto(`http://evil.test:${port}${path}`);
        const body = await r.text();
        if (r.status() !== 421) throw new Error(`${path}: ${r.status()} ${body.slice(0, 200)}`);
        if (body.includes(victim)) throw new Error(`${path}: the answer shows the run: ${body}`);
      }
      // the same page from the loopback name works
      const ok = await page.goto(new URL("/api/runs", daemon).href);
      if (ok.status() !== 200) throw new Error("loopback read: " + ok.status());
    });

    await check("the run page shows bytes that are not UTF-8 as \\xNN", async () => {
      page.on("pageerror", (e) => errors.push(String(e)));
      await page.goto(new URL(`/runs/${binary}`, daemon).href);
      await page.locator("#run-state", { hasText: "COMPLETED" }).waitFor({ timeout: 30000 });
      await page.locator("#logs", { hasText: "bad \\xFF\\xFE line" }).waitFor({ timeout: 30000 });
      const meta = await page.locator(".meta").innerText();
      if (!meta.includes('"y":b"\\xFF\\xFE"')) throw new Error("params: " + meta);
      const tasks = await page.locator("#tasks").innerText();
      // a task's arguments: bytes shown as the run's params show them
      if (!tasks.includes('[b"\\xFF\\xFE"]')) throw new Error("task params: " + tasks);
      if (errors.length) throw new Error(errors.join("\n"));
    });
  } finally {
    await browser.close();
    evil.close();
  }
  console.log(`1..${n}`);
  process.exit(failed ? 1 : 0);
})().catch((e) => { console.log("not ok - " + String(e.stack || e).split("\n").join("\n# ")); process.exit(1); });
