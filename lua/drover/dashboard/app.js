// The drover dashboard: plain JS, no build step.  Routes on
// location.pathname (the daemon serves index.html for /, /runs/ID and
// /deployments/NAME); reads the JSON API and follows /api/events (SSE).
// Everything from the store goes into the page as text, never as HTML.
"use strict";

const app = document.getElementById("app");
const live = document.getElementById("live");
let source = null;       // the page's EventSource
let refreshTimer = null;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(path, opts) {
  const r = await fetch(path, Object.assign({ headers: { accept: "application/json" } }, opts || {}));
  const body = await r.json().catch(() => ({ error: "bad response (" + r.status + ")" }));
  if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
  return body;
}

const fmtTime = (t) => t ? new Date(t * 1000).toLocaleString() : "-";
function fmtDuration(d) {
  if (d === undefined || d === null) return "-";
  if (d < 1) return Math.round(d * 1000) + "ms";
  if (d < 120) return d.toFixed(1) + "s";
  return Math.floor(d / 60) + "m" + String(Math.floor(d % 60)).padStart(2, "0") + "s";
}
const stateBadge = (s, id) => h("span", { class: "state " + s, id }, s);
// Bytes that are not UTF-8 come as {"$bytes": base64} (a log line, a
// binary result): shown as text, with each byte that is not part of a
// UTF-8 character (or is a control character) written \xNN.
const isBytes = (v) => v !== null && typeof v === "object" && !Array.isArray(v) &&
  typeof v["$bytes"] === "string" && Object.keys(v).length === 1;
const utf8 = new TextDecoder("utf-8", { fatal: true });
function bytesText(b64) {
  let bytes;
  try { bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)); } catch (e) { return "(bad base64)"; }
  let out = "";
  for (let i = 0; i < bytes.length;) {
    const b = bytes[i];
    const n = b < 0x80 ? 1 : b >= 0xc2 && b < 0xe0 ? 2 : b >= 0xe0 && b < 0xf0 ? 3 : b >= 0xf0 && b < 0xf5 ? 4 : 0;
    const control = (b < 0x20 && b !== 9 && b !== 10 && b !== 13) || b === 0x7f;
    if (n && !control) {
      try { out += utf8.decode(bytes.subarray(i, i + n)); i += n; continue; } catch (e) { /* not a character */ }
    }
    out += "\\x" + b.toString(16).toUpperCase().padStart(2, "0");
    i++;
  }
  return out;
}
// A value from the API as text: strings as they are, bytes decoded.
const text = (v) => isBytes(v) ? bytesText(v["$bytes"]) : v;
// Inside JSON, bytes show as b"..." (a JSON string would double each \).
function short(v) {
  if (v === undefined || v === null) return "";
  const parts = [];
  const s = typeof v === "string" ? v : isBytes(v) ? text(v)
    : JSON.stringify(v, (k, x) => isBytes(x) ? "\u0000" + (parts.push(text(x)) - 1) + "\u0000" : x)
      .replace(/"\\u0000(\d+)\\u0000"/g, (m, i) => 'b"' + parts[i] + '"');
  return s.length > 200 ? s.slice(0, 200) + "…" : s;
}
const ACTIVE = ["SCHEDULED", "PENDING", "RUNNING", "CANCELLING"];
const STATES = ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLING", "CANCELLED", "CRASHED"];

function follow(query, handlers) {
  if (source) source.close();
  source = new EventSource("/api/events" + query);
  source.onopen = () => live.classList.add("on");
  source.onerror = () => live.classList.remove("on");
  for (const [ev, fn] of Object.entries(handlers)) source.addEventListener(ev, (e) => fn(JSON.parse(e.data), e));
}

// Coalesce bursts of events into one refresh.
function scheduleRefresh(fn) {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; fn(); }, 150);
}

function showError(e) { app.replaceChildren(h("p", { class: "error" }, String(e.message || e))); }

// ---- runs list --------------------------------------------------------------

async function runsPage() {
  const params = new URLSearchParams(location.search);
  const state = params.get("state") || "";
  const select = h("select", { id: "state-filter", onchange: (e) => {
    const q = e.target.value ? "?state=" + e.target.value : "";
    history.pushState(null, "", "/" + q); route();
  } }, h("option", { value: "" }, "all states"), STATES.map((s) => h("option", { value: s, selected: s === state }, s)));
  const tbody = h("tbody");
  app.replaceChildren(h("h1", {}, "Flow runs"), h("div", { class: "toolbar" }, "State:", select),
    h("table", { id: "runs" }, h("thead", {}, h("tr", {}, ["Run", "Name", "Deployment", "State", "Started", "Duration"].map((c) => h("th", {}, c)))), tbody));
  async function load() {
    try {
      const runs = await api("/api/runs?limit=200" + (state ? "&state=" + state : ""));
      tbody.replaceChildren(...runs.map((r) => h("tr", {},
        h("td", { class: "code" }, h("a", { href: "/runs/" + r.id }, r.id)), h("td", {}, r.name),
        h("td", {}, r.deployment ? h("a", { href: "/deployments/" + encodeURIComponent(r.deployment) }, r.deployment) : "-"),
        h("td", {}, stateBadge(r.state)), h("td", {}, fmtTime(r.started || r.created)), h("td", {}, fmtDuration(r.duration)))));
      if (!runs.length) tbody.append(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No runs.")));
    } catch (e) { showError(e); }
  }
  await load();
  follow("", { run: () => scheduleRefresh(load) });
}

// ---- one run ----------------------------------------------------------------------

// A run's page reads its summary (task runs grouped by name) and pages
// through the task runs themselves, so a run of 20,000 task runs draws one
// bar per name at once and only the rows someone opens.
const TASK_PAGE = 50;

// The bar of a group takes the state that needs attention first.
function groupState(c) {
  for (const s of ["FAILED", "CRASHED", "RUNNING", "CANCELLING", "PENDING", "SCHEDULED", "CANCELLED"]) if (c[s]) return s;
  return "COMPLETED";
}

function taskPageURL(id, f, cursor, limit) {
  const q = new URLSearchParams({ limit: String(limit || TASK_PAGE) });
  if (f.state) q.set("state", f.state);
  if (f.name) q.set("name", f.name);
  if (cursor) q.set("cursor", cursor);
  return "/api/runs/" + encodeURIComponent(id) + "/task_runs?" + q;
}

// The time axis of a run's timeline: from the first start to the last end
// (now while something runs).
function span(groups) {
  const timed = groups.filter((g) => g.started);
  if (!timed.length) return null;
  const now = Date.now() / 1000;
  const t0 = Math.min(...timed.map((g) => g.started));
  const t1 = Math.max(...timed.map((g) => (g.ended && !g.counts.RUNNING && !g.counts.PENDING) ? g.ended : Math.max(g.ended || 0, now)));
  return { t0, width: Math.max(t1 - t0, 0.001), now };
}
const pos = (ax, a, b) => `left:${((a - ax.t0) / ax.width) * 100}%;width:${Math.max(((b - a) / ax.width) * 100, 0.3)}%`;

function countsText(c) {
  return STATES.filter((s) => c[s]).map((s) => c[s] + " " + s.toLowerCase()).join(", ");
}

// One task run's row inside an opened group.
function taskBar(ax, t) {
  const end = t.ended || ax.now;
  return h("div", { class: "row sub" }, h("div", { class: "label", title: t.call_key }, t.call_key || t.name),
    h("div", { class: "track" }, t.started ? h("div", { class: "bar " + t.state, style: pos(ax, t.started, end),
      title: `${t.name} ${t.state} ${fmtDuration(t.duration)}` }) : h("span", { class: "muted small" }, t.state)));
}

async function runPage(id) {
  const state = h("span", {}), meta = h("div", { class: "meta" }), timeline = h("div", { class: "gantt", id: "timeline" });
  const tasks = h("tbody"), logs = h("pre", { class: "logs", id: "logs" });
  const cancel = h("button", { id: "cancel", class: "danger", onclick: async () => {
    cancel.disabled = true;
    try { await api("/api/runs/" + id + "/cancel", { method: "POST" }); await refresh(); } catch (e) { alert(e.message); cancel.disabled = false; }
  } }, "Cancel");
  const title = h("h1", {}, "Run ", id);
  const summaryLine = h("span", { class: "muted", id: "task-summary" });
  // the task-run table: filters, and keyset pages (a stack of the cursors that led here)
  const filter = { state: "", name: "" };
  let cursors = [""], nextCursor = null;
  const stateSel = h("select", { id: "task-state", onchange: (e) => { filter.state = e.target.value; cursors = [""]; loadTasks(); } },
    h("option", { value: "" }, "all states"), STATES.map((s) => h("option", { value: s }, s)));
  const nameSel = h("select", { id: "task-name", onchange: (e) => { filter.name = e.target.value; cursors = [""]; loadTasks(); } },
    h("option", { value: "" }, "all names"));
  const prev = h("button", { id: "tasks-prev", onclick: () => { if (cursors.length > 1) { cursors.pop(); loadTasks(); } } }, "‹ Prev");
  const next = h("button", { id: "tasks-next", onclick: () => { if (nextCursor) { cursors.push(nextCursor); loadTasks(); } } }, "Next ›");
  const pageLabel = h("span", { class: "muted", id: "tasks-page" });
  app.replaceChildren(title, h("div", { class: "toolbar" }, state, cancel), meta,
    h("h2", {}, "Timeline ", summaryLine), timeline,
    h("h2", {}, "Task runs"), h("div", { class: "toolbar" }, "State:", stateSel, "Name:", nameSel, prev, next, pageLabel),
    h("table", { id: "tasks" }, h("thead", {}, h("tr", {}, ["Name", "Kind", "State", "Attempts", "Duration", "Params", "Result"].map((c) => h("th", {}, c)))), tasks),
    h("h2", {}, "Logs"), logs);

  const opened = new Map(); // group name -> its rows element (open groups), kept across redraws
  let first = true;

  let tasksGen = 0;
  async function loadTasks() {
    const gen = ++tasksGen;
    let page;
    try { page = await api(taskPageURL(id, filter, cursors[cursors.length - 1])); } catch (e) { showError(e); return; }
    if (gen !== tasksGen) return; // a later load (another page, a filter) answers instead
    nextCursor = page.next_cursor;
    prev.disabled = cursors.length <= 1;
    next.disabled = !nextCursor;
    pageLabel.textContent = "page " + cursors.length;
    tasks.replaceChildren(...page.task_runs.map((t) => h("tr", {},
      h("td", { title: t.call_key }, t.name), h("td", {}, t.kind), h("td", {}, stateBadge(t.state)), h("td", {}, t.attempts),
      h("td", {}, fmtDuration(t.duration)), h("td", { class: "code" }, short(t.params)),
      h("td", { class: "code" }, t.result_ok ? short(t.result) : h("span", { class: "error" }, short(t.message || t.result))))));
    if (!page.task_runs.length) tasks.append(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No task runs.")));
  }

  // An open group's task runs, a page at a time ("more" loads the next).
  // A box shows the answer of its latest request only: a refresh may
  // start another load of the same box while one is on its way.
  async function loadMembers(ax, name, box, cursor, limit) {
    const gen = box.gen = (box.gen || 0) + 1;
    // how many rows the box is to show once this answer is in: a live
    // update that reloads the box meanwhile (and so drops this answer)
    // asks for as many, so a "more" clicked just before it is not lost
    box.want = (cursor ? box.querySelectorAll(".row.sub").length : 0) + (limit || 100);
    let page;
    try { page = await api(taskPageURL(id, { name }, cursor, limit || 100)); } catch (e) { box.replaceChildren(h("p", { class: "error" }, e.message)); return; }
    if (gen !== box.gen || !box.isConnected) return;
    if (!cursor) box.replaceChildren();
    box.querySelector(".more")?.remove();
    box.append(...page.task_runs.map((t) => taskBar(ax, t)));
    if (page.next_cursor) {
      box.append(h("button", { class: "more", onclick: () => loadMembers(ax, name, box, page.next_cursor) }, "more…"));
    }
  }

  function drawTimeline(summary) {
    const groups = summary.groups;
    if (!groups.length) { timeline.replaceChildren(h("p", { class: "muted" }, "No task runs yet.")); return; }
    const ax = span(groups) || { t0: 0, width: 1, now: Date.now() / 1000 };
    timeline.replaceChildren(...groups.map((g) => {
      const cls = groupState(g.counts);
      const end = (g.counts.RUNNING || g.counts.PENDING) ? ax.now : (g.ended || ax.now);
      // the bar: the group's first start to its last end, split by state in proportion
      const bar = g.started ? h("div", { class: "bar group-bar " + cls, style: pos(ax, g.started, end), title: `${g.name}: ${countsText(g.counts)}` },
        STATES.filter((s) => g.counts[s]).map((s) => h("div", { class: "seg " + s, style: `flex:${g.counts[s]}` }))) : h("span", { class: "muted small" }, countsText(g.counts));
      const box = opened.get(g.name) || h("div", { class: "members" });
      const el = h("div", { class: "group", "data-name": g.name },
        h("div", { class: "row head", role: "button", tabindex: "0", onclick: () => toggle() },
          h("div", { class: "label", title: countsText(g.counts) }, h("span", { class: "caret" }), g.name, " ", h("span", { class: "muted" }, "×" + g.total)),
          h("div", { class: "track" }, bar)), box);
      function toggle() {
        if (opened.has(g.name)) { opened.delete(g.name); el.classList.remove("open"); box.replaceChildren(); return; }
        opened.set(g.name, box); el.classList.add("open");
        box.replaceChildren(h("p", { class: "muted small" }, "loading…"));
        loadMembers(ax, g.name, box, null);
      }
      if (opened.has(g.name)) {
        // open across a live update: the same rows again, as many as were shown (at most 1000)
        el.classList.add("open");
        loadMembers(ax, g.name, box, null, Math.min(Math.max(box.want || 0, box.querySelectorAll(".row.sub").length, 100), 1000));
      }
      return el;
    }));
    if (summary.groups_truncated) timeline.append(h("p", { class: "muted" }, "More names than shown: filter the table by name."));
  }

  async function refresh() {
    let r;
    try { r = await api("/api/runs/" + encodeURIComponent(id)); } catch (e) { showError(e); return; }
    document.title = `drover · ${r.name} · ${r.state}`;
    title.replaceChildren("Run ", r.name, " ", h("span", { class: "muted" }, r.id));
    state.replaceChildren(stateBadge(r.state, "run-state"));
    cancel.disabled = !ACTIVE.includes(r.state);
    meta.replaceChildren(...[
      h("span", {}, "deployment ", r.deployment ? h("a", { href: "/deployments/" + encodeURIComponent(r.deployment) }, h("b", {}, r.deployment)) : h("b", {}, "-")),
      h("span", {}, "backend ", h("b", {}, r.backend)), h("span", {}, "started ", h("b", {}, fmtTime(r.started))),
      h("span", {}, "duration ", h("b", {}, fmtDuration(r.duration))),
      r.message ? h("span", {}, "message ", h("b", { id: "run-message" }, text(r.message))) : null,
      h("span", {}, "params ", h("b", {}, short(r.params)))].filter(Boolean));
    const s = r.summary;
    summaryLine.textContent = `${s.total} task runs, ${s.groups.length} names` + (s.total ? ": " + countsText(s.counts) : "");
    drawTimeline(s);
    if (first) { first = false; performance.mark("drover:first-content"); }
    const names = s.groups.map((g) => g.name);
    if (nameSel.options.length - 1 !== names.length || names.some((n, i) => nameSel.options[i + 1].value !== n)) {
      nameSel.replaceChildren(h("option", { value: "" }, "all names"), ...names.map((n) => h("option", { value: n, selected: n === filter.name }, n)));
    }
  }

  await refresh();
  await loadTasks();
  follow("?run=" + encodeURIComponent(id) + "&after=0", {
    // a change: the summary and the page shown again, never every task run
    run: (r) => { if (r.id === id) scheduleRefresh(() => { refresh(); loadTasks(); }); },
    log: (l) => {
      const atEnd = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
      logs.append(text(l.line) + "\n");
      if (atEnd) logs.scrollTop = logs.scrollHeight;
    },
  });
}

// ---- one deployment --------------------------------------------------------------

async function deploymentPage(name) {
  let d;
  try { d = await api("/api/deployments/" + encodeURIComponent(name)); } catch (e) { showError(e); return; }
  app.replaceChildren(h("h1", {}, "Deployment ", d.name),
    h("div", { class: "meta" }, h("span", {}, "backend ", h("b", {}, d.backend)),
      h("span", {}, "package ", h("b", {}, (d.package_id || "-").slice(0, 12))),
      h("span", {}, "schedule ", h("b", {}, d.schedule || "-")), h("span", {}, "paused ", h("b", {}, d.paused ? "yes" : "no")),
      h("span", {}, "params ", h("b", {}, short(d.params)))),
    h("h2", {}, "Recent runs"),
    h("table", { id: "runs" }, h("thead", {}, h("tr", {}, ["Run", "State", "Started", "Duration"].map((c) => h("th", {}, c)))),
      h("tbody", {}, d.runs.map((r) => h("tr", {}, h("td", { class: "code" }, h("a", { href: "/runs/" + r.id }, r.id)),
        h("td", {}, stateBadge(r.state)), h("td", {}, fmtTime(r.started || r.created)), h("td", {}, fmtDuration(r.duration)))))));
  follow("", { run: (r) => { if (r.deployment === name) scheduleRefresh(() => deploymentPage(name)); } });
}

function route() {
  const p = location.pathname;
  let m;
  if ((m = p.match(/^\/runs\/([^/]+)\/?$/))) return runPage(decodeURIComponent(m[1]));
  if ((m = p.match(/^\/deployments\/([^/]+)\/?$/))) return deploymentPage(decodeURIComponent(m[1]));
  return runsPage();
}
window.addEventListener("popstate", route);
route();
