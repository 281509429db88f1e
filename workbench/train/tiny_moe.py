"""Train the zoo's tiny MoE language model on CPU: ``python -m workbench.train.tiny_moe``.

A 4-layer Qwen3-MoE (8 experts, top-2, hidden 128) with a 1024-token byte-level BPE trained on the
mixed-domain corpus (:mod:`workbench.models.zoo.corpus`). Every batch holds a fixed number of sequences of
each domain (:data:`MIX`). Writes ``config.json``, ``model.safetensors``, the tokenizer files and ``train_log.txt``
(losses, timing, per-domain expert load, domain specialisation) into ``--out``. The corpus is small, so
held-out loss is measured every ``--eval-every`` steps and the best checkpoint is the one saved.
"""
from __future__ import annotations

import argparse
import math
import platform
import random
import time
from pathlib import Path

import torch

from ..models.zoo import MODELS, ZOO_DIR
from ..models.zoo.corpus import DOMAINS, load_corpus

DEFAULT_OUT = ZOO_DIR / MODELS["tiny-moe"]
MODEL = dict(
    hidden_size=128,
    intermediate_size=256,  # unused: every layer is sparse
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    router_aux_loss_coef=0.01,
)


#: sequences of each domain per batch (16): the small German text gets fewer so it is not memorised first
MIX = {"english": 4, "german": 2, "python": 5, "arithmetic": 5}


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with ``<pad>``=0, ``<s>``=1 (prepended), ``</s>``=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tk.train_from_iterator(texts, trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", name_or_path="workbench-zoo-tiny-moe"
    )


def _batch(streams: dict[str, torch.Tensor], mix: dict[str, int], seq: int, bos: int, rng: random.Random) -> torch.Tensor:
    rows = []
    for d in DOMAINS:
        s = streams[d]
        for _ in range(mix[d]):
            i = rng.randrange(0, len(s) - seq)
            rows.append(torch.cat([torch.tensor([bos]), s[i : i + seq - 1]]))
    return torch.stack(rows)


@torch.no_grad()
def held_out_loss(hf, val: dict[str, torch.Tensor], seq: int, bos: int) -> dict[str, float]:
    """Mean next-token loss per domain on the held-out tail of each corpus file (chunks of ``seq``)."""
    was_training = hf.training
    hf.eval()
    out = {}
    for d in DOMAINS:
        s = val[d]
        ids = torch.stack([torch.cat([torch.tensor([bos]), s[i : i + seq - 1]]) for i in range(0, len(s) - seq, seq)][:8])
        out[d] = float(hf(input_ids=ids, labels=ids).loss)
    hf.train(was_training)
    return out


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(m, val: dict[str, torch.Tensor], seq: int, log) -> None:
    """Per-domain held-out loss, per-domain expert load per layer and domain specialisation —
    measured with workbench's own Routing probe on the saved model."""
    import workbench as wb

    hf, tok = m.hf, m.tokenizer
    labels = []
    for d, loss in held_out_loss(hf, val, seq, tok.bos_token_id).items():
        log(f"  held-out loss {d:<10} {loss:.3f}")
    with wb.capture(m, wb.Routing()) as cap:
        for di, d in enumerate(DOMAINS):
            s = val[d]
            ids = torch.stack([torch.cat([torch.tensor([tok.bos_token_id]), s[i : i + seq - 1]]) for i in range(0, len(s) - seq, seq)][:8])
            hf(input_ids=ids)
            labels.append(torch.full((ids.numel(),), di))
    from ..routing import rows

    rec = rows(cap)
    labels = torch.cat(labels)
    assert rec.verified, rec.check()
    log("per-domain expert load (% of top-2 assignments; 12.5 = uniform):")
    for li, layer in enumerate(rec.layers):
        log(f"  layer {layer}:  " + " ".join(f"e{e:<5}" for e in range(rec.n_experts)))
        for di, d in enumerate(DOMAINS):
            ex = rec.experts[li][labels == di]
            load = torch.bincount(ex.flatten(), minlength=rec.n_experts).float() / ex.numel() * 100
            log(f"    {d:<10} " + " ".join(f"{v:5.1f} " for v in load.tolist()))
    spec = wb.routing.specialisation(rec, labels, min_count=1)
    tok_spec = wb.routing.token_specialisation(rec)
    log("domain specialisation per layer (share of top-1 routing entropy explained by the domain, chance-corrected):")
    for row, trow in zip(spec.itertuples(), tok_spec.itertuples()):
        log(f"  layer {row.layer}: domain {row.score:.3f} (I={row.mi:.3f} of H={row.h_choice:.3f} bits); token id {trow.score:.3f}")


@torch.no_grad()
def sample(hf, tok, log) -> None:
    prompts = {"english": "The old lighthouse", "german": "Am Morgen ist der", "python": "def wrap(text, width", "arithmetic": "37 + 45 ="}
    for d, p in prompts.items():
        ids = torch.tensor([tok.encode(p)])
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0)
        log(f"  {d:<10} {p!r} -> {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=50, help="held-out evaluation; the best checkpoint is kept")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--mix", default=",".join(f"{d}={n}" for d, n in MIX.items()), help="sequences per domain per batch")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch threads; 1 by default: on a 2-core machine whose other core is busy, 2 threads thrash (measured 18x slower)",
    )
    ap.add_argument("--max-minutes", type=float, default=15.0, help="stop early (and say so) past this wall time")
    args = ap.parse_args(argv)
    mix = {d: int(n) for d, n in (kv.split("=") for kv in args.mix.split(","))}
    if sorted(mix) != sorted(DOMAINS):
        ap.error(f"--mix must name every domain: {DOMAINS}")
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    t0 = time.time()
    corpus = load_corpus()
    split = {d: int(len(t) * 0.92) for d, t in corpus.items()}
    tok = train_tokenizer([corpus[d][: split[d]] for d in DOMAINS], args.vocab)
    streams = {d: torch.tensor(tok.encode(corpus[d][: split[d]], add_special_tokens=False)) for d in DOMAINS}
    val = {d: torch.tensor(tok.encode(corpus[d][split[d]:], add_special_tokens=False)) for d in DOMAINS}
    cfg = AutoConfig.for_model(
        "qwen3_moe", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, output_router_logits=True, **MODEL,
    )  # fmt: skip
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    hf = AutoModelForCausalLM.from_config(cfg)
    n_params = sum(p.numel() for p in hf.parameters())
    log(f"workbench tiny-moe training — torch {torch.__version__}, python {platform.python_version()}, {args.threads} threads")
    log(f"args: {vars(args) | {'out': str(args.out)}}")
    log(f"model: qwen3_moe {MODEL}; {n_params / 1e6:.2f}M parameters")
    log(f"tokenizer: byte-level BPE, {len(tok)} tokens; train tokens per domain: "
        + ", ".join(f"{d} {len(streams[d])}" for d in DOMAINS) + "; held-out: " + ", ".join(f"{d} {len(val[d])}" for d in DOMAINS))  # fmt: skip
    opt = torch.optim.AdamW(hf.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    best = (float("inf"), 0, None)  # (mean held-out loss, step, weights): the corpus is small, so keep the best
    hf.train()
    t_train, done = time.time(), 0
    run_lm = run_aux = 0.0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.steps, args.lr, warmup=100)
        x = _batch(streams, mix, args.seq, tok.bos_token_id, rng)
        out = hf(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = float(out.aux_loss.detach())
        run_lm += float(out.loss.detach()) - cfg.router_aux_loss_coef * aux
        run_aux += aux
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            n = args.eval_every if done % args.eval_every == 0 else done % args.eval_every
            msg = f"step {done:5d}  lm loss {run_lm / n:.3f}  balance loss {run_aux / n:.3f}  lr {opt.param_groups[0]['lr']:.2e}"
            ho = held_out_loss(hf, val, args.seq, tok.bos_token_id)
            mean = sum(ho.values()) / len(ho)
            msg += f"  held-out {mean:.3f} (" + " ".join(f"{d[:3]} {v:.2f}" for d, v in ho.items()) + ")"
            if mean < best[0]:
                best = (mean, done, {k: v.detach().clone() for k, v in hf.state_dict().items()})
            log(f"{msg}  {time.time() - t_train:5.0f}s")
            run_lm = run_aux = 0.0
        if (time.time() - t0) / 60 > args.max_minutes:
            log(f"stopping early at step {done}: past --max-minutes {args.max_minutes}")
            break
    train_s = time.time() - t_train
    if best[2] is not None:
        hf.load_state_dict(best[2])
        log(f"keeping the checkpoint of step {best[1]} (best mean held-out loss {best[0]:.3f})")
    batch = sum(mix.values())
    log(f"training: {done} steps × {batch} × {args.seq} tokens in {train_s:.0f}s ({done * batch * args.seq / train_s:.0f} tokens/s)")
    hf.config.output_router_logits = False
    hf.eval().save_pretrained(args.out)
    tok.save_pretrained(args.out)
    import workbench as wb

    m = wb.load(str(args.out))  # evaluate what was saved
    evaluate(m, val, args.seq, log)
    log("greedy samples:")
    sample(m.hf, m.tokenizer, log)
    log(f"total wall time {time.time() - t0:.0f}s; saved to {args.out}")
    (args.out / "train_log.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
