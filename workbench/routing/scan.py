"""``routing.scan``: MoE routing over a set of labelled texts — expert load, specialisation by label,
margins — with the scan shape every scan shares (:mod:`workbench.measure.scan`)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch

from ..base import plots
from ..core.capture import capture, edit_labels, intervene
from ..base.errors import ProbeError
from ..measure.result import Result
from ..measure.scan import config_of, int_value, run_cases
from .analyses import expert_load, flip_risk, load_entropy, specialisation
from .probe import Routing, RoutingRows, require_moe, rows

_ROW_FIELDS = ("token_ids", "positions", "batch", "call")
_LAYER_FIELDS = ("logits", "experts", "weights", "scores", "margin", "ran", "agrees")


def default_texts(per_domain: int = 2, chars: int = 1500) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Held-out slices of the four shipped domains (English essays, German, Python, arithmetic): texts and labels."""
    from ..models.zoo import corpus

    texts, labels = [], []
    for domain, text in corpus.load_corpus().items():
        tail = text[-per_domain * chars :]
        for i in range(per_domain):
            texts.append(tail[i * chars : (i + 1) * chars])
            labels.append(domain)
    return tuple(texts), tuple(labels)


@dataclass(frozen=True)
class RoutingConfig:
    """A routing scan: one forward pass per text (its first ``max_tokens`` tokens); ``labels`` name each
    text's group (default: the shipped domains, or the text's index); ``layers``: MoE layers (None: all)."""

    texts: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    max_tokens: int = 256
    chat: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if self.texts is None:
            if self.labels is not None:
                raise ProbeError("labels need texts: pass texts=[...] with one label each")
            texts, labels = default_texts()
            set_("texts", texts), set_("labels", labels)
        else:
            if isinstance(self.texts, str) or not self.texts or not all(isinstance(t, str) and t.strip() for t in self.texts):
                raise ProbeError("texts must be a non-empty list of non-empty strings")
            set_("texts", tuple(self.texts))
            labels = tuple(str(i) for i in range(len(self.texts))) if self.labels is None else tuple(str(x) for x in self.labels)
            if len(labels) != len(self.texts):
                raise ProbeError(f"{len(labels)} labels for {len(self.texts)} texts; give one label per text")
            set_("labels", labels)
        set_("max_tokens", int_value(self.max_tokens, "max_tokens", lo=2))
        if self.layers is not None:
            set_("layers", tuple(int_value(l, "layers: each layer", lo=0) for l in self.layers))


@dataclass(repr=False)
class RoutingResult(Result):
    """The routing of every token of the scanned texts (:class:`RoutingRows`) with each row's text label."""

    rows: RoutingRows
    text: torch.Tensor  # [R] index of each row's text
    labels: tuple[str, ...]  # one per text
    provenance: object
    complete: bool = True

    kind: ClassVar[str] = "routing"
    table_names: ClassVar[tuple[str, ...]] = ("tokens",)

    def experts(self) -> pd.DataFrame:
        """One row per (MoE layer, expert): load share and activation rate, busiest first."""
        load = expert_load(self.rows)
        L, E = load.shape
        df = pd.DataFrame({"layer": [l for l in self.rows.layers for _ in range(E)], "expert": list(range(E)) * L,
                           "load": load.flatten().tolist()})  # fmt: skip
        return df.sort_values("load", ascending=False, kind="stable").reset_index(drop=True)

    heads = experts  # the table a view sorts (the result protocol's heads())

    def by_label(self) -> pd.DataFrame:
        """Expert load per text label ``(label, layer) × expert`` in % of top-k assignments."""
        out = {}
        for lab in dict.fromkeys(self.labels):
            sel = torch.tensor([self.labels[int(t)] == lab for t in self.text])
            out[lab] = pd.DataFrame(expert_load(self.rows.select(sel)).numpy() * 100, index=[f"L{l}" for l in self.rows.layers])
        return pd.concat(out, names=["label", "layer"]) if out else pd.DataFrame()

    def summary(self) -> str:
        r = self.rows
        E = r.n_experts
        ent = load_entropy(r)
        state = "" if self.complete else f" — cancelled, {len(set(self.text.tolist()))} text(s) done"
        lines = [f"routing of {r.token_ids.numel()} tokens over {len(set(self.labels))} label(s), MoE layers {list(r.layers)}, "
                 f"{E} experts{state}; verified against the experts that ran: {r.verified}"]  # fmt: skip
        top = self.experts().groupby("layer").head(1)
        for l, h, (_, t) in zip(r.layers, ent.tolist(), top.sort_values("layer").iterrows()):
            lines.append(f"  L{l}: load entropy {h:.2f} of {torch.log2(torch.tensor(float(E))):.2f} bits; busiest E{int(t.expert)} "
                         f"({t.load * 100:.1f}%)")  # fmt: skip
        if len(set(self.labels)) > 1:
            try:
                spec = specialisation(r, torch.tensor([sorted(set(self.labels)).index(self.labels[int(t)]) for t in self.text]),
                                      min_count=1, shuffles=5)  # fmt: skip
                lines.append("label explains (chance-corrected share of the top-1 choice): "
                             + ", ".join(f"L{l} {s:.2f}" for l, s in zip(spec["layer"], spec["score"])))  # fmt: skip
            except ProbeError as e:
                lines.append(f"label specialisation: {e}")
        finite = r.margin[torch.isfinite(r.margin)]
        if finite.numel():
            thr = float(finite.median()) / 10
            lines.append(f"routing margins: median {float(finite.median()):.3g}; share below a tenth of it: "
                         + ", ".join(f"L{l} {v * 100:.1f}%" for l, v in zip(r.layers, flip_risk(r, thr).tolist())))  # fmt: skip
        return "\n".join(lines)

    def figures(self) -> dict:
        r = self.rows
        return {
            "load": lambda: plots.layer_expert_grid(expert_load(r), r.layers, f"expert load per layer ({r.token_ids.numel()} tokens)"),
            "margins": lambda: plots.histogram(r.margin, "routing margin (k-th minus (k+1)-th rule score)", x="margin",
                                               by=[f"L{l}" for l in r.layers]),
        }  # fmt: skip

    def tables(self) -> dict[str, pd.DataFrame]:
        df = self.rows.to_frame()
        li = torch.tensor([self.rows.layers.index(l) for l in df["layer"]])
        ri, ki = torch.tensor(df["row"].to_numpy().copy()), torch.tensor(df["rank"].to_numpy().copy())
        df["text"] = self.text[ri].numpy()
        df["label"] = [self.labels[t] for t in df["text"]]
        df["ran"], df["agrees"] = self.rows.ran[li, ri, ki].numpy(), self.rows.agrees[li, ri].numpy()
        return {"tokens": df.assign(n_experts=self.rows.n_experts, complete=self.complete)}

    def to_frame(self) -> pd.DataFrame:
        return self.tables()["tokens"]

    @classmethod
    def from_tables(cls, tables, provenance) -> "RoutingResult":
        df = tables["tokens"]
        layers = tuple(sorted(df["layer"].unique().tolist()))
        R, K, E = int(df["row"].max()) + 1, int(df["rank"].max()) + 1, int(df["n_experts"].iloc[0])
        per_row = df.drop_duplicates("row").sort_values("row")
        li = torch.tensor([layers.index(l) for l in df["layer"]])
        ri, ki = torch.tensor(df["row"].to_numpy()), torch.tensor(df["rank"].to_numpy())

        def grid(col, fill, dtype):
            t = torch.full((len(layers), R, K), fill, dtype=dtype)
            t[li, ri, ki] = torch.tensor(df[col].to_numpy(), dtype=dtype)
            return t

        margin = torch.full((len(layers), R), float("nan"))
        margin[li, ri] = torch.tensor(df["margin"].to_numpy(), dtype=torch.float32)
        agrees = torch.zeros(len(layers), R, dtype=torch.bool)
        agrees[li, ri] = torch.tensor(df["agrees"].to_numpy(), dtype=torch.bool)
        nan = torch.full((len(layers), R, E), float("nan"))  # logits and scores are not stored
        rr = RoutingRows(layers=layers, n_experts=E, token_ids=torch.tensor(per_row["token_id"].to_numpy()),
                         positions=torch.tensor(per_row["position"].to_numpy()), batch=torch.tensor(per_row["batch"].to_numpy()),
                         call=torch.tensor(per_row["call"].to_numpy()), logits=nan, experts=grid("expert", -1, torch.long),
                         weights=grid("weight", float("nan"), torch.float32), scores=nan.clone(), margin=margin,
                         ran=grid("ran", -1, torch.long), agrees=agrees)  # fmt: skip
        labels_by_text = per_row.drop_duplicates("text").sort_values("text")
        labels = tuple(str(x) for x in labels_by_text["label"])
        return cls(rows=rr, text=torch.tensor(per_row["text"].to_numpy()), labels=labels, provenance=provenance,
                   complete=bool(df["complete"].iloc[0]))  # fmt: skip


def concat_rows(parts: list[RoutingRows]) -> RoutingRows:
    """Several :class:`RoutingRows` of one model as one (calls renumbered in order)."""
    if not parts:
        raise ProbeError("no routing rows to join")
    width = max(p.experts.shape[-1] for p in parts)
    pad = lambda t, fill: torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=fill)  # noqa: E731
    offsets, calls = 0, []
    for p in parts:
        calls.append(p.call + offsets)
        offsets += int(p.call.max()) + 1
    fields = {f: torch.cat([getattr(p, f) for p in parts]) for f in ("token_ids", "positions", "batch")}
    fields["call"] = torch.cat(calls)
    for f in _LAYER_FIELDS:
        ts = [getattr(p, f) for p in parts]
        if f in ("experts", "weights", "ran"):
            ts = [pad(t, torch.nan if t.dtype.is_floating_point else -1) for t in ts]
        fields[f] = torch.cat(ts, dim=1)
    return RoutingRows(layers=parts[0].layers, n_experts=parts[0].n_experts, **fields)


def first_tokens(model, text: str, max_tokens: int, chat: bool) -> torch.Tensor:
    """The first ``max_tokens`` ids of ``text`` ``[1, T]`` on the model's device (``chat``: as a user turn, when the
    tokenizer has a chat template), cut before the model's length check: long texts are fine."""
    if chat and getattr(model.tokenizer, "chat_template", None):
        ids = model.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"][0].tolist()
    else:
        ids = list(model.tokenizer.encode(text))
    ids = ids[:max_tokens]
    limit = model.spec.max_positions
    if limit and len(ids) > limit:
        raise ProbeError(f"max_tokens = {max_tokens} exceeds the model's {limit} positions; use max_tokens ≤ {limit}")
    return model.encode(ids)


@torch.no_grad()
def scan(model, config: RoutingConfig | None = None, *, edits=(), on_case=None, cancel=None, progress: bool = True,
         **fields) -> RoutingResult:  # fmt: skip
    """Routing of every token of labelled texts, one forward pass per text (``RoutingConfig`` fields as
    keywords: ``texts``, ``labels``, ``layers``, ``max_tokens``, ``chat``)."""
    require_moe(model, "routing.scan")
    cfg = config_of(RoutingConfig, config, fields)
    probe = Routing(layers=cfg.layers)
    probe.bind(model)  # a bad layer fails before any text runs
    ids = [first_tokens(model, t, cfg.max_tokens, cfg.chat) for t in cfg.texts]

    def run(item):
        i, x = item
        with capture(model, probe) as cap:
            model.hf(input_ids=x)
        return i, rows(cap)

    with intervene(model, *edits) if edits else nullcontext():
        done, complete = run_cases(list(enumerate(ids)), run, on_case=on_case, cancel=cancel, progress=progress,
                                   desc="routing scan", unit="text")  # fmt: skip
    if not done:
        raise ProbeError("the routing scan was cancelled before its first text: nothing to report")
    joined = concat_rows([r for _, r in done])
    text = torch.cat([torch.full((r.token_ids.numel(),), i) for i, r in done])
    prov = model.provenance.with_run(definition="routing: model-exact top-k per MoE layer; margin = k-th minus (k+1)-th rule score",
                                     texts=len(done), edits=", ".join(edit_labels(edits)) or None, complete=complete)  # fmt: skip
    return RoutingResult(rows=joined, text=text, labels=cfg.labels[: len(done)], provenance=prov, complete=complete)
