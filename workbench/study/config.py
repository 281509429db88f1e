"""The study file: a TOML document validated by a pydantic schema, errors naming the key and its line.

A study is a model, a task, an ablation kind and a grid of ablation sets (see ``studies/`` and
``README.md``). Everything here is checked before any model loads, including head/expert indices
(against the model's config, read without weights)."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..base.errors import WorkbenchError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class StudyError(WorkbenchError):
    """A study file that cannot run, with the offending key (and line) named."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MAX_UNITS = 100_000  # units one study may plan (each is at least one forward pass; a typo like 1e9 is refused)
MAX_SEED = 2**63 - 1  # seeds are stored as int64
DEVICE = re.compile(r"^(cpu|meta|mps|cuda|xpu|hpu|npu)(:\d+)?$")


class ModelConfig(_Strict):
    """``source``: ``"embedded"`` (SmolLM2), ``"tiny-moe"``, ``"tiny:<arch>"``, a hub id or a local directory.
    ``device_map`` is passed to ``from_pretrained`` for a model split across GPUs (``"auto"``); on Ray
    each worker then reserves ``gpus_per_worker`` GPUs."""

    source: str = "embedded"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    device_map: str | None = None
    gpus_per_worker: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _device(self):
        if not DEVICE.match(self.device):
            raise ValueError(f"device {self.device!r} is not a torch device; use cpu, cuda, cuda:N or mps")
        return self


class NIAHTask(_Strict):
    """Needle-in-a-haystack accuracy (ROUGE-1 recall > 0.5) at each context length × depth; one unit per
    (ablation set, length, depth, repetition), ``needles`` tests each."""

    kind: Literal["niah"]
    lengths: list[Annotated[int, Field(ge=64)]] = Field(min_length=1)
    depths: list[Annotated[float, Field(ge=0, le=100)]] = Field(min_length=1)
    needles: Annotated[int, Field(ge=1, le=12)] = 1
    max_new_tokens: Annotated[int, Field(ge=2, le=256)] = 24


class LossTask(_Strict):
    """Mean next-token loss (nats) over a text set: the shipped essays, or a file with one text per line."""

    kind: Literal["loss"]
    texts: str = "essays"
    n_texts: Annotated[int, Field(ge=1)] = 4
    max_tokens: Annotated[int, Field(ge=2)] = 256


class LogitDiffTask(_Strict):
    """logit(target) − logit(foil) of the first token of each after the prompt (Wang et al.'s metric):
    ``pairs`` inline or ``file`` (JSONL with prompt/target/foil)."""

    kind: Literal["logit_diff"]
    pairs: list[dict[str, str]] = []
    file: str | None = None

    @model_validator(mode="after")
    def _some(self):
        if not self.pairs and not self.file:
            raise ValueError("give `pairs` or `file`")
        for p in self.pairs:
            if set(p) != {"prompt", "target", "foil"}:
                raise ValueError(f"each pair needs exactly prompt, target, foil; got {sorted(p)}")
        return self


class GenerationMatchTask(_Strict):
    """Share of prompts whose greedy continuation under the ablation equals the unablated one."""

    kind: Literal["generation_match"]
    prompts: list[str] = Field(min_length=1)
    max_new_tokens: Annotated[int, Field(ge=1, le=256)] = 16
    chat: bool = True


Task = Annotated[Union[NIAHTask, LossTask, LogitDiffTask, GenerationMatchTask], Field(discriminator="kind")]


class Ablation(_Strict):
    """What is turned off: attention ``heads`` (mode zero / mean / uniform, see HeadAblation) or MoE
    ``experts`` (mode deactivate, see ExpertMask)."""

    target: Literal["heads", "experts"] = "heads"
    mode: Literal["zero", "mean", "uniform", "deactivate"] = "zero"

    @model_validator(mode="after")
    def _mode_fits(self):
        if (self.target == "experts") != (self.mode == "deactivate"):
            raise ValueError("heads take mode zero/mean/uniform; experts take mode deactivate")
        return self


class Ranking(_Strict):
    """The retrieval scan that ranks heads for ``select = "top"`` (Wu et al.'s score, variant ``set``)."""

    lengths: list[Annotated[int, Field(ge=64)]] = Field(default=[500], min_length=1)
    depths: list[Annotated[float, Field(ge=0, le=100)]] = Field(default=[25.0, 75.0], min_length=1)
    needles: Annotated[int, Field(ge=1, le=12)] = 1
    max_new_tokens: Annotated[int, Field(ge=2, le=256)] = 24


class GridEntry(_Strict):
    """One family of ablation sets.

    - ``none``: the unablated baseline;
    - ``explicit``: ``sets`` of [layer, head] (or [layer, expert]) pairs;
    - ``top``: the ``k`` best by retrieval score (heads; ranked by ``rank``) or by routing load (experts);
    - ``random``: ``k`` random units for each of ``seeds`` (excluding the top-``k`` when a ``top`` entry exists);
    - ``layer``: every head (expert) of each of ``layers``, one set per layer.
    """

    select: Literal["none", "explicit", "top", "random", "layer"]
    name: str | None = None
    k: list[Annotated[int, Field(ge=1)]] = []
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = [0]
    sets: list[list[tuple[int, int]]] = []
    layers: list[Annotated[int, Field(ge=0)]] = []
    rank: Ranking = Ranking()

    @field_validator("sets")
    @classmethod
    def _each_unit_once(cls, sets: list[list[tuple[int, int]]]) -> list[list[tuple[int, int]]]:
        """A set naming one head twice (``[[0, 0], [0, 0]]``) ablates one head but would be recorded as k = 2."""
        for i, s in enumerate(sets):
            seen = set()
            for pair in s:
                if pair in seen:
                    raise ValueError(f"set {i} lists {list(pair)} twice: a set ablates each unit once (it would be "
                                     f"recorded as k = {len(s)} for {len(set(s))} distinct units)")  # fmt: skip
                seen.add(pair)
        return sets

    @model_validator(mode="after")
    def _needs(self):
        need = {"explicit": ("sets", self.sets), "top": ("k", self.k), "random": ("k", self.k), "layer": ("layers", self.layers)}
        if self.select in need and not need[self.select][1]:
            raise ValueError(f"select = {self.select!r} needs a non-empty `{need[self.select][0]}`")
        if any(not s for s in self.sets):
            raise ValueError("`sets` contains an empty set")
        if not self.seeds:
            raise ValueError("`seeds` is empty")
        # each value names one ablation set: a repeat would plan the same unit twice (and never finish)
        for key, values in (("k", self.k), ("seeds", self.seeds), ("layers", self.layers),
                            ("sets", [tuple(sorted(set(map(tuple, s)))) for s in self.sets])):  # fmt: skip
            seen = set()
            for v in values:
                if v in seen:
                    shown = [list(x) for x in v] if key == "sets" else v
                    raise ValueError(f"`{key}` lists {shown} twice; each value must appear once")
                seen.add(v)
        return self

    @property
    def label(self) -> str:
        return self.name or self.select

    def n_sets(self) -> int:
        """How many ablation sets this entry plans (before conditions and repetitions)."""
        return {"none": 1, "explicit": len(self.sets), "top": len(self.k), "random": len(self.k) * len(self.seeds),
                "layer": len(self.layers)}[self.select]  # fmt: skip


class Study(_Strict):
    """A whole study file."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    description: str = ""
    repetitions: Annotated[int, Field(ge=1, le=MAX_UNITS)] = 1
    model: ModelConfig = ModelConfig()
    task: Task
    ablation: Ablation = Ablation()
    grid: list[GridEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _families_and_size(self):
        labels: dict[str, int] = {}
        for i, g in enumerate(self.grid):
            if g.label in labels:
                raise ValueError(f"grid[{labels[g.label]}] and grid[{i}] are both labelled {g.label!r} (their results would "
                                 "merge in the summary): give one of them a distinct `name`")  # fmt: skip
            labels[g.label] = i
        conditions = len(self.task.lengths) * len(self.task.depths) if self.task.kind == "niah" else 1
        units = conditions * self.repetitions * sum(g.n_sets() for g in self.grid)
        if units > MAX_UNITS:
            raise ValueError(f"the study plans {units:,} units ({conditions} conditions × {self.repetitions} repetitions × "
                             f"{sum(g.n_sets() for g in self.grid)} ablation sets); at most {MAX_UNITS:,}")  # fmt: skip
        return self


def load_study(source: str | Path | dict) -> Study:
    """Parse and validate a study (a TOML path, TOML text or a dict). Raises :class:`StudyError` naming
    the key and, for files, its line."""
    text = None
    if isinstance(source, dict):
        data = source
    else:
        path = study_path(source)
        text = read_study_text(path) if path is not None else str(source).removeprefix("\ufeff")  # a BOM is not TOML
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise StudyError(f"study file is not valid TOML: {e}") from None
        except RecursionError:
            raise StudyError("study file is nested too deeply to be a study (arrays or tables inside each other)") from None
    try:
        return Study.model_validate(data)
    except ValidationError as e:
        raise StudyError(_explain(e, text)) from None
    except RecursionError:
        raise StudyError("study is nested too deeply to be a study") from None


def study_path(source: str | Path) -> Path | None:
    """The file a study source names, or ``None`` when it is TOML text. A :class:`~pathlib.Path` is always
    a file; a string is one when it is a single line ending in ``.toml`` or naming something that exists."""
    if isinstance(source, Path):
        return source
    s = str(source)
    if "\n" in s or "=" in s and not s.endswith(".toml"):
        return None
    path = Path(s)
    return path if s.endswith(".toml") or path.exists() or "/" in s or "\\" in s else None


def read_study_text(path: Path) -> str:
    """A study file's text (UTF-8, a leading byte order mark dropped), or a :class:`StudyError` saying why not."""
    if path.is_dir():
        raise StudyError(f"{path} is a directory; give the study file (TOML), e.g. {path / 'study.toml'}")
    if not path.is_file():
        raise StudyError(f"study file not found: {path}")
    try:
        return path.read_bytes().decode("utf-8-sig")  # Windows editors start UTF-8 files with a BOM: accepted, dropped
    except UnicodeDecodeError as e:
        raise StudyError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                         "save the study file as UTF-8") from None  # fmt: skip
    except OSError as e:
        raise StudyError(f"cannot read {path}: {e.strerror or e}") from None


def _explain(error: ValidationError, text: str | None) -> str:
    lines = []
    for err in error.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p in _TASK_KINDS)]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append("kind")  # the discriminator itself is the offending key
        key = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[") or "(top level)"
        where = _line_of(text, loc) if text else None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}{f' (line {where})' if where else ''}: {msg}")
    return "invalid study file:\n" + "\n".join(lines)


_TASK_KINDS = ("niah", "loss", "logit_diff", "generation_match")
_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.]+)\s*\]\s*(#.*)?$")
_ARRAY_TABLE = re.compile(r"^\s*\[\[\s*([A-Za-z0-9_.]+)\s*\]\]\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_]+)\s*=")


def _line_of(text: str, loc: list) -> int | None:
    """Best-effort line of ``loc`` (e.g. ``["grid", 1, "k"]``) in a TOML text: the key's line, else its table's."""
    keys = [p for p in loc if isinstance(p, str)]
    index = next((p for p in loc if isinstance(p, int)), None)
    table, count, best = "", {}, None
    for n, line in enumerate(text.splitlines(), 1):
        if m := _ARRAY_TABLE.match(line):
            table = m.group(1)
            count[table] = count.get(table, -1) + 1
            here = table.split(".")
            if here == keys[: len(here)] and (index is None or count[table] == index):
                best = best or n
            continue
        if m := _TABLE.match(line):
            table = m.group(1)
            if table.split(".") == keys[: len(table.split("."))]:
                best = best or n
            continue
        if m := _KEY.match(line):
            path = (table.split(".") if table else []) + [m.group(1)]
            same_item = index is None or count.get(table, 0) == index or table not in count
            if same_item and path == keys[: len(path)] and len(path) == len(keys):
                return n
            if same_item and not table and path == keys[:1]:
                best = best or n
    return best
