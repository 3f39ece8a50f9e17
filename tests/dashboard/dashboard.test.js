// The dashboard in a real browser (headless Chromium through playwright-core),
// against a real daemon and real local runs.  Run by tests/dashboard_spec.lua:
//   DROVER_BIN=... DROVER_HOME=... (deployments "ok" and "long" exist)
//   SCREENSHOT=docs/dashboard.png node tests/dashboard/dashboard.test.js
// Prints "ok N - ..." / "not ok N - ..." lines; exits 1 on any failure.
"use strict";
const { chromium } = require("playwright-core");
const { execFileSync } = require("child_process");

const bin = process.env.DROVER_BIN;
const env = Object.assign({}, process.env, { LD_PRELOAD: "" });
const marker = String(5000 + Math.floor(Math.random() * 4000)) + ".625";
let n = 0, failed = 0;

function droverRun(args) {
  const out = execFileSync(bin, ["run", ...args], { env, encoding: "utf8" }).trim();
  const [id, url] = out.split(/\s+/);
  if (!/^[0-9a-f]+$/.test(id) || !/^http:\/\/127\.0\.0\.1:\d+\/runs\//.test(url)) throw new Error("drover run printed: " + out);
  return { id, url };
}

async function check(name, fn) {
  n++;
  try { await fn(); console.log(`ok ${n} - ${name}`); }
  catch (e) { failed++; console.log(`not ok ${n} - ${name}\n# ${String(e.stack || e).split("\n").join("\n# ")}`); }
}

(async () => {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium", headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  let short;
  try {
    await check("the URL drover run prints shows the run reaching COMPLETED", async () => {
      short = droverRun(["ok"]);
      await page.goto(short.url);
      await page.locator("#run-state", { hasText: "COMPLETED" }).waitFor({ timeout: 60000 });
      await page.locator("#timeline .bar.COMPLETED").first().waitFor({ timeout: 30000 });
      const rows = await page.locator("#tasks tbody tr").count();
      if (rows !== 2) throw new Error("expected 2 task runs in the table, got " + rows);
      const text = await page.locator("#tasks").innerText();
      if (!text.includes("Fixture.shout") || !text.includes("HELLO")) throw new Error("task table: " + text);
      await page.locator("#logs", { hasText: "fixture says HELLO" }).waitFor({ timeout: 30000 });
      if (!(await page.locator("#cancel").isDisabled())) throw new Error("Cancel is enabled on a finished run");
      const meta = await page.locator(".meta").innerText();
      if (/\b(null|undefined|NaN)\b/.test(meta)) throw new Error("run details show: " + meta);
    });

    await check("Cancel on a long run's page ends it CANCELLED", async () => {
      const long = droverRun(["long", "marker=" + marker]);
      await page.goto(long.url);
      await page.locator("#run-state", { hasText: "RUNNING" }).waitFor({ timeout: 60000 });
      await page.locator("#cancel:not([disabled])").click();
      await page.locator("#run-state", { hasText: "CANCELLED" }).waitFor({ timeout: 60000 });
      console.log("# cancelled run " + long.id + " marker " + marker);
    });

    await check("the runs list shows both runs and filters by state", async () => {
      await page.goto(new URL("/", short.url).href);
      await page.locator("#runs tbody tr").nth(1).waitFor({ timeout: 30000 });
      await page.selectOption("#state-filter", "COMPLETED");
      await page.waitForURL(/\?state=COMPLETED$/);
      await page.locator(`#runs a[href="/runs/${short.id}"]`).waitFor({ timeout: 30000 });
      const states = await page.locator("#runs tbody .state").allInnerTexts();
      if (!states.length || states.some((s) => s !== "COMPLETED")) throw new Error("filtered states: " + states);
    });

    await check("the deployment page lists its runs", async () => {
      await page.goto(new URL("/deployments/ok", short.url).href);
      await page.locator(`#runs a[href="/runs/${short.id}"]`).waitFor({ timeout: 30000 });
    });

    await check("screenshot of a run page", async () => {
      await page.goto(short.url);
      await page.locator("#logs", { hasText: "fixture says HELLO" }).waitFor({ timeout: 30000 });
      await page.screenshot({ path: process.env.SCREENSHOT || "dashboard.png", fullPage: true });
    });

    // issue 13: a run of 20,000 task runs (BIG, made by tests/bigrun_fixture.lua)
    const bigURL = new URL("/runs/" + process.env.BIG, short.url).href;
    await check("a 20,000-task run's page shows one bar per name at once (time to first content)", async () => {
      await page.goto(bigURL, { waitUntil: "commit" });
      await page.locator("#timeline .group .bar").first().waitFor({ state: "visible", timeout: 60000 });
      const t = await page.evaluate(() => ({
        seen: performance.now(),
        mark: (performance.getEntriesByName("drover:first-content")[0] || {}).startTime,
      }));
      console.log(`# time to first content: ${t.mark.toFixed(0)} ms to the first group bar drawn ` +
        `(${t.seen.toFixed(0)} ms when the test saw it), 20,000 task runs`);
      const groups = await page.locator("#timeline .group").count();
      if (groups !== Number(process.env.BIG_NAMES)) throw new Error(`${groups} groups, ${process.env.BIG_NAMES} expected`);
      const bars = await page.locator("#timeline .bar").count();
      if (bars !== groups) throw new Error(`${bars} bars drawn for ${groups} groups`);
      const summary = await page.locator("#task-summary").innerText();
      if (!summary.includes("20000 task runs")) throw new Error("summary: " + summary);
      // a generous bound only: the speed itself is a number to read, not to test
      if (t.mark > 20000) throw new Error("first content after " + t.mark + " ms");
    });

    await check("opening a group loads its task runs a page at a time", async () => {
      const group = page.locator('#timeline .group[data-name="step-7"]');
      await group.locator(".row.head").click();
      await group.locator(".members .row.sub").nth(99).waitFor({ timeout: 30000 });
      if ((await group.locator(".members .row.sub").count()) !== 100) throw new Error("first page is not 100 rows");
      await group.locator(".members .more").click();
      await group.locator(".members .row.sub").nth(199).waitFor({ timeout: 30000 });
      const labels = await group.locator(".members .row.sub .label").allInnerTexts();
      if (labels.some((l) => !l.startsWith("step-7:"))) throw new Error("rows of other names: " + labels.slice(0, 5));
      if (new Set(labels).size !== labels.length) throw new Error("a task run shown twice");
    });

    await check("the task-run table pages, and filters by state and name", async () => {
      const rows = page.locator("#tasks tbody tr");
      if ((await rows.count()) !== 50) throw new Error("first page: " + (await rows.count()) + " rows");
      const first = await rows.first().innerText();
      await page.click("#tasks-next");
      await page.locator("#tasks-page", { hasText: "page 2" }).waitFor({ timeout: 30000 });
      if ((await rows.first().innerText()) === first) throw new Error("page 2 shows page 1");
      await page.click("#tasks-prev");
      await page.locator("#tasks-page", { hasText: "page 1" }).waitFor({ timeout: 30000 });
      await page.selectOption("#task-state", "FAILED");
      await page.selectOption("#task-name", "step-3");
      await page.waitForFunction(() => {
        const s = [...document.querySelectorAll("#tasks tbody tr")].map((r) => r.innerText);
        return s.length > 0 && s.every((t) => /^step-3\b/.test(t) && t.includes("FAILED"));
      }, null, { timeout: 30000 });
    });

    await check("a live update shows a new group and the changed counts", async () => {
      const before = await page.locator("#task-summary").innerText();
      execFileSync(bin, [process.env.BIGRUN_FIXTURE, "late", process.env.DROVER_HOME, process.env.BIG], { env });
      await page.locator('#timeline .group[data-name="late-step"] .bar.RUNNING').waitFor({ timeout: 30000 });
      await page.locator("#task-summary", { hasText: "20003 task runs" }).waitFor({ timeout: 30000 });
      // the open group stays open, its rows loaded again
      await page.locator('#timeline .group.open[data-name="step-7"] .members .row.sub').first().waitFor({ timeout: 30000 });
      if ((await page.locator("#task-summary").innerText()) === before) throw new Error("summary unchanged");
    });

    await check("no JavaScript errors on the pages", async () => {
      if (errors.length) throw new Error(errors.join("\n"));
    });
  } finally {
    await browser.close();
  }
  console.log(`1..${n}`);
  process.exit(failed ? 1 : 0);
})().catch((e) => { console.log("not ok - " + String(e.stack || e).split("\n").join("\n# ")); process.exit(1); });
