"""The flash path: an online softmax over key tiles small enough to stay in cache, with the compiled C tile
step (:mod:`.native`; torch operations without a compiler); statistics of normalised probabilities take a
second pass over the row block's tiles. Covers every request without probability edits."""
from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels import semantics
from .masks import LazyMask
from .native import native_step
from .reduce import _NEG, _allocate, _allocate_key_mass
from .request import LayerRequest

#: query rows per block on the flash path (bigger blocks: fewer per-block operations, taller matmuls)
FLASH_ROWS = 128
#: keys per score tile: a tile holds B·Hq·FLASH_ROWS·FLASH_KEYS scores (1.7 MB for SmolLM2's 9 heads:
#: it stays in a core's L2 between the score matmul, the step and the P·V matmul)
FLASH_KEYS = 384
#: at most this many row blocks run at once (one single-threaded worker each) on CPU
FLASH_MAX_WORKERS = 8
#: use the compiled tile step when a C compiler is available (False: always the torch step)
NATIVE = True
#: the running centre moves only when a row's running maximum leaves [centre − R, centre + R]:
#: exp(score − centre) ≤ e^R cannot overflow, and tiles after the first rarely pay a rescale
_RECENTRE = 20.0
_UNSEEN = _NEG / 2  # running maximum of a row that has seen no key yet (masked scores are ≈ _NEG)
#: torch step's top-1 in two levels: a tile's n keys form G strided groups of w = n / G (key j0 + t + w·g
#: is in column t of group g); a vectorised max over the groups gives w column maxima per row, and only
#: the winning column's G keys are compared with indices (max with indices is not vectorised in torch)
_GROUP = 16

def flash_covers(request: LayerRequest) -> bool:
    """What :func:`flash_attention` computes: every statistic (lse, entropy, top-k, key columns, spans,
    tiles, key mass, distance moments, row-key probabilities), learned sinks, zero/mean output edits and
    output sums. Edits that change the
    probabilities (uniform, calibrate, mask_keys, streaming) take :func:`general_attention`."""
    return not request.changes_probabilities


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    rows_visible: Callable[[int, int], torch.Tensor],
    q_pos: torch.Tensor,
    kv_offset: int = 0,
    sinks: torch.Tensor | None = None,
    request: LayerRequest | None = None,
    block_rows: int | None = None,
    workers: int | None = None,
    native: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Online softmax over key tiles (the flash-attention recurrence): one score tile per worker, never N×N.

    Per tile: one matmul gives the scores already centred (queries carry a column −centre, keys a column
    of ones); one step finds each row's maximum and its key, turns the scores into unnormalised
    probabilities p = exp(s − centre) in place and sums l = Σ p and U = Σ p·(s − centre) (entropy =
    log l − U / l); one matmul accumulates P·V. The step is a small compiled C function when a compiler
    is available (``native``, default :data:`NATIVE`: two passes over the tile in cache), else torch
    operations. Fully visible tiles are never masked; tiles no row sees are never scored. Statistics
    of the normalised probabilities (spans, tiles, key mass, top-k > 1) take a second pass over the row
    block's tiles once its normaliser is known (scores again, then exp(s − lse)). Row blocks
    run on ``workers`` single-threaded workers (default: torch's thread count) so the per-tile Python
    work of one overlaps the arithmetic of another. Same contract as :func:`chunked_attention` for the
    requests :func:`flash_covers`.
    """
    request = request or LayerRequest()
    assert flash_covers(request), "flash_attention: this request needs general_attention"
    job = _FlashJob(q, k, v, scale, rows_visible, q_pos, kv_offset, sinks, request, block_rows, NATIVE if native is None else native)
    starts = list(range(0, job.M, job.R))[::-1]  # causal: the last blocks cost most; start them first
    if workers is None:
        workers = torch.get_num_threads() if q.device.type == "cpu" else 1
    workers = max(1, min(workers, len(starts), FLASH_MAX_WORKERS))
    if workers == 1:
        ws = job.workspace()
        for i0 in starts:
            job.run(i0, ws)
    else:
        _run_parallel(job, starts, workers)
    job.gather()
    out, stats = job.out, job.stats
    out = semantics.apply_output_edits(out, request.edits, q_pos)
    if request.record_outputs:
        stats["output_sum"] = out.double().sum(dim=(0, 2))
        stats["output_count"] = torch.tensor(job.B * job.M, device=q.device)
    return out, stats


class _FlashJob:
    """One layer call on the flash path: shared inputs and outputs; :meth:`run` does one row block."""

    def __init__(self, q, k, v, scale, rows_visible, q_pos, kv_offset, sinks, request, block_rows, native: bool):
        B, Hq, M, D = q.shape
        Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[-1]
        self.B, self.Hkv, self.rep, self.M, self.N, self.D, self.Dv = B, Hkv, Hq // Hkv, M, N, D, Dv
        self.BH = B * Hkv
        self.cdt = cdt = torch.promote_types(q.dtype, torch.float32)
        self.dev = dev = q.device
        self.R = max(1, min(M, block_rows or FLASH_ROWS))
        self.K = FLASH_KEYS * max(1, FLASH_ROWS // self.R)  # fewer rows (decode steps): longer tiles, same buffer
        self.q, self.scale, self.kv_offset = q.to(cdt), scale, kv_offset  # scaled in the compute dtype
        ka = torch.empty(self.BH, N, D + 1, dtype=cdt, device=dev)  # keys and a column of ones: q·k − centre in one matmul
        ka.view(B, Hkv, N, D + 1)[..., :D] = k
        ka[..., D] = 1.0
        self.kat = ka.transpose(1, 2)
        self.vv = v.reshape(self.BH, N, Dv).to(cdt)
        self.sinks = None if sinks is None else sinks.to(cdt).view(1, Hkv, self.rep, 1)
        self.out = torch.empty(B, Hq, M, Dv, dtype=v.dtype, device=dev)
        self.rec, self.request, self.q_pos = request.record, request, q_pos.to(dev)
        self.stats = _allocate(request, B, Hq, M, dev) if request.record else {}
        self.second = request.record and (
            request.topk > 1 or request.spans is not None or bool(request.tiles) or request.key_mass or request.distance_moments or request.row_keys is not None
        )
        self.workspaces: list[dict] = []  # per worker: key-mass sums and tile pieces, merged by gather()
        self.key_pos = torch.arange(N, device=dev) + kv_offset
        self.cols = None
        if request.record and request.key_columns is not None:
            local = request.key_columns.to(dev) - kv_offset
            self.cols = (local.clamp(0, max(N - 1, 0)), (local >= 0) & (local < N))
        self.blocks = _flash_blocks(rows_visible, N, self.R, self.K, self.cols, cdt)
        self.step = native_step(cdt) if native and dev.type == "cpu" else None
        self._tiles: dict = {}

    def workspace(self) -> dict:
        f = dict(dtype=self.cdt, device=self.dev)
        rows = self.rep * self.R
        ws = {"qa": torch.empty(self.BH, rows, self.D + 1, **f), "s": torch.empty(self.BH * rows * self.K, **f), "views": {}}
        if self.step is None:
            ws["p"] = torch.empty(self.BH * rows * self.K, **f)
        if self.rec and self.request.key_mass:  # summed over row blocks: one accumulator per worker, no races
            _allocate_key_mass(ws, self.B, self.Hkv * self.rep, self.N, self.dev)
        ws["tiles"] = {}
        self.workspaces.append(ws)
        return ws

    def gather(self) -> None:
        """Merge what the workers accumulated apart: key mass sums, tile pieces in row order."""
        if not self.rec:
            return
        st = self.stats
        if self.request.key_mass:
            _allocate_key_mass(st, self.B, self.Hkv * self.rep, self.N, self.dev)
            for ws in self.workspaces:
                st["key_mass"] += ws["key_mass"]
                st["key_count"] += ws["key_count"]
        for t in range(len(self.request.tiles)):
            pieces = sorted(((i0, piece) for ws in self.workspaces for (tt, i0), piece in ws["tiles"].items() if tt == t), key=lambda x: x[0])
            st[f"tile{t}"] = [piece for _, piece in pieces]

    def _tile(self, j0: int, j1: int):
        """Keys ``[BH, D+1, n]`` and values ``[BH, n, Dv]`` of one key tile (slices shared by all row blocks)."""
        t = self._tiles.get((j0, j1))
        if t is None:
            t = self._tiles[(j0, j1)] = (self.kat[:, :, j0:j1], self.vv[:, j0:j1])
        return t

    def run(self, i0: int, ws: dict) -> None:
        B, Hkv, rep, D, Dv, BH, dev, cdt = self.B, self.Hkv, self.rep, self.D, self.Dv, self.BH, self.dev, self.cdt
        i1 = min(self.M, i0 + self.R)
        c = i1 - i0
        rows = rep * c
        tiles, colvis = self.blocks(i0, i1)
        qv = ws["qa"][:, :rows]
        torch.mul(self.q[:, :, i0:i1].unflatten(1, (Hkv, rep)), self.scale, out=qv.view(B, Hkv, rep, c, D + 1)[..., :D])
        r = _Rows(
            qv=qv,
            sums=torch.zeros(2, len(tiles) + 1, BH, rows, dtype=cdt, device=dev),  # l and U per tile; slot 0: the sink
            acc=torch.zeros(BH, rows, Dv, dtype=cdt, device=dev),
            m=torch.full((BH, rows), _UNSEEN, dtype=cdt, device=dev),  # running maximum over keys, centred
            top=torch.full((BH, rows), -1, dtype=torch.long, device=dev),  # its key
            centre=torch.zeros((BH, rows), dtype=cdt, device=dev),
        )
        if self.sinks is not None:  # the sink slot: centre on it; it holds mass e^0 = 1 and adds 0 to U
            r.centre.copy_(self.sinks.expand(B, Hkv, rep, c).reshape(BH, rows))
            r.sums[0, 0] = 1.0
        torch.neg(r.centre, out=qv[..., D])
        (self._scan_native if self.step is not None else self._scan_torch)(r, tiles, ws, c, rows)
        self._finish(r, i0, i1, c, colvis, tiles, ws)

    def _scores(self, r: "_Rows", ws: dict, rows: int, c: int, j0: int, j1: int, bias) -> tuple[torch.Tensor, torch.Tensor]:
        """Centred scores of one tile into the workspace (masked where ``bias`` says), and its values."""
        n = j1 - j0
        s = ws["views"].get((rows, n))
        if s is None:
            s = ws["views"][(rows, n)] = ws["s"][: self.BH * rows * n].view(self.BH, rows, n)
        kt, vt = self._tile(j0, j1)
        torch.bmm(r.qv, kt, out=s)
        if bias is not None:
            s.view(self.B, self.Hkv, self.rep, c, n).add_(bias)
        return s, vt

    def _scan_native(self, r: "_Rows", tiles, ws: dict, c: int, rows: int) -> None:
        d = torch.empty_like(r.m)
        allow_down = int(self.sinks is None)
        m_p, top_p, d_p, n_rows = r.m.data_ptr(), r.top.data_ptr(), d.data_ptr(), self.BH * rows
        step = self.step if not _profiling() else _profiled(self.step)
        for t, (j0, j1, bias) in enumerate(tiles, 1):
            s, vt = self._scores(r, ws, rows, c, j0, j1, bias)
            moved = step(
                s.data_ptr(), n_rows, j1 - j0, m_p, top_p, j0, _RECENTRE, allow_down, r.sums[0, t].data_ptr(), r.sums[1, t].data_ptr(), d_p
            )  # fmt: skip
            if moved:
                r.shift(d, t)
            r.acc.baddbmm_(s, vt)

    def _scan_torch(self, r: "_Rows", tiles, ws: dict, c: int, rows: int) -> None:
        BH = self.BH
        low = self.sinks is None  # some row has seen no key yet: its centre may sit far above its scores
        l_t, u_t = r.sums[0].unbind(0), r.sums[1].unbind(0)
        for t, (j0, j1, bias) in enumerate(tiles, 1):
            s, vt = self._scores(r, ws, rows, c, j0, j1, bias)
            n = j1 - j0
            if n % _GROUP == 0 and n > _GROUP:  # max over groups (vectorised), then the winning column's keys
                w = n // _GROUP
                s4 = s.view(BH, rows, _GROUP, w)
                bm, bt = s4.amax(2).max(-1)
                grp = s4.gather(3, bt.view(BH, rows, 1, 1).expand(BH, rows, _GROUP, 1))
                bj = torch.add(bt, grp.view(BH, rows, _GROUP).argmax(-1), alpha=w)
            else:
                bm, bj = s.max(-1)
            better = bm > r.m
            r.m = torch.where(better, bm, r.m)
            r.top = torch.where(better, bj.add_(j0), r.top)
            if low:
                move = (r.m > _RECENTRE) | ((r.m < -_RECENTRE) & (r.m > _UNSEEN))
                low = not bool((r.m > _UNSEEN).all())
            else:
                move = r.m > _RECENTRE
            if bool(move.any()):
                d = torch.where(move, r.m, 0.0)
                s.sub_(d[..., None])
                r.m = torch.where(move, 0.0, r.m)
                r.shift(d, t)
            p = ws["p"][: s.numel()].view_as(s)
            torch.exp(s, out=p)
            torch.sum(p, -1, out=l_t[t])
            torch.mul(p, s, out=s)
            torch.sum(s, -1, out=u_t[t])
            r.acc.baddbmm_(p, vt)

    def _finish(self, r: "_Rows", i0: int, i1: int, c: int, colvis, tiles, ws: dict) -> None:
        B, Hkv, rep = self.B, self.Hkv, self.rep
        l, u = r.sums.sum(1)
        if self.second:
            self._second_pass(r, i0, i1, c, tiles, ws, torch.where(l > 0, torch.log(l), 0.0))
        tiny = torch.finfo(self.cdt).tiny
        unflat = lambda x: x.view(B, Hkv, rep, c, *x.shape[2:]).flatten(1, 2)
        self.out[:, :, i0:i1] = unflat(r.acc / l.clamp_min(tiny)[..., None])
        if not self.rec:
            return
        st = self.stats
        seen = l > 0
        log_l = torch.log(l)
        st["lse"][:, :, i0:i1] = unflat(torch.where(seen, r.centre + log_l, float("-inf")))
        st["entropy"][:, :, i0:i1] = unflat(torch.where(seen, log_l - u / l.clamp_min(tiny), 0.0))
        found = r.m > _UNSEEN
        if self.request.topk == 1:
            st["topk_idx"][:, :, i0:i1, 0] = unflat(torch.where(found, r.top + self.kv_offset, -1))
            st["topk_prob"][:, :, i0:i1, 0] = unflat(torch.where(found, torch.exp(r.m - log_l), 0.0))
        if self.cols is not None:
            sc = r.qv @ self.kat[:, :, self.cols[0]]  # centred scores of the tracked keys [BH, rows, nk]
            pc = torch.exp(sc - log_l[..., None]).view(B, Hkv, rep, c, -1)
            st["col_prob"][:, :, i0:i1] = pc.masked_fill(~colvis[:, None, None], 0.0).flatten(1, 2)
            st["col_visible"][:, i0:i1] = colvis.expand(B, -1, -1)

    def _second_pass(self, r: "_Rows", i0: int, i1: int, c: int, tiles, ws: dict, log_l: torch.Tensor) -> None:
        """Normalised probabilities p = exp(s − centre − log l), tile by tile, for the statistics that
        read them: top-k > 1 (merged across tiles), span mass, tiles, key mass, distance moments and row keys."""
        B, Hkv, rep, BH, request, st = self.B, self.Hkv, self.rep, self.BH, self.request, self.stats
        Hq, rows = Hkv * rep, rep * c
        qp = self.q_pos[i0:i1]
        k = request.topk
        top_v = torch.full((BH, rows, k), _NEG, dtype=self.cdt, device=self.dev) if k > 1 else None
        top_i = torch.zeros((BH, rows, k), dtype=torch.long, device=self.dev) if k > 1 else None
        spans = None
        if request.spans is not None:
            sp = request.spans.to(self.dev)
            spans = (sp, torch.zeros(B, Hq, c, sp.shape[0], dtype=self.cdt, device=self.dev))
        zeros = lambda *shape: torch.zeros(*shape, dtype=self.cdt, device=self.dev)
        moments = zeros(2, B, Hq, c) if request.distance_moments else None
        row_keys = None if request.row_keys is None else (request.row_keys[:, i0:i1].to(self.dev).expand(B, -1), zeros(B, Hq, c))
        valid = request.query_valid[:, i0:i1].to(self.dev) if request.key_mass and request.query_valid is not None else None
        pieces = {}
        for t, (q0, q1, k0, k1) in enumerate(request.tiles):
            sel = (qp >= q0) & (qp < q1)
            if bool(sel.any()):
                pieces[t] = (sel, torch.zeros(B, Hq, int(sel.sum()), k1 - k0, dtype=torch.float32, device=self.dev))
        for j0, j1, bias in tiles:
            n = j1 - j0
            s, _ = self._scores(r, ws, rows, c, j0, j1, bias)
            s.sub_(log_l[..., None])  # log-probabilities; hidden keys stay ≈ −1e30
            if top_v is not None:
                tv, ti = s.topk(min(k, n), dim=-1)
                top_v, pick = torch.cat([top_v, tv], -1).topk(k, dim=-1)
                top_i = torch.cat([top_i, ti + j0], -1).gather(-1, pick)
            p = s.exp_().view(B, Hq, c, n)
            kp = self.key_pos[j0:j1]
            if spans is not None:
                sp, acc = spans
                acc += torch.einsum("bhcn,scn->bhcs", p, semantics.span_membership(sp, qp, kp).to(p.dtype))
            if moments is not None:
                moments += torch.stack(semantics.distance_moments(p, qp, kp))
            if row_keys is not None:
                row_keys[1].add_(semantics.row_key_prob(p, row_keys[0], kp))
            for t, (sel, piece) in pieces.items():
                q0, q1, k0, k1 = request.tiles[t]
                a, b = max(k0, j0 + self.kv_offset), min(k1, j1 + self.kv_offset)
                if a < b:
                    lo = j0 + self.kv_offset
                    piece[..., a - k0 : b - k0] = p[:, :, sel][..., a - lo : b - lo].float()
            if request.key_mass:  # padding query rows (query_valid False) see real keys but are not counted
                vis = torch.ones(1, c, n, dtype=torch.bool, device=self.dev) if bias is None else bias[:, 0, 0] == 0
                if valid is not None:
                    p, vis = p * valid[:, None, :, None], vis & valid[..., None]
                ws["key_mass"][..., j0:j1] += p.sum(2).double()
                ws["key_count"][:, j0:j1] += vis.sum(1)  # rows that see each key [B|1, n]
        unflat = lambda x: x.view(B, Hkv, rep, c, *x.shape[2:]).flatten(1, 2)
        if top_v is not None:
            ok = top_v > _NEG / 2
            st["topk_idx"][:, :, i0:i1] = unflat(torch.where(ok, top_i + self.kv_offset, -1))
            st["topk_prob"][:, :, i0:i1] = unflat(torch.where(ok, torch.exp(top_v), 0.0)).float()
        if spans is not None:
            st["span_mass"][:, :, i0:i1] = spans[1]
        if moments is not None:
            st["dist_sum"][:, :, i0:i1], st["dist_sq_sum"][:, :, i0:i1] = moments.float()
        if row_keys is not None:
            st["row_key_prob"][:, :, i0:i1] = row_keys[1].float()
        for t, (sel, piece) in pieces.items():
            ws["tiles"][(t, i0)] = (qp[sel], piece)


def _profiling() -> bool:
    return torch.autograd.profiler._is_profiler_enabled


def _profiled(fn):
    """The C step shows up in torch.profiler tables as ``flash_step (C)``."""

    def call(*args):
        with torch.profiler.record_function("flash_step (C)"):
            return fn(*args)

    return call


@dataclass
class _Rows:
    """Running state of one row block (rows ordered kv head, query head in group, row)."""

    qv: torch.Tensor  # scaled queries and −centre [BH, rows, D+1]
    sums: torch.Tensor  # [2, tiles+1, BH, rows]: l and U of each tile, relative to the current centre
    acc: torch.Tensor  # Σ p·v [BH, rows, Dv]
    m: torch.Tensor  # running maximum score, centred
    top: torch.Tensor  # its key index
    centre: torch.Tensor

    def shift(self, d: torch.Tensor, t: int) -> None:
        """The centre moved by ``d`` (already applied to tile ``t`` and to ``m``): rescale what came before.
        A row moves down only on the tile where it sees its first key (nothing before to rescale)."""
        alpha = torch.exp(-d.clamp_min(0))  # e^−d would overflow for a large downward move (times l = 0: NaN)
        self.sums[1, :t].sub_(d * self.sums[0, :t]).mul_(alpha)  # U' = e^−d (U − d·l)
        self.sums[0, :t].mul_(alpha)
        self.acc.mul_(alpha[..., None])
        self.centre.add_(d)
        torch.neg(self.centre, out=self.qv[..., -1])


_POOL: list = [None, 0, None]  # pid, size, executor


def _run_parallel(job: _FlashJob, starts: list[int], workers: int) -> None:
    """Row blocks on ``workers`` pool threads, each single-threaded (torch ops and the C step release the GIL)."""
    if _POOL[0] != os.getpid() or _POOL[1] < workers:  # a forked child has no pool threads: make its own
        if _POOL[2] is not None and _POOL[0] == os.getpid():
            _POOL[2].shutdown(wait=False)
        _POOL[:] = [os.getpid(), workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="workbench-flash")]
    queue, lock = iter(starts), threading.Lock()
    threads, inference = torch.get_num_threads(), torch.is_inference_mode_enabled()

    def work() -> None:
        torch.set_num_threads(1)
        try:
            with torch.inference_mode() if inference else torch.no_grad():
                ws = job.workspace()
                while True:
                    with lock:
                        i0 = next(queue, None)
                    if i0 is None:
                        return
                    job.run(i0, ws)
        finally:
            torch.set_num_threads(threads)  # per-thread setting; also what threads started later inherit

    for f in [_POOL[2].submit(work) for _ in range(workers)]:
        f.result()


#: per LazyMask (one per forward, shared by every layer): its row blocks' tiles, computed once
_BLOCK_MEMO: "weakref.WeakKeyDictionary[LazyMask, dict]" = weakref.WeakKeyDictionary()


def _flash_blocks(rows_visible, N: int, R: int, K: int, cols, cdt) -> Callable:
    """``blocks(i0, i1) -> (tiles, colvis)``: the key tiles ``(j0, j1, bias)`` rows ``i0:i1`` must score
    (bias ``[B|1, 1, 1, c, n]``: 0 where visible, −1e30 elsewhere; None when every row sees every key of
    the tile; tiles no row sees are left out) and the visibility ``[B|1, c, nk]`` of the tracked key
    columns. Memoised on a :class:`LazyMask`: a forward's visibility is evaluated once, not once per layer."""
    owner = getattr(rows_visible, "__self__", None)
    memo = None
    if isinstance(owner, LazyMask) and getattr(rows_visible, "__func__", None) is LazyMask.rows:
        key = (N, R, K, cdt, None if cols is None else (tuple(cols[0].tolist()), tuple(cols[1].tolist())))
        memo = _BLOCK_MEMO.setdefault(owner, {}).setdefault(key, {})

    def blocks(i0: int, i1: int):
        if memo is not None and (i0, i1) in memo:
            return memo[(i0, i1)]
        vis = rows_visible(i0, i1).bool()  # [B|1, 1, c, N]
        Bv, c = vis.shape[0], i1 - i0
        flat = vis.reshape(Bv * c, N).view(torch.uint8)  # uint8 reductions are vectorised, bool ones are not
        seen_cols = flat.amax(0)
        tiles = []
        nz = seen_cols.nonzero()
        if nz.numel():
            lo, hi = int(nz[0]), int(nz[-1]) + 1
            for j0 in range(lo, hi, K):
                j1 = min(hi, j0 + K)
                if not int(seen_cols[j0:j1].amax()):
                    continue
                bias = None
                if not int(flat[:, j0:j1].amin()):
                    bias = torch.where(vis[..., j0:j1], 0.0, _NEG).to(cdt).unsqueeze(2)
                tiles.append((j0, j1, bias))
        colvis = None if cols is None else vis[:, 0][..., cols[0]] & cols[1]
        res = (tiles, colvis)
        if memo is not None:
            memo[(i0, i1)] = res
        return res

    return blocks
