"""The dashboard's computations, plain Python (no Panel): one :class:`Workbench` per server process, shared by
every browser session.

The jobs live in their own modules — :mod:`.pool` (models, one lock per model), :mod:`.validation` (caps and
request checks built on the library's validators), :mod:`.runs` (the runs browser) — and this one runs the
computations the pages ask for, each under the model's lock, each stoppable (``progress``: Cancel stops a
forward pass at the next layer, a scan between tests, keeping what finished). Long scans take the lock per
NIAH test, so a scan in one tab does not freeze the prompt lab in another. Drill-downs (the queries and keys
of a prompt's first run) are cached per prompt for all sessions, bounded by ``Caps.max_drilldown_elements``.
"""

from __future__ import annotations

import itertools
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from ... import routing
from ...attention import AttentionStats
from ...base.errors import ProbeError
from ...core.capture import cancel_hook, capture, intervene
from ...measure import heads, retrieval, sinks, taxonomy
from ...measure.drilldown import DrilldownCache
from ...measure.effects import PromptEffect, mean_loss, prompt_effect, token_losses, user_span
from ...models.tokens import token_labels
from ...routing import ExpertForce, ExpertMask, routing_rows
from .pool import ModelPool
from .runs import Comparison, RunsStore, compare_frames, run_metric, safe_path
from .validation import (Cancelled, Caps, DashboardError, HeadEdits, check_prompt, expert_name, head_name, is_cancel, sink_keys,
                         new_tokens, parse_experts, parse_heads, retrieval_config, routing_text, sink_config, taxonomy_config)  # fmt: skip


@dataclass
class PromptOutcome:
    """One prompt run: tokens, per-head metrics ``name -> [layer, head]`` (capture names), the loss on the
    user's own tokens and the greedy continuation."""

    text: str
    token_ids: list[int]
    tokens: list[str]  # readable labels (byte tokens as \\xNN)
    metrics: dict[str, torch.Tensor]
    loss: float  # mean next-token loss over the user's tokens (template tokens excluded)
    output: str
    edits: HeadEdits = field(default_factory=HeadEdits)
    seconds: float = 0.0
    chat: bool = False
    notes: list[str] = field(default_factory=list)  # hover notes per token (byte tokens)
    user: tuple[int, int] = (0, 0)  # [start, end): the user's own tokens; the rest is the chat template / BOS
    losses: torch.Tensor | None = None  # [T - 1] every next-token loss (template ones too)
    drill: object = None  # the prompt's Drilldown (baseline runs): exact rows without a forward pass
    pattern_capture: object = None  # whole-prompt tiles of a short prompt, until a view takes them

    @property
    def n_template(self) -> int:
        return len(self.token_ids) - (self.user[1] - self.user[0])

    def effect_of(self, edited: "PromptOutcome"):
        """This run (before) against ``edited`` (after), token by token (:class:`workbench.effects.PromptEffect`)."""
        return PromptEffect(edits=[edited.edits.describe()], tokens=self.tokens, notes=self.notes, user=self.user,
                            losses_before=self.losses, losses_after=edited.losses, text_before=self.output,
                            text_after=edited.output, max_logit_change=None, mean_kl=None)  # fmt: skip


@dataclass
class RoutingOutcome:
    model: str
    text: str
    tokens: list[str]
    record: object
    load: torch.Tensor  # [layer, expert]
    specialisation: pd.DataFrame

    def per_token(self) -> pd.DataFrame:
        """Top-1 expert per (token, MoE layer)."""
        ex = self.record.experts[..., 0]  # [layer, row]
        df = pd.DataFrame({"position": range(len(self.tokens)), "token": self.tokens})
        for li, layer in enumerate(self.record.layers):
            df[f"L{layer}"] = ex[li, : len(self.tokens)].tolist()
        return df


class Progress:
    """Progress of a long computation, polled or observed by the page; ``cancel()`` stops it (between NIAH
    tests of a scan, at the next layer of a forward pass). It is the ``cancel`` object scans and runs take."""

    def __init__(self, callback: Callable[["Progress"], None] | None = None):
        self.done, self.total, self.message = 0, 0, ""
        self._cancel = threading.Event()
        self.callback = callback

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def is_set(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("stopped")

    def update(self, done: int | None = None, total: int | None = None, message: str | None = None) -> None:
        if done is not None:
            self.done = done
        if total is not None:
            self.total = total
        if message is not None:
            self.message = message
        if self.callback is not None:
            self.callback(self)


class Workbench:
    """Everything the dashboard computes, shared by all sessions of one server.

    ``model``: the main model's source (``None``: the embedded SmolLM2); ``moe_models``: MoE sources
    the Routing tab offers (first = default); ``runs``: the study runs directory. Only these
    sources can ever be loaded."""

    def __init__(self, model=None, *, moe_models: Sequence[str] = ("tiny-moe",), runs: str | Path = "runs",
                 caps: Caps | None = None, loader: Callable | None = None):  # fmt: skip
        self.pool = ModelPool(model, [str(m) for m in moe_models], loader=loader)
        self.main_name = self.pool.main_name
        self.moe_names = [str(m) for m in moe_models]
        self.runs = Path(runs)
        self.caps = caps or Caps()
        self.drilldowns = DrilldownCache(self.caps.max_drilldown_elements, self.caps.max_drilldown_prompts)
        self._sessions = itertools.count(1)

    def new_session(self) -> int:
        """The next session number: how one browser session is named to the others (waiting lines), never
        its Bokeh session id (that would let a reader join the session)."""
        return next(self._sessions)

    # --- models (the pool) ------------------------------------------------------------------------------
    def model(self, name: str | None = None):
        return self.pool.model(name)

    def using(self, name: str | None = None, *, timeout: float | None = None):
        return self.pool.using(name, timeout=timeout)

    def lock_stats(self, name: str | None = None) -> dict:
        return self.pool.lock_stats(name)

    # --- prompt lab ---------------------------------------------------------------------------------------
    def drilldown(self, ids: torch.Tensor):
        """The shared :class:`~workbench.views.widgets.Drilldown` of a prompt on the main model (filled by its first run)."""
        return self.drilldowns.get(self.main_name, self.model(), ids, using=self.using)[0]

    @torch.no_grad()
    def run_prompt(self, text: str, *, chat: bool = False, max_new_tokens: int = 16, edits: HeadEdits | None = None,
                   progress: Progress | None = None) -> PromptOutcome:  # fmt: skip
        """Forward the prompt with per-head statistics from the kernel, its loss on the user's tokens and the
        greedy continuation; ``edits`` applied to both when given. A baseline run also keeps the prompt's
        queries and keys (the drill-down) and, for short prompts, every head's pattern, in the same pass."""
        edits = edits or HeadEdits()
        n_new = new_tokens(max_new_tokens, self.caps)
        t0 = time.perf_counter()
        with self.using() as m:
            ids = check_prompt(m, text, self.caps, chat=chat)
            span = user_span(m, text, ids)
            if not range(max(span[0], 1), span[1]):
                raise DashboardError("the prompt needs at least two of your own tokens (the loss is over next-token predictions)")
            built = edits.build(reference=text) if edits else []
            stop = cancel_hook(progress)
            short = ids.shape[1] <= self.caps.max_pattern_tokens
            drill = None if edits else self.drilldowns.get(self.main_name, m, ids, using=self.using)[0]
            record = drill.recording(pattern=short) if drill is not None else nullcontext(None)
            with intervene(m, *built, stop), capture(m, AttentionStats(sink_keys=4, topk=1)) as cap, record as rec:
                logits = m.hf(input_ids=ids).logits[0]
            losses = token_losses(logits, ids)
            del logits
            if drill is not None:
                drill.take(rec)
                self.drilldowns.trim()
            with intervene(m, *built, stop):
                out = m.generate(ids, max_new_tokens=n_new) if n_new else ""
            metrics = heads.summary(cap)
            labels, notes = token_labels(m.tokenizer, ids[0])
        return PromptOutcome(text=text, token_ids=ids[0].tolist(), tokens=labels, metrics=metrics, loss=mean_loss(losses, span),
                             output=out, edits=edits, seconds=time.perf_counter() - t0, chat=chat, notes=notes, user=span,
                             losses=losses, drill=drill, pattern_capture=rec if short and drill is not None else None)  # fmt: skip

    def head_edits(self, ablate=(), mode: str = "zero", calibrate=(), sink_keys_text: str = "0", beta: float = 0.4) -> HeadEdits:
        """A validated :class:`HeadEdits` from what the page holds (heads as names or pairs)."""
        spec = self.model().spec
        keys = sink_keys(sink_keys_text, self.caps, self.caps.prompt_tokens(self.model()))
        return HeadEdits(ablate=parse_heads(ablate, spec), mode=mode, calibrate=parse_heads(calibrate, spec), sink_keys=keys,
                         beta=float(beta))  # fmt: skip

    # --- retrieval ----------------------------------------------------------------------------------------
    def check_scan(self, lengths: Sequence[int], depths: int, n_needles: int = 1, max_new_tokens: int = 24) -> list[int]:
        return list(retrieval_config(self.caps, lengths, depths, n_needles, max_new_tokens).lengths)

    def retrieval_scan(self, lengths: Sequence[int], depths: int, *, n_needles: int = 1, max_new_tokens: int = 24,
                       variant: str = "set", progress: Progress | None = None):  # fmt: skip
        """Wu et al.'s scan (:func:`workbench.retrieval.scan`), progress per test; Cancel keeps the finished tests."""
        cfg = retrieval_config(self.caps, lengths, depths, n_needles, max_new_tokens, variant)
        progress = progress or Progress()
        progress.update(done=0, total=len(cfg.lengths) * int(cfg.depths) * cfg.n_needles, message="NIAH scan")
        with self.using() as m:
            return retrieval.scan(m, cfg, on_case=self._between_tests(progress), cancel=progress, progress=False)

    def _between_tests(self, progress: Progress) -> Callable:
        """``on_case`` of a scan: report progress, then let other sessions have the model before the next test."""

        def on_case(case):
            progress.update(done=case.index + 1)
            self.pool.pause()

        return on_case

    def retrieval_ablation(self, result, k: int = 10, *, mode: str = "uniform", seeds: int = 2, progress: Progress | None = None):
        """Wu's causal test on the scan's own grid (:func:`workbench.retrieval.ablation_check`): top-``k`` heads
        ablated vs ``k`` random heads, one run per seed; Cancel keeps the finished tests."""
        m = self.model()
        spec = m.spec
        top = min(self.caps.max_ablation_k, spec.n_layers * spec.n_heads - 1)
        if not 1 <= int(k) <= top:
            raise DashboardError(f"k must lie in 1..{top}")
        if not 0 <= int(seeds) <= self.caps.max_seeds:
            raise DashboardError(f"random seeds must lie in 0..{self.caps.max_seeds}")
        progress = progress or Progress()
        progress.update(done=0, total=len(result.tests) * (2 + int(seeds)), message=f"ablation ({mode}, k={k})")
        with self.using() as m:
            return retrieval.ablation_check(m, result, int(k), mode=mode, seeds=range(int(seeds)), progress=False,
                                            on_case=self._between_tests(progress), cancel=progress)  # fmt: skip

    # --- sinks -------------------------------------------------------------------------------------------
    def sinks_scan(self, *, T: int = 64, eps: float = 0.3, texts: Sequence[str] | None = None, progress: Progress | None = None):
        cfg = sink_config(self.caps, T, eps, texts)
        with self.using() as m:
            return sinks.scan(m, cfg, progress=False, cancel=progress)

    # --- head types --------------------------------------------------------------------------------------
    def taxonomy_scan(self, *, lengths: Sequence[int] = (256,), n_texts: int = 2, local_window: int = 8, repeated: bool = True,
                      retrieval=None, progress: Progress | None = None):  # fmt: skip
        """The head taxonomy (:func:`workbench.taxonomy.scan`), progress per case; ``retrieval``: a retrieval
        scan of this model to join (Wu's axis). Takes the model's lock per case; Cancel keeps finished cases."""
        cfg = taxonomy_config(self.caps, lengths, n_texts, local_window, repeated)
        progress = progress or Progress()
        m = self.model()
        if retrieval is not None and retrieval.provenance.weights_hash != m.provenance.weights_hash:
            raise DashboardError("the retrieval scan is of another model; run it again on this one")
        progress.update(done=0, total=len(cfg.cases(m)), message="head taxonomy")
        with self.using() as m:
            return taxonomy.scan(m, cfg, retrieval=retrieval, on_case=self._between_tests(progress), cancel=progress, progress=False)

    # --- routing ------------------------------------------------------------------------------------------
    def moe_model(self, name: str):
        if name not in self.moe_names:
            raise DashboardError(f"unknown MoE model {name!r}; this server offers {self.moe_names}")
        m = self.model(name)
        if not m.spec.is_moe:
            raise DashboardError(f"{name} is not an MoE model")
        return m

    def moe_spec(self, name: str):
        return self.moe_model(name).spec

    @torch.no_grad()
    def routing_of(self, name: str, text: str):
        """Routing record of ``text`` on MoE model ``name`` with expert load and token specialisation."""
        text = routing_text(self.caps, text)
        self.moe_model(name)
        with self.using(name) as m:
            ids = m.encode(text)
            if ids.shape[-1] > self.caps.prompt_tokens(m):
                raise DashboardError(f"text has {ids.shape[-1]:,} tokens; the limit is {self.caps.prompt_tokens(m):,} tokens")
            rec = routing_rows(m, ids)
            tokens = token_labels(m.tokenizer, ids[0])[0]
        load = routing.expert_load(rec)
        try:
            spec_table = routing.token_specialisation(rec, shuffles=5)
        except ProbeError as e:  # too few repeated tokens in a short text
            spec_table = pd.DataFrame({"note": [str(e)]})
        return RoutingOutcome(model=name, text=text, tokens=tokens, record=rec, load=load, specialisation=spec_table)

    @torch.no_grad()
    def routing_effect(self, name: str, text: str, *, mask=(), force=(), max_new_tokens: int = 16, progress: Progress | None = None):
        """Outputs with and without deactivated (``mask``) / forced (``force``) experts, token by token
        (:func:`workbench.effects.prompt_effect`: loss on the text's tokens, per-token Δloss, word diff, experts named)."""
        text = routing_text(self.caps, text)
        m = self.moe_model(name)
        mask, force = parse_experts(mask, m), parse_experts(force, m)
        if not mask and not force:
            raise DashboardError("choose experts to deactivate or force first")
        edits = ([ExpertMask(list(mask))] if mask else []) + ([ExpertForce(list(force))] if force else [])
        n_new = new_tokens(max_new_tokens, self.caps)
        with self.using(name) as m:
            return prompt_effect(m, text, edits, max_new_tokens=n_new, chat=False, cancel=progress)

    # --- runs ---------------------------------------------------------------------------------------------
    def runs_store(self) -> RunsStore:
        return RunsStore(self.runs)


_SHARED: dict[tuple, Workbench] = {}
_SHARED_LOCK = threading.Lock()


def shared(model=None, *, moe_models: Sequence[str] = ("tiny-moe",), runs: str | Path = "runs", caps: Caps | None = None) -> Workbench:
    """The process-wide :class:`Workbench` for a configuration (all sessions of a server share it)."""
    key = (None if model is None else str(model), tuple(moe_models), str(Path(runs).resolve()), caps)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Workbench(model, moe_models=moe_models, runs=runs, caps=caps)
        return _SHARED[key]


__all__ = ["Cancelled", "Caps", "Comparison", "DashboardError", "HeadEdits", "Progress", "PromptOutcome", "RoutingOutcome",
           "RunsStore", "Workbench", "compare_frames", "expert_name", "head_name", "is_cancel", "parse_experts", "parse_heads",
           "run_metric", "safe_path", "shared"]  # fmt: skip
