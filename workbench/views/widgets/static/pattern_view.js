// PatternView: every head's exact attention pattern as a thumbnail (layer × head), click one to enlarge it;
// hover a cell to see its query and key tokens, hover a token to see its row. Long prompts: the row view.
function render({ model, el }) {
  const r = root(el, "wb-pattern");
  const rows = rowView(model, { onHoverToken: (i) => hoverRow(i) });
  const thumbsBox = h("div", { class: "wb-thumbs", style: "max-height:420px;overflow:auto;border:1px solid #eee;padding:2px" });
  const head = h("div", { class: "wb-bar" });
  const big = h("canvas", { class: "wb-pattern-canvas", width: 480, height: 480, style: "cursor:crosshair;border:1px solid #ccc" });
  const bigTitle = h("div", { class: "wb-title wb-pattern-title" });
  const cellHover = h("div", { class: "wb-hover wb-cell-hover" });
  // token labels on both axes of the enlarged pattern: queries down the left, keys along the top (read
  // bottom-up); thinned to one every few tokens when dense, the hovered row / column shown whole
  const AXIS = 84;
  const qAxis = h("div", { class: "wb-axis wb-axis-q", style: `position:relative;width:${AXIS}px;overflow:visible` });
  const kAxis = h("div", { class: "wb-axis wb-axis-k", style: `position:relative;height:${AXIS}px;overflow:visible` });
  const plotBox = h("div", { style: `display:grid;grid-template-columns:${AXIS}px auto;grid-template-rows:${AXIS}px auto` },
    h("span", { class: "wb-hover", style: "font-size:10px;align-self:end;text-align:right;padding:2px", text: "query ↓ key →" }), kAxis, qAxis, big);
  const bigBox = h("div", { class: "wb-enlarged", style: "flex:none" }, bigTitle, plotBox, cellHover);
  const lower = h("div", { style: "display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start" }, bigBox,
    h("div", { style: "flex:1 1 380px;min-width:340px" }, rows.el));
  r.append(head, thumbsBox, lower, statusLine(model));

  const LUT = Array.from({ length: 256 }, (_, u) => blues(u / 255).match(/\d+/g).map(Number));
  const THUMB_PX = 36;
  function drawThumbs() {
    const mode = get(model, "mode");
    head.replaceChildren();
    if (mode !== "pattern") { thumbsBox.style.display = "none"; bigBox.style.display = "none"; return; }
    thumbsBox.style.display = ""; bigBox.style.display = "";
    const L = get(model, "n_layers"), H = get(model, "n_heads"), S = get(model, "thumb_size"), T = get(model, "tokens").length;
    head.append(h("span", { class: "wb-title", text: `every head's attention pattern (${L} layers × ${H} heads, ${T} tokens)` }),
      colorbar((t) => blues(Math.sqrt(t)), 0, 1, "attention", "√ scale"),
      h("span", { class: "wb-hover", text: S < T ? `thumbnails: max over ${Math.ceil(T / S)}×${Math.ceil(T / S)} blocks` : "click a thumbnail to enlarge it" }));
    const bytes = b64bytes(get(model, "thumbs"));
    const grid = h("div", { style: `display:grid;grid-template-columns:32px repeat(${H}, ${THUMB_PX + 4}px);gap:2px;align-items:center` });
    grid.append(h("span"));
    for (let hd = 0; hd < H; hd++) grid.append(h("span", { style: "font-size:10px;text-align:center", text: "H" + hd }));
    const [sl, sh] = get(model, "selected") || [];
    for (let l = 0; l < L; l++) {
      grid.append(h("span", { style: "font-size:10px;text-align:right", text: "L" + l }));
      for (let hd = 0; hd < H; hd++) {
        const c = h("canvas", { width: S, height: S, class: "wb-thumb" + (l === sl && hd === sh ? " wb-thumb-selected" : ""),
          "data-layer": l, "data-head": hd, title: `L${l}H${hd}`,
          style: `width:${THUMB_PX}px;height:${THUMB_PX}px;image-rendering:pixelated;cursor:pointer;border:2px solid ${l === sl && hd === sh ? "#d62728" : "#eee"}` });
        const img = c.getContext("2d").createImageData(S, S), off = (l * H + hd) * S * S;
        const d = img.data;
        for (let k = 0; k < S * S; k++) { const c = LUT[bytes[off + k]]; d[4 * k] = c[0]; d[4 * k + 1] = c[1]; d[4 * k + 2] = c[2]; d[4 * k + 3] = 255; }
        c.getContext("2d").putImageData(img, 0, 0);
        c.addEventListener("click", () => put(model, "selected", [l, hd]));
        grid.append(c);
      }
    }
    thumbsBox.replaceChildren(grid);
  }
  function markSelected() {
    const [sl, sh] = get(model, "selected") || [];
    thumbsBox.querySelectorAll("canvas.wb-thumb").forEach((c) => {
      const on = +c.dataset.layer === sl && +c.dataset.head === sh;
      c.classList.toggle("wb-thumb-selected", on);
      c.style.borderColor = on ? "#d62728" : "#eee";
    });
  }

  // the enlarged head: exact float32 pattern [T, T]
  let P = null, T = 0, base = null;
  function drawBig() {
    const p = get(model, "pattern") || {};
    if (get(model, "mode") !== "pattern" || !p.data) return;
    T = p.T; P = b64floats(p.data);
    const toks = get(model, "tokens");
    bigTitle.textContent = `L${p.layer}H${p.head}: ${T} queries (rows) × ${T} keys (columns)`;
    bigTitle.dataset.layer = p.layer; bigTitle.dataset.head = p.head;
    base = document.createElement("canvas"); base.width = T; base.height = T;
    const img = base.getContext("2d").createImageData(T, T);
    const d = img.data;
    for (let k = 0; k < T * T; k++) { const c = LUT[Math.round(255 * Math.sqrt(Math.max(0, Math.min(1, P[k]))))]; d[4 * k] = c[0]; d[4 * k + 1] = c[1]; d[4 * k + 2] = c[2]; d[4 * k + 3] = 255; }
    base.getContext("2d").putImageData(img, 0, 0);
    const D = Math.max(240, Math.min(480, T * 8));
    big.width = D; big.height = D; big.style.width = D + "px"; big.style.height = D + "px";
    drawAxes(toks, D);
    paintBig(null);
    cellHover.textContent = `hover a cell: its query and key; click: make that row the query (${toks.length} tokens)`;
  }
  const shown = (t) => String(t).replace(/\n/g, "↵").replace(/ /g, "·");
  const short = (t) => { const x = shown(t); return x.length > 10 ? x.slice(0, 9) + "…" : x; };
  function axisLabel(axis, i, text, cell, full) {
    const q = axis === qAxis;
    const style = q ? `position:absolute;right:3px;top:${i * cell + cell / 2}px;transform:translateY(-50%);white-space:nowrap`
      : `position:absolute;bottom:3px;left:${i * cell + cell / 2}px;transform:translateX(-50%) rotate(180deg);writing-mode:vertical-rl;white-space:nowrap`;
    return h("span", { class: "wb-axis-label" + (full ? " wb-axis-active" : ""), "data-pos": i, title: `${i}: ${JSON.stringify(String(text))}`,
      style: `${style};font:10px/1 ui-monospace,monospace;${full ? "background:#ffe9a8;color:#000;z-index:2;padding:1px 2px" : "color:#444"}`,
      text: full ? `${i} ${shown(text)}` : short(text) });
  }
  function drawAxes(toks, D) {
    const cell = D / T, step = Math.max(1, Math.ceil(11 / cell));  // a label every `step` tokens: ≥ 11 px apart
    qAxis.style.height = D + "px"; kAxis.style.width = D + "px";
    for (const axis of [qAxis, kAxis]) {
      axis.replaceChildren(...Array.from({ length: Math.ceil(T / step) }, (_, n) => axisLabel(axis, n * step, toks[n * step], cell, false)));
      axis.dataset.step = step;
    }
  }
  function markAxes(i, j) {  // the hovered query and key, whole, over the thinned labels
    const toks = get(model, "tokens"), cell = big.width / T;
    for (const [axis, pos] of [[qAxis, i], [kAxis, j]]) {
      axis.querySelectorAll(".wb-axis-active").forEach((x) => x.remove());
      if (pos != null) axis.append(axisLabel(axis, pos, toks[pos], cell, true));
    }
  }
  function paintBig(row) {
    if (!base) return;
    const ctx = big.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, big.width, big.height);
    ctx.drawImage(base, 0, 0, big.width, big.height);
    const cell = big.width / T;
    const qs = get(model, "queries") || [];
    ctx.strokeStyle = "#d62728"; ctx.lineWidth = 1;
    for (const q of qs) ctx.strokeRect(0.5, q * cell + 0.5, big.width - 1, Math.max(cell, 1));
    if (row != null) { ctx.strokeStyle = "#ff7f0e"; ctx.lineWidth = 2; ctx.strokeRect(1, row * cell + 1, big.width - 2, Math.max(cell, 2)); }
  }
  const rowOf = (i) => P ? Array.from(P.subarray(i * T, i * T + i + 1)) : null;
  function hoverRow(i) {
    if (!P) return;
    if (i == null) { paintBig(null); rows.preview(null); return; }
    paintBig(i); rows.preview(rowOf(i), i);
  }
  const cellAt = (ev) => { const cell = big.clientWidth / T; return [Math.floor(ev.offsetY / cell), Math.floor(ev.offsetX / cell)]; };
  big.addEventListener("mousemove", (ev) => {
    if (!P) return;
    const [i, j] = cellAt(ev), toks = get(model, "tokens");
    if (i < 0 || j < 0 || i >= T || j >= T) return;
    cellHover.textContent = `query ${i} ${JSON.stringify(toks[i])} → key ${j} ${JSON.stringify(toks[j])}: ` +
      (j > i ? "not visible (after the query)" : P[i * T + j].toPrecision(4));
    hoverRow(i);
    markAxes(i, j);
    el.querySelectorAll(".wb-tok.wb-key").forEach((x) => x.classList.remove("wb-key"));
    const key = el.querySelector(`.wb-tok[data-pos="${j}"]`);
    if (key) { key.classList.add("wb-key"); key.style.outline = "2px solid #ff7f0e"; }
  });
  big.addEventListener("mouseleave", () => {
    hoverRow(null);
    markAxes(null, null);
    el.querySelectorAll(".wb-tok.wb-key").forEach((x) => { x.classList.remove("wb-key"); x.style.outline = ""; });
  });
  big.addEventListener("click", (ev) => { if (!P) return; const [i] = cellAt(ev); if (i >= 0 && i < T) put(model, "queries", [i]); });

  model.on("change:thumbs", drawThumbs);
  model.on("change:mode", () => { drawThumbs(); drawBig(); });
  model.on("change:selected", markSelected);
  model.on("change:pattern", drawBig);
  model.on("change:queries", () => paintBig(null));
  drawThumbs(); drawBig();
}
export default { render };
