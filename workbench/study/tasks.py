"""What one unit computes: the study's task under the unit's ablation, one row per test item.

Every row has ``metric`` (the task's number: NIAH 1/0 for ROUGE-1 recall > 0.5, loss in nats, logit
difference, 1/0 generation match) and ``token_ids`` (the exact input, JSON)."""
from __future__ import annotations

import json
import random
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch

from ..measure import niah, retrieval
from ..attention import HeadAblation, head_output_means
from ..core.capture import intervene
from ..routing import ExpertMask
from .config import Study, StudyError
from .plan import Unit

DEFINITIONS = {
    "niah": "NIAH accuracy: ROUGE-1 recall of the greedy answer against the needle > 0.5 (Wu et al. 2024)",
    "loss": "mean next-token cross-entropy (nats) over each text's first max_tokens tokens",
    "logit_diff": "logit(first token of target) - logit(first token of foil) at the prompt's last position",
    "generation_match": "1 if the greedy continuation equals the unablated model's, else 0",
    "rank:heads": "Wu 2024 retrieval score (variant set) on the rank scan; heads ranked best first",
    "rank:experts": "routing load (share of top-k assignments) over the task texts; experts ranked busiest first",
}


def model_kwargs(study: Study) -> dict:
    m = study.model
    place = {"device_map": m.device_map} if m.device_map else {"device": m.device}
    return {"source": None if m.source == "embedded" else m.source, "dtype": m.dtype, **place}


class Evaluator:
    """Runs units on one resident model (a worker keeps one of these), caching what units share:
    mean head outputs for ``mode = "mean"`` and unablated generations for ``generation_match``."""

    def __init__(self, study: Study, model=None):
        from ..models.loading import load

        self.study = study
        self.model = model if model is not None else load(**model_kwargs(study))
        self._means = None
        self._baseline: dict[str, str] = {}
        self.provenance = self.model.provenance.to_dict()

    def run(self, unit: Unit) -> pd.DataFrame:
        if unit.kind == "rank":
            return self._rank(unit)
        if self.study.task.kind == "generation_match":  # baselines first, while nothing is attached
            for prompt in self.study.task.prompts:
                self._baseline_text(prompt)
        with torch.no_grad(), (intervene(self.model, *self._edits(unit)) if unit.targets else nullcontext()):
            return getattr(self, f"_{self.study.task.kind}")(dict(unit.condition), unit.repetition)

    def _edits(self, unit: Unit):
        ab = self.study.ablation
        if ab.target == "experts":
            return (ExpertMask(list(unit.targets)),)
        if ab.mode == "mean" and self._means is None:
            self._means = head_output_means(self.model, self._inputs())
        return (HeadAblation(list(unit.targets), mode=ab.mode, means=self._means if ab.mode == "mean" else None),)

    def _inputs(self) -> list[list[int]]:
        """Token ids of the task texts, cut at ``max_tokens`` (or the model's context)."""
        limit = getattr(self.study.task, "max_tokens", None) or self.model.spec.max_positions or None
        return [self.model.tokenizer.encode(t)[:limit] for t in texts(self.study)]

    # --- rankings -----------------------------------------------------------------------------------
    def _rank(self, unit: Unit) -> pd.DataFrame:
        if self.study.ablation.target == "experts":
            from ..core.capture import capture
            from ..routing import Routing, expert_load

            with capture(self.model, Routing()) as cap:
                for ids in self._inputs():
                    self.model.forward_text(ids)
            load = expert_load(cap)
            layers = list(self.model.spec.moe_layers)
            scores = torch.full((self.model.spec.n_layers, load.shape[1]), float("nan"))
            scores[layers] = load[: len(layers)]
        else:
            r = json.loads(dict(unit.condition)["rank"])
            res = retrieval.scan(self.model, lengths=r["lengths"], depths=r["depths"], n_needles=r["needles"],
                                 max_new_tokens=r["max_new_tokens"], progress=False)  # fmt: skip
            scores = res.scores
        L, U = scores.shape
        frame = pd.DataFrame({"layer": [l for l in range(L) for _ in range(U)], "unit": list(range(U)) * L,
                              "metric": scores.flatten().tolist()})  # fmt: skip
        frame = frame.dropna(subset=["metric"]).sort_values(["metric", "layer", "unit"], ascending=[False, True, True])
        return frame.assign(rank=range(len(frame)), token_ids="[]").reset_index(drop=True)

    # --- tasks ----------------------------------------------------------------------------------------
    def _niah(self, cond: dict, rep: int) -> pd.DataFrame:
        t = self.study.task
        pick = random.Random(rep).sample(range(len(niah.needles())), t.needles)
        rows = []
        for i in pick:
            case = niah.build_case(self.model, niah.needles()[i], int(cond["length"]), cond["depth"], max_new_tokens=t.max_new_tokens)
            r = retrieval.run_case(self.model, case, max_new_tokens=t.max_new_tokens)
            rows.append({"item": r["needle"], "metric": float(r["counted"]), "rouge1_recall": r["rouge1_recall"],
                         "answer_found": r["answer_found"], "output": r["response"], "token_ids": json.dumps(r["token_ids"])})  # fmt: skip
        return pd.DataFrame(rows)

    def _loss(self, cond: dict, rep: int) -> pd.DataFrame:
        rows = []
        for i, ids in enumerate(self._inputs()):
            ids = self.model.encode(ids)
            loss = self.model.hf(input_ids=ids, labels=ids).loss
            rows.append({"item": f"text{i}", "metric": float(loss), "token_ids": json.dumps(ids[0].tolist())})
        return pd.DataFrame(rows)

    def _logit_diff(self, cond: dict, rep: int) -> pd.DataFrame:
        rows = []
        for i, p in enumerate(pairs(self.study)):
            ids = self.model.encode(p["prompt"])
            logits = self.model.hf(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
            a, b = (self._first_token(p[w]) for w in ("target", "foil"))
            rows.append({"item": f"pair{i}", "metric": float(logits[a] - logits[b]), "token_ids": json.dumps(ids[0].tolist())})
        return pd.DataFrame(rows)

    def _generation_match(self, cond: dict, rep: int) -> pd.DataFrame:
        t = self.study.task
        rows = []
        for i, prompt in enumerate(t.prompts):
            out = self.model.generate(prompt, max_new_tokens=t.max_new_tokens, chat=t.chat)
            base = self._baseline_text(prompt)
            rows.append({"item": f"prompt{i}", "metric": float(out == base), "output": out, "baseline": base,
                         "token_ids": json.dumps(self.model.encode(prompt, chat=t.chat)[0].tolist())})  # fmt: skip
        return pd.DataFrame(rows)

    def _baseline_text(self, prompt: str) -> str:
        if prompt not in self._baseline:
            t = self.study.task
            self._baseline[prompt] = self.model.generate(prompt, max_new_tokens=t.max_new_tokens, chat=t.chat)
        return self._baseline[prompt]

    def _first_token(self, text: str) -> int:
        ids = self.model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise StudyError(f"target/foil {text!r} has no tokens")
        return int(ids[0])


def texts(study: Study) -> list[str]:
    """The loss task's texts (also the reference set for mean ablation and expert ranking)."""
    from ..measure.sinks import default_texts

    t = study.task
    if getattr(t, "texts", "essays") == "essays":
        return default_texts(getattr(t, "n_texts", 4))
    path = Path(t.texts)
    if not path.is_file():
        raise StudyError(f"task.texts: file not found: {path}")
    try:
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise StudyError(f"task.texts: cannot read {path} as UTF-8 text ({type(e).__name__}: {e})") from None
    if not lines:
        raise StudyError(f"task.texts: {path} has no non-empty line")
    return lines[: t.n_texts]


def pairs(study: Study) -> list[dict]:
    t = study.task
    out = list(t.pairs)
    if t.file:
        path = Path(t.file)
        if not path.is_file():
            raise StudyError(f"task.file: file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise StudyError(f"task.file: cannot read {path} as UTF-8 text ({type(e).__name__}: {e})") from None
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    p = json.loads(line)
                except ValueError as e:
                    raise StudyError(f"task.file: {path}:{n} is not a JSON object ({e})") from None
                if not isinstance(p, dict) or not all(isinstance(p.get(k), str) for k in ("prompt", "target", "foil")):
                    raise StudyError(f"task.file: {path}:{n} needs prompt, target and foil (strings)")
                out.append(p)
    return out
