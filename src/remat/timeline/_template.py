"""The page of a timeline: HTML, CSS and vanilla JavaScript in one string, nothing fetched.

``__TITLE__`` and ``__DATA__`` are replaced by :func:`remat.timeline.render.render_html` (the
title escaped, the data as JSON with ``</`` escaped). The script draws inline SVG: a stacked area
per step by category, each step's total and peak, the budget, a tooltip on hover, and the
lifetimes of a unit's saved and recomputed tensors on click.
"""

PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.2em 2em; color: #222; background: #fff; }
h1 { font-size: 1.3em; margin: 0 0 .3em 0; }
#summary { margin: .2em 0 .6em 0; font-size: .92em; line-height: 1.45; }
#summary .budget { color: #c00; }
#controls { font-size: .9em; margin-bottom: .4em; }
#controls button { font: inherit; padding: .1em .7em; margin-right: .3em; border: 1px solid #999;
  background: #f4f4f4; border-radius: 3px; cursor: pointer; }
#controls button.on { background: #333; color: #fff; border-color: #333; }
#wrap { position: relative; width: 1100px; }
svg text { font-size: 11px; fill: #333; }
svg .axis line, svg .axis path { stroke: #888; }
svg .grid { stroke: #e6e6e6; }
svg .total { fill: none; stroke-width: 1.4; }
svg .budget { stroke: #d00; stroke-width: 1.6; stroke-dasharray: 7 4; }
svg .guide { stroke: #555; stroke-width: 1; stroke-dasharray: 2 2; pointer-events: none; }
svg .peak { stroke: #fff; stroke-width: 1.5; }
svg .peak-label { font-size: 11.5px; font-weight: 600; }
#tooltip { position: absolute; pointer-events: none; background: rgba(255,255,255,.96);
  border: 1px solid #888; border-radius: 4px; padding: .35em .6em; font-size: 12px;
  white-space: pre; box-shadow: 0 2px 6px rgba(0,0,0,.2); font-family: ui-monospace, monospace; }
#legend { width: 1100px; font-size: .85em; display: flex; flex-wrap: wrap; gap: .2em .9em;
  margin: .4em 0; }
#legend .item { display: inline-flex; align-items: center; gap: .3em; }
#legend .unit { cursor: pointer; text-decoration: underline dotted; }
#legend .unit.selected { font-weight: 700; }
#legend .swatch { width: 12px; height: 12px; display: inline-block; border: 1px solid #0003; }
#unit-info { font-size: .9em; min-height: 1.3em; margin: .3em 0; }
.help { font-size: .82em; color: #555; width: 1100px; }
</style>
</head>
<body>
<h1 id="title">__TITLE__</h1>
<div id="summary"></div>
<div id="controls"></div>
<div id="wrap"><svg id="chart" width="1100" height="470" role="img"></svg>
<div id="tooltip" hidden></div></div>
<div id="legend"></div>
<div id="unit-info">Click a unit's activations (in the chart or the legend) to see its saved
tensors' lifetimes and their recompute in backward.</div>
<svg id="lifetimes" width="1100" height="0"></svg>
<p class="help">Live bytes of tensor storage after every op of one training step (forward, loss,
backward, optimizer step), as remat's memory tracker counts them. The step in front is drawn as a
stacked area by category; the other step is drawn behind it, faded, with its total as a dashed
line. Hover for the op, module and bytes by category; the x axis is __XLABEL__.</p>
<script type="application/json" id="timeline-data">__DATA__</script>
<script>
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("timeline-data").textContent);
  const chart = document.getElementById("chart");
  const life = document.getElementById("lifetimes");
  const tooltip = document.getElementById("tooltip");
  const NS = chart.namespaceURI;
  const W = 1100, H = 470;
  const M = {left: 78, right: 24, top: 22, bottom: 92};
  const X0 = M.left, X1 = W - M.right, Y0 = M.top, Y1 = H - M.bottom;
  const names = DATA.names;
  const keys = DATA.keys;
  const steps = DATA.steps;
  const byLabel = {};
  steps.forEach(function (s) { byLabel[s.label] = s; });
  let front = steps.length > 1 ? steps[steps.length - 1].label : steps[0].label;
  let selected = null;

  function el(parent, tag, attrs, text) {
    const node = document.createElementNS(NS, tag);
    for (const name in attrs) { node.setAttribute(name, attrs[name]); }
    if (text !== undefined) { node.textContent = text; }
    parent.appendChild(node);
    return node;
  }

  function fmtBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = n, i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (i === 0 ? String(v) : v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)) + " " + units[i];
  }
  function fmtX(v) {
    return DATA.x_unit === "ms" ? v.toFixed(v >= 100 ? 0 : 1) + " ms" : "op " + Math.round(v);
  }
  function niceStep(span, count) {
    const raw = span / count;
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) { if (m * p >= raw) { return m * p; } }
    return 10 * p;
  }
  function byteTicks(max) {
    const units = [1, 1024, Math.pow(1024, 2), Math.pow(1024, 3), Math.pow(1024, 4)];
    let unit = 1;
    for (const u of units) { if (max / u >= 1) { unit = u; } }
    const step = niceStep(max / unit, 5) * unit;
    const ticks = [];
    for (let v = 0; v <= max * 1.0001; v += step) { ticks.push(v); }
    return ticks;
  }

  let xmax = 1;
  steps.forEach(function (s) { if (s.x.length) { xmax = Math.max(xmax, s.x[s.x.length - 1]); } });
  let ymax = 0;
  steps.forEach(function (s) { ymax = Math.max(ymax, s.peak.bytes); });
  // A budget far above the steps (a whole device) is named, not drawn: it would flatten them.
  const budgetShown = DATA.budget_bytes && DATA.budget_bytes <= 2 * ymax;
  if (budgetShown) { ymax = Math.max(ymax, DATA.budget_bytes); }
  ymax = Math.max(ymax * 1.08, 1);
  const sx = function (v) { return X0 + (v / xmax) * (X1 - X0); };
  const sy = function (v) { return Y1 - (v / ymax) * (Y1 - Y0); };

  function cumulative(s) {
    const n = s.x.length;
    const tops = [];
    let base = new Array(n).fill(0);
    keys.forEach(function (k, j) {
      const col = s.stack[j];
      const top = base.map(function (b, i) { return b + col[i]; });
      tops.push({key: k, bottom: base, top: top, used: col.some(function (v) { return v > 0; })});
      base = top;
    });
    return tops;
  }
  steps.forEach(function (s) { s.layers = cumulative(s); s.total = s.layers.length ? s.layers[s.layers.length - 1].top : []; });

  function areaPath(s, layer) {
    const pts = [];
    for (let i = 0; i < s.x.length; i++) { pts.push(sx(s.x[i]).toFixed(1) + "," + sy(layer.top[i]).toFixed(1)); }
    for (let i = s.x.length - 1; i >= 0; i--) { pts.push(sx(s.x[i]).toFixed(1) + "," + sy(layer.bottom[i]).toFixed(1)); }
    return "M" + pts.join("L") + "Z";
  }
  function linePath(s) {
    const pts = [];
    for (let i = 0; i < s.x.length; i++) { pts.push(sx(s.x[i]).toFixed(1) + "," + sy(s.total[i]).toFixed(1)); }
    return "M" + pts.join("L");
  }
  function keyInfo(k) { return DATA.key_info[k]; }

  function drawAxes(g) {
    const axis = el(g, "g", {"class": "axis"});
    byteTicks(ymax).forEach(function (v) {
      const y = sy(v);
      el(axis, "line", {"class": "grid", x1: X0, x2: X1, y1: y, y2: y});
      const t = el(axis, "text", {"class": "ytick", x: X0 - 6, y: y + 4, "text-anchor": "end",
        "data-bytes": v, "data-y": y}, fmtBytes(v));
      t.setAttribute("data-bytes", String(v));
    });
    const xstep = niceStep(xmax, 8);
    for (let v = 0; v <= xmax * 1.0001; v += xstep) {
      const x = sx(v);
      el(axis, "line", {x1: x, x2: x, y1: Y1, y2: Y1 + 4});
      el(axis, "text", {"class": "xtick", x: x, y: Y1 + 16, "text-anchor": "middle",
        "data-x": v}, DATA.x_unit === "ms" ? String(Math.round(v * 100) / 100) : String(Math.round(v)));
    }
    el(axis, "line", {x1: X0, x2: X1, y1: Y1, y2: Y1});
    el(axis, "line", {x1: X0, x2: X0, y1: Y0, y2: Y1});
    el(axis, "text", {x: (X0 + X1) / 2, y: Y1 + 32, "text-anchor": "middle"}, DATA.x_label);
    el(axis, "text", {x: 14, y: (Y0 + Y1) / 2, "text-anchor": "middle",
      transform: "rotate(-90 14 " + (Y0 + Y1) / 2 + ")"}, "live bytes");
  }

  function drawPhases(g) {
    const colors = {forward: "#59a14f", backward: "#4e79a7", optimizer: "#9c755f", recompute: "#e15759"};
    steps.forEach(function (s, j) {
      const y = Y1 + 44 + j * 16;
      el(g, "text", {x: X0 - 6, y: y + 8, "text-anchor": "end"}, s.label);
      s.phases.forEach(function (p) {
        const r = el(g, "rect", {"class": "phase", x: sx(p[1]), y: y, height: 9,
          width: Math.max(sx(p[2]) - sx(p[1]), 1), fill: colors[p[0]] || "#999", "data-step": s.label,
          "data-phase": p[0]});
        el(r, "title", {}, s.label + ": " + p[0] + " " + fmtX(p[1]) + " to " + fmtX(p[2]));
      });
    });
    const ly = Y1 + 44 + steps.length * 16 + 6;
    let lx = X0;
    for (const p of ["forward", "backward", "recompute", "optimizer"]) {
      el(g, "rect", {x: lx, y: ly, width: 10, height: 9, fill: colors[p]});
      el(g, "text", {x: lx + 14, y: ly + 8}, p);
      lx += 90;
    }
  }

  function drawStep(g, s, isFront) {
    const layerG = el(g, "g", {"class": isFront ? "front" : "back", "data-step": s.label});
    s.layers.forEach(function (layer) {
      if (!layer.used) { return; }
      const info = keyInfo(layer.key);
      let opacity = isFront ? 0.88 : 0.2;
      if (isFront && selected !== null && layer.key !== "act:" + selected) { opacity = 0.28; }
      const path = el(layerG, "path", {"class": "area", d: areaPath(s, layer), fill: info.color,
        "fill-opacity": opacity, "data-step": s.label, "data-key": layer.key});
      if (isFront && selected !== null && layer.key === "act:" + selected) {
        path.setAttribute("stroke", "#000");
        path.setAttribute("stroke-width", "1.2");
      }
    });
  }

  function drawTotals(g) {
    steps.forEach(function (s) {
      const isFront = s.label === front;
      el(g, "path", {"class": "total", d: linePath(s), stroke: isFront ? "#111" : "#555",
        "stroke-dasharray": isFront ? "" : "5 3", "data-step": s.label});
    });
  }

  function drawPeaks(g) {
    steps.forEach(function (s, j) {
      const p = s.peak;
      const cx = sx(p.x), cy = sy(p.bytes);
      const isFront = s.label === front;
      el(g, "circle", {"class": "peak", cx: cx, cy: cy, r: 5.5, fill: isFront ? "#000" : "#666",
        "data-step": s.label, "data-bytes": p.bytes, "data-x": p.x, "data-op": p.op,
        "data-module": p.module});
      const text = s.label + " peak " + fmtBytes(p.bytes) + ": " + (p.module || "(model)") +
        " " + p.op + " (" + p.phase + ")";
      const right = cx > (X0 + X1) / 2;
      el(g, "text", {"class": "peak-label", x: right ? cx - 9 : cx + 9, y: cy - 8 - 14 * j,
        "text-anchor": right ? "end" : "start", "data-step": s.label}, text);
    });
  }

  function drawBudget(g) {
    if (!DATA.budget_bytes) { return; }
    if (!budgetShown) {
      el(g, "text", {id: "budget-note", x: X1 - 4, y: 12, "text-anchor": "end", fill: "#c00"},
        "budget " + fmtBytes(DATA.budget_bytes) + ": far above the chart");
      return;
    }
    const y = sy(DATA.budget_bytes);
    el(g, "line", {id: "budget", "class": "budget", x1: X0, x2: X1, y1: y, y2: y,
      "data-bytes": DATA.budget_bytes});
    el(g, "text", {x: X1 - 4, y: y - 5, "text-anchor": "end", fill: "#c00"},
      "budget " + fmtBytes(DATA.budget_bytes));
  }

  function nearest(s, v) {
    let lo = 0, hi = s.x.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (s.x[mid] < v) { lo = mid + 1; } else { hi = mid; }
    }
    if (lo > 0 && Math.abs(s.x[lo - 1] - v) <= Math.abs(s.x[lo] - v)) { lo -= 1; }
    return lo;
  }

  function tooltipText(s, i) {
    const lines = [];
    const phase = s.ph[i] === 3 ? "backward, recompute" : ["forward", "backward", "optimizer"][s.ph[i]];
    const t = s.t ? "t = " + s.t[i].toFixed(1) + " ms, " : "";
    lines.push(s.label + " step, " + t + "op " + s.i[i] + " of " + s.n);
    lines.push(names[s.op[i]] + " in " + (names[s.mod[i]] || "(model)") + " (" + phase + ")");
    lines.push("total " + fmtBytes(s.total[i]));
    s.layers.forEach(function (layer, j) {
      const v = s.stack[j][i];
      if (v > 0) { lines.push("  " + keyInfo(layer.key).label + ": " + fmtBytes(v)); }
    });
    steps.forEach(function (o) {
      if (o === s || !o.x.length) { return; }
      const k = nearest(o, s.x[i]);
      lines.push(o.label + " at " + fmtX(o.x[k]) + ": total " + fmtBytes(o.total[k]));
    });
    return lines.join("\n");
  }

  function bandAt(s, i, bytes) {
    for (const layer of s.layers) {
      if (layer.used && bytes >= layer.bottom[i] && bytes < layer.top[i]) { return layer.key; }
    }
    return null;
  }

  function render() {
    while (chart.firstChild) { chart.removeChild(chart.firstChild); }
    const g = el(chart, "g", {});
    drawAxes(g);
    steps.forEach(function (s) { if (s.label !== front) { drawStep(g, s, false); } });
    drawStep(g, byLabel[front], true);
    drawSpans(g);
    drawTotals(g);
    drawBudget(g);
    drawPeaks(g);
    drawPhases(g);
    const guide = el(g, "line", {"class": "guide", x1: 0, x2: 0, y1: Y0, y2: Y1, visibility: "hidden"});
    const overlay = el(g, "rect", {id: "overlay", x: X0, y: Y0, width: X1 - X0, height: Y1 - Y0,
      fill: "transparent", "pointer-events": "all"});
    overlay.addEventListener("mousemove", function (event) {
      const box = chart.getBoundingClientRect();
      const px = event.clientX - box.left;
      const s = byLabel[front];
      if (!s.x.length) { return; }
      const i = nearest(s, (px - X0) / (X1 - X0) * xmax);
      const gx = sx(s.x[i]);
      guide.setAttribute("x1", gx);
      guide.setAttribute("x2", gx);
      guide.setAttribute("visibility", "visible");
      tooltip.textContent = tooltipText(s, i);
      tooltip.hidden = false;
      const left = px + 16 + 330 > W ? px - 16 - tooltip.offsetWidth : px + 16;
      tooltip.style.left = Math.max(0, left) + "px";
      tooltip.style.top = Math.max(0, event.clientY - box.top - 20) + "px";
    });
    overlay.addEventListener("mouseleave", function () {
      tooltip.hidden = true;
      guide.setAttribute("visibility", "hidden");
    });
    overlay.addEventListener("click", function (event) {
      const box = chart.getBoundingClientRect();
      const s = byLabel[front];
      if (!s.x.length) { return; }
      const i = nearest(s, (event.clientX - box.left - X0) / (X1 - X0) * xmax);
      const bytes = (Y1 - (event.clientY - box.top)) / (Y1 - Y0) * ymax;
      const key = bandAt(s, i, bytes);
      select(key !== null && key.startsWith("act:") && key.length > 4 ? key.slice(4) : null);
    });
  }

  function drawSpans(g) {
    if (selected === null) { return; }
    const colors = {forward: "#59a14f", recompute: "#e15759", backward: "#4e79a7"};
    steps.forEach(function (s) {
      const u = s.units[selected];
      if (!u || s.label !== front) { return; }
      for (const kind of ["forward", "recompute", "backward"]) {
        const span = u.spans[kind];
        if (!span) { continue; }
        const r = el(g, "rect", {"class": "span", x: sx(span[0]), y: Y0,
          width: Math.max(sx(span[1]) - sx(span[0]), 1), height: Y1 - Y0, fill: colors[kind],
          "fill-opacity": 0.08, "data-kind": kind});
        el(r, "title", {}, selected + " " + kind);
      }
    });
  }

  function lanes(items) {
    const ends = [];
    const placed = [];
    items.slice().sort(function (a, b) { return a[0] - b[0]; }).forEach(function (it) {
      let lane = ends.findIndex(function (e) { return e <= it[0]; });
      if (lane < 0) { lane = ends.length; ends.push(0); }
      ends[lane] = it[1];
      placed.push([lane, it]);
    });
    return {count: ends.length, placed: placed};
  }

  function drawLifetimes() {
    while (life.firstChild) { life.removeChild(life.firstChild); }
    if (selected === null) { life.setAttribute("height", 0); return; }
    const colors = {saved: "#4e9f8f", recompute: "#e15759"};
    let y = 6;
    const laneH = 5, maxLanes = 24;
    steps.forEach(function (s) {
      const u = s.units[selected];
      if (!u) { return; }
      el(life, "text", {x: 4, y: y + 10}, s.label);
      y += 16;
      for (const kind of ["saved", "recompute"]) {
        const items = u[kind];
        if (!items.length) { continue; }
        const laid = lanes(items);
        const shown = Math.min(laid.count, maxLanes);
        el(life, "text", {x: X0 - 6, y: y + Math.min(shown * laneH, 12) - 2, "text-anchor": "end"},
          kind === "saved" ? "saved" : "recomputed");
        laid.placed.forEach(function (p) {
          if (p[0] >= maxLanes) { return; }
          const it = p[1];
          const r = el(life, "rect", {"class": "life " + kind, x: sx(it[0]), y: y + p[0] * laneH,
            width: Math.max(sx(it[1]) - sx(it[0]), 1.5), height: laneH - 1, fill: colors[kind],
            "data-step": s.label});
          el(r, "title", {}, kind + " " + fmtBytes(it[2]) + " by " + names[it[3]] + ", " +
            fmtX(it[0]) + " to " + fmtX(it[1]));
        });
        y += shown * laneH + 8;
      }
      y += 4;
    });
    el(life, "line", {x1: X0, x2: X1, y1: y, y2: y, stroke: "#888"});
    life.setAttribute("height", y + 6);
  }

  function unitSummary() {
    const info = document.getElementById("unit-info");
    if (selected === null) {
      info.textContent = "Click a unit's activations (in the chart or the legend) to see its saved" +
        " tensors' lifetimes and their recompute in backward.";
      return;
    }
    const parts = [];
    steps.forEach(function (s) {
      const u = s.units[selected];
      if (!u) { return; }
      const sum = function (items) { return items.reduce(function (a, it) { return a + it[2]; }, 0); };
      let text = s.label + ": " + u.saved.length + " saved tensors (" + fmtBytes(sum(u.saved)) + ")";
      if (u.recompute.length) {
        text += ", " + u.recompute.length + " recomputed in backward (" + fmtBytes(sum(u.recompute)) + ")";
      }
      parts.push(text);
    });
    const action = DATA.actions[selected];
    info.textContent = "unit " + selected + (action ? " (plan: " + action + ")" : "") + ": " +
      parts.join("; ");
  }

  function select(unit) {
    selected = unit;
    document.querySelectorAll("#legend .unit").forEach(function (node) {
      node.classList.toggle("selected", node.getAttribute("data-unit") === unit);
    });
    render();
    drawLifetimes();
    unitSummary();
  }

  function legend() {
    const box = document.getElementById("legend");
    keys.forEach(function (k, j) {
      const used = steps.some(function (s) { return s.stack[j].some(function (v) { return v > 0; }); });
      if (!used) { return; }
      const info = keyInfo(k);
      const item = document.createElement("span");
      item.className = "item" + (info.unit !== undefined ? " unit" : "");
      item.setAttribute("data-key", k);
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = info.color;
      item.appendChild(sw);
      const action = info.unit !== undefined ? DATA.actions[info.unit] : undefined;
      item.appendChild(document.createTextNode(info.label + (action ? " (" + action + ")" : "")));
      if (info.unit !== undefined) {
        item.setAttribute("data-unit", info.unit);
        item.addEventListener("click", function () {
          select(selected === info.unit ? null : info.unit);
        });
      }
      box.appendChild(item);
    });
  }

  function controls() {
    const box = document.getElementById("controls");
    if (steps.length < 2) { return; }
    box.appendChild(document.createTextNode("In front: "));
    steps.forEach(function (s) {
      const b = document.createElement("button");
      b.textContent = s.label;
      b.setAttribute("data-front", s.label);
      b.className = s.label === front ? "on" : "";
      b.addEventListener("click", function () {
        front = s.label;
        box.querySelectorAll("button").forEach(function (o) {
          o.className = o.getAttribute("data-front") === front ? "on" : "";
        });
        render();
      });
      box.appendChild(b);
    });
  }

  function summary() {
    const box = document.getElementById("summary");
    DATA.summary.forEach(function (line) {
      const div = document.createElement("div");
      div.textContent = line;
      if (line.startsWith("budget")) { div.className = "budget"; }
      box.appendChild(div);
    });
  }

  summary();
  controls();
  legend();
  render();
  window.rematTimeline = {data: DATA, select: select, ymax: ymax, xmax: xmax};
})();
</script>
</body>
</html>
"""
