// Engram dashboard: the run list and the live run page. Plain JS over the server's JSON and SSE endpoints
// (src/dashboard/server.py); charts are uPlot (vendored). window.__engram exposes timings for the tests and benches.
"use strict";

const E = (window.__engram = { draws: [], firstChart: null, loaded: false, errors: [] });
const MAX_DRAWS = 20000;
const LOCAL_POINTS = 6000; // a live series longer than this in the page is thinned to half (min/max kept)
const COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd"];
const WD_GROUPS = ["all", "embeddings", "attention", "mlp", "norms", "other"];

// --- chart specs: what each card shows -------------------------------------------------------------------
const CHARTS = [
  { id: "loss", title: "Loss", m: ["train/loss", "val/loss"] },
  { id: "lr", title: "Learning rate", p: ["lr-"], m: ["train/lr"] },
  { id: "throughput", title: "Throughput", m: ["perf/tokens_per_s", "perf/mfu"], right: ["perf/mfu"] },
  { id: "capbits", title: "Cap-Gauge memorized bits", m: ["capgauge/bits_seen", "capgauge/bits_unseen", "capgauge/bits_diff"] },
  { id: "capbpp", title: "Cap-Gauge bits per parameter", m: ["capgauge/bpp_seen", "capgauge/bpp_unseen", "capgauge/alert_bpp", "capgauge/alert"],
    hide: ["capgauge/alert"], dashed: ["capgauge/alert_bpp"] },
  { id: "absorption", title: "Mem-Absorption (bits per million tokens)", m: ["mem_absorption/rate", "mem_absorption/spike", "mem_absorption/gen_gap"],
    hide: ["mem_absorption/spike"], right: ["mem_absorption/gen_gap"], spikes: { of: "mem_absorption/rate", flag: "mem_absorption/spike" } },
  { id: "weightdelta", title: "Weight-Δ per layer and group", kind: "heat", wide: true },
  { id: "update_norm", title: "Plasticity: update norm per layer", m: ["ttt/update_norm", "titans/update_norm", "emma/update_norm"], perLayer: true },
  { id: "gate", title: "EMMA gate", m: ["gate/lambda", "gate/open", "gate/write_enabled", "gate/lr_scale"], right: ["gate/open", "gate/write_enabled"], stepped: true },
  { id: "router", title: "Temporal LoRA router weights", p: ["train/routing/mean_weight/", "val/routing/mean_weight/"] },
];

// --- small helpers -------------------------------------------------------------------------------------------
const $ = (sel, el = document) => el.querySelector(sel);
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) el.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) el.append(c);
  return el;
}
const fmt = (v, d = 4) => (v === null || v === undefined ? "—" : Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : +v.toPrecision(d) + "");
const ago = (t, now) => (t ? `${Math.max(0, Math.round(now - t))} s ago` : "—");
async function api(path, params = {}) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) for (const x of [].concat(v)) if (x !== undefined && x !== null) q.append(k, x);
  const res = await fetch(`${path}?${q}`);
  if (!res.ok) throw new Error(`${path}: ${res.status}`);
  return res.json();
}
const keyOf = (metric, layer, head, position) => `${metric}|${layer ?? ""}|${head ?? ""}|${position ?? ""}`;
const now = () => performance.timeOrigin + performance.now();

// Min/max-preserving thinning, the same rule as the server's minmax_downsample, for series grown live.
function thin(xs, ys, target) {
  const buckets = Math.max(1, Math.floor((target - 1) / 2)), width = Math.ceil(xs.length / buckets);
  const keep = new Set([xs.length - 1]);
  for (let b = 0; b < xs.length; b += width) {
    let lo = b, hi = b;
    for (let i = b; i < Math.min(b + width, xs.length); i++) {
      if (ys[i] !== null && (ys[lo] === null || ys[i] < ys[lo])) lo = i;
      if (ys[i] !== null && (ys[hi] === null || ys[i] > ys[hi])) hi = i;
    }
    keep.add(lo); keep.add(hi);
  }
  const idx = [...keep].sort((a, b) => a - b);
  return [idx.map((i) => xs[i]), idx.map((i) => ys[i])];
}

// --- a run's data: series loaded once, then appended to from its event stream ------------------------------
class Feed {
  constructor(run, onData) {
    this.run = run; this.onData = onData; this.series = new Map(); this.source = null; this.wdMetric = "rel_prev";
  }
  selectors(charts) {
    const m = [], p = [];
    for (const c of charts) { m.push(...(c.m || [])); p.push(...(c.p || [])); }
    if (charts.some((c) => c.kind === "heat")) for (const g of WD_GROUPS) m.push(`weight_delta/${g}/${this.wdMetric}`);
    return { m: [...new Set(m)], p: [...new Set(p)] };
  }
  async load(charts, maxPoints = 1000) {
    const sel = this.selectors(charts);
    const data = await api("/api/series", { run: this.run, ...sel, max_points: maxPoints });
    for (const s of data.series) {
      this.series.set(keyOf(s.metric, s.layer, s.head, s.position), { ...s, x: s.step, y: s.value });
    }
    return data.offset;
  }
  follow(charts, offset) {
    if (this.source) this.source.close();
    const sel = this.selectors(charts), q = new URLSearchParams({ run: this.run, offset });
    for (const x of sel.m) q.append("m", x);
    for (const x of sel.p) q.append("p", x);
    this.source = new EventSource(`/api/stream?${q}`);
    this.source.onmessage = (msg) => this.append(JSON.parse(msg.data).events);
    this.source.addEventListener("reset", () => { this.source.close(); this.onData(null); });
    this.source.onerror = () => { $("#conn").textContent = "reconnecting…"; };
    this.source.onopen = () => { $("#conn").textContent = "live"; };
  }
  append(events) {
    const touched = new Set();
    for (const [metric, layer, head, position, step, value] of events) {
      const key = keyOf(metric, layer, head, position);
      let s = this.series.get(key);
      if (!s) { s = { metric, layer, head, position, x: [], y: [], n: 0 }; this.series.set(key, s); }
      s.x.push(step); s.y.push(value); s.n += 1;
      if (s.x.length > LOCAL_POINTS) [s.x, s.y] = thin(s.x, s.y, LOCAL_POINTS / 2);
      touched.add(metric);
    }
    this.onData(touched);
  }
  close() { if (this.source) this.source.close(); this.source = null; }
  matching(chart) {
    const out = [];
    for (const s of this.series.values()) {
      const hit = (chart.m || []).includes(s.metric) || (chart.p || []).some((p) => s.metric.startsWith(p));
      if (hit && (!chart.perLayer || (s.head === null && s.position === null))) out.push(s);
    }
    return out.sort((a, b) => (a.metric < b.metric ? -1 : a.metric > b.metric ? 1 : (a.layer ?? -1) - (b.layer ?? -1)));
  }
}

// --- a line chart card -----------------------------------------------------------------------------------------
class LineCard {
  constructor(spec, parent) {
    this.spec = spec; this.plot = null; this.signature = "";
    this.el = h("div", { class: "card", id: `chart-${spec.id}`, hidden: "" }, h("h2", {}, spec.title, h("span", { class: "muted" })));
    this.body = h("div", { class: "plot" });
    this.el.append(this.body);
    parent.append(this.el);
  }
  label(s) { return s.layer !== null && s.layer !== undefined ? `${s.metric} L${s.layer}` : s.metric; }
  update(feeds) {
    const spec = this.spec, lines = [], tables = [];
    feeds.forEach((feed, f) => {
      if (!feed) return;
      for (const s of feed.matching(spec)) {
        if ((spec.hide || []).includes(s.metric) || !s.x.length) continue;
        lines.push({ s, f, label: this.label(s) + (f ? ` · ${feed.run}` : "") });
        tables.push([s.x, s.y]);
      }
      if (spec.spikes) {
        const base = feed.matching(spec).find((s) => s.metric === spec.spikes.of);
        const flag = feed.matching(spec).find((s) => s.metric === spec.spikes.flag);
        if (base && flag && flag.x.length) {
          const at = new Map(flag.x.map((x, i) => [x, flag.y[i]]));
          const xs = [], ys = [];
          base.x.forEach((x, i) => { if (at.get(x) === 1) { xs.push(x); ys.push(base.y[i]); } });
          if (xs.length) { lines.push({ s: base, f, label: "spike" + (f ? ` · ${feed.run}` : ""), spike: true }); tables.push([xs, ys]); }
        }
      }
    });
    if (!lines.length) return;
    this.el.hidden = false;
    const data = tables.length === 1 ? tables[0] : uPlot.join(tables);
    const signature = lines.map((l) => l.label).join(";");
    if (signature !== this.signature || !this.plot) this.build(lines, signature, data);
    else this.plot.setData(data);
    const last = lines[0].s;
    $("h2 .muted", this.el).textContent = `${fmt(last.y[last.y.length - 1])} at step ${last.x[last.x.length - 1]}`;
  }
  build(lines, signature, data) {
    if (this.plot) this.plot.destroy();
    this.signature = signature;
    const spec = this.spec, colors = new Map();
    const series = [{ label: "step" }];
    let right = false;
    for (const l of lines) {
      const name = l.s.metric + "|" + (l.s.layer ?? "");
      if (!colors.has(name)) colors.set(name, COLORS[colors.size % COLORS.length]);
      const onRight = (spec.right || []).includes(l.s.metric);
      right ||= onRight;
      const dash = l.f ? [6, 4] : (spec.dashed || []).includes(l.s.metric) ? [3, 3] : undefined;
      series.push(l.spike
        ? { label: l.label, stroke: "#c62828", fill: "#c62828", paths: () => null, points: { show: true, size: 9, fill: "#c62828" }, scale: "y" }
        : { label: l.label, stroke: colors.get(name), width: 1.5, dash, scale: onRight ? "y2" : "y", spanGaps: true,
            points: { size: 4 }, paths: spec.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined });
    }
    const values = (u, ticks) => ticks.map((v) => fmt(v, 3)); // small and large values stay readable (3e-4, 1.5e+5)
    const axes = [{ label: "step" }, { scale: "y", size: 64, values }];
    if (right) axes.push({ scale: "y2", side: 1, grid: { show: false }, size: 64, values });
    const id = spec.id;
    this.plot = new uPlot({
      width: Math.max(300, this.body.clientWidth || 500), height: 220, series, axes,
      scales: { x: { time: false } }, legend: { live: true },
      hooks: { draw: [(u) => {
        const xs = u.data[0];
        if (!xs.length) return;
        const t = now();
        if (E.firstChart === null) E.firstChart = performance.now();
        E.draws.push([id, xs[xs.length - 1], t]);
        if (E.draws.length > MAX_DRAWS) E.draws.splice(0, MAX_DRAWS / 2);
      }] },
    }, data, this.body);
  }
  resize() { if (this.plot) this.plot.setSize({ width: Math.max(300, this.body.clientWidth), height: 220 }); }
  destroy() { if (this.plot) this.plot.destroy(); this.el.remove(); }
}

// --- heat strips (Weight-Δ per layer and group; plasticity Layer × Time) -----------------------------------------
function color(t) { // t in [0, 1] -> a viridis-like ramp
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const x = Math.min(0.9999, Math.max(0, t)) * (stops.length - 1), i = Math.floor(x), f = x - i;
  return stops[i].map((c, k) => Math.round(c + f * (stops[i + 1][k] - c)));
}
function drawHeat(canvas, rows, cols, valueAt, log) {
  canvas.width = cols; canvas.height = rows;
  const ctx = canvas.getContext("2d"), img = ctx.createImageData(cols, rows);
  let lo = Infinity, hi = -Infinity;
  const tf = (v) => (log ? Math.log10(Math.max(v, 1e-12)) : v);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
    const v = valueAt(r, c);
    if (v !== null && v !== undefined && isFinite(v)) { lo = Math.min(lo, tf(v)); hi = Math.max(hi, tf(v)); }
  }
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
    const v = valueAt(r, c), o = 4 * (r * cols + c);
    if (v === null || v === undefined || !isFinite(v)) { img.data.set([240, 240, 240, 255], o); continue; }
    img.data.set([...color(hi > lo ? (tf(v) - lo) / (hi - lo) : 0.5), 255], o);
  }
  ctx.putImageData(img, 0, 0);
  return [lo, hi].map((v) => (log ? 10 ** v : v));
}

class WeightDeltaCard {
  constructor(spec, parent, page) {
    this.spec = spec; this.page = page;
    const pick = h("select", { onchange: (e) => page.setWeightDeltaMetric(e.target.value) },
      ...["rel_prev", "rel_init", "update_ratio"].map((m) => h("option", { value: m }, m)));
    this.canvas = h("canvas", { height: 10, width: 10 });
    this.labels = h("div", { class: "labels" });
    this.legend = h("div", { class: "legend" });
    this.el = h("div", { class: "card wide", id: "chart-weightdelta", hidden: "" },
      h("h2", {}, spec.title, pick, h("span", { class: "muted" }, "log colour, per (group, layer) row, step →")),
      h("div", { class: "heat" }, this.labels, this.canvas), this.legend);
    parent.append(this.el);
  }
  update(feeds) {
    const feed = feeds[0], metric = feed.wdMetric;
    const rows = [...feed.series.values()].filter((s) => s.metric.startsWith("weight_delta/") && s.metric.endsWith("/" + metric) && s.x.length)
      .sort((a, b) => (a.metric === b.metric ? (a.layer ?? -1) - (b.layer ?? -1) : a.metric < b.metric ? -1 : 1));
    if (!rows.length) return;
    this.el.hidden = false;
    let lo = Infinity, hi = -Infinity;
    for (const s of rows) { lo = Math.min(lo, s.x[0]); hi = Math.max(hi, s.x[s.x.length - 1]); }
    const cols = Math.max(1, Math.min(400, hi - lo + 1)), width = (hi - lo + 1) / cols;
    const grid = rows.map((s) => {
      const cells = new Array(cols).fill(null);
      s.x.forEach((x, i) => { const c = Math.min(cols - 1, Math.floor((x - lo) / width)); if (s.y[i] !== null) cells[c] = Math.max(cells[c] ?? -Infinity, s.y[i]); });
      for (let c = 1; c < cols; c++) if (cells[c] === null) cells[c] = cells[c - 1]; // hold the last measurement
      return cells;
    });
    this.canvas.style.height = `${Math.max(40, rows.length * 9)}px`;
    const [vlo, vhi] = drawHeat(this.canvas, rows.length, cols, (r, c) => grid[r][c], true);
    this.labels.replaceChildren(...rows.map((s) => h("div", { style: null }, `${s.metric.split("/")[1]}${s.layer !== null ? " L" + s.layer : ""}`)));
    for (const d of this.labels.children) d.style.height = this.canvas.style.height.replace("px", "") / rows.length + "px";
    this.legend.textContent = `${metric}: ${fmt(vlo)} (dark) … ${fmt(vhi)} (bright); steps ${lo}–${hi}`;
    E.draws.push(["weightdelta", hi, now()]);
  }
  resize() {}
  destroy() { this.el.remove(); }
}

class PlasticityCard {
  constructor(parent, run) {
    this.run = run; this.stage = null; this.step = null; this.metric = "update_norm"; this.signature = "";
    this.canvas = h("canvas", { height: 10, width: 10 });
    this.labels = h("div", { class: "labels" });
    this.controls = h("span", {});
    this.bars = h("div", { class: "bars" });
    this.legend = h("div", { class: "legend" });
    this.images = h("div", { class: "images" });
    this.el = h("div", { class: "card wide", id: "chart-plasticity", hidden: "" },
      h("h2", {}, "Plasticity: Layer × Time (token position)", this.controls),
      h("div", { class: "heat" }, this.labels, this.canvas), this.legend, this.bars, this.images);
    parent.append(this.el);
  }
  async refresh() {
    let d;
    try { d = await api("/api/plasticity", { run: this.run, stage: this.stage, step: this.step, metric: this.metric }); }
    catch (err) { return; }
    if (!d.stages || !d.stages.length) return;
    const signature = JSON.stringify([d.stage, d.step, d.steps, d.metric, d.metrics, d.images]);
    if (signature === this.signature) return;
    this.signature = signature;
    this.el.hidden = false;
    const sel = (values, current, on) => h("select", { onchange: (e) => on(e.target.value) }, ...values.map((v) => h("option", v == current ? { value: v, selected: "" } : { value: v }, String(v))));
    this.controls.replaceChildren(
      sel(d.stages, d.stage, (v) => { this.stage = v; this.step = null; this.refresh(); }),
      sel(d.steps, d.step, (v) => { this.step = v; this.refresh(); }),
      sel(d.metrics, d.metric, (v) => { this.metric = v; this.refresh(); }));
    this.canvas.style.height = `${Math.max(60, d.layers * 22)}px`;
    const [lo, hi] = drawHeat(this.canvas, d.layers, d.positions, (r, c) => d.heat[r][c], false);
    this.labels.replaceChildren(...Array.from({ length: d.layers }, (_, i) => { const el = h("div", {}, `layer ${i}`); el.style.height = `${Math.max(60, d.layers * 22) / d.layers}px`; return el; }));
    this.legend.textContent = `mean ${d.metric} over sequences and heads at step ${d.step} (${d.stage}); ${d.position_bin} position(s) per column; ${fmt(lo)} (dark) … ${fmt(hi)} (bright)`;
    const top = Math.max(...d.buckets.map((b) => b.mean || 0), 1e-12);
    this.bars.replaceChildren(...d.buckets.flatMap((b) => {
      const bar = h("div", { class: "bar" }); bar.style.width = `${(100 * (b.mean || 0)) / top}%`;
      return [h("span", {}, b.bucket), h("div", {}, bar), h("span", { class: "muted" }, `${fmt(b.mean)} (n=${b.count})`)];
    }));
    this.images.replaceChildren(...d.images.filter((p) => p.includes(d.metric)).map((p) => h("img", { src: `/files/${this.run}/${p}`, alt: p, title: p })));
  }
  resize() {}
  destroy() { this.el.remove(); }
}

// --- the run page ---------------------------------------------------------------------------------------------
class RunPage {
  constructor(run, compare) {
    this.run = run; this.compare = compare; this.cards = []; this.pending = false;
    this.feed = new Feed(run, (t) => this.changed(t));
    this.other = compare ? new Feed(compare, (t) => this.changed(t)) : null;
  }
  async mount(view) {
    this.head = h("div", { class: "runhead" });
    this.alert = h("div", { class: "alert", id: "capgauge-alert", hidden: "" });
    this.files = h("div", { class: "files" });
    const grid = h("div", { class: "grid" });
    view.replaceChildren(this.head, this.alert, grid, this.files);
    for (const spec of CHARTS) this.cards.push(spec.kind === "heat" ? new WeightDeltaCard(spec, grid, this) : new LineCard(spec, grid));
    this.plasticity = new PlasticityCard(grid, this.run);
    this.cards.push(this.plasticity);
    this.summary(); // not awaited: the first chart need not wait for the header
    try {
      // The first chart alone first (a long history parses only its own lines), then everything.
      await this.feed.load([{ m: ["train/loss"] }]);
      this.redraw();
      const offset = await this.feed.load(CHARTS);
      this.feed.follow(CHARTS, offset);
      if (this.other) this.other.follow(CHARTS, await this.other.load(CHARTS));
      this.redraw();
      E.loaded = true;
    } catch (err) { E.errors.push(String(err)); }
    this.plasticity.refresh();
    this.timer = setInterval(() => { this.summary(); this.plasticity.refresh(); }, 3000);
    this.onresize = () => this.cards.forEach((c) => c.resize());
    window.addEventListener("resize", this.onresize);
  }
  async summary() {
    const d = await api("/api/runs").catch(() => null);
    if (!d) return;
    const me = d.runs.find((r) => r.run === this.run);
    const options = [h("option", { value: "" }, "compare with…"), ...d.runs.filter((r) => r.run !== this.run)
      .map((r) => h("option", r.run === this.compare ? { value: r.run, selected: "" } : { value: r.run }, r.run))];
    const pick = h("select", { id: "compare", onchange: (e) => { location.hash = `#/run/${this.run}` + (e.target.value ? `?vs=${e.target.value}` : ""); } }, ...options);
    this.head.replaceChildren(h("h1", {}, this.run),
      me ? h("span", { class: `status ${me.status}` }, me.status) : h("span", { class: "muted" }, "waiting for the run to appear…"),
      me ? h("span", { class: "muted" }, `${me.family ?? "?"} · step ${me.step ?? "—"} · loss ${fmt(me.loss)} · updated ${ago(me.updated, d.now)}`) : null,
      pick);
    const files = await api("/api/files", { run: this.run }).catch(() => ({ files: [] }));
    this.files.replaceChildren(h("span", { class: "muted" }, "files: "), ...files.files.map((f) => h("a", { href: `/files/${this.run}/${f}`, target: "_blank" }, f)));
  }
  changed(touched) {
    if (touched === null) { route(); return; } // the file was replaced: start over
    this.redraw();
  }
  redraw() {
    for (const c of this.cards) if (c.update) c.update([this.feed, this.other]);
    this.checkAlert();
  }
  checkAlert() {
    const s = (m) => this.feed.series.get(keyOf(m));
    const bpp = s("capgauge/bpp_seen"), thr = s("capgauge/alert_bpp"), fired = s("capgauge/alert");
    const last = (x) => (x && x.y.length ? x.y[x.y.length - 1] : null);
    const peak = bpp && bpp.y.length ? Math.max(...bpp.y.filter((v) => v !== null)) : null;
    const t = last(thr);
    if ((fired && fired.y.length) || (peak !== null && t !== null && peak >= t)) {
      this.alert.hidden = false;
      this.alert.textContent = `Cap-Gauge alert: ${fmt(peak ?? last(fired))} bits per parameter reached the threshold ${fmt(t)}`;
    }
  }
  async setWeightDeltaMetric(metric) {
    this.feed.wdMetric = metric;
    const offset = await this.feed.load(CHARTS, 400);
    this.feed.follow(CHARTS, offset);
    this.redraw();
  }
  unmount() {
    this.feed.close(); if (this.other) this.other.close();
    clearInterval(this.timer); window.removeEventListener("resize", this.onresize);
    for (const c of this.cards) c.destroy();
  }
}

// --- the run list -----------------------------------------------------------------------------------------------
class ListPage {
  async mount(view) {
    this.table = h("table", { class: "runs", id: "runs" });
    view.replaceChildren(this.table);
    await this.refresh();
    this.timer = setInterval(() => this.refresh(), 2000); // a run started in another terminal shows up here
  }
  async refresh() {
    const d = await api("/api/runs").catch(() => null);
    if (!d) return;
    $("#root").textContent = d.root;
    const head = h("tr", {}, ...["run", "family", "status", "step", "last loss", "updated"].map((t) => h("th", {}, t)));
    const rows = d.runs.map((r) => h("tr", { class: "run", "data-run": r.run, onclick: () => (location.hash = `#/run/${r.run}`) },
      h("td", {}, h("a", { href: `#/run/${r.run}` }, r.run)), h("td", {}, r.family ?? "—"),
      h("td", {}, h("span", { class: `status ${r.status}` }, r.status)), h("td", { class: "num" }, r.step ?? "—"),
      h("td", { class: "num" }, fmt(r.loss)), h("td", { class: "muted" }, ago(r.updated, d.now))));
    this.table.replaceChildren(h("thead", {}, head), h("tbody", {}, ...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 6, class: "empty" }, "no runs yet under this root"))])));
  }
  unmount() { clearInterval(this.timer); }
}

// --- routing: #/ is the list, #/run/<run>[?vs=<other run>] a run ---------------------------------------------------
let page = null;
function route() {
  if (page) page.unmount();
  E.firstChart = null; E.loaded = false;
  const hash = decodeURIComponent(location.hash.slice(1));
  const m = hash.match(/^\/run\/([^?]+)(?:\?vs=(.+))?$/);
  page = m ? new RunPage(m[1], m[2] || null) : new ListPage();
  page.mount($("#view"));
}
window.addEventListener("hashchange", route);
route();
