// The row view shared by AttentionView and PatternView: a query row's attention drawn on the tokens.
// Token spans are built once; a new row only recolours them (stays responsive at 8K tokens). Long texts:
// the view scrolls to the query, lists the row's top keys, and draws a heat strip beside the scrollbar
// showing where the row's mass lands in the whole text (click the strip to scroll there).
function rowView(model, opts = {}) {
  const wrap = h("div", { class: "wb-rowview" });
  const title = h("span", { class: "wb-title wb-av-title" });
  const layer = h("input", { type: "number", min: 0, class: "wb-layer", style: "width:4em" });
  const head = h("input", { type: "number", min: 0, class: "wb-head", style: "width:4em" });
  const sel = () => get(model, "selected") || [0, 0];
  layer.addEventListener("change", () => put(model, "selected", [+layer.value, sel()[1]]));
  head.addEventListener("change", () => put(model, "selected", [sel()[0], +head.value]));
  const goto = h("input", { type: "number", min: 0, class: "wb-goto", style: "width:6em", placeholder: "token #" });
  goto.addEventListener("change", () => { const i = +goto.value; if (i >= 0 && i < spans.length) put(model, "queries", [i]); });
  const jump = h("button", { class: "wb-jump", text: "jump to query", onclick: () => scrollTo(active, true) });
  const which = h("span");
  const hover = h("span", { class: "wb-hover" });
  const box = h("div", { class: "wb-tokens", style: "position:relative;flex:1" });
  const strip = h("canvas", { class: "wb-heat", width: 14, height: 320, title: "where this row's attention lands in the whole text (click: scroll there)",
    style: "width:14px;height:320px;border:1px solid #ddd;cursor:pointer;flex:none" });
  const topKeys = h("div", { class: "wb-top-keys" });
  const legend = h("div", { class: "wb-bar" });
  const controls = opts.controls === false ? null : h("div", { class: "wb-bar" }, title, h("label", { text: "layer " }, layer),
    h("label", { text: "head " }, head), h("label", { text: "query " }, goto), jump, which);
  if (opts.controls === false) wrap.append(h("div", { class: "wb-bar" }, title, which));
  wrap.append(...[controls, h("div", { style: "display:flex;gap:4px;align-items:flex-start" }, box, strip), topKeys, legend,
    h("div", { class: "wb-hover" }, h("span", { text: "click a token to make it the query (shift-click adds one) · " }), hover)].filter((x) => x));

  let spans = [], active = null, shown = null, preview = null;
  function drawTokens() {
    const toks = get(model, "tokens"), notes = get(model, "token_notes") || {};
    spans = toks.map((t, i) => {
      const sp = h("span", { class: "wb-tok", "data-pos": i, text: tokenText(t) });
      if (notes[i]) sp.classList.add("wb-bytes");
      sp.addEventListener("mousedown", (ev) => { if (ev.shiftKey) ev.preventDefault(); });  // no text selection
      sp.addEventListener("click", (ev) => {
        const q = get(model, "queries") || [];
        put(model, "queries", ev.shiftKey ? [...new Set([...q, i])] : [i]);
      });
      sp.addEventListener("mouseenter", () => {
        hover.textContent = `token ${i} ${JSON.stringify(toks[i])}${notes[i] ? " — " + notes[i] : ""}: ${sp.dataset.w || ""}`;
        if (opts.onHoverToken) opts.onHoverToken(i);
      });
      sp.addEventListener("mouseleave", () => { if (opts.onHoverToken) opts.onHoverToken(null); });
      return sp;
    });
    box.replaceChildren(...spans);
    drawStrip();
  }
  function scrollTo(i, flash) {
    const sp = spans[i];
    if (!sp) return;
    box.scrollTop = Math.max(0, sp.offsetTop - box.clientHeight / 2);
    if (flash) { sp.animate([{ outlineColor: "#ff7f0e", outlineWidth: "3px" }, { outlineColor: "transparent" }], 900); }
    drawStrip();
  }
  let weights = null, queryOf = null;
  function drawStrip() {
    const tall = Math.max(40, Math.min(320, box.offsetHeight || 320));  // as tall as the text box beside it
    if (strip.height !== tall) { strip.height = tall; strip.style.height = tall + "px"; }
    const ctx = strip.getContext("2d"), Hh = strip.height;
    ctx.clearRect(0, 0, strip.width, Hh);
    if (!spans.length) return;
    const total = Math.max(box.scrollHeight, 1);
    if (weights) {
      const bins = new Float64Array(Hh);
      for (let i = 0; i < weights.length && i < spans.length; i++) {
        const b = Math.min(Hh - 1, Math.floor(spans[i].offsetTop / total * Hh));
        bins[b] += weights[i];
      }
      const mx = Math.max(...bins) || 1;
      for (let y = 0; y < Hh; y++) if (bins[y] > 0) { ctx.fillStyle = blues(Math.sqrt(bins[y] / mx)); ctx.fillRect(0, y, strip.width, 1); }
      if (queryOf != null && spans[queryOf]) {
        ctx.fillStyle = "#d62728";
        ctx.fillRect(0, Math.min(Hh - 2, Math.floor(spans[queryOf].offsetTop / total * Hh)), strip.width, 2);
      }
    }
    ctx.strokeStyle = "#555";  // the part of the text in view
    ctx.strokeRect(0.5, box.scrollTop / total * Hh + 0.5, strip.width - 1, Math.max(2, box.clientHeight / total * Hh) - 1);
  }
  box.addEventListener("scroll", drawStrip);
  strip.addEventListener("click", (ev) => { box.scrollTop = ev.offsetY / strip.clientHeight * box.scrollHeight - box.clientHeight / 2; });

  // colour the tokens by one row (weights over keys 0..q); `q` is outlined as the query
  function paint(w, q, queries) {
    const max = Math.max(...w) || 1;
    spans.forEach((sp, i) => {
      const v = i < w.length ? w[i] : null;
      sp.style.background = v == null ? "" : blues(Math.sqrt(v / max));  // sqrt: small weights stay visible
      sp.style.color = v != null && v / max > 0.5 ? "#fff" : "";
      sp.dataset.w = v == null ? "after the query (not visible)" : `attention ${v.toPrecision(4)}`;
      sp.classList.toggle("wb-query", queries.has(i));
    });
    weights = w; queryOf = q;
    legend.replaceChildren(colorbar(blues, 0, max, "attention", "√ scale, max of the row"));
    drawStrip();
  }
  function drawRow() {
    const rows = get(model, "rows") || [];
    if (!rows.length || !spans.length) return;
    if (active === null || !rows.some((x) => x.query === active)) active = rows[rows.length - 1].query;
    const row = rows.find((x) => x.query === active);
    const toks = get(model, "tokens");
    title.textContent = `layer ${row.layer} · head ${row.head} · query ${active} ${JSON.stringify(toks[active] || "")}`;
    title.dataset.layer = row.layer; title.dataset.head = row.head; title.dataset.query = active;
    const [L, H] = sel();
    layer.value = L; head.value = H; layer.max = get(model, "n_layers") - 1; head.max = get(model, "n_heads") - 1;
    goto.max = toks.length - 1;
    which.replaceChildren(...(rows.length > 1 ? rows.map((x) => h("span", { class: "wb-chip", text: `q${x.query}`,
      style: x.query === active ? "background:#fbb" : "", onclick: () => { active = x.query; drawRow(); } })) : []));
    topKeys.replaceChildren(h("b", { text: `top keys of query ${active}: ` }), ...(row.top || []).map(([k, p]) =>
      h("span", { class: "wb-chip wb-top-key", "data-pos": k, text: `#${k} ${JSON.stringify(toks[k] || "")} ${p.toPrecision(3)}`,
        onclick: () => scrollTo(k, true) })));
    if (!preview) paint(row.weights, active, new Set(rows.map((x) => x.query)));
    const key = `${row.layer},${row.head},${active}`;
    if (shown === null || !shown.endsWith("," + active)) scrollTo(active, false);  // a new query: bring it into view
    shown = key;
  }
  model.on("change:tokens", () => { drawTokens(); drawRow(); });
  model.on("change:rows", drawRow);
  model.on("change:selected", () => { const [L, H] = sel(); layer.value = L; head.value = H; });
  drawTokens();
  requestAnimationFrame(drawRow);  // after layout: scrolling to the query needs the spans placed
  drawRow();
  return {
    el: wrap,
    // show another row (e.g. the hovered row of a pattern) without changing the state; null: back to the query's
    preview(w, q) {
      if (w == null) { preview = null; drawRow(); return; }
      preview = true; paint(w, q, new Set([q]));
    },
  };
}
