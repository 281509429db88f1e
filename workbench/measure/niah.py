"""Needle-in-a-haystack cases: the shipped haystack and needles, insertion at sentence boundaries,
prompts built so the needle's token span is known exactly."""
from __future__ import annotations

import json
import warnings
import weakref
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Callable, Sequence

import torch

from ..base.errors import ProbeError

INSTRUCTION = "Read the document and answer the question with the sentence from the document that answers it."


@dataclass(frozen=True)
class Needle:
    """An arbitrary fact (``needle``), the ``question`` it answers and the exact ``answer`` span."""

    id: str
    needle: str
    question: str
    answer: str


@dataclass(frozen=True)
class NIAHCase:
    """One test: prompt token ids with the needle at ``needle_span`` (token positions, end exclusive)."""

    needle: Needle
    length: int  # requested context length in tokens (the prompt's total length)
    depth: float  # percent of the haystack before the needle, 0..100
    input_ids: torch.Tensor  # [1, T]
    needle_span: tuple[int, int]


@lru_cache(maxsize=1)
def needles() -> tuple[Needle, ...]:
    """The needles shipped in ``workbench/data/needles.json`` (written for this project, CC0)."""
    raw = json.loads(resources.files("workbench").joinpath("data/needles.json").read_text())
    return tuple(Needle(**{k: n[k] for k in ("id", "needle", "question", "answer")}) for n in raw)


@lru_cache(maxsize=1)
def haystack() -> str:
    """The shipped haystack: original essays in ``workbench/data/haystack`` (CC0), in file order."""
    folder = resources.files("workbench").joinpath("data/haystack")
    files = sorted(f for f in folder.iterdir() if f.name.endswith(".txt"))
    return "\n\n".join(f.read_text().strip() for f in files)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _prompt_parts(tokenizer, question: str, adds_bos: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the document: the chat template around ``document + question``."""
    marker = "\u2063WBDOC\u2063"
    tail = f"\n\nQuestion: {question}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{INSTRUCTION}\n\nDocument:\n{marker}{tail}"}], add_generation_prompt=True, tokenize=False
        )
        before, after = text.split(marker)
    else:  # base models: a plain completion prompt
        bos = tokenizer.bos_token if getattr(tokenizer, "bos_token", None) and adds_bos else ""
        before, after = f"{bos}{INSTRUCTION}\n\nDocument:\n", f"{tail}\nAnswer:"
    return _ids(tokenizer, before), _ids(tokenizer, after)


def _sentence_ends(tokenizer, ids: list[int]) -> list[int]:
    """Positions ``p`` such that a sentence ends just before token ``p`` (insertion points)."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    ends = [0]
    for i, piece in enumerate(pieces):
        text = tokenizer.convert_tokens_to_string([piece]) if hasattr(tokenizer, "convert_tokens_to_string") else piece
        if text.rstrip().endswith((".", "!", "?")):
            ends.append(i + 1)
    return ends


MIN_LENGTH = 64  # tokens: a needle, its question and haystack around them (checked before a model loads)


def check_lengths(lengths: Sequence[int], max_new_tokens: int, max_positions: int | None, *,
                  what: str = "context length", minimum: int | None = MIN_LENGTH) -> None:  # fmt: skip
    """The rule for NIAH context lengths: each at least ``minimum`` tokens, and each plus the tokens generated
    after it within the model's positions (lengths are never clipped). ``what`` names the field in messages."""
    for n in lengths:
        if minimum is not None and n < minimum:
            raise ProbeError(f"{what} {n} is too short for a needle-in-a-haystack test (at least {minimum})")
        if max_positions is not None and n + max_new_tokens > max_positions:
            raise ProbeError(f"{what} {n} + {max_new_tokens} new tokens exceeds the model's {max_positions} positions; "
                             f"use lengths ≤ {max_positions - max_new_tokens} (lengths are never clipped silently)")  # fmt: skip


def build_case(model, needle: Needle, length: int, depth: float, *, max_new_tokens: int = 32) -> NIAHCase:
    """A prompt of exactly ``length`` tokens with ``needle`` inserted at the sentence boundary at or
    before ``depth`` percent of the haystack."""
    if not 0 <= depth <= 100:
        raise ProbeError(f"depth must lie in [0, 100] (percent of the document), got {depth}")
    check_lengths([length], max_new_tokens, model.spec.max_positions, minimum=None)  # the library builds short tests too
    tok = model.tokenizer
    before, after = _prompt_parts(tok, needle.question, bool(model.spec.bos and model.spec.bos.adds_bos))
    needle_ids = _ids(tok, " " + needle.needle.strip() + " ")
    room = length - len(before) - len(after) - len(needle_ids)
    if room < 1:
        raise ProbeError(
            f"needle {needle.id!r} and the prompt need {len(before) + len(after) + len(needle_ids) + 1} tokens; "
            f"context length {length} is too short"
        )
    hay = _haystack_ids(tok)
    if room > len(hay):
        raise ProbeError(f"the shipped haystack has {len(hay)} tokens; context length {length} needs {room}")
    hay = hay[:room]
    ends = _sentence_ends(tok, hay)
    target = room * depth / 100
    cut = max(e for e in ends if e <= target)
    ids = before + hay[:cut] + needle_ids + hay[cut:] + after
    start = len(before) + cut
    return NIAHCase(needle, length, float(depth), torch.tensor([ids]), (start, start + len(needle_ids)))


_HAY_CACHE: dict[int, tuple[Callable[[], object], list[int]]] = {}


def _haystack_ids(tokenizer) -> list[int]:
    """The haystack's token ids under ``tokenizer``, cached per tokenizer object. An entry holds a weak
    reference to its tokenizer and is used only while that very object lives: a new tokenizer that reuses a
    freed one's ``id`` gets its own ids, never another vocabulary's."""
    key = id(tokenizer)
    entry = _HAY_CACHE.get(key)
    if entry is None or entry[0]() is not tokenizer:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sequence longer than the model's maximum": we cut it ourselves
            ids = _ids(tokenizer, haystack())
        try:
            ref = weakref.ref(tokenizer, lambda _, key=key: _HAY_CACHE.pop(key, None))
        except TypeError:  # an object without weak references: hold it (its id cannot be reused meanwhile)
            ref = lambda tok=tokenizer: tok  # noqa: E731
        entry = _HAY_CACHE[key] = (ref, ids)
    return entry[1]


def depth_grid(depths: int | list[float]) -> list[float]:
    """``5`` → [0, 25, 50, 75, 100]; a list is validated and kept."""
    if isinstance(depths, int):
        if depths < 1:
            raise ProbeError(f"number of depths must be ≥ 1, got {depths}")
        return [100.0 * i / max(1, depths - 1) for i in range(depths)] if depths > 1 else [50.0]
    out = [float(d) for d in depths]
    if not out:
        raise ProbeError("no depths given")
    for d in out:
        if not 0 <= d <= 100:
            raise ProbeError(f"depth must lie in [0, 100] (percent of the document), got {d}")
    return out
