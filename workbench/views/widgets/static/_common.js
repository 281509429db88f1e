// Shared helpers of the workbench views (prepended to each view's module by workbench/views/widgets/_base.py).
// Only the anywidget model API is used (get / set / save_changes / on "change:x"), so the same module
// runs in Jupyter (anywidget) and in Panel (panel.custom.AnyWidgetComponent).

const WB_CSS = `
.wb { font: 12px/1.4 system-ui, sans-serif; color: #222; }
.wb .wb-bar { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; margin: 4px 0; }
.wb .wb-title { font-weight: 600; font-size: 13px; }
.wb .wb-hover { color: #555; min-height: 1.4em; }
.wb .wb-error { color: #b00020; white-space: pre-wrap; }
.wb .wb-status { color: #555; font-style: italic; display: flex; gap: 6px; align-items: center; }
.wb .wb-spinner { width: 12px; height: 12px; border: 2px solid #bbb; border-top-color: #33415c; border-radius: 50%;
  display: inline-block; animation: wb-spin 0.8s linear infinite; }
@keyframes wb-spin { to { transform: rotate(360deg); } }
.wb .wb-colorbar { display: inline-flex; align-items: center; gap: 4px; font-size: 10px; color: #444; }
.wb .wb-colorbar canvas { border: 1px solid #ccc; }
.wb svg.wb-grid, .wb .wb-thumbs, .wb .wb-tokens { user-select: none; -webkit-user-select: none; }
.wb .wb-notice { color: #444; background: #eef3fb; padding: 2px 6px; border-radius: 3px; }
.wb .wb-chip { display: inline-block; padding: 0 6px; border-radius: 8px; background: #eee; margin: 1px; cursor: pointer; }
.wb .wb-effect { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 11px; background: #f7f7f7; padding: 4px; }
.wb .wb-del { background: #fdd; text-decoration: line-through; }
.wb .wb-add { background: #dfd; }
.wb .wb-tokens { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; max-height: 320px;
  overflow-y: auto; border: 1px solid #ddd; padding: 4px; line-height: 1.7; }
.wb .wb-tok { cursor: pointer; border-radius: 2px; }
.wb .wb-tok.wb-query { outline: 2px solid #d62728; }
.wb .wb-tok.wb-bytes { text-decoration: underline dotted #888; }
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
const diverging = scale([[0, [33, 102, 172]], [0.5, [247, 247, 247]], [1, [178, 24, 43]]]);  // − blue, + red
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
  "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"];
function category(i) { return i < 0 ? "#fff" : PALETTE[i % PALETTE.length]; }
function fmt(v) { return v == null || Number.isNaN(v) ? "n/a" : Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3); }
function range(vals) {
  let lo = Infinity, hi = -Infinity;
  for (const row of vals) for (const v of row) if (v != null && !Number.isNaN(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  return lo === Infinity ? [0, 1] : [lo, hi > lo ? hi : lo + 1];
}

// The status / error line every view shows at its bottom: a spinner and a cancel button while the
// server computes, the last error otherwise ("stopped" after a cancel is a notice, not an error).
function statusLine(model) {
  const line = h("div", { class: "wb-statusline" });
  const draw = () => {
    const err = get(model, "error"), st = get(model, "status");
    if (st) {
      line.replaceChildren(h("div", { class: "wb-status" }, h("span", { class: "wb-spinner" }), h("span", { text: st + "…" }),
        h("button", { class: "wb-cancel-view", text: "cancel", onclick: () => put(model, "cancel", (get(model, "cancel") || 0) + 1) })));
    } else if (err) {
      line.replaceChildren(h("div", { class: err === "stopped" ? "wb-notice" : "wb-error", text: err === "stopped" ? "stopped (nothing changed)" : err }));
    } else line.replaceChildren();
  };
  model.on("change:error", draw);
  model.on("change:status", draw);
  draw();
  return line;
}

// A colour bar: `scaleFn` over [0, 1] labelled with the values at its ends; `note` says how values map to
// colours (e.g. "√ scale") when that is not linear.
function colorbar(scaleFn, lo, hi, label = "", note = "") {
  const W = 120, H = 10;
  const c = h("canvas", { width: W, height: H });
  const ctx = c.getContext("2d");
  for (let x = 0; x < W; x++) { ctx.fillStyle = scaleFn(x / (W - 1)); ctx.fillRect(x, 0, 1, H); }
  return h("span", { class: "wb-colorbar", "data-lo": lo, "data-hi": hi }, label ? h("span", { text: label }) : null,
    h("span", { text: fmt(lo) }), c, h("span", { text: fmt(hi) }), note ? h("span", { text: `(${note})` }) : null);
}

// The continuation before → after as one text, removed words struck through, added words marked.
function wordsView(words) {
  const d = h("div", { class: "wb-words" });
  for (const [op, w] of words || []) d.append(h("span", { class: op === "-" ? "wb-del" : op === "+" ? "wb-add" : "", text: w }), " ");
  return d;
}

// What an edit did: summary, the edits named, the continuation as a word diff, Δloss per token of the
// user's own text (template tokens greyed out and not counted).
function effectView(eff) {
  if (!eff || !eff.summary) return "";
  const toks = eff.tokens || [], delta = eff.token_delta || [], user = eff.user || [0, toks.length];
  let mx = 0;
  for (const v of delta) if (v != null) mx = Math.max(mx, Math.abs(v));
  mx = mx || 1;
  const strip = h("div", { class: "wb-tokens wb-delta-tokens", style: "max-height:160px" });
  toks.forEach((t, i) => {
    const v = delta[i], tmpl = i < user[0] || i >= user[1];
    strip.append(h("span", { class: "wb-tok" + (tmpl ? " wb-template" : ""), "data-pos": i, text: tokenText(t),
      title: tmpl ? "template token (not counted)" : v == null ? "first token (nothing predicts it)" : `Δloss ${v >= 0 ? "+" : ""}${v.toPrecision(3)} nats`,
      style: tmpl ? "color:#999;background:#f2f2f2" : v == null ? "" : `background:${diverging(0.5 + v / (2 * mx))}` }));
  });
  return h("div", { class: "wb-effect-box" },
    h("div", { class: "wb-effect wb-effect-summary", text: eff.summary }),
    h("div", {}, h("b", { text: "continuation (before → after): " }), eff.text_before == null ? h("i", { text: "no generation" }) :
      (eff.words || []).some((x) => x[0] !== "=") ? wordsView(eff.words) : h("span", { text: "unchanged: " + (eff.text_before || "") })),
    h("div", { class: "wb-bar" }, h("b", { text: "Δloss per token" }), colorbar(diverging, -mx, mx, "", "blue: better, red: worse"),
      eff.n_template ? h("span", { class: "wb-hover", text: `grey: ${eff.n_template} template tokens, not counted` }) : null),
    strip);
}

// base64 → typed arrays (the views ship patterns as bytes, not JSON lists)
function b64bytes(s) { const bin = atob(s || ""); const out = new Uint8Array(bin.length); for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i); return out; }
function b64floats(s) { const b = b64bytes(s); return new Float32Array(b.buffer, b.byteOffset, b.byteLength >> 2); }
function tokenText(t) { return String(t).replace(/\n/g, "↵\n").replace(/\t/g, "→"); }
