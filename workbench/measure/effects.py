"""What an intervention did, for any edits (attention, routing, hooks): loss change, next-token logit
change, KL and the generated-text diff."""
from __future__ import annotations

import difflib
import html
from dataclasses import dataclass

import torch

from ..base.errors import ProbeError


@dataclass(frozen=True)
class EditEffect:
    """Before/after numbers for one text under some edits (any workbench edits, routing or attention).

    ``loss_*``: mean next-token cross-entropy (nats) of the text; ``max_logit_change``: largest
    |Δ logit| over positions and vocabulary; ``mean_kl``: mean over positions of
    KL(before ‖ after) of the next-token distributions; ``text_*``: greedy continuations;
    ``diff``: a word-level diff of the two continuations (``-word`` removed, ``+word`` added)."""

    labels: tuple[str, ...]
    loss_before: float
    loss_after: float
    max_logit_change: float
    mean_kl: float
    text_before: str | None
    text_after: str | None
    diff: tuple[str, ...]

    @property
    def delta_loss(self) -> float:
        return self.loss_after - self.loss_before

    def summary(self) -> str:
        lines = [
            f"edits: {', '.join(self.labels)}",
            f"loss {self.loss_before:.4f} -> {self.loss_after:.4f} (Δ {self.delta_loss:+.4f} nats); "
            f"max |Δlogit| {self.max_logit_change:.4g}; mean KL {self.mean_kl:.4g}",
        ]
        if self.text_before is not None:
            lines += [f"before: {self.text_before!r}", f"after:  {self.text_after!r}"]
            if self.diff:
                lines.append("diff: " + " ".join(self.diff))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """The numbers as a small table and the text change as a coloured word diff."""
        e = html.escape
        rows = [("edits", ", ".join(self.labels)), ("loss (nats)", f"{self.loss_before:.4f} → {self.loss_after:.4f} (Δ {self.delta_loss:+.4f})"),
                ("max |Δ logit|", f"{self.max_logit_change:.4g}"), ("mean KL(before ‖ after)", f"{self.mean_kl:.4g}")]  # fmt: skip
        if self.text_before is not None:
            rows += [("before", f"<code>{e(self.text_before)}</code>"), ("after", f"<code>{e(self.text_after)}</code>")]
            words = [f"<span style='background:{'#fdd' if d[0] == '-' else '#dfd'}'>{e(d[2:])}</span>" for d in self.diff]
            rows.append(("diff", " ".join(words) or "(same text)"))
        body = "".join(f"<tr><th style='text-align:left'>{k}</th><td style='text-align:left'>{v}</td></tr>" for k, v in rows)
        return f"<table class='workbench-edit-effect'>{body}</table>"


@torch.no_grad()
def edit_effect(model, text, *edits, max_new_tokens: int = 16, chat: bool = False) -> EditEffect:
    """Run ``text`` with and without ``edits`` (as in :func:`workbench.intervene`) and report the change.
    ``max_new_tokens=0`` skips generation."""
    from ..core.capture import edit_labels, intervene

    if not edits:
        raise ProbeError("edit_effect needs at least one edit")
    ids = model.encode(text, chat=chat)
    if ids.shape[-1] < 2:
        raise ProbeError("edit_effect needs at least two tokens to measure a next-token loss")
    before = model.hf(input_ids=ids).logits[0].float()
    gen_before = model.generate(ids, max_new_tokens=max_new_tokens) if max_new_tokens > 0 else None
    with intervene(model, *edits):
        after = model.hf(input_ids=ids).logits[0].float()
        gen_after = model.generate(ids, max_new_tokens=max_new_tokens) if max_new_tokens > 0 else None
    target = ids[0, 1:]
    loss = lambda lg: float(torch.nn.functional.cross_entropy(lg[:-1], target))  # noqa: E731
    lp_b, lp_a = torch.log_softmax(before, -1), torch.log_softmax(after, -1)
    kl = (lp_b.exp() * (lp_b - lp_a)).sum(-1)
    diff = ()
    if gen_before is not None:
        diff = tuple(
            d for d in difflib.ndiff(gen_before.split(), gen_after.split()) if d[:1] in "+-"
        )
    return EditEffect(
        labels=tuple(edit_labels(edits)),
        loss_before=loss(before),
        loss_after=loss(after),
        max_logit_change=float((after - before).abs().max()),
        mean_kl=float(kl.mean()),
        text_before=gen_before,
        text_after=gen_after,
        diff=diff,
    )
