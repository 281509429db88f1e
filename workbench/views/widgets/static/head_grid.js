// HeadGrid: layer × head heatmap; click selects a head, shift-click toggles it in the ablation set.
function render({ model, el }) {
  const r = root(el, "wb-headgrid");
  const select = h("select", { class: "wb-metric" });
  select.addEventListener("change", () => put(model, "metric", select.value));
  const hover = h("span", { class: "wb-hover" });
  const svgBox = h("div", { class: "wb-scroll" });
  const ablation = h("div", { class: "wb-ablation" });
  r.append(h("div", { class: "wb-bar" }, h("span", { class: "wb-title", text: get(model, "heading") || "heads" }),
    h("label", { text: "metric " }, select), hover), svgBox, ablation, statusLine(model));

  const CELL = 18, LEFT = 36, TOP = 18;
  function drawGrid() {
    const metrics = get(model, "metrics"), metric = get(model, "metric");
    select.replaceChildren(...metrics.map((m) => h("option", { value: m, text: m })));
    select.value = metric;
    const vals = get(model, "values")[metric] || [];
    const sel = get(model, "selected") || [];
    const abl = (get(model, "ablate") || []).map((x) => x.join(","));
    const L = vals.length, H = L ? vals[0].length : 0;
    const [lo, hi] = range(vals);
    const svg = s("svg", { width: LEFT + H * CELL + 4, height: TOP + L * CELL + 4, class: "wb-grid" });
    for (let hd = 0; hd < H; hd++) {
      const t = s("text", { x: LEFT + hd * CELL + CELL / 2, y: 12, "text-anchor": "middle", "font-size": 10 });
      t.textContent = hd; svg.append(t);
    }
    for (let l = 0; l < L; l++) {
      const t = s("text", { x: LEFT - 4, y: TOP + l * CELL + 13, "text-anchor": "end", "font-size": 10 });
      t.textContent = "L" + l; svg.append(t);
      for (let hd = 0; hd < H; hd++) {
        const v = vals[l][hd];
        // an undefined value (NaN, sent as null) is grey, never the colour scale's low end
        const isSel = sel[0] === l && sel[1] === hd, isAbl = abl.includes(l + "," + hd);
        const rect = s("rect", { x: LEFT + hd * CELL, y: TOP + l * CELL, width: CELL - 1, height: CELL - 1,
          fill: v == null ? "#ddd" : viridis((v - lo) / (hi - lo)), class: "wb-cell", "data-layer": l, "data-head": hd,
          stroke: isSel ? "#d62728" : isAbl ? "#000" : "none", "stroke-width": isSel || isAbl ? 2 : 0,
          "stroke-dasharray": isAbl && !isSel ? "3,2" : "none" });
        rect.addEventListener("mouseenter", () => { hover.textContent = `L${l}H${hd}: ${fmt(v)} (${metric})`; });
        rect.addEventListener("mousedown", (ev) => { if (ev.shiftKey) ev.preventDefault(); });  // shift-click: no text selection
        rect.addEventListener("click", (ev) => {
          if (ev.shiftKey && get(model, "editable")) {
            const cur = get(model, "ablate") || [];
            const i = cur.findIndex((x) => x[0] === l && x[1] === hd);
            put(model, "ablate", i >= 0 ? cur.filter((_, j) => j !== i) : [...cur, [l, hd]]);
          } else put(model, "selected", [l, hd]);
        });
        svg.append(rect);
      }
    }
    svgBox.replaceChildren(svg, h("div", { class: "wb-bar" }, colorbar(viridis, lo, hi, metric)),
      h("div", { class: "wb-hover", text: "click a cell to select it" + (get(model, "editable") ? ", shift-click to add it to the edit set (or take it out)" : "") }));
  }

  function drawAblation() {
    if (!get(model, "can_ablate")) { ablation.replaceChildren(); return; }
    const heads = get(model, "ablate") || [], sel = get(model, "selected") || [];
    const mode = h("select", { class: "wb-mode" }, ...get(model, "modes").map((m) => h("option", { value: m, text: m })));
    mode.value = get(model, "mode");
    mode.addEventListener("change", () => put(model, "mode", mode.value));
    const chips = heads.length ? heads.map((x) => h("span", { class: "wb-chip", text: `L${x[0]}H${x[1]} ×`,
      onclick: () => put(model, "ablate", heads.filter((y) => y !== x)) })) : [h("span", { text: sel.length ? `(selected L${sel[0]}H${sel[1]})` : "(none)" })];
    const effBox = effectView(get(model, "effect") || {});
    ablation.replaceChildren(h("div", { class: "wb-bar" }, h("b", { text: "ablate" }), ...chips,
      h("button", { text: "+ selected", onclick: () => sel.length && put(model, "ablate", [...heads, sel]) }),
      h("button", { text: "clear", onclick: () => put(model, "ablate", []) }), h("label", { text: "mode " }, mode),
      h("button", { class: "wb-run", text: "run ablation", onclick: () => put(model, "run", get(model, "run") + 1) })), effBox);
  }

  for (const k of ["metric", "values", "selected", "ablate"]) model.on("change:" + k, drawGrid);
  for (const k of ["ablate", "selected", "mode", "effect", "can_ablate"]) model.on("change:" + k, drawAblation);
  drawGrid(); drawAblation();
}
export default { render };
