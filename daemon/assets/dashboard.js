// The Colony dashboard: one EventSource on /api/events; every `snapshot` event redraws the
// page. Text from peers (agents, questions, generated tokens) only ever goes in as text.
"use strict";

const $ = (id) => document.getElementById(id);
const short = (id) => (id && id.length > 16 ? id.slice(0, 6) + "…" + id.slice(-6) : id || "");
const bytes = (n) => {
  const u = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + u[i];
};
const rate = (bps) => (bps === null || bps === undefined ? "–" : bytes(bps) + "/s");
const num = (x, d = 2) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(d));
const ago = (ms) => {
  const s = Math.max(0, (Date.now() - ms) / 1000);
  return s < 60 ? s.toFixed(0) + " s ago" : (s / 60).toFixed(0) + " min ago";
};

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

function fillTable(id, rows) {
  const tbody = $(id).querySelector("tbody");
  const frag = document.createDocumentFragment();
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const c of r) tr.appendChild(c instanceof Node ? c : cell(c));
    frag.appendChild(tr);
  }
  tbody.replaceChildren(frag);
}

function show(id, on) { $(id).classList.toggle("hidden", !on); }

// ---- charts (uPlot) ----
const charts = new Map();

function chart(key, parent, title, series, data) {
  let c = charts.get(key);
  const width = Math.max(240, parent.clientWidth || 300);
  if (!c || !parent.contains(c.root)) {
    if (c) c.destroy();
    c = new uPlot({
      title, width, height: 180,
      scales: { x: { time: series.time === true } },
      axes: [{ label: series.xLabel }, { label: series.yLabel }],
      series: [{ label: series.xLabel }].concat(series.lines),
      legend: { live: false },
    }, data, parent);
    charts.set(key, c);
  } else {
    c.setData(data);
    if (Math.abs(c.width - width) > 4) c.setSize({ width, height: 180 });
  }
  return c;
}

// ---- sections ----
function renderHeader(s) {
  $("node-id").textContent = short(s.status.peer_id);
  $("node-id").title = s.status.peer_id;
  $("node-facts").textContent =
    `${s.status.connected_peers} peers · DHT ${s.status.dht_mode} · ` +
    `services: ${s.status.services.join(", ")} · up ${s.status.uptime_s} s`;
}

function renderSwarm(s) {
  // What each peer offers: training runs it reports progress in (samples/s), from the runs'
  // progress records.
  const offers = new Map();
  for (const r of s.runs.filter((r) => r.active)) {
    for (const m of (r.swarm && r.swarm.members) || []) {
      const o = offers.get(m.peer) || [];
      o.push(`${r.run}: ${num(m.samples_per_sec, 1)} samples/s${m.client ? " (client)" : ""}`);
      offers.set(m.peer, o);
    }
  }
  const rows = s.peers.map((p) => {
    const role = p.dht_server ? "node" : "client";
    const reach = p.relayed ? "relayed" : "direct";
    const who = cell(short(p.peer_id), "mono");
    who.title = p.peer_id;
    const bw = s.bandwidth.peers[p.peer_id];
    return [who, role, reach, p.rtt_ms == null ? "–" : num(p.rtt_ms, 1) + " ms",
      bw ? `${rate(bw.to_bps)} / ${rate(bw.from_bps)}` : "–",
      cell((offers.get(p.peer_id) || []).join("; "), "wrap"), p.agent || "", p.strikes];
  });
  fillTable("peers-table", rows);
  const b = s.bandwidth;
  $("swarm-facts").textContent =
    `this node: ↑ ${rate(b.up_bps)} ↓ ${rate(b.down_bps)} (measured) · ${s.peers.length} connected · ${s.status.routing_table_peers} in the routing table · ` +
    `${s.status.dht_entries} DHT entries here · ${s.status.banned_peers.length} banned · ` +
    `${s.status.offences} offences seen`;
}

function runCard(r) {
  let el = document.querySelector(`.run[data-run="${CSS.escape(r.run)}"]`);
  if (!el) {
    el = document.createElement("div");
    el.className = "run";
    el.dataset.run = r.run;
    el.innerHTML = `<h3></h3><p class="facts"></p><div class="progress"><div></div></div>
      <div class="charts"><div class="chart loss-chart"></div><div class="chart sps-chart"></div></div>
      <p class="facts last-step"></p>`;
    $("runs").appendChild(el);
  }
  return el;
}

function renderTraining(s) {
  show("training-empty", s.runs.length === 0);
  for (const r of s.runs) {
    const el = runCard(r);
    el.querySelector("h3").textContent = `${r.run}${r.active ? "" : " (left)"}`;
    const sw = r.swarm;
    const have = sw ? sw.samples : 0;
    const frac = r.target_batch > 0 ? Math.min(1, (sw ? sw.estimated : 0) / r.target_batch) : 0;
    el.querySelector(".facts").textContent =
      `global step ${r.epoch} · swarm at step ${sw ? sw.epoch : "–"} with ${sw ? sw.peers : 0} peers, ` +
      `${have} of ${r.target_batch} samples reported (≈${Math.round(frac * 100)}% with throughput ` +
      `${sw ? num(sw.samples_per_sec, 1) : "–"} samples/s)`;
    el.querySelector(".progress").classList.toggle("hidden", !r.active);
    el.querySelector(".progress > div").style.width = (frac * 100).toFixed(1) + "%";
    const steps = r.history.filter((p) => p.kind === "averaged" || p.kind === "alone");
    const withLoss = steps.filter((p) => p.loss !== null);
    chart(`loss:${r.run}`, el.querySelector(".loss-chart"), "loss",
      { xLabel: "step", yLabel: "loss", lines: [{ label: "loss", stroke: "#2563eb", width: 2 }] },
      [withLoss.map((p) => p.epoch), withLoss.map((p) => p.loss)]);
    chart(`sps:${r.run}`, el.querySelector(".sps-chart"), "samples/s (this node)",
      { xLabel: "time", yLabel: "samples/s", time: true,
        lines: [{ label: "samples/s", stroke: "#15803d", width: 2 }] },
      [steps.map((p) => p.t_ms / 1000), steps.map((p) => p.samples_per_sec)]);
    const last = r.history[r.history.length - 1];
    el.querySelector(".last-step").textContent = last
      ? `last: step ${last.epoch} ${last.kind}` +
        (last.kind === "averaged" ? ` with ${last.peers} peers over ${num(last.samples, 0)} samples in ${num(last.seconds, 1)} s` : "") +
        (last.why ? ` (${last.why})` : "") + `, ${ago(last.t_ms)}`
      : "no step yet";
  }
  const rounds = s.rounds;
  chart("rounds", $("rounds-chart"), "all-reduce round time (s)",
    { xLabel: "round", yLabel: "seconds",
      lines: [{ label: "took", stroke: "#b45309", width: 2 },
        { label: "bound", stroke: "#5d6677", dash: [4, 4], width: 1.5 }] },
    [rounds.map((_, i) => i), rounds.map((r) => r.seconds), rounds.map((r) => (r.bound_s > 0 ? r.bound_s : null))]);
  fillTable("rounds-table", rounds.slice().reverse().slice(0, 12).map((r) => [
    cell(r.round, "mono"), ago(r.t_ms), num(r.seconds, 3) + " s",
    r.bound_s > 0 ? num(r.bound_s, 3) + " s" : "–",
    r.bound_s > 0 ? num(r.seconds / r.bound_s, 2) + "×" : "–",
    r.values, bytes(r.bytes_sent), bytes(r.bytes_received),
    memberCell(r),
  ]));
}

function memberCell(r) {
  if (!r.ok) return cell("failed: " + (r.error || ""), "wrap bad");
  const td = cell(`${r.members.length}: ${r.members.slice(0, 3).map(short).join(", ")}${r.members.length > 3 ? ", …" : ""}`, "mono");
  td.title = r.members.join("\n");
  return td;
}

function renderInference(s) {
  const inf = s.infer;
  show("inference-empty", !inf);
  if (!inf) return;
  const running = inf.jobs.filter((j) => j.state === "running");
  $("inference-facts").textContent =
    `model ${inf.model} · ${inf.tokens_total} tokens written · ` +
    `${running.length} running, ${inf.jobs.filter((j) => j.state === "queued").length} queued · ` +
    `${num(running.reduce((a, j) => a + j.tokens_per_sec, 0), 1)} tokens/s now`;
  const shown = inf.jobs.filter((j) => Array.isArray(j.worker_texts));
  const box = $("hogwild");
  const frag = document.createDocumentFragment();
  for (const j of shown.slice().reverse()) {
    const wrap = document.createElement("div");
    wrap.className = "job";
    wrap.dataset.job = j.id;
    const h = document.createElement("h3");
    h.textContent = `job ${j.id} (${j.state}) · ${j.workers} Hogwild workers · ${j.tokens} tokens, ${num(j.tokens_per_sec, 1)}/s`;
    const q = document.createElement("p");
    q.className = "facts";
    q.textContent = "Q: " + j.question;
    const grid = document.createElement("div");
    grid.className = "workers";
    j.worker_texts.forEach((text, w) => {
      const d = document.createElement("div");
      d.className = "worker";
      const t = document.createElement("h4");
      t.textContent = `worker ${w}`;
      const pre = document.createElement("pre");
      pre.textContent = text;
      d.append(t, pre);
      grid.appendChild(d);
    });
    wrap.append(h, q, grid);
    if (j.answer) {
      const a = document.createElement("div");
      a.className = "answer";
      const pre = document.createElement("pre");
      pre.textContent = j.answer;
      a.appendChild(pre);
      wrap.appendChild(a);
    }
    frag.appendChild(wrap);
  }
  box.replaceChildren(frag);
  fillTable("jobs-table", inf.jobs.slice().reverse().slice(0, 12).map((j) => [
    j.id, j.state, j.workers,
    j.tokens, num(j.tokens_per_sec, 1), cell(short(j.client), "mono"), cell(j.question, "wrap"),
  ]));
}

function renderRouting(s) {
  const map = s.shard_map;
  show("routing-empty", map.length === 0 && s.local_shards.length === 0);
  const mine = new Set(s.local_shards.map((r) => `${r.index}/${r.shard}`));
  const rows = map.map((m) => [
    m.index, `${m.shard} of ${m.shards}${mine.has(`${m.index}/${m.shard}`) ? " (here)" : ""}`,
    cell(m.replicas.map(([p, v]) => `${short(p)} (${v})`).join(", ") || "none", m.replicas.length ? "wrap mono" : "bad"),
  ]);
  fillTable("shards-table", rows);
}

function renderPatches(s) {
  const p = s.patch;
  show("patches-empty", !p);
  if (!p) return;
  $("patch-facts").textContent =
    `model ${p.model.slice(0, 12)} · version ${p.version.slice(0, 12)} · ${p.len} patches · ` +
    `control error ${num(p.control_error * 100, 2)}% (base ${num(p.base_error * 100, 2)}%)`;
  fillTable("chain-table", p.chain.map((c, i) => [i + 1, cell(c.patch.slice(0, 12), "mono"), c.fate, cell(c.version.slice(0, 12), "mono")]));
  fillTable("proposals-table", p.proposals.slice(-12).reverse().map((x) => [
    cell(x.patch.slice(0, 12), "mono"), x.target, x.steps, x.bytes,
    cell(x.status, x.status.startsWith("accepted") ? "ok" : x.status.startsWith("rejected") ? "bad wrap" : "warn"),
    x.accepts, x.rejects, cell(short(x.author), "mono"),
  ]));
}

function renderTraffic(s) {
  fillTable("traffic-table", s.traffic.map((t) => [t.protocol, bytes(t.bytes_in), bytes(t.bytes_out), t.messages_in, t.messages_out]));
  const e = Object.entries(s.errors);
  $("errors").textContent = e.length ? "errors: " + e.map(([k, n]) => `${k} ${n}`).join(" · ") : "no errors";
}

function render(s) {
  window.colony.last = s;
  renderHeader(s);
  renderSwarm(s);
  renderTraining(s);
  renderInference(s);
  renderRouting(s);
  renderPatches(s);
  renderTraffic(s);
  document.body.dataset.updated = String(s.t_ms);
}

// ---- live updates ----
function connect() {
  const es = new EventSource("/api/events");
  es.addEventListener("open", () => { $("conn").textContent = "live"; $("conn").className = "pill on"; });
  es.addEventListener("snapshot", (ev) => {
    try { render(JSON.parse(ev.data)); } catch (e) { console.error("cannot render the snapshot", e); }
  });
  es.addEventListener("error", () => {
    $("conn").textContent = "disconnected, retrying";
    $("conn").className = "pill off";
  });
}

// For the browser test and the console: the charts and the last snapshot.
window.colony = { charts, last: null };

connect();
