"""Token labels people can read: a token that is only part of a UTF-8 character (byte-level BPE splits
"日" or, with a byte tokenizer, "ß" into several tokens) decodes alone to "�"; we show its bytes instead
(``\\xe6\\x97``) and say which character they belong to."""
from __future__ import annotations

import re
from functools import lru_cache

import torch

REPLACEMENT = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 bytes), inverted."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The raw bytes of one token when the tokenizer is byte-level (GPT-2 style) or has byte fallback."""
    try:
        piece = tokenizer.convert_ids_to_tokens(int(token_id))
    except Exception:  # noqa: BLE001 — a tokenizer without the method: no bytes
        return None
    if not isinstance(piece, str) or not piece:
        return None
    m = _BYTE_TOKEN.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    dec = _byte_decoder()
    if all(c in dec for c in piece):
        return bytes(dec[c] for c in piece)
    return None


def _escape(b: bytes) -> str:
    """Bytes as text, the bytes that are not whole UTF-8 characters as ``\\xNN``."""
    return b.decode("utf-8", errors="backslashreplace")


def token_labels(tokenizer, ids) -> tuple[list[str], list[str]]:
    """``(labels, notes)`` per token: ``labels`` what a view draws (the decoded text, or ``\\xNN`` bytes for a
    token that is part of a character), ``notes`` a hover text for those tokens ("" otherwise)."""
    ids = [int(i) for i in (ids.flatten().tolist() if isinstance(ids, torch.Tensor) else ids)]
    labels = [tokenizer.decode([i]) for i in ids]
    notes = [""] * len(ids)
    raw: list[bytes | None] = [None] * len(ids)
    for i, (tid, text) in enumerate(zip(ids, labels)):
        if REPLACEMENT in text:
            raw[i] = token_bytes(tokenizer, tid)
            if raw[i] is not None:
                labels[i] = _escape(raw[i])
                notes[i] = f"bytes {raw[i].hex(' ')} (part of a character)"
    # runs of partial tokens that together make characters: name them
    i = 0
    while i < len(ids):
        if raw[i] is None:
            i += 1
            continue
        j = i
        while j < len(ids) and raw[j] is not None:
            j += 1
        start = i
        while start < j:  # the shortest prefix of the run that decodes, then the rest
            for end in range(start + 1, j + 1):
                chunk = b"".join(raw[start:end])  # type: ignore[arg-type]
                try:
                    char = chunk.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                n = end - start
                for k in range(start, end):
                    notes[k] = f"bytes {raw[k].hex(' ')}: token {k - start + 1} of {n} of {char!r}"  # type: ignore[union-attr]
                start = end
                break
            else:
                start += 1
        i = j
    return labels, notes
