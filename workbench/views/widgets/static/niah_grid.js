// NIAHGrid: depth × context-length accuracy heatmaps side by side.
function render({ model, el }) {
  const r = root(el, "wb-niah");
  const row = h("div", { class: "wb-bar", style: "align-items:flex-start" });
  const hover = h("div", { class: "wb-hover" });
  r.append(row, h("div", { class: "wb-bar" }, colorbar(rdylgn, 0, 1, "NIAH accuracy"),
    h("span", { class: "wb-hover", text: "columns: context length (tokens); rows: needle depth" })), hover, statusLine(model));
  const CW = 56, CH = 26, LEFT = 48, TOP = 20;
  function draw() {
    row.replaceChildren(...get(model, "panels").map((p) => {
      const svg = s("svg", { width: LEFT + p.lengths.length * CW + 4, height: TOP + p.depths.length * CH + 4, class: "wb-niah-panel" });
      p.lengths.forEach((len, j) => {
        const x = s("text", { x: LEFT + j * CW + CW / 2, y: 14, "text-anchor": "middle", "font-size": 10 }); x.textContent = len; svg.append(x);
      });
      p.depths.forEach((d, i) => {
        const y = s("text", { x: LEFT - 4, y: TOP + i * CH + 17, "text-anchor": "end", "font-size": 10 }); y.textContent = d; svg.append(y);
        p.lengths.forEach((len, j) => {
          const v = p.z[i][j];
          const rect = s("rect", { x: LEFT + j * CW, y: TOP + i * CH, width: CW - 1, height: CH - 1, fill: rdylgn(v), class: "wb-cell" });
          rect.addEventListener("mouseenter", () => { hover.textContent = `${p.title}: length ${len}, depth ${d}: accuracy ${fmt(v)}`; });
          const label = s("text", { x: LEFT + j * CW + CW / 2, y: TOP + i * CH + 17, "text-anchor": "middle", "font-size": 10, "pointer-events": "none" });
          label.textContent = fmt(v);
          svg.append(rect, label);
        });
      });
      return h("div", {}, h("div", { class: "wb-title", text: p.title }), svg);
    }));
  }
  model.on("change:panels", draw);
  draw();
}
export default { render };
