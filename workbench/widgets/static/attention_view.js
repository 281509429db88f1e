// AttentionView: the attention row of a query token drawn on the tokens (one background colour per key).
// Token spans are built once; a new row only recolours them (stays responsive at 8K tokens).
function render({ model, el }) {
  const r = root(el, "wb-attention");
  const title = h("span", { class: "wb-title wb-av-title" });
  const layer = h("input", { type: "number", min: 0, class: "wb-layer", style: "width:4em" });
  const head = h("input", { type: "number", min: 0, class: "wb-head", style: "width:4em" });
  layer.addEventListener("change", () => put(model, "layer", +layer.value));
  head.addEventListener("change", () => put(model, "head", +head.value));
  const which = h("span");
  const hover = h("span", { class: "wb-hover" });
  const box = h("div", { class: "wb-tokens" });
  r.append(h("div", { class: "wb-bar" }, title, h("label", { text: "layer " }, layer), h("label", { text: "head " }, head), which, hover),
    box, h("div", { class: "wb-hover", text: "click a token to make it the query (shift-click adds one)" }), statusLine(model));

  let spans = [], active = null;
  function drawTokens() {
    const toks = get(model, "tokens");
    spans = toks.map((t, i) => {
      const sp = h("span", { class: "wb-tok", "data-pos": i, text: t.replace(/\n/g, "↵\n") });
      sp.addEventListener("click", (ev) => {
        const q = get(model, "queries");
        put(model, "queries", ev.shiftKey ? [...new Set([...q, i])] : [i]);
      });
      sp.addEventListener("mouseenter", () => { hover.textContent = `token ${i}: ${sp.title || ""}`; });
      return sp;
    });
    box.replaceChildren(...spans);
  }
  function drawRow() {
    const rows = get(model, "rows") || [];
    if (!rows.length) return;
    if (active === null || !rows.some((x) => x.query === active)) active = rows[rows.length - 1].query;
    const row = rows.find((x) => x.query === active), w = row.weights;
    const max = Math.max(...w) || 1;
    const L = get(model, "layer"), H = get(model, "head");
    title.textContent = `layer ${L} · head ${H} · query ${active} ${JSON.stringify(get(model, "tokens")[active] || "")}`;
    title.dataset.layer = L; title.dataset.head = H; title.dataset.query = active;
    layer.value = L; head.value = H; layer.max = get(model, "n_layers") - 1; head.max = get(model, "n_heads") - 1;
    which.replaceChildren(...(rows.length > 1 ? rows.map((x) => h("span", { class: "wb-chip", text: `q${x.query}`,
      style: x.query === active ? "background:#fbb" : "", onclick: () => { active = x.query; drawRow(); } })) : []));
    const queries = new Set(rows.map((x) => x.query));
    spans.forEach((sp, i) => {
      const v = i < w.length ? w[i] : null;
      sp.style.background = v == null ? "" : blues(Math.sqrt(v / max));  // sqrt: small weights stay visible
      sp.style.color = v != null && v / max > 0.5 ? "#fff" : "";
      sp.title = v == null ? "after the query (not visible)" : `attention ${v.toPrecision(4)}`;
      sp.classList.toggle("wb-query", queries.has(i));
    });
  }
  model.on("change:tokens", () => { drawTokens(); drawRow(); });
  for (const k of ["rows", "layer", "head"]) model.on("change:" + k, drawRow);
  drawTokens(); drawRow();
}
export default { render };
