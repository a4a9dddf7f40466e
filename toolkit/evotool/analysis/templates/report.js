"use strict";
// evotool report: renders the embedded report data (see evotool/analysis/html.py for its schema).
(function () {
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const STAGES = ["rapid_evolution", "stabilization", "mutation"];
  const STAGE_COLOUR = { rapid_evolution: "#4C72B0", stabilization: "#55A868", mutation: "#C44E52" };
  const METRICS = [["js_prev", "adjacent-layer JS"], ["js_final", "JS to output layer"], ["p_token", "p(emitted token)"],
                   ["entropy", "entropy"], ["cos_prev", "adjacent cosine"]];
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"];
  const SVGNS = "http://www.w3.org/2000/svg";
  const state = { run: 0, sample: 0, step: null, scale: "raw", patchLayer: 0 };
  const $ = (id) => document.getElementById(id);

  // ---- DOM helpers -------------------------------------------------------------------------------
  function setAttrs(e, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
  }
  function append(e, children) {
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return e;
  }
  function el(tag, attrs, ...children) { const e = document.createElement(tag); setAttrs(e, attrs); return append(e, children); }
  function svg(tag, attrs, ...children) { const e = document.createElementNS(SVGNS, tag); setAttrs(e, attrs); return append(e, children); }
  function clear(e) { while (e.firstChild) e.removeChild(e.firstChild); return e; }

  function fmt(x, digits) {
    if (x === null || x === undefined) return "n/a";
    if (x === 0) return "0";
    const a = Math.abs(x);
    return a >= 1e-3 && a < 1e4 ? String(Number(x.toPrecision(digits || 4))) : x.toExponential((digits || 4) - 1);
  }
  function field(name, value, text) { return el("span", { "data-field": name, "data-value": value, text: text === undefined ? String(value) : text }); }
  function visible(s) {
    if (s.trim() === "") return s.replace(/\n/g, "↵").replace(/ /g, "␣").replace(/\t/g, "⇥") || "∅";
    return s.replace(/\n/g, "↵");
  }
  function run() { return DATA.runs[state.run]; }
  function sample() { return run().samples[state.sample]; }
  function tokenText(r, id) { const s = r.token_strings[String(id)]; return s === undefined ? "#" + id : s; }
  function stageOf(r, layer) {
    let name = "rapid_evolution";
    for (const s of STAGES) { const g = r.stages[s]; if (g && layer >= g[0] && layer <= g[1]) name = s; }
    return name;
  }
  function stageLabel(name) { return name.replace("_", " "); }
  function rangeText(g) { return g ? g[0] + "–" + g[1] : "absent"; }
  function viridis(t) {
    t = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0));
    const x = t * (VIRIDIS.length - 1), i = Math.floor(x), f = x - i;
    const a = VIRIDIS[i], b = VIRIDIS[Math.min(i + 1, VIRIDIS.length - 1)];
    const ch = (h, k) => parseInt(h.slice(1 + 2 * k, 3 + 2 * k), 16);
    return "rgb(" + [0, 1, 2].map((k) => Math.round(ch(a, k) + f * (ch(b, k) - ch(a, k)))).join(",") + ")";
  }

  // ---- tooltip -----------------------------------------------------------------------------------
  const tip = $("tooltip");
  const TIPS = {};
  function placeTip(ev) {
    const pad = 14;
    let x = ev.clientX + pad, y = ev.clientY + pad;
    if (x + tip.offsetWidth > window.innerWidth) x = ev.clientX - tip.offsetWidth - pad;
    if (y + tip.offsetHeight > window.innerHeight) y = ev.clientY - tip.offsetHeight - pad;
    tip.style.left = Math.max(0, x) + "px";
    tip.style.top = Math.max(0, y) + "px";
  }
  document.addEventListener("mouseover", (ev) => {
    const target = ev.target.closest ? ev.target.closest("[data-tip]") : null;
    if (!target) { tip.hidden = true; return; }
    clear(tip);
    append(tip, [TIPS[target.dataset.tip](target)]);
    tip.dataset.for = target.dataset.tip;
    tip.hidden = false;
    placeTip(ev);
  });
  document.addEventListener("mousemove", (ev) => { if (!tip.hidden) placeTip(ev); });
  document.addEventListener("mouseleave", () => { tip.hidden = true; });

  // ---- line plots (stage curves, atlas) ----------------------------------------------------------
  // opts: width, height, title, xmax, xlabel, series [{x, y, colour, lo, hi}], shade [{from, to, colour}],
  //       vlines [{x, colour, dash, label}], hover {xs, attrs(i)}
  function linePlot(opts) {
    const W = opts.width || 250, H = opts.height || 170, L = 40, R = 8, T = 18, B = 26;
    const ys = [];
    for (const s of opts.series) for (const arr of [s.y, s.lo, s.hi]) if (arr) for (const v of arr) if (v !== null && Number.isFinite(v)) ys.push(v);
    let ymin = ys.length ? Math.min(...ys) : 0, ymax = ys.length ? Math.max(...ys) : 1;
    if (ymax - ymin < 1e-12) { ymin -= 0.5; ymax += 0.5; }
    const pad = (ymax - ymin) * 0.05; ymin -= pad; ymax += pad;
    const X = (x) => L + (x / (opts.xmax || 1)) * (W - L - R);
    const Y = (y) => T + (1 - (y - ymin) / (ymax - ymin)) * (H - T - B);
    const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "panel" });
    root.appendChild(svg("text", { x: L, y: 12, class: "title", text: opts.title || "" }));
    const step = (opts.xmax || 1) / Math.max(1, (opts.nx || 1));
    for (const sh of opts.shade || []) {
      root.appendChild(svg("rect", { x: X(sh.from - step / 2), y: T, width: Math.max(0, X(sh.to + step / 2) - X(sh.from - step / 2)),
                                     height: H - T - B, fill: sh.colour, "fill-opacity": 0.1 }));
    }
    root.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }));
    root.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" }));
    for (const frac of [0, 0.5, 1]) {
      const v = ymin + pad + frac * (ymax - ymin - 2 * pad);
      root.appendChild(svg("text", { x: L - 3, y: Y(v) + 3, "text-anchor": "end", text: fmt(v, 2) }));
    }
    for (const t of opts.xticks || []) root.appendChild(svg("text", { x: X(t), y: H - B + 12, "text-anchor": "middle", text: fmt(t, 2) }));
    root.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 2, "text-anchor": "middle", text: opts.xlabel || "layer" }));
    for (const s of opts.series) {
      const seg = (arr) => s.x.map((x, i) => [x, arr[i]]).filter((p) => p[1] !== null && Number.isFinite(p[1]));
      if (s.lo && s.hi) {
        const lo = seg(s.lo), hi = seg(s.hi).reverse();
        if (lo.length) root.appendChild(svg("polygon", { points: lo.concat(hi).map((p) => X(p[0]) + "," + Y(p[1])).join(" "), fill: s.colour, "fill-opacity": 0.18 }));
      }
      const pts = seg(s.y);
      root.appendChild(svg("polyline", { points: pts.map((p) => X(p[0]) + "," + Y(p[1])).join(" "), fill: "none", stroke: s.colour, "stroke-width": 1.6 }));
    }
    for (const v of opts.vlines || []) {
      root.appendChild(svg("line", { x1: X(v.x), x2: X(v.x), y1: T, y2: H - B, stroke: v.colour, "stroke-dasharray": v.dash || "", "stroke-width": 1.3 },
                           svg("title", { text: v.label || "" })));
    }
    if (opts.hover) {
      const xs = opts.hover.xs, w = xs.length > 1 ? X(xs[1]) - X(xs[0]) : W - L - R;
      xs.forEach((x, i) => root.appendChild(svg("rect", Object.assign({ x: X(x) - w / 2, y: T, width: w, height: H - T - B, fill: "transparent" }, opts.hover.attrs(i)))));
    }
    return root;
  }

  function boundaryLines(r, scale) {
    const lines = [];
    if (r.critical_layer !== null) lines.push({ x: r.critical_layer * scale, colour: STAGE_COLOUR.stabilization, dash: "5,3", label: "critical layer " + r.critical_layer });
    for (const m of r.mutation_layers) lines.push({ x: m * scale, colour: STAGE_COLOUR.mutation, dash: "2,2", label: "mutation layer " + m });
    const b = r.behaviour;
    if (b) {
      if (b.critical_layer !== null && b.critical_layer !== undefined) lines.push({ x: b.critical_layer * scale, colour: "#000", dash: "1,3", label: "behavioural critical layer " + b.critical_layer });
      for (const m of b.mutation_layers || []) lines.push({ x: m * scale, colour: "#000", dash: "6,2,1,2", label: "behavioural mutation layer " + m });
    }
    return lines;
  }
  function stageShades(r, scale) {
    return STAGES.filter((s) => r.stages[s]).map((s) => ({ from: r.stages[s][0] * scale, to: r.stages[s][1] * scale, colour: STAGE_COLOUR[s] }));
  }
  function layerTicks(n) { const k = Math.max(1, Math.ceil(n / 6)); const t = []; for (let i = 0; i <= n; i += k) t.push(i); return t; }

  function curveTip(target) {
    const r = DATA.runs[+target.dataset.run], metric = target.dataset.metric, layer = +target.dataset.layer;
    const c = r.curves[metric];
    return el("div", {},
      el("div", {}, el("b", { text: r.name }), " · layer ", field("layer", layer), " (", stageLabel(stageOf(r, layer)), ")"),
      el("div", {}, metric + " median ", field("median", c.median[layer], fmt(c.median[layer])),
         " (IQR ", fmt(c.q25[layer]), " – ", fmt(c.q75[layer]), ")"));
  }
  TIPS.curve = curveTip;

  function renderCurves(r) {
    const box = clear($("curves"));
    if (!r.curves) { box.appendChild(el("p", { class: "note", text: "this stage file has no per-layer curves" })); return; }
    const n = r.num_layers, xs = Array.from({ length: n + 1 }, (_, i) => i);
    const panels = el("div", { class: "panels" });
    for (const [key, label] of METRICS) {
      const c = r.curves[key];
      if (!c) continue;
      panels.appendChild(linePlot({
        title: label + (key.startsWith("js") || key === "entropy" ? " (" + r.js_unit + ")" : ""), xmax: n, nx: n, xticks: layerTicks(n),
        series: [{ x: xs, y: c.median, lo: c.q25, hi: c.q75, colour: "#222" }],
        shade: stageShades(r, 1), vlines: boundaryLines(r, 1),
        hover: { xs: xs, attrs: (i) => ({ "data-tip": "curve", "data-run": state.run, "data-metric": key, "data-layer": i, class: "curve-hover" }) },
      }));
    }
    box.appendChild(panels);
  }

  // ---- run summary -------------------------------------------------------------------------------
  function renderSummary(r) {
    $("run-title").textContent = r.name + " — " + r.model;
    const rows = [
      ["samples / generated tokens", (r.samples_total ?? "n/a") + " / " + (r.tokens_total ?? "n/a")],
      ["decoder layers", r.num_layers], ["lens", r.lens ?? "n/a"],
      ["critical layer", r.critical_layer ?? "none"],
      ["mutation layers", r.mutation_layers.length ? r.mutation_layers.join(", ") : "none"],
    ].concat(STAGES.map((s) => [stageLabel(s), rangeText(r.stages[s])]));
    if (r.flags && r.flags.length) rows.push(["detector flags", r.flags.join(", ")]);
    if (r.behaviour) rows.push(["behavioural critical / mutation", (r.behaviour.critical_layer ?? "none") + " / " + ((r.behaviour.mutation_layers || []).join(", ") || "none")]);
    const table = el("table", { class: "summary", id: "summary-table" });
    for (const [k, v] of rows) table.appendChild(el("tr", {}, el("th", { text: k }), el("td", { text: String(v) })));
    append(clear($("run-summary")), [table]);
    const notes = clear($("notes"));
    for (const n of r.notes) notes.appendChild(el("li", { text: n }));
    const hall = clear($("hallucination"));
    if (r.hallucination) {
      hall.appendChild(el("h2", { text: "Object tokens: hallucinated vs grounded" }));
      const t = el("table", { class: "hall" }, el("tr", {}, ["", "tokens", "median decision depth", "decided in rapid / stable / mutation", "overturned after the stable stage"].map((h) => el("th", { text: h }))));
      for (const [name, g] of Object.entries(r.hallucination)) {
        t.appendChild(el("tr", {}, el("td", { text: name }), el("td", { text: String(g.tokens) }), el("td", { text: String(g.median_decision_depth ?? "n/a") }),
          el("td", { text: STAGES.map((s) => Math.round(100 * g.decided_in[s]) + "%").join(" / ") }),
          el("td", { text: Math.round(100 * g.overturned_after_stable) + "%" })));
      }
      hall.appendChild(t);
    }
    const figs = clear($("figures"));
    $("figures-title").hidden = !r.figures.length;
    for (const f of r.figures) figs.appendChild(el("figure", {}, el("figcaption", { text: f.name.replace(/_/g, " ") }), el("img", { src: f.uri, alt: f.name })));
  }

  // ---- samples -----------------------------------------------------------------------------------
  function renderSampleList(r) {
    const list = clear($("sample-list"));
    r.samples.forEach((s, i) => {
      list.appendChild(el("button", { "data-sample": i, class: i === state.sample ? "selected" : "", title: s.id, onclick: () => selectSample(i) },
        s.image ? el("img", { src: s.image, alt: "" }) : null, el("span", { text: s.id })));
    });
    $("sample").hidden = !r.samples.length;
    if (!r.samples.length) list.appendChild(el("p", { class: "note", text: "no samples stored in this run directory" }));
  }

  function objectFlags(s) { const m = new Map(); for (const [step, h] of s.object_tokens) m.set(step, h ? "hallucinated" : "grounded"); return m; }
  function divergenceAt(s) { const m = new Map(); for (const d of s.divergence) { if (!m.has(d.step)) m.set(d.step, []); m.get(d.step).push(d); } return m; }

  function pointValue(r, key, v) {  // token ids (e.g. stable_top1) also as their strings
    if (Number.isInteger(v) && key.endsWith("top1")) return v + " " + JSON.stringify(tokenText(r, v));
    return typeof v === "object" && v !== null ? JSON.stringify(v) : String(v);
  }
  function tokTip(target) {
    const r = run(), s = sample(), step = +target.dataset.step, id = s.token_ids[step];
    const box = el("div", {}, el("div", {}, "token ", field("token", tokenText(r, id), JSON.stringify(tokenText(r, id))), " (step ", field("step", step), ")"));
    const flag = objectFlags(s).get(step);
    if (flag) box.appendChild(el("div", { text: flag + " object" }));
    if (step < s.shown) box.appendChild(el("div", { text: "decision depth " + s.decision_depth[step] + " (" + stageLabel(stageOf(r, s.decision_depth[step])) + ")" }));
    for (const d of divergenceAt(s).get(step) || []) {
      box.appendChild(el("div", { class: "divergence-info" }, el("b", { text: "divergence point" }),
        ...Object.entries(d).filter(([k]) => k !== "step").map(([k, v]) => el("div", { "data-key": k, text: k + ": " + pointValue(r, k, v) }))));
    }
    return box;
  }
  TIPS.tok = tokTip;

  function renderText(r, s) {
    $("prompt").textContent = s.prompt;
    $("output").textContent = s.text;
    $("truth").textContent = s.objects ? "ground-truth objects: " + (s.objects.join(", ") || "none") : "";
    const flags = objectFlags(s), div = divergenceAt(s), box = clear($("text"));
    s.token_ids.forEach((id, step) => {
      const cls = ["tok", flags.get(step) || "", div.has(step) ? "divergence" : "", step >= s.shown ? "beyond" : ""].filter(Boolean).join(" ");
      box.appendChild(el("span", { class: cls, "data-step": step, "data-tip": "tok", text: visible(tokenText(r, id)),
                                   onclick: () => { if (step < s.shown) selectStep(step); } }));
    });
  }

  function renderImage(r, s) {
    const img = $("sample-image"), wrap = $("image-wrap"), overlay = clear($("patch-overlay")), strip = clear($("patch-strip"));
    const pl = s.patch_lens;
    if (s.image) { img.src = s.image; img.hidden = false; wrap.style.height = ""; }
    else { img.removeAttribute("src"); img.hidden = true; wrap.style.height = pl && pl.spatial ? Math.round(288 * pl.grid[0] / pl.grid[1]) + "px" : "0"; }
    $("patch-controls").hidden = !pl;
    if (!pl) return;
    const slider = $("patch-layer");
    slider.max = r.num_layers;
    slider.value = state.patchLayer;
    $("patch-note").textContent = pl.note;
    const target = pl.spatial ? overlay : strip;
    overlay.style.gridTemplateColumns = "repeat(" + pl.grid[1] + ", 1fr)";
    overlay.style.gridTemplateRows = "repeat(" + pl.grid[0] + ", 1fr)";
    for (let p = 0; p < pl.top1[0].length; p++) target.appendChild(el("div", { class: "patch", "data-patch": p, "data-tip": "patch" }));
    paintPatches();
  }
  function paintPatches() {
    const r = run(), s = sample(), pl = s.patch_lens, layer = state.patchLayer;
    if (!pl) return;
    $("patch-layer-label").textContent = layer + " (" + stageLabel(stageOf(r, layer)) + ")";
    document.querySelectorAll(".patch[data-patch]").forEach((cell) => {
      const p = +cell.dataset.patch, id = pl.top1[layer][p], prob = pl.prob[layer][p];
      cell.textContent = visible(tokenText(r, id)).slice(0, 6);
      cell.dataset.id = id;
      cell.style.background = "hsla(" + Math.round((id * 137.508) % 360) + ",70%,40%," + (0.1 + 0.45 * prob).toFixed(3) + ")";
    });
  }
  TIPS.patch = (target) => {
    const r = run(), pl = sample().patch_lens, p = +target.dataset.patch, layer = state.patchLayer, id = pl.top1[layer][p];
    const where = pl.spatial ? "row " + Math.floor(p / pl.grid[1]) + ", column " + (p % pl.grid[1]) : "position " + p;
    return el("div", {}, el("div", {}, "patch ", field("patch", p), " (" + where + ") · layer ", field("layer", layer)),
      el("div", {}, "reads as ", field("token", tokenText(r, id), JSON.stringify(tokenText(r, id))), " p = ", field("prob", pl.prob[layer][p], fmt(pl.prob[layer][p], 3))));
  };

  // ---- heatmap -----------------------------------------------------------------------------------
  function columnScaled(s) {
    const n = s.js.length ? s.js[0].length : 0, max = new Array(n).fill(0);
    for (const row of s.js) row.forEach((v, j) => { if (v !== null && v > max[j]) max[j] = v; });
    return s.js.map((row) => row.map((v, j) => (v === null ? null : v / Math.max(max[j], 1e-12))));
  }
  function renderHeatmap(r, s) {
    const table = clear($("heatmap"));
    if (!s) return;
    const scaled = columnScaled(s);
    let globalMax = 1e-12;
    for (const row of s.js) for (const v of row) if (v !== null && v > globalMax) globalMax = v;
    const values = state.scale === "column" ? scaled : s.js.map((row) => row.map((v) => (v === null ? null : v / globalMax)));
    append(clear($("heat-legend")), ["colour: 0 ", el("span", { class: "gradient", style: "background:linear-gradient(to right," + VIRIDIS.join(",") + ")" }),
      " " + (state.scale === "column" ? "1 (column max)" : fmt(globalMax, 3) + " " + r.js_unit)]);
    const firstOf = new Set();
    if (r.critical_layer !== null) firstOf.add(r.critical_layer + 1);
    for (const m of r.mutation_layers) firstOf.add(m);
    const head = el("tr", {}, el("th", { text: "token \\ layers" }));
    for (let p = 0; p < r.num_layers; p++) {
      head.appendChild(el("th", { class: "colhead" + (firstOf.has(p + 1) ? " boundary" : ""), text: p + "→" + (p + 1),
                                  style: "color:" + STAGE_COLOUR[stageOf(r, p + 1)] }));
    }
    table.appendChild(head);
    for (let step = 0; step < s.shown; step++) {
      const tr = el("tr", { "data-step": step },
        el("th", { class: "rowhead", "data-step": step, "data-tip": "tok", text: visible(tokenText(r, s.token_ids[step])) + " " + step, onclick: () => selectStep(step) }));
      for (let p = 0; p < r.num_layers; p++) {
        const v = values[step][p];
        tr.appendChild(el("td", { class: "cell" + (firstOf.has(p + 1) ? " boundary" : ""), "data-step": step, "data-pair": p, "data-tip": "heat",
                                  style: "background:" + (v === null ? "#eee" : viridis(v)) }));
      }
      table.appendChild(tr);
    }
  }
  function topkList(r, s, step, layer, name) {
    const ol = el("ol", { "data-field": name, "data-layer": layer });
    s.topk_ids[step][layer].forEach((id, i) => {
      const p = s.topk_p[step][layer][i];
      ol.appendChild(el("li", { "data-id": id, "data-p": p, class: id === s.token_ids[step] ? "emitted" : "" , text: JSON.stringify(tokenText(r, id)) + "  " + fmt(p, 3) }));
    });
    return ol;
  }
  TIPS.heat = (target) => {
    const r = run(), s = sample(), step = +target.dataset.step, pair = +target.dataset.pair;
    const js = s.js[step][pair], scaled = columnScaled(s)[step][pair], tok = tokenText(r, s.token_ids[step]);
    return el("div", {},
      el("div", {}, "token ", field("token", tok, JSON.stringify(tok)), " (step ", field("step", step), ")"),
      el("div", {}, "layers ", field("from", pair), " → ", field("to", pair + 1), " (" + stageLabel(stageOf(r, pair + 1)) + ")"),
      el("div", {}, "JS ", field("js", js, fmt(js)), " " + r.js_unit + " · column-scaled ", field("js-column", scaled, fmt(scaled, 3))),
      el("div", { class: "cols" },
        el("div", {}, "top-k at layer " + pair, topkList(r, s, step, pair, "topk-from")),
        el("div", {}, "top-k at layer " + (pair + 1), topkList(r, s, step, pair + 1, "topk-to"))));
  };

  // ---- trajectory --------------------------------------------------------------------------------
  function renderTrajectory() {
    const r = run(), s = sample(), box = clear($("trajectory")), step = state.step;
    if (step === null) { box.appendChild(el("p", { class: "note", text: "Click a token (in the text or a heatmap row) to see its top-k at every layer." })); return; }
    const id = s.token_ids[step], flag = objectFlags(s).get(step), k = s.topk_ids[step][0].length;
    box.appendChild(el("p", { id: "trajectory-title" }, "step ", field("step", step), ": emitted ", field("token", tokenText(r, id), JSON.stringify(tokenText(r, id))),
      ", decision depth " + s.decision_depth[step] + (flag ? " · " + flag + " object" : "") + (divergenceAt(s).has(step) ? " · divergence point" : "")));
    const table = el("table", { id: "trajectory-table" },
      el("tr", {}, ["layer", "stage", "p(emitted)", "rank"].map((h) => el("th", { text: h })), Array.from({ length: k }, (_, i) => el("th", { text: "top-" + (i + 1) }))));
    for (let layer = r.num_layers; layer >= 0; layer--) {
      const p = s.p_token[step][layer], stage = stageOf(r, layer);
      const tr = el("tr", { "data-layer": layer },
        el("td", { text: String(layer) }), el("td", { class: "stage-" + stage, text: stageLabel(stage) }),
        el("td", { "data-field": "p_token", "data-value": p }, el("span", { class: "bar", style: "width:" + Math.round(60 * p) + "px" }), fmt(p, 3)),
        el("td", { "data-field": "rank", text: String(s.rank[step][layer]) }));
      s.topk_ids[step][layer].forEach((tid, i) => {
        const tp = s.topk_p[step][layer][i];
        tr.appendChild(el("td", { class: "topk" + (tid === id ? " emitted" : ""), "data-id": tid, "data-p": tp, text: visible(tokenText(r, tid)) + " " + fmt(tp, 3) }));
      });
      table.appendChild(tr);
    }
    box.appendChild(table);
  }

  // ---- selection ---------------------------------------------------------------------------------
  function selectStep(step) {
    state.step = step;
    document.querySelectorAll("#text .tok").forEach((e) => e.classList.toggle("selected", +e.dataset.step === step));
    renderTrajectory();
  }
  function selectSample(i) {
    const r = run();
    state.sample = i;
    state.step = null;
    document.querySelectorAll("#sample-list button").forEach((b) => b.classList.toggle("selected", +b.dataset.sample === i));
    if (!r.samples.length) return;
    const s = sample();
    renderImage(r, s);
    renderText(r, s);
    renderHeatmap(r, s);
    renderTrajectory();
  }
  function selectRun(i) {
    state.run = i;
    state.sample = 0;
    state.patchLayer = DATA.runs[i].num_layers;
    $("run-select").value = String(i);
    document.querySelectorAll("#atlas-table tr[data-run]").forEach((tr) => tr.classList.toggle("selected", +tr.dataset.run === i));
    const r = run();
    renderSummary(r);
    renderCurves(r);
    renderSampleList(r);
    selectSample(0);
  }

  // ---- atlas -------------------------------------------------------------------------------------
  function renderAtlasPlots() {
    const metric = $("atlas-metric").value, depth = $("atlas-x").value === "depth";
    const grid = clear($("atlas-grid")), overlay = clear($("atlas-overlay"));
    const label = METRICS.find((m) => m[0] === metric)[1];
    const series = [];
    DATA.runs.forEach((r, i) => {
      if (!r.curves || !r.curves[metric]) return;
      const n = r.num_layers, scale = depth ? 1 / n : 1, xs = Array.from({ length: n + 1 }, (_, l) => l * scale), c = r.curves[metric];
      series.push({ x: Array.from({ length: n + 1 }, (_, l) => l / n), y: c.median, colour: PALETTE[i % PALETTE.length] });
      grid.appendChild(el("div", { class: "atlas-cell", "data-run": i }, linePlot({
        title: r.name + " (L=" + n + ")", xmax: depth ? 1 : n, nx: n, xticks: depth ? [0, 0.5, 1] : layerTicks(n), xlabel: depth ? "layer / L" : "layer",
        series: [{ x: xs, y: c.median, lo: c.q25, hi: c.q75, colour: "#222" }], shade: stageShades(r, scale), vlines: boundaryLines(r, scale),
        hover: { xs: xs, attrs: (l) => ({ "data-tip": "curve", "data-run": i, "data-metric": metric, "data-layer": l }) },
      })));
    });
    overlay.appendChild(linePlot({ title: label + ": median of every run against relative depth", width: 520, height: 230, xmax: 1, nx: 12,
                                   xticks: [0, 0.25, 0.5, 0.75, 1], xlabel: "layer / L", series: series }));
    overlay.appendChild(el("div", { class: "controls" }, DATA.runs.map((r, i) => el("span", { style: "color:" + PALETTE[i % PALETTE.length], text: "■ " + r.name }))));
  }
  function renderAtlas() {
    $("atlas").hidden = false;
    const table = clear($("atlas-table"));
    table.appendChild(el("tr", {}, ["run", "model", "L", "critical", "mutation", "rapid", "stable", "mutation stage", "flags", "behavioural critical / mutation", "samples", "tokens"].map((h) => el("th", { text: h }))));
    DATA.runs.forEach((r, i) => {
      const b = r.behaviour;
      table.appendChild(el("tr", { "data-run": i, onclick: () => selectRun(i) },
        [r.name, r.model, r.num_layers, r.critical_layer ?? "none", r.mutation_layers.join(", ") || "none",
         rangeText(r.stages.rapid_evolution), rangeText(r.stages.stabilization), rangeText(r.stages.mutation),
         (r.flags || []).join(", "), b ? (b.critical_layer ?? "none") + " / " + ((b.mutation_layers || []).join(", ") || "none") : "",
         r.samples_total ?? "", r.tokens_total ?? ""].map((v, j) => el("td", { "data-col": j, text: String(v) }))));
    });
    const select = $("atlas-metric");
    for (const [key, label] of METRICS) select.appendChild(el("option", { value: key, text: label }));
    select.addEventListener("change", renderAtlasPlots);
    $("atlas-x").addEventListener("change", renderAtlasPlots);
    renderAtlasPlots();
  }

  // ---- start -------------------------------------------------------------------------------------
  const runSelect = $("run-select");
  DATA.runs.forEach((r, i) => runSelect.appendChild(el("option", { value: i, text: r.name })));
  runSelect.addEventListener("change", () => selectRun(+runSelect.value));
  $("run-picker").hidden = DATA.runs.length < 2;
  for (const id of ["scale-raw", "scale-column"]) $(id).addEventListener("change", (ev) => { state.scale = ev.target.value; renderHeatmap(run(), sample()); });
  $("patch-layer").addEventListener("input", (ev) => { state.patchLayer = +ev.target.value; paintPatches(); });
  if (DATA.runs.length > 1) renderAtlas();
  selectRun(0);
  document.body.dataset.ready = "1";
})();
