"""From a validated study to units of work: each unit is one ablation set under one task condition and
repetition, identified by the hash of everything that determines its result."""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field

from ..base.errors import ProbeError
from ..measure.retrieval import RetrievalConfig
from ..models.spec import ModelSpec, config_spec
from .config import Study, StudyError

Target = tuple[int, int]  # (layer, head) or (layer, expert)


@dataclass(frozen=True)
class Shape:
    """What indices exist: layers, query heads, experts per MoE layer (0 for a dense model)."""

    n_layers: int
    n_heads: int
    n_experts: int
    max_positions: int | None = None  # the model's context, when known
    spec: ModelSpec | None = field(default=None, compare=False)  # what the config tells (checks read it)

    @classmethod
    def of_config(cls, cfg) -> "Shape":
        spec = config_spec(cfg)
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        experts = next((getattr(text, a) for a in ("num_experts", "num_local_experts", "n_routed_experts") if getattr(text, a, None)), 0)
        return cls(spec.n_layers, spec.n_heads, int(experts or 0), spec.max_positions, spec)

    def per_layer(self, target: str) -> int:
        return self.n_heads if target == "heads" else self.n_experts


@dataclass(frozen=True)
class Unit:
    """One piece of work. ``kind``: ``rank`` (the scan that ranks heads/experts for ``top``) or ``eval``."""

    kind: str
    grid: str
    select: str
    k: int | None
    seed: int | None
    targets: tuple[Target, ...]
    condition: tuple[tuple[str, float | str], ...]
    repetition: int
    study: dict = field(repr=False, compare=False, hash=False)
    family: str | None = None  # set only when another grid family plans the very same unit (see eval_units)

    @property
    def config(self) -> dict:
        """Everything the result depends on (not the grid's display name, unless two families share a set)."""
        own = {k: v for k, v in asdict(self).items() if k not in ("study", "grid", "family")}
        if self.family is not None:
            own["family"] = self.family
        return {"model": self.study["model"], "task": self.study["task"], "ablation": self.study["ablation"], **own}

    @property
    def id(self) -> str:
        blob = json.dumps(self.config, sort_keys=True, default=list)
        return f"{self.kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def describe(self) -> str:
        cond = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.condition)
        size = f"layer {self.k}" if self.select == "layer" else f"k={self.k}"
        what = f"{self.grid} {size}" + (f" seed={self.seed}" if self.seed is not None else "")
        return f"{what} [{cond}] rep {self.repetition}" if cond else f"{what} rep {self.repetition}"


def check(study: Study, shape: Shape) -> None:
    """Reject indices and sizes the model cannot have, naming the grid entry (before any model loads)."""
    target = study.ablation.target
    per = shape.per_layer(target)
    if target == "experts" and not shape.n_experts:
        raise StudyError("ablation.target = 'experts' but the model has no experts (a dense model)")
    total = shape.n_layers * per
    top_ks = {k for g in study.grid if g.select == "top" for k in g.k}
    for i, g in enumerate(study.grid):
        where = f"grid[{i}] ({g.label})"
        for s in g.sets:
            for layer, unit in s:
                if not (0 <= layer < shape.n_layers and 0 <= unit < per):
                    raise StudyError(f"{where}.sets: [{layer}, {unit}] is out of range: the model has {shape.n_layers} "
                                     f"layers × {per} {target} (indices from 0)")  # fmt: skip
        for layer in g.layers:
            if layer >= shape.n_layers:
                raise StudyError(f"{where}.layers: layer {layer} is out of range (the model has {shape.n_layers})")
        if g.select == "layer" and target == "experts":
            raise StudyError(f"{where}: select = 'layer' would deactivate every expert of a layer; list experts instead")
        for k in g.k:
            if k >= total:
                raise StudyError(f"{where}.k: {k} must be below the model's {total} {target}")
            if g.select == "random" and k in top_ks and total - k < k:
                raise StudyError(f"{where}.k: {k} random {target} drawn outside the top-{k} need {2 * k} {target}; "
                                 f"the model has {total}")  # fmt: skip
    _check_lengths(study, shape)


def _check_lengths(study: Study, shape: Shape) -> None:
    """Context lengths (+ the tokens generated after them) the model's positions cannot hold."""
    limit = shape.max_positions
    if not limit:
        return
    t = study.task
    if t.kind == "niah":
        _check_retrieval(t.lengths, t.max_new_tokens, shape, "task.lengths:")
    if t.kind == "loss" and t.max_tokens > limit:
        raise StudyError(f"task.max_tokens: {t.max_tokens} exceeds the model's {limit} positions")
    if study.ablation.target == "heads":
        for i, g in enumerate(study.grid):
            if g.select == "top":
                _check_retrieval(g.rank.lengths, g.rank.max_new_tokens, shape, f"grid[{i}] ({g.label}).rank.lengths:")


def _check_retrieval(lengths: list[int], max_new_tokens: int, shape: Shape, what: str) -> None:
    """NIAH lengths on the library's rule (:meth:`RetrievalConfig.check`), refused as a study error."""
    spec = shape.spec or _Positions(shape.max_positions)
    try:
        RetrievalConfig(lengths=lengths, max_new_tokens=max_new_tokens).check(spec, what=what)
    except ProbeError as e:
        raise StudyError(str(e)) from None


@dataclass(frozen=True)
class _Positions:
    """A shape built by hand (tests, Ray workers) has no spec; the check reads only the positions."""

    max_positions: int | None


def rank_units(study: Study) -> list[Unit]:
    """The ranking scans ``top`` entries need (one per distinct ranking)."""
    data = study.model_dump(mode="json")
    conds = dict.fromkeys(rank_condition(study, g) for g in study.grid if g.select == "top")
    return [Unit("rank", "rank", "top", None, None, (), cond, 0, data) for cond in conds]


def rank_condition(study: Study, entry) -> tuple[tuple[str, str], ...]:
    """What ranks the targets of a ``top`` entry: its retrieval scan (heads) or routing load (experts)."""
    if study.ablation.target == "experts":
        return (("rank", "routing-load"),)
    return (("rank", json.dumps(entry.rank.model_dump(mode="json"), sort_keys=True)),)


def _all_targets(shape: Shape, target: str) -> list[Target]:
    return [(l, u) for l in range(shape.n_layers) for u in range(shape.per_layer(target))]


def random_set(pool: list[Target], k: int, seed: int) -> list[Target]:
    """``k`` targets drawn from ``pool`` with ``random.Random(seed)`` (reproducible across runs)."""
    return sorted(random.Random(seed).sample(pool, k))


def eval_units(study: Study, shape: Shape, rankings: dict[tuple, list[Target]]) -> list[Unit]:
    """Every evaluation unit: ablation sets × task conditions × repetitions. ``rankings`` maps a rank
    unit's condition to its targets, best first."""
    data = study.model_dump(mode="json")
    target = study.ablation.target
    top_of = {}  # k -> top-k of the first ranking, excluded from random draws as in Wu et al.
    sets: list[tuple[str, str, int | None, int | None, tuple[Target, ...]]] = []
    for g in study.grid:
        if g.select == "top":
            ranked = rankings[rank_condition(study, g)]
            for k in g.k:
                top_of.setdefault(k, ranked[:k])
                sets.append((g.label, "top", k, None, tuple(sorted(ranked[:k]))))
    for g in study.grid:
        if g.select == "none":
            sets.append((g.label, "none", 0, None, ()))
        elif g.select == "explicit":
            sets += [(g.label, "explicit", len(s), None, tuple(sorted(set(map(tuple, s))))) for s in g.sets]
        elif g.select == "layer":
            sets += [(g.label, "layer", layer, None, tuple((layer, u) for u in range(shape.per_layer(target)))) for layer in g.layers]
        elif g.select == "random":
            for k in g.k:
                pool = [t for t in _all_targets(shape, target) if t not in set(top_of.get(k, ()))]
                sets += [(g.label, "random", k, s, tuple(random_set(pool, k, s))) for s in g.seeds]
    units, seen = [], set()
    for cond in conditions(study):
        for rep in range(study.repetitions):
            for label, select, k, seed, targets in sets:
                unit = Unit("eval", label, select, k, seed, targets, cond, rep, data)
                if unit.id in seen:  # another family plans the same set (e.g. two random entries, same k and seed):
                    unit = Unit("eval", label, select, k, seed, targets, cond, rep, data, family=label)  # its own unit
                seen.add(unit.id)
                units.append(unit)
    return units


def conditions(study: Study) -> list[tuple[tuple[str, float], ...]]:
    """The task's grid of conditions: (length, depth) for NIAH, a single one otherwise."""
    t = study.task
    if t.kind == "niah":
        return [(("depth", float(d)), ("length", float(n))) for n in t.lengths for d in t.depths]
    return [()]
