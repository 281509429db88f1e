"""What an intervention did, for any edits (attention, routing, hooks): loss change, next-token logit
change, KL and the generated-text diff — for a whole text (:func:`edit_effect` → :class:`EditEffect`) and, token
by token on the user's own tokens of a prompt (:func:`prompt_effect` → :class:`PromptEffect`: a chat template's
tokens are excluded and labelled, per-token Δloss, a word-level diff, the heads / experts edited). The one
effects module: the notebook views, the dashboard and the CLI show what it computes."""
from __future__ import annotations

import difflib
import html
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..base.errors import ProbeError
from ..core.capture import cancel_hook, edit_labels, intervene
from ..models.spec import parse_unit_name
from ..models.tokens import token_labels


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


def _before_after(model, ids: torch.Tensor, edits: Sequence, max_new_tokens: int, both: Sequence = ()):
    """Logits ``[T, V]`` (float) and greedy continuations (``None`` when ``max_new_tokens`` is 0) of ``ids``
    without and with ``edits``; ``both``: hooks active in both runs (a cancel hook)."""
    with intervene(model, *both) if both else nullcontext():
        before = model.hf(input_ids=ids).logits[0].float()
        gen_before = model.generate(ids, max_new_tokens=max_new_tokens) if max_new_tokens > 0 else None
    with intervene(model, *edits, *both):
        after = model.hf(input_ids=ids).logits[0].float()
        gen_after = model.generate(ids, max_new_tokens=max_new_tokens) if max_new_tokens > 0 else None
    return before, after, gen_before, gen_after


@torch.no_grad()
def edit_effect(model, text, *edits, max_new_tokens: int = 16, chat: bool = False) -> EditEffect:
    """Run ``text`` with and without ``edits`` (as in :func:`workbench.intervene`) and report the change.
    ``max_new_tokens=0`` skips generation."""
    if not edits:
        raise ProbeError("edit_effect needs at least one edit")
    ids = model.encode(text, chat=chat)
    if ids.shape[-1] < 2:
        raise ProbeError("edit_effect needs at least two tokens to measure a next-token loss")
    before, after, gen_before, gen_after = _before_after(model, ids, edits, max_new_tokens)
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


def user_span(model, text: str, ids: torch.Tensor) -> tuple[int, int]:
    """``[start, end)``: the positions of ``ids`` (``[1, T]``, the prompt as the model sees it — maybe inside a
    chat template, maybe after a BOS) that are the user's own ``text``; the others are template tokens."""
    seq = ids.flatten().tolist()
    if not isinstance(text, str):  # token ids given: all of them are the user's
        return 0, len(seq)
    plain = model.tokenizer.encode(text, add_special_tokens=False)
    n = len(plain)
    if n and n <= len(seq):
        first = plain[0]
        for s in range(len(seq) - n + 1):
            if seq[s] == first and seq[s : s + n] == plain:
                return s, s + n
    # the template merged a boundary token: the tokens the template adds around an empty message are the rest
    try:
        empty = model.tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=True)
        empty = empty["input_ids"] if isinstance(empty, dict) or hasattr(empty, "keys") else empty
    except Exception:  # noqa: BLE001 — no template: only special tokens can be the template's
        special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
        start = 0
        while start < len(seq) and seq[start] in special:
            start += 1
        end = len(seq)
        while end > start and seq[end - 1] in special:
            end -= 1
        return start, end
    p = 0
    while p < min(len(seq), len(empty)) and seq[p] == empty[p]:
        p += 1
    s = 0
    while s < min(len(seq) - p, len(empty) - p) and seq[-1 - s] == empty[-1 - s]:
        s += 1
    return p, len(seq) - s


def token_losses(logits: torch.Tensor, ids: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
    """Cross-entropy (nats) of each next token: entry ``t - 1`` is the loss of predicting token ``t`` (``[T - 1]``).
    In chunks of rows: an 8K prompt's log-softmax over a 49K vocabulary would be another 1.6 GB at once."""
    ids = ids.flatten().to(logits.device)
    out = [torch.nn.functional.cross_entropy(logits[i : min(i + chunk, len(ids) - 1)].float(), ids[i + 1 : i + 1 + chunk],
                                             reduction="none") for i in range(0, len(ids) - 1, chunk)]  # fmt: skip
    return torch.cat(out).cpu() if out else torch.zeros(0)


def targets(span: tuple[int, int]) -> range:
    """Positions ``t`` whose prediction counts: the user's tokens, except a first token (nothing predicts it)."""
    return range(max(span[0], 1), span[1])


def mean_loss(losses: torch.Tensor, span: tuple[int, int]) -> float:
    ts = targets(span)
    if not len(ts):
        raise ProbeError("the prompt needs at least two of your own tokens to measure a next-token loss")
    return float(losses[ts.start - 1 : ts.stop - 1].double().mean())


def word_diff(before: str, after: str) -> list[list[str]]:
    """``[[op, word], ...]`` over the words of both texts, ``op`` ``=`` kept, ``-`` removed, ``+`` added."""
    out = []
    for d in difflib.ndiff((before or "").split(), (after or "").split()):
        if d[:1] in " +-":
            out.append(["=" if d[0] == " " else d[0], d[2:]])
    return out


def edit_names(edits) -> list[str]:
    """What each edit changes, by name: ``ablate (uniform) L17H3, L20H1``, ``deactivate L1E3`` …"""
    out = []
    for e, label in zip(edits, edit_labels(edits)):
        heads = getattr(e, "heads", None)
        experts = getattr(e, "experts", None)
        if heads:
            out.append(f"{label} " + ", ".join(f"L{l}H{h}" for l, h in _pairs(heads)))
        elif experts:
            out.append(f"{label} " + ", ".join(f"L{l}E{x}" for l, x in _pairs(experts)))
        else:
            out.append(label)
    return out


def _pairs(items) -> list[tuple[int, int]]:
    out = []
    for it in items:
        if isinstance(it, str):
            if (pair := parse_unit_name(it)) is not None:
                out.append(pair)
        else:
            a, b = it
            out.append((int(a), int(b)))
    return out


@dataclass
class PromptEffect:
    """Before/after of one prompt under some edits, measured on the user's own tokens."""

    edits: list[str]  # named: "head-ablation:zero L1H2"
    tokens: list[str]
    notes: list[str]
    user: tuple[int, int]
    losses_before: torch.Tensor  # [T - 1], every next-token loss (template ones too; views grey them out)
    losses_after: torch.Tensor
    text_before: str | None
    text_after: str | None
    max_logit_change: float | None  # None: not measured (two separate runs compared, logits not kept)
    mean_kl: float | None
    labels: tuple[str, ...] = field(default=())

    @property
    def loss_before(self) -> float:
        return mean_loss(self.losses_before, self.user)

    @property
    def loss_after(self) -> float:
        return mean_loss(self.losses_after, self.user)

    @property
    def delta_loss(self) -> float:
        return self.loss_after - self.loss_before

    @property
    def n_template(self) -> int:
        return len(self.tokens) - (self.user[1] - self.user[0])

    def token_delta(self) -> list[float | None]:
        """Δloss per token (after − before; None for template tokens and the first token)."""
        ts = set(targets(self.user))
        d = (self.losses_after - self.losses_before).tolist()
        return [d[t - 1] if t in ts else None for t in range(len(self.tokens))]

    def diff(self) -> list[list[str]]:
        return word_diff(self.text_before or "", self.text_after or "") if self.text_before is not None else []

    def summary(self) -> str:
        n = self.user[1] - self.user[0]
        tmpl = f" ({self.n_template} template tokens excluded)" if self.n_template else ""
        extra = ""
        if self.max_logit_change is not None:
            extra = f"; max |Δlogit| {self.max_logit_change:.4g}; mean KL {self.mean_kl:.4g}"
        return (f"edits: {'; '.join(self.edits)}\nloss on your {n} tokens{tmpl}: {self.loss_before:.4f} -> {self.loss_after:.4f} "
                f"(Δ {self.delta_loss:+.4f} nats){extra}")  # fmt: skip

    def edit_effect(self):
        """The same numbers as an :class:`EditEffect` (the loss on the user's tokens; NaN where not measured)."""
        diff = tuple(f"{op} {w}" for op, w in self.diff() if op != "=")
        return EditEffect(labels=self.labels, loss_before=self.loss_before, loss_after=self.loss_after,
                          max_logit_change=float("nan") if self.max_logit_change is None else self.max_logit_change,
                          mean_kl=float("nan") if self.mean_kl is None else self.mean_kl, text_before=self.text_before,
                          text_after=self.text_after, diff=diff)  # fmt: skip

    def payload(self) -> dict:
        """What a view draws (JSON)."""
        return {"edits": self.edits, "summary": self.summary(), "loss_before": self.loss_before, "loss_after": self.loss_after,
                "delta_loss": self.delta_loss, "max_logit_change": self.max_logit_change, "mean_kl": self.mean_kl,
                "text_before": self.text_before, "text_after": self.text_after, "words": self.diff(),
                "diff": [f"{op} {w}" for op, w in self.diff() if op != "="], "tokens": self.tokens,
                "token_delta": self.token_delta(), "user": list(self.user), "n_template": self.n_template}  # fmt: skip


@torch.no_grad()
def prompt_effect(model, text, edits: Sequence, *, chat: bool = False, max_new_tokens: int = 16, cancel=None) -> PromptEffect:
    """Run ``text`` with and without ``edits`` (:func:`workbench.intervene`) and compare them token by token.
    ``cancel``: an Event; the runs stop at the next layer once it is set."""
    if not edits:
        raise ProbeError("no edits to compare: choose heads (or experts) first")
    ids = model.encode(text, chat=chat)
    if ids.shape[-1] < 2:
        raise ProbeError("the prompt needs at least two tokens to measure a next-token loss")
    span = user_span(model, text, ids)
    before, after, gen_before, gen_after = _before_after(model, ids, edits, max_new_tokens, both=(cancel_hook(cancel),))
    ts = targets(span)
    pos = slice(ts.start - 1, ts.stop - 1)  # the logits that predict the user's tokens
    lp_b, lp_a = torch.log_softmax(before[pos], -1), torch.log_softmax(after[pos], -1)
    labels, notes = token_labels(model.tokenizer, ids[0])
    return PromptEffect(edits=edit_names(edits), tokens=labels, notes=notes, user=span, losses_before=token_losses(before, ids),
                        losses_after=token_losses(after, ids), text_before=gen_before, text_after=gen_after,
                        max_logit_change=float((after[pos] - before[pos]).abs().max()) if ts else 0.0,
                        mean_kl=float((lp_b.exp() * (lp_b - lp_a)).sum(-1).mean()) if ts else 0.0,
                        labels=tuple(edit_labels(edits)))  # fmt: skip
