// Shared helpers of the workbench views (prepended to each view's module by workbench/widgets/_base.py).
// Only the anywidget model API is used (get / set / save_changes / on "change:x"), so the same module
// runs in Jupyter (anywidget) and in Panel (panel.custom.AnyWidgetComponent).

const WB_CSS = `
.wb { font: 12px/1.4 system-ui, sans-serif; color: #222; }
.wb .wb-bar { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; margin: 4px 0; }
.wb .wb-title { font-weight: 600; font-size: 13px; }
.wb .wb-hover { color: #555; min-height: 1.4em; }
.wb .wb-error { color: #b00020; white-space: pre-wrap; }
.wb .wb-status { color: #555; font-style: italic; }
.wb .wb-chip { display: inline-block; padding: 0 6px; border-radius: 8px; background: #eee; margin: 1px; cursor: pointer; }
.wb .wb-effect { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 11px; background: #f7f7f7; padding: 4px; }
.wb .wb-del { background: #fdd; text-decoration: line-through; }
.wb .wb-add { background: #dfd; }
.wb .wb-tokens { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; max-height: 320px;
  overflow-y: auto; border: 1px solid #ddd; padding: 4px; line-height: 1.7; }
.wb .wb-tok { cursor: pointer; border-radius: 2px; }
.wb .wb-tok.wb-query { outline: 2px solid #d62728; }
.wb .wb-scroll { overflow-x: auto; }
.wb button { font-size: 12px; }
.wb .wb-cell { cursor: pointer; }
`;

// Plain JS values: Panel (Bokeh) may hand dictionaries over as Map objects.
function plain(x) {
  if (x instanceof Map) { const o = {}; for (const [k, v] of x) o[k] = plain(v); return o; }
  if (Array.isArray(x)) return x.map(plain);
  return x;
}
function get(model, name) { return plain(model.get(name)); }
function put(model, name, value) { model.set(name, value); model.save_changes(); }

function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}
const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function root(el, cls) {
  el.replaceChildren();
  const style = document.createElement("style");
  style.textContent = WB_CSS;  // inline: works inside Panel's shadow roots and offline
  const r = h("div", { class: "wb " + cls });
  el.append(style, r);
  return r;
}

// Colour scales: interpolate between stops ([t, [r, g, b]]).
function scale(stops) {
  return (t) => {
    if (t == null || Number.isNaN(t)) return "#ddd";
    t = Math.max(0, Math.min(1, t));
    for (let i = 1; i < stops.length; i++) {
      if (t <= stops[i][0]) {
        const [t0, a] = stops[i - 1], [t1, b] = stops[i], u = (t - t0) / (t1 - t0 || 1);
        return `rgb(${a.map((x, j) => Math.round(x + u * (b[j] - x))).join(",")})`;
      }
    }
    return `rgb(${stops[stops.length - 1][1].join(",")})`;
  };
}
const viridis = scale([[0, [68, 1, 84]], [0.25, [59, 82, 139]], [0.5, [33, 145, 140]], [0.75, [94, 201, 98]], [1, [253, 231, 37]]]);
const rdylgn = scale([[0, [215, 48, 39]], [0.5, [255, 255, 191]], [1, [26, 152, 80]]]);
const blues = scale([[0, [255, 255, 255]], [1, [33, 102, 172]]]);
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
  "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"];
function category(i) { return i < 0 ? "#fff" : PALETTE[i % PALETTE.length]; }
function fmt(v) { return v == null || Number.isNaN(v) ? "n/a" : Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3); }
function range(vals) {
  let lo = Infinity, hi = -Infinity;
  for (const row of vals) for (const v of row) if (v != null && !Number.isNaN(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  return lo === Infinity ? [0, 1] : [lo, hi > lo ? hi : lo + 1];
}

// The status / error line every view shows at its bottom.
function statusLine(model) {
  const line = h("div");
  const draw = () => {
    const err = get(model, "error"), st = get(model, "status");
    line.replaceChildren(err ? h("div", { class: "wb-error", text: err }) : st ? h("div", { class: "wb-status", text: st + "…" }) : "");
  };
  model.on("change:error", draw);
  model.on("change:status", draw);
  draw();
  return line;
}

// A word diff ("-word" / "+word") as coloured spans.
function diffView(diff) {
  const d = h("div");
  for (const w of diff || []) d.append(h("span", { class: w[0] === "-" ? "wb-del" : "wb-add", text: w.slice(2) }), " ");
  return d;
}
