// AttentionView: the attention row of a query token drawn on the tokens (see attention_rows.js).
function render({ model, el }) {
  const r = root(el, "wb-attention");
  r.append(rowView(model).el, statusLine(model));
}
export default { render };
