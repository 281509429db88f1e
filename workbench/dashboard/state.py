"""The dashboard's controller, plain Python (no Panel): models, one lock per model, caps, computations.

One :class:`Workbench` lives per server process and is shared by every browser session. Sessions
never touch a model directly: each computation goes through :meth:`Workbench.using`, which holds the
model's lock for as long as probes or edits are attached — concurrent sessions queue instead of
mixing their hooks into each other's captures. Long scans take the lock per NIAH test, so a scan
in one tab does not freeze the prompt lab in another.

Everything a browser can send is data (text, numbers, head and expert indices, names from fixed
lists), validated here against :class:`Caps` and the model's spec before any forward pass. Model
sources come from the server's configuration, never from the page; run files are read only from
inside the runs directory (:func:`safe_path`).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pandas as pd
import torch

from ..errors import ProbeError, WorkbenchError

Head = tuple[int, int]


class Cancelled(WorkbenchError):
    """A long computation was stopped from the page."""


class DashboardError(WorkbenchError):
    """A request the dashboard refuses (over a cap, outside the runs directory, unknown name)."""


@dataclass(frozen=True)
class Caps:
    """Limits on what one request may ask for. ``max_prompt_tokens=None``: the model's context."""

    max_prompt_chars: int = 60_000
    max_prompt_tokens: int | None = None
    max_new_tokens: int = 64
    max_scan_tests: int = 24
    max_scan_length: int = 4000
    max_depths: int = 10
    max_needles: int = 3
    max_ablation_k: int = 64
    max_seeds: int = 3
    max_sink_T: int = 512
    max_sink_texts: int = 16
    max_routing_chars: int = 4000
    max_view_queries: int = 32  # query rows one AttentionView request may fetch
    max_sink_keys: int = 16  # key positions the prompt lab's calibration may scale

    def prompt_tokens(self, model) -> int:
        ctx = model.spec.max_positions or 8192
        return min(ctx, self.max_prompt_tokens) if self.max_prompt_tokens else ctx


# --- requests (data only) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadEdits:
    """Attention edits asked for in the prompt lab: ablated heads (``mode``) and ACT-calibrated heads."""

    ablate: tuple[Head, ...] = ()
    mode: str = "zero"
    calibrate: tuple[Head, ...] = ()
    sink_keys: tuple[int, ...] = (0,)
    beta: float = 0.4

    def __bool__(self) -> bool:
        return bool(self.ablate or self.calibrate)

    def build(self, reference: str | None = None) -> list:
        """The library edits. ``mode="mean"`` replaces a head's output by its mean over ``reference``
        (the prompt itself in the prompt lab)."""
        from ..attention import HeadAblation, SinkCalibration

        out = []
        if self.ablate:
            ref = [reference] if self.mode == "mean" and reference else None
            out.append(HeadAblation(list(self.ablate), mode=self.mode, reference=ref))
        if self.calibrate:
            out.append(SinkCalibration(list(self.calibrate), sink_keys=list(self.sink_keys), beta=self.beta))
        return out

    def describe(self) -> str:
        parts = []
        if self.ablate:
            parts.append(f"ablate ({self.mode}) " + ", ".join(f"L{l}H{h}" for l, h in self.ablate))
        if self.calibrate:
            parts.append(
                f"ACT β={self.beta:g} on keys {list(self.sink_keys)} at "
                + ", ".join(f"L{l}H{h}" for l, h in self.calibrate)
            )
        return "; ".join(parts) or "no edits"


@dataclass
class PromptOutcome:
    """One prompt run: tokens, per-head metrics ``name -> [layer, head]``, loss and greedy continuation."""

    text: str
    token_ids: list[int]
    tokens: list[str]
    metrics: dict[str, torch.Tensor]
    loss: float
    output: str
    edits: HeadEdits = field(default_factory=HeadEdits)
    seconds: float = 0.0


# --- helpers ---------------------------------------------------------------------------------------------


MAX_NAME_CHARS = 32  # a head or expert name from the page ("L12H3"); longer strings are refused unparsed


def _capped_names(items, limit: int, what: str) -> list:
    items = list(items or ())
    if len(items) > limit:
        raise DashboardError(f"at most {limit} {what} at once (the model has {limit}), got {len(items)}")
    return items


def parse_heads(items, spec) -> tuple[Head, ...]:
    """``["L3H2", (4, 1), "5:0"]`` → validated ``((3, 2), (4, 1), (5, 0))`` (duplicates dropped). At most
    as many items as the model has heads; names longer than :data:`MAX_NAME_CHARS` are refused."""
    out: list[Head] = []
    seen: set[Head] = set()
    for it in _capped_names(items, spec.n_layers * spec.n_heads, "heads"):
        if isinstance(it, str):
            if len(it) > MAX_NAME_CHARS:
                raise DashboardError(f"not a head: {it[:MAX_NAME_CHARS]!r}… (write L3H2)")
            s = it.strip().upper().replace("L", "").replace("H", ":").replace(",", ":")
            try:
                l, h = (int(x) for x in s.split(":") if x != "")
            except ValueError:
                raise DashboardError(f"not a head: {it!r} (write L3H2)") from None
        else:
            l, h = (int(x) for x in it)
        if not (0 <= l < spec.n_layers and 0 <= h < spec.n_heads):
            raise DashboardError(f"head L{l}H{h} does not exist ({spec.n_layers} layers × {spec.n_heads} heads)")
        if (l, h) not in seen:
            seen.add((l, h))
            out.append((l, h))
    return tuple(out)


def head_name(l: int, h: int) -> str:
    return f"L{l}H{h}"


def expert_name(l: int, e: int) -> str:
    return f"L{l}E{e}"


def parse_experts(items, spec) -> tuple[tuple[int, int], ...]:
    """``["L1E3"]`` → ``((1, 3),)``, validated against the model's MoE layers."""
    layers = {r.layer: r.n_experts for r in spec.routers}
    out, seen = [], set()
    for it in _capped_names(items, sum(layers.values()), "experts"):
        if isinstance(it, str):
            if len(it) > MAX_NAME_CHARS:
                raise DashboardError(f"not an expert: {it[:MAX_NAME_CHARS]!r}… (write L1E3)")
            s = it.strip().upper().removeprefix("L").replace("E", ":")
            try:
                l, e = (int(x) for x in s.split(":"))
            except ValueError:
                raise DashboardError(f"not an expert: {it!r} (write L1E3)") from None
        else:
            l, e = (int(x) for x in it)
        if l not in layers or not 0 <= e < layers[l]:
            raise DashboardError(f"expert L{l}E{e} does not exist")
        if (l, e) not in seen:
            seen.add((l, e))
            out.append((l, e))
    return tuple(out)


def safe_path(root: str | Path, candidate: str | Path) -> Path:
    """``candidate`` resolved, if it lies inside ``root`` (symlinks resolved too); else an error.
    Relative candidates are taken relative to ``root``."""
    root = Path(root).resolve()
    p = Path(candidate)
    p = (p if p.is_absolute() else root / p).resolve()
    if p != root and root not in p.parents:
        raise DashboardError(f"refused: {candidate} is outside the runs directory")
    return p


class Progress:
    """Progress of a long computation, polled or observed by the page; ``cancel()`` stops it between steps."""

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
        """Progress is a scan's ``cancel`` object (workbench.scan): set when the page asked to stop."""
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


# --- models -------------------------------------------------------------------------------------------------


class _Slot:
    def __init__(self, source):
        self.source = source
        self.model = None
        self.lock = threading.RLock()  # held while probes/edits are attached or the model runs
        self.load_lock = threading.Lock()
        self.uses = 0
        self.active = 0  # sessions inside the lock right now (tests assert it never exceeds 1)
        self.max_active = 0


class Workbench:
    """Everything the dashboard computes, shared by all sessions of one server.

    ``model``: the main model's source (``None``: the embedded SmolLM2); ``moe_models``: MoE sources
    the Routing tab offers (first = default); ``runs``: the study runs directory. Only these
    sources can ever be loaded."""

    def __init__(self, model=None, *, moe_models: Sequence[str] = ("tiny-moe",), runs: str | Path = "runs",
                 caps: Caps | None = None, loader: Callable | None = None):  # fmt: skip
        self.main_name = "default" if model is None else str(model)
        self._slots: dict[str, _Slot] = {self.main_name: _Slot(model)}
        self.moe_names = [str(m) for m in moe_models]
        for name in self.moe_names:
            self._slots.setdefault(name, _Slot(name))
        self.runs = Path(runs)
        self.caps = caps or Caps()
        self._loader = loader
        self.baselines: dict[tuple, PromptOutcome] = {}  # (model, text, chat, max_new) -> outcome, small LRU

    # models
    def model_names(self) -> list[str]:
        return list(self._slots)

    def _slot(self, name: str | None) -> _Slot:
        name = self.main_name if name is None else name
        if name not in self._slots:
            raise DashboardError(f"unknown model {name!r}; this server offers {self.model_names()}")
        return self._slots[name]

    def model(self, name: str | None = None):
        """The loaded model (loads it on first use; the caller must not run it outside :meth:`using`)."""
        slot = self._slot(name)
        with slot.load_lock:
            if slot.model is None:
                load = self._loader
                if load is None:
                    from .. import load
                slot.model = load(slot.source)
        return slot.model

    @contextmanager
    def using(self, name: str | None = None, *, timeout: float | None = None) -> Iterator[object]:
        """Exclusive use of a model: hold its lock while attaching probes/edits and running it.

        ``timeout`` (seconds): give up with a :class:`DashboardError` instead of waiting longer — for
        calls made on the server's event loop (a click inside a widget), which must not stall every
        session while another one's computation holds the model."""
        slot = self._slot(name)
        model = self.model(name)
        if not slot.lock.acquire(timeout=-1 if timeout is None else timeout):
            raise DashboardError(
                "the model is busy with another computation (another tab or user); try again in a moment"
            )
        try:
            slot.active += 1
            slot.uses += 1
            slot.max_active = max(slot.max_active, slot.active)
            try:
                yield model
            finally:
                slot.active -= 1
        finally:
            slot.lock.release()

    def lock_stats(self, name: str | None = None) -> dict:
        s = self._slot(name)
        return {"uses": s.uses, "max_active": s.max_active}

    # --- prompt lab -------------------------------------------------------------------------------------
    def _check_prompt(self, model, text: str, *, chat: bool) -> torch.Tensor:
        if not isinstance(text, str) or not text.strip():
            raise DashboardError("type a prompt first")
        if len(text) > self.caps.max_prompt_chars:
            raise DashboardError(f"prompt has {len(text)} characters; the limit is {self.caps.max_prompt_chars}")
        ids = model.encode(text, chat=chat)
        limit = self.caps.prompt_tokens(model)
        if ids.shape[-1] > limit:
            raise DashboardError(f"prompt has {ids.shape[-1]} tokens; the limit is {limit}")
        if ids.shape[-1] < 2:
            raise DashboardError("the prompt needs at least two tokens (the loss is over next-token predictions)")
        return ids

    def _new_tokens(self, n: int) -> int:
        n = int(n)
        if not 0 <= n <= self.caps.max_new_tokens:
            raise DashboardError(f"new tokens must lie in 0..{self.caps.max_new_tokens}, got {n}")
        return n

    @torch.no_grad()
    def run_prompt(
        self, text: str, *, chat: bool = False, max_new_tokens: int = 16, edits: HeadEdits | None = None
    ) -> PromptOutcome:
        """Forward the prompt (with per-head statistics from the kernel), its loss and the greedy continuation;
        with ``edits`` applied to both when given."""
        from ..attention import AttentionStats
        from ..capture import capture, intervene

        edits = edits or HeadEdits()
        n_new = self._new_tokens(max_new_tokens)
        t0 = time.perf_counter()
        with self.using() as m:
            ids = self._check_prompt(m, text, chat=chat)
            built = edits.build(reference=text) if edits else []
            ctx = intervene(m, *built) if built else nullcontext()
            with ctx:
                with capture(m, AttentionStats(sink_keys=1, topk=1)) as cap:
                    logits = m.hf(input_ids=ids).logits[0].float()
                out = m.generate(ids, max_new_tokens=n_new) if n_new else ""
            metrics = _head_metrics(cap)
            loss = float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]))
            tokens = m.tokens(ids[0])
        return PromptOutcome(text=text, token_ids=ids[0].tolist(), tokens=tokens, metrics=metrics, loss=loss, output=out,
                             edits=edits, seconds=time.perf_counter() - t0)  # fmt: skip

    # --- retrieval ----------------------------------------------------------------------------------------
    def check_scan(
        self, lengths: Sequence[int], depths: int, n_needles: int = 1, max_new_tokens: int = 24
    ) -> list[int]:
        lengths = sorted({int(x) for x in lengths})
        if not lengths:
            raise DashboardError("choose at least one context length")
        if min(lengths) < 64 or max(lengths) > self.caps.max_scan_length:
            raise DashboardError(f"context lengths must lie in 64..{self.caps.max_scan_length}")
        if not 1 <= int(depths) <= self.caps.max_depths:
            raise DashboardError(f"depths must lie in 1..{self.caps.max_depths}")
        if not 1 <= int(n_needles) <= self.caps.max_needles:
            raise DashboardError(f"needles must lie in 1..{self.caps.max_needles}")
        if not 2 <= int(max_new_tokens) <= self.caps.max_new_tokens:
            raise DashboardError(f"new tokens must lie in 2..{self.caps.max_new_tokens}")
        n = len(lengths) * int(depths) * int(n_needles)
        if n > self.caps.max_scan_tests:
            raise DashboardError(
                f"{n} NIAH tests asked for; the limit is {self.caps.max_scan_tests} (fewer lengths or depths)"
            )
        return lengths

    def retrieval_scan(self, lengths: Sequence[int], depths: int, *, n_needles: int = 1, max_new_tokens: int = 24,
                       variant: str = "set", progress: Progress | None = None):  # fmt: skip
        """Wu et al.'s scan (:func:`workbench.retrieval.scan`), progress per test; Cancel keeps the finished tests."""
        from .. import retrieval

        lengths = self.check_scan(lengths, depths, n_needles, max_new_tokens)
        cfg = retrieval.RetrievalConfig(lengths=lengths, depths=int(depths), n_needles=int(n_needles), variant=variant,
                                        max_new_tokens=int(max_new_tokens))  # fmt: skip
        progress = progress or Progress()
        m = self.model()
        progress.update(done=0, total=len(lengths) * int(depths) * int(n_needles), message="NIAH scan")
        return retrieval.scan(m, cfg, on_case=lambda c: progress.update(done=c.index + 1), cancel=progress, progress=False)

    def retrieval_ablation(self, result, k: int = 10, *, mode: str = "uniform", seeds: int = 2, progress: Progress | None = None):
        """Wu's causal test on the scan's own grid (:func:`workbench.retrieval.ablation_check`): top-``k`` heads
        ablated vs ``k`` random heads, one run per seed; Cancel keeps the finished tests."""
        from .. import retrieval

        m = self.model()
        spec = m.spec
        if not 1 <= int(k) <= min(self.caps.max_ablation_k, spec.n_layers * spec.n_heads - 1):
            raise DashboardError(f"k must lie in 1..{min(self.caps.max_ablation_k, spec.n_layers * spec.n_heads - 1)}")
        if not 0 <= int(seeds) <= self.caps.max_seeds:
            raise DashboardError(f"random seeds must lie in 0..{self.caps.max_seeds}")
        progress = progress or Progress()
        progress.update(done=0, total=len(result.tests) * (2 + int(seeds)), message=f"ablation ({mode}, k={k})")
        return retrieval.ablation_check(m, result, int(k), mode=mode, seeds=range(int(seeds)), progress=False,
                                        on_case=lambda c: progress.update(done=c.index + 1), cancel=progress)  # fmt: skip

    # --- sinks -------------------------------------------------------------------------------------------
    def sinks_scan(self, *, T: int = 64, eps: float = 0.3, texts: Sequence[str] | None = None):
        from .. import sinks

        if not 2 <= int(T) <= self.caps.max_sink_T:
            raise DashboardError(f"T must lie in 2..{self.caps.max_sink_T}")
        if not 0 < float(eps) < 1:
            raise DashboardError("ε must lie in (0, 1)")
        if texts is not None:
            texts = [t for t in texts if t.strip()]
            if not texts:
                texts = None
            elif len(texts) > self.caps.max_sink_texts or sum(map(len, texts)) > self.caps.max_prompt_chars:
                raise DashboardError(
                    f"at most {self.caps.max_sink_texts} texts and {self.caps.max_prompt_chars} characters"
                )
        cfg = sinks.SinkConfig(T=int(T), eps=float(eps), texts=texts if texts is not None else sinks.texts_for(int(T)))
        with self.using() as m:
            return sinks.scan(m, cfg, progress=False)

    # --- routing ------------------------------------------------------------------------------------------
    def moe_spec(self, name: str):
        m = self.model(name)
        if not m.spec.is_moe:
            raise DashboardError(f"{name} is not an MoE model")
        return m.spec

    def _check_routing_text(self, text: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise DashboardError("type a text to route")
        if len(text) > self.caps.max_routing_chars:
            raise DashboardError(f"text has {len(text)} characters; the limit is {self.caps.max_routing_chars}")
        return text

    @torch.no_grad()
    def route(self, name: str, text: str):
        """Routing record of ``text`` on MoE model ``name`` with expert load and token specialisation."""
        from .. import routing
        from ..capture import capture

        text = self._check_routing_text(text)
        if name not in self.moe_names:
            raise DashboardError(f"unknown MoE model {name!r}; this server offers {self.moe_names}")
        self.moe_spec(name)
        with self.using(name) as m:
            ids = m.encode(text)
            if ids.shape[-1] > self.caps.prompt_tokens(m):
                raise DashboardError(f"text has {ids.shape[-1]} tokens; the limit is {self.caps.prompt_tokens(m)}")
            with capture(m, routing.Routing()) as cap:
                m.hf(input_ids=ids)
            rec = routing.rows(cap)
            tokens = m.tokens(ids[0])
        load = routing.expert_load(rec)
        try:
            spec_table = routing.token_specialisation(rec, shuffles=5)
        except ProbeError as e:  # too few repeated tokens in a short text
            spec_table = pd.DataFrame({"note": [str(e)]})
        return RoutingOutcome(model=name, text=text, tokens=tokens, record=rec, load=load, specialisation=spec_table)

    @torch.no_grad()
    def routing_effect(self, name: str, text: str, *, mask=(), force=(), max_new_tokens: int = 16):
        """Outputs with and without deactivated (``mask``) / forced (``force``) experts (:func:`edit_effect`)."""
        from ..routing import ExpertForce, ExpertMask
        from ..effects import edit_effect

        text = self._check_routing_text(text)
        if name not in self.moe_names:
            raise DashboardError(f"unknown MoE model {name!r}")
        spec = self.moe_spec(name)
        mask, force = parse_experts(mask, spec), parse_experts(force, spec)
        if not mask and not force:
            raise DashboardError("choose experts to deactivate or force first")
        edits = ([ExpertMask(list(mask))] if mask else []) + ([ExpertForce(list(force))] if force else [])
        n_new = self._new_tokens(max_new_tokens)
        with self.using(name) as m:
            return edit_effect(m, text, *edits, max_new_tokens=n_new, chat=False)

    # --- runs ---------------------------------------------------------------------------------------------
    def runs_store(self) -> "RunsStore":
        return RunsStore(self.runs)


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


class RunsStore:
    """Study runs under one directory, through the :mod:`workbench.study` API; nothing outside it is opened."""

    def __init__(self, root: str | Path, api=None):
        self.root = Path(root)
        self._api = api
        self.refused: list[str] = []  # listed runs whose directory lies outside the root

    @property
    def api(self):
        if self._api is None:
            from .. import study

            self._api = study
        return self._api

    def list(self) -> pd.DataFrame:
        if not self.root.is_dir():
            return pd.DataFrame(
                columns=["run_id", "name", "path", "created", "n_units", "n_done", "n_failed", "status"]
            )
        df = self.api.list_runs(self.root)
        if not len(df):
            return df
        paths, refused = [], []
        for rid, p in zip(df["run_id"], df["path"]):
            try:
                paths.append(str(safe_path(self.root, p)))
            except DashboardError:  # e.g. a symlink out of the store: not listed, never opened
                paths.append(None)
                refused.append(str(rid))
        self.refused = refused
        df = df.assign(path=paths)
        return df[df["path"].notna()].reset_index(drop=True)

    def path(self, run_id: str) -> Path:
        """The directory of run ``run_id`` (which must be listed and lie inside the root)."""
        df = self.list()
        hit = df[df["run_id"].astype(str) == str(run_id)] if len(df) else df
        if not len(hit):
            raise DashboardError(f"no run {run_id!r} in {self.root}")
        return safe_path(self.root, hit["path"].iloc[0])

    def run(self, run_id: str):
        return self.api.Run(self.path(run_id))

    def report_html(self, run_id: str) -> str:
        """The run's HTML report (written by ``Run.report()`` if missing), read from inside the root."""
        run = self.run(run_id)
        existing = self.path(run_id) / "report" / "index.html"
        if existing.is_file():
            page = existing
        else:
            try:
                page = run.report(png=False)  # PNG export needs chromium and takes seconds: not for a click
            except TypeError:
                page = run.report()
        page = safe_path(self.root, page)
        if page.suffix.lower() not in (".html", ".htm"):
            raise DashboardError("the run's report is not an HTML file")
        return page.read_text(encoding="utf-8", errors="replace")

    def compare(self, a: str, b: str) -> pd.DataFrame:
        """Two runs' summaries side by side (columns suffixed with the run ids)."""
        sa, sb = self.run(a).summary(), self.run(b).summary()
        return compare_frames(sa, sb, str(a), str(b))


ID_COLUMNS = {"k", "seed", "layer", "head", "expert", "length", "depth", "repetition", "needle", "unit", "unit_id"}


def compare_frames(a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str) -> pd.DataFrame:
    """Join two summary tables on their shared non-numeric and identifier columns (``k``, ``seed``,
    ``layer``, …); the other numeric columns side by side with a Δ."""
    num = pd.api.types.is_numeric_dtype
    shared = [c for c in a.columns if c in b.columns]
    keys = [c for c in shared if not num(a[c]) or c in ID_COLUMNS]
    nums = [c for c in shared if c not in keys and num(a[c]) and num(b[c])]
    if keys:
        merged = a[keys + nums].merge(b[keys + nums], on=keys, how="outer", suffixes=(f" [{name_a}]", f" [{name_b}]"))
    else:
        merged = pd.concat([a[nums].add_suffix(f" [{name_a}]"), b[nums].add_suffix(f" [{name_b}]")], axis=1)
    for c in nums:
        ca, cb = f"{c} [{name_a}]", f"{c} [{name_b}]"
        if ca in merged and cb in merged:
            merged[f"Δ {c}"] = merged[cb] - merged[ca]
    return merged


# --- internals -------------------------------------------------------------------------------------------


def _head_metrics(cap) -> dict[str, torch.Tensor]:
    """Per-head summaries ``[layer, head]`` of one prompt's rows (:func:`workbench.heads.summary`) and the
    share of rows whose top-1 key is the previous token."""
    from ..heads import summary

    top1 = cap.stack("attn.top1")[:, 0].long()  # [L, H, R]
    q = cap.q_pos.view(1, 1, -1)
    prev = (top1 == q - 1).float()[..., 1:].mean(-1) if top1.shape[-1] > 1 else torch.zeros(top1.shape[:2])
    return {**summary(cap), "previous-token share": prev}


_SHARED: dict[tuple, Workbench] = {}
_SHARED_LOCK = threading.Lock()


def shared(
    model=None, *, moe_models: Sequence[str] = ("tiny-moe",), runs: str | Path = "runs", caps: Caps | None = None
) -> Workbench:
    """The process-wide :class:`Workbench` for a configuration (all sessions of a server share it)."""
    key = (None if model is None else str(model), tuple(moe_models), str(Path(runs).resolve()), caps)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Workbench(model, moe_models=moe_models, runs=runs, caps=caps)
        return _SHARED[key]


__all__ = ["Cancelled", "Caps", "DashboardError", "HeadEdits", "Progress", "PromptOutcome", "RunsStore", "Workbench",
           "compare_frames", "parse_experts", "parse_heads", "safe_path", "shared"]  # fmt: skip
