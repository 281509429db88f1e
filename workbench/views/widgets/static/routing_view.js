// RoutingView: MoE layer × token grid coloured by top-1 expert, expert load, deactivate / force edits.
function render({ model, el }) {
  const r = root(el, "wb-routing");
  const hover = h("span", { class: "wb-hover" });
  const loadBox = h("div"), gridBox = h("div", { class: "wb-scroll" }), editBox = h("div"), afterBox = h("div", { class: "wb-scroll" });
  r.append(h("div", { class: "wb-bar" }, h("span", { class: "wb-title", text: "MoE routing" }), hover),
    loadBox, gridBox, editBox, afterBox, statusLine(model));
  const CW = 14, CH = 16, LEFT = 40, TOKH = 70;

  function tokenGrid(top1, before, title) {
    const toks = get(model, "tokens"), layers = get(model, "layers"), experts = get(model, "experts");
    const sel = get(model, "selected") || [];
    const svg = s("svg", { width: LEFT + toks.length * CW + 4, height: TOKH + layers.length * CH + 18, class: "wb-token-grid" });
    const li = layers.indexOf(sel[0]);
    toks.forEach((tok, j) => {
      const hit = li >= 0 && experts[li][j].includes(sel[1]);
      const lab = s("text", { transform: `translate(${LEFT + j * CW + 10},${TOKH - 2}) rotate(-60)`, "font-size": 10,
        "font-weight": hit ? 700 : 400, fill: hit ? "#d62728" : "#333", class: hit ? "wb-hit" : "" });
      lab.textContent = JSON.stringify(tok).slice(1, -1).slice(0, 10); svg.append(lab);
    });
    layers.forEach((layer, i) => {
      const y = s("text", { x: LEFT - 4, y: TOKH + i * CH + 12, "text-anchor": "end", "font-size": 10 }); y.textContent = "L" + layer; svg.append(y);
      toks.forEach((tok, j) => {
        const e = top1[i][j], hit = layer === sel[0] && experts[i][j].includes(sel[1]);
        const changed = before && before[i][j] !== e;
        const rect = s("rect", { x: LEFT + j * CW, y: TOKH + i * CH, width: CW - 1, height: CH - 1, fill: category(e),
          class: "wb-cell", "data-layer": layer, "data-token": j, "fill-opacity": sel.length && layer === sel[0] && !hit ? 0.25 : 1,
          stroke: changed ? "#000" : hit ? "#d62728" : "none", "stroke-width": changed || hit ? 2 : 0 });
        rect.addEventListener("mouseenter", () => { hover.textContent = `layer ${layer}, token ${j} ${JSON.stringify(tok)}: top-1 expert ${e}` +
          (before ? ` (before: ${before[i][j]})` : ` (top-k ${experts[i][j].join(", ")})`); });
        rect.addEventListener("click", () => put(model, "selected", [layer, e]));
        svg.append(rect);
      });
    });
    return h("div", {}, h("div", { class: "wb-title", text: title }), svg);
  }

  function loadGrid() {
    const load = get(model, "load"), layers = get(model, "layers"), E = get(model, "n_experts"), sel = get(model, "selected") || [];
    const masked = (get(model, "masked") || []).map((x) => x.join(",")), forced = (get(model, "forced") || []).map((x) => x.join(","));
    const C = 22;
    const svg = s("svg", { width: LEFT + E * C + 4, height: 30 + layers.length * C, class: "wb-load" });
    for (let e = 0; e < E; e++) {
      const x = s("text", { x: LEFT + e * C + C / 2, y: 26, "text-anchor": "middle", "font-size": 10, fill: category(e) }); x.textContent = e; svg.append(x);
    }
    const [lo, hi] = range(load);
    layers.forEach((layer, i) => {
      const y = s("text", { x: LEFT - 4, y: 30 + i * C + 14, "text-anchor": "end", "font-size": 10 }); y.textContent = "L" + layer; svg.append(y);
      for (let e = 0; e < E; e++) {
        const key = layer + "," + e, isSel = sel[0] === layer && sel[1] === e;
        const rect = s("rect", { x: LEFT + e * C, y: 30 + i * C, width: C - 1, height: C - 1, fill: viridis((load[i][e] - lo) / (hi - lo)),
          class: "wb-cell wb-load-cell", "data-layer": layer, "data-expert": e,
          stroke: isSel ? "#d62728" : masked.includes(key) ? "#000" : forced.includes(key) ? "#2ca02c" : "none",
          "stroke-width": isSel || masked.includes(key) || forced.includes(key) ? 3 : 0 });
        rect.addEventListener("mouseenter", () => { hover.textContent = `layer ${layer}, expert ${e}: load ${fmt(load[i][e])}` +
          (masked.includes(key) ? " (deactivated)" : forced.includes(key) ? " (forced)" : ""); });
        rect.addEventListener("click", () => put(model, "selected", [layer, e]));
        svg.append(rect);
      }
    });
    return h("div", {}, h("div", { class: "wb-title", text: "expert load per layer (click a cell: select that expert)" }), svg,
      h("div", { class: "wb-bar" }, colorbar(viridis, lo, hi, "share of assignments")));
  }

  function toggle(name) {
    const sel = get(model, "selected") || [];
    if (!sel.length) return;
    const cur = get(model, name) || [];
    const i = cur.findIndex((x) => x[0] === sel[0] && x[1] === sel[1]);
    put(model, name, i >= 0 ? cur.filter((_, j) => j !== i) : [...cur, sel]);
  }

  function drawEdits() {
    const sel = get(model, "selected") || [], masked = get(model, "masked") || [], forced = get(model, "forced") || [];
    const chip = (x, kind) => h("span", { class: "wb-chip", text: `${kind} L${x[0]}E${x[1]}` });
    editBox.replaceChildren(h("div", { class: "wb-bar" },
      h("b", { text: sel.length ? `selected: layer ${sel[0]}, expert ${sel[1]}` : "select an expert" }),
      h("button", { class: "wb-mask", text: "deactivate", onclick: () => toggle("masked") }),
      h("button", { class: "wb-force", text: "force", onclick: () => toggle("forced") }),
      ...masked.map((x) => chip(x, "off")), ...forced.map((x) => chip(x, "force")),
      h("button", { class: "wb-apply", text: "apply (re-run)", onclick: () => put(model, "run", get(model, "run") + 1) }),
      h("button", { text: "reset", onclick: () => { model.set("masked", []); model.set("forced", []); model.save_changes();
        put(model, "run", get(model, "run") + 1); } })));
  }

  function drawAfter() {
    const after = get(model, "edited_top1") || [], eff = get(model, "effect") || {};
    if (!after.length) { afterBox.replaceChildren(); return; }
    afterBox.replaceChildren(tokenGrid(after, get(model, "top1"), `after edits: top-1 expert (${eff.changed_top1} cells changed, outlined)`),
      effectView(eff));
  }

  const drawMain = () => { loadBox.replaceChildren(loadGrid()); gridBox.replaceChildren(tokenGrid(get(model, "top1"), null, "top-1 expert per token")); };
  for (const k of ["selected", "masked", "forced", "load", "top1"]) model.on("change:" + k, drawMain);
  for (const k of ["selected", "masked", "forced"]) model.on("change:" + k, drawEdits);
  for (const k of ["edited_top1", "effect", "selected"]) model.on("change:" + k, drawAfter);
  drawMain(); drawEdits(); drawAfter();
}
export default { render };
