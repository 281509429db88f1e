"""``PatternView``: every head's exact attention pattern for short prompts, the row view beyond."""
from __future__ import annotations

import base64

import torch
import traitlets

from ...base.errors import ProbeError
from ._base import esm
from .attention_view import AttentionView
from ...measure.drilldown import Drilldown

#: prompts up to this many tokens get every head's whole pattern; longer ones the row view
MAX_PATTERN_TOKENS = 512
#: a thumbnail is at most this many cells wide (longer prompts: the maximum over blocks of cells)
THUMB_CELLS = 64


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().numpy().tobytes()).decode("ascii")


def thumbnails(patterns, size: int = THUMB_CELLS) -> tuple[torch.Tensor, int]:
    """``[layer × head, S, S]`` uint8 thumbnails (``round(255·√p)``) of ``[head, T, T]`` patterns per layer;
    ``S = T`` up to ``size``, beyond that each cell is the maximum over a block (thin lines stay visible)."""
    first = patterns[0]
    T = first.shape[-1]
    k = max(1, -(-T // size))
    out = []
    for p in patterns:
        p = p.float().clamp(0, 1)
        if k > 1:
            p = torch.nn.functional.max_pool2d(p[None], kernel_size=k, stride=k, ceil_mode=True)[0]
        out.append(p)
    grid = torch.cat(out)  # [L*H, S, S]
    return (grid.sqrt() * 255).round().to(torch.uint8), int(grid.shape[-1])


class PatternView(AttentionView):
    """All heads at once, CircuitsVis-style, computed exactly (no N×N matrix beyond the prompt's own).

    Prompts of up to ``max_pattern_tokens`` tokens (default 512): a thumbnail of every head's ``[T, T]``
    pattern from the attention backend's exact tiles (``AttentionStats(tiles=...)``), laid out layer × head;
    click one to enlarge it (``selected = [layer, head]``) — hover a cell to see its query and key tokens,
    hover a token to see its row, click a token to keep it as the query. Longer prompts: the row view of
    :class:`AttentionView` (jump to the query, its top keys, a heat strip of the whole text).

    ``capture``: a capture of this prompt that already holds the tiles (``Drilldown.recording(pattern=True)``)
    — then nothing runs again; otherwise the view runs the prompt once."""

    _esm = esm("attention_rows", "pattern_view")
    mode = traitlets.Unicode("rows").tag(sync=True)  # "pattern" (every head) | "rows" (long prompts)
    thumbs = traitlets.Unicode("").tag(sync=True)  # base64 uint8 [n_layers * n_heads, S, S], √p scaled
    thumb_size = traitlets.Int(0).tag(sync=True)
    pattern = traitlets.Dict().tag(sync=True)  # {layer, head, T, data: base64 float32 [T * T]} — the enlarged head

    def __init__(self, model, text, *, layer: int | None = None, head: int | None = None, capture=None,
                 max_pattern_tokens: int = MAX_PATTERN_TOKENS, drilldown: Drilldown | None = None, chat: bool = False,
                 **kwargs):  # fmt: skip
        self._capture_in = capture
        self.max_pattern_tokens = int(max_pattern_tokens)
        if drilldown is None:
            drilldown = Drilldown(model, model.encode(text, chat=chat))
        self._tiles = None
        if drilldown.T <= self.max_pattern_tokens:
            self._tiles = self._pattern_tiles(model, drilldown, capture)
        if layer is None or head is None:  # open on head 0 of the middle layer
            layer, head = model.spec.n_layers // 2, 0
        super().__init__(model, text, layer=layer, head=head, drilldown=drilldown, chat=chat, **kwargs)

    def _pattern_tiles(self, model, drill: Drilldown, cap) -> list[torch.Tensor]:
        """``[head, T, T]`` per layer, from the backend's tiles (one forward pass unless ``cap`` holds them)."""
        names = [f"blocks.{l}.attn.tile.0" for l in range(model.spec.n_layers)]
        if cap is None or not all(n in cap for n in names):
            if cap is not None:
                raise ProbeError("PatternView: the capture holds no whole-prompt tiles; record it with Drilldown.recording(pattern=True)")
            with torch.no_grad(), drill.recording(pattern=True) as cap:
                model.hf(input_ids=drill.ids.to(model.device), use_cache=False)
        T = drill.T
        tiles = [cap[n][0] for n in names]
        if any(t.shape != (model.spec.n_heads, T, T) for t in tiles):
            raise ProbeError(f"PatternView: the capture's tiles are not whole [head, {T}, {T}] patterns of this prompt")
        if not drill.layers:
            drill.take(cap)  # the same pass kept the queries and keys: clicks cost no forward pass
        return tiles

    def _setup(self, kwargs) -> None:
        if self._tiles is not None:
            thumbs, size = thumbnails(self._tiles)
            kwargs.update(mode="pattern", thumbs=_b64(thumbs), thumb_size=size)
            self._tiles = None  # the thumbnails and the cached queries/keys are all the view keeps

    @traitlets.observe("selected")
    def _enlarge(self, change):
        if self.mode != "pattern":
            return
        layer, head = self.layer, self.head
        self._compute(f"pattern of L{layer}H{head}", lambda: self._pattern_payload(layer, head), lambda p: setattr(self, "pattern", p))

    def _pattern_payload(self, layer: int, head: int) -> dict:
        p = self.drill.pattern(layer, head, max_tokens=self.max_pattern_tokens)
        return {"layer": layer, "head": head, "T": int(p.shape[0]), "data": _b64(p.float())}

    def pattern_of(self, layer: int, head: int) -> torch.Tensor:
        """The exact ``[T, T]`` pattern of one head (what the enlarged view draws)."""
        return self.drill.pattern(layer, head, max_tokens=max(self.max_pattern_tokens, self.drill.T))

    def thumbnail(self, layer: int, head: int) -> torch.Tensor:
        """The uint8 thumbnail the view draws for one head ``[S, S]``."""
        self.model.spec.check_head(layer, head, what="PatternView")
        if not self.thumbs:
            raise ProbeError("PatternView: this prompt is drawn as rows (longer than max_pattern_tokens): no thumbnails")
        raw = torch.frombuffer(bytearray(base64.b64decode(self.thumbs)), dtype=torch.uint8)
        S = self.thumb_size
        return raw.view(-1, S, S)[layer * self.model.spec.n_heads + head]
