// tunelab studio: the pages' behaviour. Plain JavaScript, no build step; curves by uPlot.
"use strict";

const $ = (id) => document.getElementById(id);
const content = () => $("content");
const params = new URLSearchParams(location.search);

function esc(s) { const d = document.createElement("div"); d.textContent = s == null ? "" : String(s); return d.innerHTML; }
function csrf() { const m = document.cookie.match(/(?:^|; )tunelab_studio_csrf=([^;]*)/); return m ? m[1] : ""; }
async function getJSON(path) {
  const r = await fetch(path);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error ? (body.error.message || body.error) : r.statusText);
  return body;
}
async function post(path, body) {
  return fetch(path, {method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf()},
                      body: JSON.stringify(body)});
}
function fmt(v, digits = 4) {
  if (v == null || v === "") return "";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(digits);
  return String(v);
}
function duration(s) {
  if (s == null) return "";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}
// The data folder's picker: folders to open, files to pick (paths relative to the data folder).
async function picker(box, onFile, folder = "") {
  const listing = await getJSON("/api/files?folder=" + encodeURIComponent(folder));
  box.hidden = false;
  const up = listing.folder ? `<a data-folder="${esc(listing.folder.split("/").slice(0, -1).join("/"))}">..</a>` : "";
  box.innerHTML = up + listing.folders.map((f) => `<a data-folder="${esc(f)}">${esc(f)}/</a>`).join("") +
    listing.files.map((f) => `<a data-file="${esc(f)}">${esc(f)}</a>`).join("");
  box.querySelectorAll("a").forEach((a) => a.addEventListener("click", () => {
    if (a.dataset.file != null) { box.hidden = true; onFile(a.dataset.file); } else picker(box, onFile, a.dataset.folder);
  }));
}
async function methodBoxes(el) {
  const {fields} = await getJSON("/api/form");
  const methods = ["none", ...fields.find((f) => f.key === "method").choices];
  el.innerHTML = methods.map((m) => `<label><input type="checkbox" class="method" value="${esc(m)}" ${["none", "full", "lora"].includes(m) ? "checked" : ""}> ${esc(m)}</label>`).join(" ");
}
const tickedMethods = (el) => [...el.querySelectorAll("input.method:checked")].map((i) => i.value);
function errorText(out) { return out.error || Object.values(out.errors || {}).join("; ") || "failed"; }

function badge(status) { return `<span class="badge ${esc(status)}">${esc(status)}</span>`; }
function runLink(name) { return `<a href="/run?name=${encodeURIComponent(name)}">${esc(name)}</a>`; }

// ------------------------------------------------------------------------------------- charts

const COLORS = ["#2b7bd6", "#d9480f", "#2e8b57", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d"];

// A line chart of one or more series over steps: {xs: [...], series: [{label, ys}]}
function makeChart(el, title, labels, width = 390, height = 230) {
  el.innerHTML = `<h3>${esc(title)}</h3>`;
  const opts = {
    width, height, scales: {x: {time: false}}, legend: {show: labels.length > 1},
    axes: [{label: "step"}, {}],
    series: [{label: "step"}, ...labels.map((l, i) => ({label: l, stroke: COLORS[i % COLORS.length], width: 1.5,
                                                        spanGaps: true, points: {size: 4}}))],
  };
  const data = [[], ...labels.map(() => [])];
  const plot = new uPlot(opts, data, el);
  return {el, plot, data, add(step, values) {
    this.data[0].push(step);
    values.forEach((v, i) => this.data[i + 1].push(v == null ? null : v));
    this.el.dataset.points = String(this.data[0].length);
    this.plot.setData(this.data);
  }, reset() { this.data = [[], ...labels.map(() => [])]; this.el.dataset.points = "0"; this.plot.setData(this.data); }};
}

// ---------------------------------------------------------------------------------------- runs

const COLUMNS = [
  ["", null], ["run", "name"], ["status", "status"], ["task", "task"], ["method", "method"], ["model", "model"],
  ["metric", "value"], ["time", "seconds"], ["samples/s", "samples_per_s"], ["progress", "progress"],
];

async function runsPage() {
  content().innerHTML = `
    <div class="toolbar"><input id="filter" placeholder="filter: name, task, method, model, status" size="40">
    <button id="compare-selected">Compare selected</button><a href="/new"><button class="primary">New run</button></a>
    <span class="muted" id="count"></span></div>
    <table class="wide" id="runs"><thead><tr>${COLUMNS.map(([label, key]) =>
      `<th class="${key ? "sortable" : ""}" data-key="${key || ""}">${label}</th>`).join("")}</tr></thead><tbody></tbody></table>
    <h2>Compare reports</h2><ul id="reports"></ul>`;
  let rows = [], sortKey = "started", descending = true;
  const selected = new Set();
  function render() {
    const filter = $("filter").value.toLowerCase();
    const shown = rows.filter((r) => [r.name, r.task, r.method, r.model, r.status].join(" ").toLowerCase().includes(filter));
    shown.sort((a, b) => {
      const x = a[sortKey], y = b[sortKey];
      const order = x == null ? 1 : y == null ? -1 : (x < y ? -1 : x > y ? 1 : 0);
      return descending ? -order : order;
    });
    $("runs").querySelector("tbody").innerHTML = shown.map((r) => `<tr data-name="${esc(r.name)}">
      <td><input type="checkbox" class="pick" value="${esc(r.name)}" ${selected.has(r.name) ? "checked" : ""}></td>
      <td>${runLink(r.name)}</td><td>${badge(r.status)}</td><td>${esc(r.task)}</td><td>${esc(r.method)}</td>
      <td>${esc(r.model.split("/").slice(-1)[0])}</td>
      <td class="num">${r.value == null ? "" : esc(r.metric) + " " + fmt(r.value)}</td>
      <td class="num">${duration(r.seconds)}</td><td class="num">${fmt(r.samples_per_s, 1)}</td>
      <td>${r.status === "running" ? `<span class="bar"><div style="width:${(100 * (r.progress || 0)).toFixed(0)}%"></div></span>
          ${r.eta_s != null ? "ETA " + duration(r.eta_s) : ""}` : ""}</td></tr>`).join("");
    $("count").textContent = `${shown.length} of ${rows.length} runs`;
    document.querySelectorAll("th.sortable").forEach((th) => {
      th.classList.toggle("sorted-asc", th.dataset.key === sortKey && !descending);
      th.classList.toggle("sorted-desc", th.dataset.key === sortKey && descending);
    });
  }
  async function refresh() {
    try {
      const body = await getJSON("/api/runs");
      rows = body.runs;
      $("reports").innerHTML = body.reports.map((p) =>
        `<li><a href="/compare?report=${encodeURIComponent(p)}">${esc(p)}</a></li>`).join("") || "<li class=muted>none yet</li>";
      render();
    } catch (e) { $("count").textContent = "error: " + e.message; }
  }
  $("filter").addEventListener("input", render);
  document.querySelectorAll("th.sortable").forEach((th) => th.addEventListener("click", () => {
    if (sortKey === th.dataset.key) descending = !descending; else { sortKey = th.dataset.key; descending = false; }
    render();
  }));
  $("runs").addEventListener("change", (e) => {
    if (!e.target.classList.contains("pick")) return;
    if (e.target.checked) selected.add(e.target.value); else selected.delete(e.target.value);
  });
  $("compare-selected").addEventListener("click", () => {
    location.href = "/compare?runs=" + encodeURIComponent([...selected].join(","));
  });
  await refresh();
  setInterval(refresh, 2000);
}

// ----------------------------------------------------------------------------------------- run

function scalarTable(id, scores) {
  const rows = Object.entries(scores).filter(([, v]) => typeof v === "number");
  return `<table id="${id}"><tbody>${rows.map(([k, v]) => `<tr><td>${esc(k)}</td><td class="num">${fmt(v)}</td></tr>`).join("")}</tbody></table>`;
}

function perClassTable(perClass) {
  const names = Object.keys(perClass);
  if (!names.length) return "";
  return `<table class="per-class"><thead><tr><th>label</th><th class=num>precision</th><th class=num>recall</th>
    <th class=num>f1</th><th class=num>support</th></tr></thead><tbody>${names.map((n) => {
      const s = perClass[n];
      return `<tr><td>${esc(n)}</td><td class=num>${fmt(s.precision)}</td><td class=num>${fmt(s.recall)}</td>
              <td class=num>${fmt(s.f1)}</td><td class=num>${esc(s.support)}</td></tr>`;
    }).join("")}</tbody></table>`;
}

// The confusion matrix as a heat map: rows true labels, columns predicted; shade by share of the row.
function heatMap(id, cm) {
  const rows = cm.matrix.map((row, i) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    return `<tr><th>${esc(cm.labels[i])}</th>${row.map((v, j) => {
      const share = v / total, hue = i === j ? 140 : 8;
      const bg = `hsl(${hue}, 60%, ${(97 - 50 * share).toFixed(0)}%)`;
      return `<td class="cell" style="background:${bg};color:${share > 0.6 ? "#fff" : "#222"}" title="true ${esc(cm.labels[i])}, predicted ${esc(cm.labels[j])}">${v}</td>`;
    }).join("")}</tr>`;
  }).join("");
  return `<table class="heat" id="${id}"><thead><tr><th>true \\ predicted</th>${cm.labels.map((l) => `<th>${esc(l)}</th>`).join("")}</tr></thead>
    <tbody>${rows}</tbody></table>`;
}

function evalSection(report) {
  if (!report) return "<p class=muted>eval.json is written when training ends.</p>";
  let html = "";
  for (const split of ["validation", "test"]) {
    const scores = report[split];
    if (!scores) continue;
    html += `<h3>${split}</h3><div class="toolbar" style="align-items:flex-start">${scalarTable("scores-" + split, scores)}`;
    if (scores.confusion_matrix) html += `<div><b>confusion matrix</b>${heatMap("confusion-" + split, scores.confusion_matrix)}</div>`;
    html += "</div>";
    if (scores.per_class) html += perClassTable(scores.per_class);
    const base = report.baseline && report.baseline[split];
    if (base) html += `<p><b>un-tuned model</b></p>${scalarTable("baseline-" + split, base)}`;
  }
  if (report.train) html += `<h3>training</h3>${scalarTable("scores-train", report.train)}`;
  return html;
}

async function runPage() {
  const name = params.get("name");
  content().innerHTML = `
    <div class="toolbar"><span id="status">${badge("starting")}</span>
      <span class="bar"><div id="progress" style="width:0%"></div></span><span id="progress-text" class="muted"></span>
      <button id="stop">Stop</button><button id="resume">Resume</button>
      <select id="export-kind"><option value="merge">merged model</option><option value="adapter">adapter only</option>
        <option value="onnx">ONNX</option><option value="gguf">GGUF</option></select><button id="export">Export</button>
      <a id="play-link" hidden><button>Playground</button></a>
      <button id="eval-file">Evaluate on a file</button><button id="serve">Serve</button><button id="serve-stop" hidden>Stop server</button>
      <a id="serve-link" target="_blank" rel="noopener" hidden></a><span id="action" class="muted"></span></div>
    <div class="picker" id="eval-picker" hidden></div><div id="eval-files"></div>
    <div class="charts"><div class="chart" id="chart-loss"></div><div class="chart" id="chart-lr"></div>
      <div class="chart" id="chart-metric"></div></div>
    <h2>Evaluation</h2><div id="eval"></div>
    <div id="samples"></div>
    <h2>Config</h2><pre id="config"></pre>
    <h2>Process output</h2><pre id="log" class="muted">(only for processes started from this studio)</pre>`;
  const loss = makeChart($("chart-loss"), "training loss", ["loss"]);
  const lr = makeChart($("chart-lr"), "learning rate", ["lr"]);
  let metric = null, metricName = null, pending = [];
  let detail = null;
  // the metric's name comes with the run's first status; validation lines that arrive before it wait
  function ensureMetric(name) {
    if (metric || !name) return;
    metricName = name;
    metric = makeChart($("chart-metric"), "validation " + name, [name]);
    pending.forEach(addValidation); pending = [];
  }
  function addValidation(line) {
    if (!metric) { pending.push(line); return; }
    if (metricName in line) metric.add(line.step, [line[metricName]]);
  }

  async function refresh() {
    try { detail = await getJSON("/api/run?name=" + encodeURIComponent(name)); } catch (e) { detail = null; return; }
    const info = detail.info;
    ensureMetric(info.metric);
    $("config").textContent = JSON.stringify(detail.config, null, 2);
    $("eval").innerHTML = evalSection(detail.eval);
    const evals = detail.jobs.filter((j) => j.kind === "eval");
    $("eval-files").innerHTML = evals.map((j) => `<h3>evaluated on ${esc(j.file)}</h3>` + (j.alive ? "<p class=muted>running tunelab eval...</p>"
      : j.metrics ? `<pre class="eval-metrics">${esc(JSON.stringify(j.metrics, null, 2))}</pre><p class=muted>written to ${esc(j.output)}</p>`
      : `<p class="error">tunelab eval exited ${esc(j.returncode)}: see the process output below</p>`)).join("");
    const server = detail.jobs.find((j) => j.kind === "serve" && j.alive);
    $("serve-link").hidden = !server; $("serve-stop").hidden = !server; $("serve").hidden = !!server;
    if (server) { $("serve-link").href = server.url; $("serve-link").textContent = server.url; }
    const jobs = detail.jobs.filter((j) => j.log);
    $("log").textContent = jobs.length ? jobs.map((j) => `$ tunelab ${j.kind} (pid ${j.pid}${j.alive ? "" : ", exit " + j.returncode})\n${j.log}`).join("\n\n") : "(only for processes started from this studio)";
    if (detail.samples.length) {
      $("samples").innerHTML = "<h2>Samples</h2><table class=wide><thead><tr><th>prompt</th><th>reference</th><th>generation</th></tr></thead><tbody>" +
        detail.samples.map((s) => `<tr><td>${esc(s.prompt)}</td><td>${esc(s.reference)}</td><td>${esc(s.generation)}</td></tr>`).join("") + "</tbody></table>";
    }
    showStatus(info);
  }
  function showStatus(info) {
    $("status").innerHTML = badge(info.status) + (info.step ? ` <span class="muted">step ${info.step}</span>` : "");
    const p = info.progress == null ? 0 : info.progress;
    $("progress").style.width = (100 * p).toFixed(1) + "%";
    $("progress-text").textContent = (100 * p).toFixed(0) + "%" + (info.eta_s != null && info.status === "running" ? ", ETA " + duration(info.eta_s) : "");
    $("stop").disabled = info.status !== "running";
    $("resume").disabled = info.status !== "interrupted";
    $("export").disabled = info.status !== "finished";
    $("eval-file").disabled = $("serve").disabled = info.status !== "finished";
    if (info.status === "finished") { $("play-link").hidden = false; $("play-link").href = "/play?run=" + encodeURIComponent(name); }
  }
  function follow() {
    const source = new EventSource("/api/events?name=" + encodeURIComponent(name));
    source.onmessage = (e) => {
      const line = JSON.parse(e.data);
      if (line.split === "validation") addValidation(line);
      else if ("loss" in line) { loss.add(line.step, [line.loss]); lr.add(line.step, [line.lr]); }
    };
    source.addEventListener("reset", () => { loss.reset(); lr.reset(); if (metric) metric.reset(); });
    source.addEventListener("status", (e) => {
      const info = JSON.parse(e.data);
      if (info.status === "starting") { $("status").innerHTML = badge("starting"); return; }
      ensureMetric(info.metric);
      showStatus(info);
      if (!detail) refresh();
    });
    source.addEventListener("done", () => { source.close(); refresh(); });
  }
  async function act(path, body, what) {
    $("action").textContent = what + "...";
    const r = await post(path, body);
    const out = await r.json();
    $("action").textContent = r.ok ? what + ": ok" + (out.out ? " -> " + out.out : "") : "error: " + errorText(out);
    if (r.ok && path === "/api/resume") { loss.reset(); lr.reset(); if (metric) metric.reset(); setTimeout(follow, 500); }
    setTimeout(refresh, 800);
  }
  $("stop").addEventListener("click", () => act("/api/stop", {name}, "stop (SIGTERM: checkpoint, then exit)"));
  $("resume").addEventListener("click", () => act("/api/resume", {name}, "resume"));
  $("export").addEventListener("click", () => act("/api/export", {name, kind: $("export-kind").value}, "export"));
  $("eval-file").addEventListener("click", () => picker($("eval-picker"), (file) => act("/api/eval", {name, file}, "tunelab eval on " + file)));
  $("serve").addEventListener("click", () => act("/api/serve", {name}, "tunelab serve"));
  $("serve-stop").addEventListener("click", () => act("/api/serve/stop", {name}, "stop the server"));
  await refresh();
  follow();
  setInterval(() => { if (detail && detail.info.status === "running") refresh(); }, 5000);
  setInterval(() => { if (detail && detail.jobs.some((j) => j.alive && j.kind !== "train")) refresh(); }, 1500);
}

// ------------------------------------------------------------------------------------- new run

async function newPage() {
  const {fields} = await getJSON("/api/form");
  const sections = {};
  for (const f of fields) (sections[f.section] = sections[f.section] || []).push(f);
  const main = ["", "data", "train"];
  const input = (f) => {
    const id = "f-" + f.key;
    if (f.kind === "select") return `<select id="${id}" name="${esc(f.key)}">${f.choices.map((c) =>
      `<option value="${esc(c)}" ${c === f.default ? "selected" : ""}>${c === "" ? "(default)" : esc(c)}</option>`).join("")}</select>`;
    if (f.kind === "bool") return `<input type="checkbox" id="${id}" name="${esc(f.key)}" ${f.default === "true" ? "checked" : ""}>`;
    const browse = f.kind === "file" ? ` <button type="button" class="browse" data-for="${esc(f.key)}">browse</button><div class="picker" hidden></div>` : "";
    return `<input type="text" id="${id}" name="${esc(f.key)}" value="${esc(f.default)}" placeholder="${f.default === "" ? "(none)" : ""}">${browse}`;
  };
  const row = (f) => `<div class="field" id="row-${esc(f.key)}"><label for="f-${esc(f.key)}">${esc(f.key)}</label>
    <div>${input(f)}<span class="err" id="err-${esc(f.key)}"></span></div>
    <div class="help">${esc(f.doc)}${f.default !== "" ? ` <span class="muted">[default: ${esc(f.default)}]</span>` : ""}</div></div>`;
  const order = [...main, ...Object.keys(sections).filter((s) => !main.includes(s))];
  content().innerHTML = `<form id="new-run" autocomplete="off">
    <fieldset><legend>run</legend><div class="field"><label for="f-name">name</label><div><input type="text" id="f-name" name="name"
      placeholder="(default: model-method-time)"><span class="err" id="err-name"></span></div>
      <div class="help">Folder of the run inside the runs folder (what <code>output_dir</code> names from the command line).</div></div></fieldset>
    ${order.map((s) => main.includes(s)
      ? `<fieldset><legend>${s || "model, task, method"}</legend>${sections[s].map(row).join("")}</fieldset>`
      : `<details class="section"><summary>${esc(s)}</summary>${sections[s].map(row).join("")}</details>`).join("")}
    <div class="toolbar"><button type="button" id="check">Check</button><button type="button" id="datacheck">Data check</button>
      <button type="button" id="estimate">Estimate</button><button type="submit" class="primary" id="start">Start</button>
      <span id="form-status" class="muted"></span></div>
    <details id="compare-box"><summary>Compare methods on this config (tunelab compare)</summary>
      <div class="toolbar"><span id="compare-methods"></span><button type="button" id="compare-form">Compare</button></div></details>
    <p class="error" id="form-error"></p><pre id="preview" hidden></pre></form>`;

  function values() {
    const out = {};
    for (const f of fields) {
      const el = $("f-" + f.key);
      out[f.key] = f.kind === "bool" ? (el.checked ? "true" : "false") : el.value;
    }
    return out;
  }
  function showErrors(errors) {
    document.querySelectorAll(".field.invalid").forEach((el) => el.classList.remove("invalid"));
    document.querySelectorAll(".err").forEach((el) => { el.textContent = ""; });
    $("form-error").textContent = "";
    for (const [key, message] of Object.entries(errors || {})) {
      const el = $("err-" + key);
      if (el) {
        el.textContent = message;
        el.closest(".field").classList.add("invalid");
        const folded = el.closest("details"); if (folded) folded.open = true;
      } else $("form-error").textContent = message;
    }
    const first = document.querySelector(".field.invalid") || ($("form-error").textContent ? $("form-error") : null);
    if (first) first.scrollIntoView({block: "center"});
    return Object.keys(errors || {}).length === 0;
  }
  async function check() {
    const r = await post("/api/check", values());
    const out = await r.json();
    const ok = showErrors(out.errors);
    $("form-status").textContent = ok ? "config ok: tunelab train " + out.overrides.join(" ") : "fix the marked fields";
    return ok;
  }
  let timer = null;
  $("new-run").addEventListener("change", () => { clearTimeout(timer); timer = setTimeout(check, 250); });
  $("check").addEventListener("click", check);
  $("datacheck").addEventListener("click", async () => {
    $("form-status").textContent = "checking the data (tokenizer only)...";
    const out = await (await post("/api/datacheck", values())).json();
    if (!showErrors(out.errors)) { $("form-status").textContent = "fix the marked fields"; return; }
    $("preview").hidden = false; $("preview").textContent = out.text;
    $("form-status").textContent = "data check: " + out.report.findings.filter((f) => f.level === "error").length + " error(s)";
  });
  $("estimate").addEventListener("click", async () => {
    $("form-status").textContent = "estimating (a short probe of the method; may take a minute)...";
    const out = await (await post("/api/estimate", values())).json();
    if (!showErrors(out.errors)) { $("form-status").textContent = "estimate failed"; return; }
    const m = out.estimate.methods[0];
    $("preview").hidden = false;
    $("preview").textContent = `${out.estimate.model} (${out.estimate.task}), ${out.estimate.train_rows} training rows, ${m.steps_per_epoch} steps/epoch\n` +
      `method ${m.method}: time/epoch ${duration(m.epoch_s)}, peak memory ${fmt(m.peak_rss_mb, 0)} MB, trainable params ${m.trainable_params}`;
    $("form-status").textContent = "estimate done";
  });
  $("new-run").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("form-status").textContent = "starting...";
    const r = await post("/api/start", {...values(), name: $("f-name").value});
    const out = await r.json();
    if (!r.ok) { showErrors(out.errors); $("form-status").textContent = "not started: fix the marked fields"; return; }
    location.href = "/run?name=" + encodeURIComponent(out.name);
  });
  document.querySelectorAll("button.browse").forEach((b) => b.addEventListener("click", () => browse(b)));
  function browse(button) {
    return picker(button.nextElementSibling, (file) => { $("f-" + button.dataset.for).value = file; check(); });
  }
  await methodBoxes($("compare-methods"));
  $("compare-form").addEventListener("click", async () => {
    $("form-status").textContent = "starting tunelab compare...";
    const r = await post("/api/compare", {values: values(), methods: tickedMethods($("compare-methods")), name: $("f-name").value});
    const out = await r.json();
    if (!r.ok) { showErrors(out.errors || {"": out.error}); $("form-status").textContent = "compare not started"; return; }
    location.href = "/job?kind=compare&run=" + encodeURIComponent(out.name);
  });
}

// ------------------------------------------------------------------------------------- compare

async function comparePage() {
  const report = params.get("report");
  if (report) {
    $("title").textContent = "Compare report: " + report;
    content().innerHTML = `<iframe class="report" id="report" src="/files/runs/${report.split("/").map(encodeURIComponent).join("/")}"></iframe>`;
    return;
  }
  const {runs} = await getJSON("/api/runs");
  const chosen = (params.get("runs") || "").split(",").filter(Boolean);
  content().innerHTML = `<details ${chosen.length ? "" : "open"}><summary>pick runs</summary><form id="pick">${runs.map((r) =>
    `<label style="display:block"><input type="checkbox" name="runs" value="${esc(r.name)}" ${chosen.includes(r.name) ? "checked" : ""}>
     ${esc(r.name)} <span class="muted">${esc(r.task)} ${esc(r.method)} ${esc(r.status)}</span></label>`).join("")}
    <button class="primary" id="show">Compare</button></form></details>
    <details id="run-compare"><summary>run tunelab compare on a config file</summary>
      <div class="toolbar"><label>config <input type="text" id="compare-config" placeholder="a .yaml file in the data folder" size="40"></label>
      <button type="button" id="compare-browse">browse</button></div><div class="picker" id="compare-picker" hidden></div>
      <div class="toolbar">methods <span id="compare-methods"></span></div>
      <div class="toolbar"><input type="text" id="compare-name" placeholder="(default: compare-CONFIG-time)" size="30">
      <button class="primary" id="compare-start">Start compare</button><span id="compare-status" class="muted"></span></div>
      <p class="muted">Or fill the <a href="/new">new-run form</a> and use its Compare button.</p></details>
    <div id="side"></div>`;
  await methodBoxes($("compare-methods"));
  $("compare-browse").addEventListener("click", () => picker($("compare-picker"), (f) => { $("compare-config").value = f; }));
  $("compare-start").addEventListener("click", async () => {
    $("compare-status").textContent = "starting...";
    const r = await post("/api/compare", {config: $("compare-config").value, methods: tickedMethods($("compare-methods")), name: $("compare-name").value});
    const out = await r.json();
    if (!r.ok) { $("compare-status").textContent = "error: " + errorText(out); return; }
    location.href = "/job?kind=compare&run=" + encodeURIComponent(out.name);
  });
  $("pick").addEventListener("submit", (e) => {
    e.preventDefault();
    const names = [...document.querySelectorAll("#pick input:checked")].map((i) => i.value);
    location.href = "/compare?runs=" + encodeURIComponent(names.join(","));
  });
  if (!chosen.length) return;
  const details = await Promise.all(chosen.map((n) => getJSON("/api/run?name=" + encodeURIComponent(n)).catch(() => null)));
  const found = details.map((d, i) => [chosen[i], d]).filter(([, d]) => d);
  const split = (d) => d.eval && (d.eval.test || d.eval.validation) || {};
  const keys = [...new Set(found.flatMap(([, d]) => Object.keys(split(d)).filter((k) => typeof split(d)[k] === "number")))];
  const rows = [["status", (d) => badge(d.info.status)], ["task", (d) => esc(d.info.task)], ["method", (d) => esc(d.info.method)],
    ["model", (d) => esc(d.info.model)], ["time", (d) => duration(d.info.seconds)], ["samples/s", (d) => fmt(d.info.samples_per_s, 1)],
    ["trainable params", (d) => fmt(d.eval && d.eval.train && d.eval.train.trainable_params)],
    ...keys.map((k) => [k, (d) => fmt(split(d)[k])])];
  $("side").innerHTML = `<table class="wide" id="side-by-side"><thead><tr><th></th>${found.map(([n]) => `<th>${runLink(n)}</th>`).join("")}</tr></thead>
    <tbody>${rows.map(([label, cell]) => `<tr><td>${esc(label)}</td>${found.map(([, d]) => `<td class="num">${cell(d)}</td>`).join("")}</tr>`).join("")}</tbody></table>
    <div class="charts"><div class="chart" id="compare-loss"></div><div class="chart" id="compare-metric"></div></div>`;
  overlay($("compare-loss"), "training loss", found, (m) => !m.split && "loss" in m ? m.loss : null);
  const metric = found[0][1].info.metric;
  overlay($("compare-metric"), "validation " + metric, found, (m) => m.split === "validation" && metric in m ? m[metric] : null);
}

// Curves of several runs on one chart: uPlot wants one x array, so steps are merged and gaps left null.
function overlay(el, title, found, pick) {
  const perRun = found.map(([, d]) => new Map(d.metrics.map((m) => [m.step, pick(m)]).filter(([, v]) => v != null)));
  const steps = [...new Set(perRun.flatMap((m) => [...m.keys()]))].sort((a, b) => a - b);
  const chart = makeChart(el, title, found.map(([n]) => n), 560, 280);
  chart.data = [steps, ...perRun.map((m) => steps.map((s) => (m.has(s) ? m.get(s) : null)))];
  el.dataset.points = String(steps.length);
  chart.plot.setData(chart.data);
}

// ---------------------------------------------------------------------------------- playground

async function playPage() {
  const {runs} = await getJSON("/api/runs");
  const finished = runs.filter((r) => r.status === "finished");
  const chosen = params.get("run") || (finished[0] && finished[0].name) || "";
  content().innerHTML = `<div class="toolbar"><label>run <select id="run">${finished.map((r) =>
      `<option value="${esc(r.name)}" ${r.name === chosen ? "selected" : ""}>${esc(r.name)} (${esc(r.task)})</option>`).join("")}</select></label>
      <span class="muted" id="about"></span></div>
    <div class="chatlog" id="answer"></div>
    <form id="ask"><textarea id="text" placeholder="Type here" required></textarea>
    <textarea id="context" placeholder="Context (question answering)" hidden></textarea>
    <div class="toolbar"><button class="primary" id="send" type="submit">Send</button><button type="button" id="reset">Clear</button>
    <span class="muted" id="play-status"></span></div></form>`;
  let history = [];
  const task = () => { const r = finished.find((x) => x.name === $("run").value); return r ? r.task : ""; };
  const base = () => "/play/" + $("run").value.split("/").map(encodeURIComponent).join("/") + "/-";
  function about() {
    $("about").textContent = {"classification": "label scores", "token-classification": "entities", "regression": "a value",
      "causal-lm": "chat: the answer streams in", "seq2seq": "generated text, streamed", "question-answering": "the answer span",
      "masked-lm": "the [MASK] filled in"}[task()] || "";
    $("context").hidden = task() !== "question-answering";
    history = []; $("answer").innerHTML = "";
  }
  $("run").addEventListener("change", about); about();
  $("reset").addEventListener("click", about);
  async function send(path, body) {
    const r = await post(base() + path, body);
    if (!r.ok) { const e = await r.json(); throw new Error(e.error ? e.error.message || e.error : r.statusText); }
    return r;
  }
  async function stream(path, body, show) {
    const r = await send(path, {...body, stream: true});
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "", text = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split("\n\n"); buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const choice = JSON.parse(data).choices[0];
        text += (choice.delta ? choice.delta.content : choice.text) || "";
        show(text);
      }
    }
    return text;
  }
  $("ask").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = $("text").value, t = task();
    $("play-status").textContent = "working... (the first request loads the model)";
    try {
      if (t === "causal-lm" || t === "seq2seq") {
        $("answer").insertAdjacentHTML("beforeend", `<div class="msg user"><b>you</b> ${esc(text)}</div><div class="msg assistant"><b>model</b> <span class="reply"></span></div>`);
        const replies = $("answer").querySelectorAll(".reply"), out = replies[replies.length - 1];
        const answer = t === "causal-lm"
          ? await stream("/v1/chat/completions", {messages: [...history, {role: "user", content: text}], max_tokens: 64}, (s) => { out.textContent = s; })
          : await stream("/v1/completions", {prompt: text, max_tokens: 64}, (s) => { out.textContent = s; });
        history.push({role: "user", content: text}, {role: "assistant", content: answer});
      } else if (t === "question-answering") {
        const r = (await (await send("/v1/answer", {question: text, context: $("context").value})).json()).data[0];
        $("answer").innerHTML = r.answer == null ? "(no answer)" : `<b>${esc(r.answer)}</b> <span class=muted>${fmt(r.score)}</span>`;
      } else {
        const path = {"classification": "/v1/classify", "token-classification": "/v1/entities"}[t] || "/v1/predict";
        const r = (await (await send(path, {input: text})).json()).data[0];
        if (r.probabilities) {
          const rows = Object.entries(r.probabilities).sort((a, b) => b[1] - a[1]);
          $("answer").innerHTML = "<table id='scores'>" + rows.map(([label, p]) => `<tr><td class="label">${esc(label)}</td><td class=num>${p.toFixed(3)}</td>
            <td style="width:20rem"><span class="bar" style="width:100%"><div style="width:${(100 * p).toFixed(1)}%"></div></span></td></tr>`).join("") + "</table>";
        } else if (r.entities) {
          $("answer").innerHTML = r.entities.length ? "<table id='entities'>" + r.entities.map((x) =>
            `<tr><td>${esc(x.text)}</td><td>${esc(x.type)}</td><td>${x.start}-${x.end}</td></tr>`).join("") + "</table>" : "(no entities)";
        } else $("answer").textContent = r.filled || String(r.value);
      }
      $("play-status").textContent = "done";
    } catch (err) { $("play-status").textContent = "failed: " + err.message; }
  });
}

// ----------------------------------------------------------------------------------------- job

// A process the studio started (a compare): its output while it runs; its report in place once written.
async function jobPage() {
  const run = params.get("run"), kind = params.get("kind");
  content().innerHTML = `<div class="toolbar"><span id="job-status"></span></div><div id="job-report"></div><pre id="job-log"></pre>`;
  let timer = null;
  async function poll() {
    let job;
    try { job = await getJSON(`/api/job?run=${encodeURIComponent(run)}&kind=${encodeURIComponent(kind)}`); }
    catch (e) { $("job-status").innerHTML = `<span class="error">${esc(e.message)}</span>`; clearInterval(timer); return; }
    $("job-status").innerHTML = badge(job.alive ? "running" : job.returncode === 0 ? "finished" : "failed") +
      ` <span class="muted">pid ${esc(job.pid)}${job.alive ? "" : ", exit " + esc(job.returncode)}</span>`;
    $("job-log").textContent = job.log;
    if (job.report && !$("report")) {
      $("job-report").innerHTML = `<iframe class="report" id="report" src="/files/runs/${job.report.split("/").map(encodeURIComponent).join("/")}"></iframe>`;
    }
    if (!job.alive) clearInterval(timer);
  }
  await poll();
  timer = setInterval(poll, 1000);
}

// ------------------------------------------------------------------------------------- reviews

async function reviewsPage() {
  const {folder, reviews} = await getJSON("/api/reviews");
  if (!reviews.length) {
    content().innerHTML = `<p class="muted">No reviews in ${esc(folder)}/ yet: <code>tunelab review A B --prompts FILE</code> makes one
      (give the studio another folder with <code>--reviews DIR</code>).</p>`;
    return;
  }
  const rate = (r) => r.win_rate_a == null ? "no decided ratings yet"
    : `${r.win_rate_a.toFixed(3)} <span class="muted">(95% CI ${r.ci95[0].toFixed(3)}-${r.ci95[1].toFixed(3)}; a tie counts half)</span>`;
  const kappa = (r) => r.agreement && r.agreement.mean_kappa != null ? fmt(r.agreement.mean_kappa, 2) : "";
  content().innerHTML = reviews.map((r) => `<section class="review" data-name="${esc(r.name)}"><h2>${esc(r.name)}
      <a href="/review/${encodeURIComponent(r.name)}/"><button class="primary">Rate</button></a></h2>` + (r.error ? `<p class="error">${esc(r.error)}</p>` :
    `<p>A = ${esc(r.a)} vs B = ${esc(r.b)}: ${r.items} prompts, ${r.ratings} decided ratings (${r.a_wins} A, ${r.b_wins} B, ${r.ties} ties; ${r.skips} skipped)</p>
     <table><tbody><tr><td>win rate of A</td><td class="num win-rate">${rate(r)}</td></tr>
       <tr><td>mean Cohen's kappa</td><td class="num">${kappa(r)}</td></tr></tbody></table>
     <details><summary>per prompt</summary><table class="wide"><thead><tr><th>item</th><th class=num>A</th><th class=num>B</th><th class=num>tie</th>
       <th class=num>skip</th><th class=num>score</th><th>prompt</th></tr></thead><tbody>${r.per_prompt.map((p) =>
       `<tr><td>${p.item}</td><td class=num>${p.a}</td><td class=num>${p.b}</td><td class=num>${p.tie}</td><td class=num>${p.skip}</td>
        <td class=num>${fmt(p.mean_score, 1)}</td><td>${esc(p.prompt)}</td></tr>`).join("")}</tbody></table></details>`) + "</section>").join("");
}

const PAGES = {runs: runsPage, run: runPage, new: newPage, compare: comparePage, play: playPage, job: jobPage, reviews: reviewsPage};
PAGES[document.body.dataset.page]().catch((e) => { content().insertAdjacentHTML("afterbegin", `<p class="error">${esc(e.message)}</p>`); });
