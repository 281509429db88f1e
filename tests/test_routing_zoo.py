"""The committed zoo checkpoint: ``workbench.load("tiny-moe")`` loads it offline, its routing is the
rule's, and its experts route the four training domains differently."""
import re

import pytest
import torch

import workbench as wb
from workbench.models import zoo

from test_routing_capture import one_thread  # noqa: F401  (autouse fixture)

# fresh text of each domain (not in the training corpus)
TEXTS = {
    "english": [
        "The harbour was quiet in the evening, and the fishermen were mending their nets by the light of a lamp.",
        "Most people who keep a small garden learn that patience matters more than any tool they can buy.",
    ],
    "german": [
        "Am Abend sitzen die Nachbarn vor dem Haus und sprechen über das Wetter und die Ernte im Garten.",
        "Im Sommer fahren viele Familien an den See, baden im kühlen Wasser und essen ein Eis am Ufer.",
    ],
    "python": [
        "def merge(left, right):\n    result = []\n    while left and right:\n        result.append(left.pop(0))\n    return result\n",
        "for name, value in sorted(items.items()):\n    if value is None:\n        continue\n    print(name, value)\n",
    ],
    "arithmetic": ["58 + 27 = 85\n144 / 12 = 12\n(6 + 9) * 3 = 45\n", "7, 14, 21, 28, 35, 42\n903 - 455 = 448\n"],
}


@pytest.fixture(scope="module")
def tiny_moe():
    return wb.load("tiny-moe")


@pytest.fixture(scope="module")
def capture(tiny_moe):
    """One capture of every text; ``labels`` gives each row's domain index."""
    rec = wb.routing.scan(tiny_moe, texts=[t for ts in TEXTS.values() for t in ts], progress=False).rows
    sizes = [tiny_moe.encode(t).shape[1] for ts in TEXTS.values() for t in ts]
    labels = torch.cat([torch.full((n,), i // 2) for i, n in enumerate(sizes)])
    return rec, labels


@pytest.fixture(scope="module")
def records(capture):
    rec, labels = capture
    return {d: rec.select(labels == i) for i, d in enumerate(TEXTS)}


def test_loads_offline_as_a_zoo_model(tiny_moe):
    m = tiny_moe
    assert m.source == "zoo:tiny-moe" and m.spec.model_type == "qwen3_moe"
    assert m.spec.moe_layers == (0, 1, 2, 3)
    assert {(r.n_experts, r.top_k, r.rule) for r in m.spec.routers} == {(8, 2, "softmax_topk")}
    files = sorted(p.name for p in zoo.model_dir("tiny-moe").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_log.txt"} <= set(files)
    assert sum(p.stat().st_size for p in zoo.model_dir("tiny-moe").iterdir()) < 20 * 2**20
    # trained, not random: the held-out-best checkpoint predicts fresh English far better than chance
    ids = m.encode(TEXTS["english"][0])
    with torch.no_grad():
        assert float(m.hf(input_ids=ids, labels=ids).loss) < 0.8 * torch.log(torch.tensor(float(m.spec.vocab_size)))


def test_training_log_is_within_budget():
    log = (zoo.model_dir("tiny-moe") / "train_log.txt").read_text()
    wall = int(re.search(r"total wall time (\d+)s", log).group(1))
    assert wall <= 15 * 60
    assert "per-domain expert load" in log and "keeping the checkpoint of step" in log


def test_domains_route_differently(capture, records):
    rec, labels = capture
    assert rec.verified
    rates = {d: wb.routing.activation_rate(r) for d, r in records.items()}  # [layer, expert]
    domains = list(rates)
    for i, a in enumerate(domains):
        for b in domains[i + 1 :]:
            # total-variation distance between the two domains' expert loads, in the most separating layer
            tv = ((rates[a] - rates[b]).abs().sum(1) / 4).max()
            assert tv > 0.25, (a, b, float(tv))
    # and the domain explains a good share of the routing decision (chance-corrected; ~0 if unrelated)
    spec = wb.routing.specialisation(rec, labels, min_count=1)
    assert spec.score.max() > 0.2, spec
    assert wb.routing.specialisation(rec, labels[torch.randperm(len(labels))], min_count=1).score.max() < 0.1


def test_behaviour_experts_deactivation_hurts_that_domain_most(tiny_moe, records):
    """MoTE-style: the experts that light up for Python over German, deactivated, cost Python more loss."""
    experts = wb.routing.behaviour_experts(records["python"], records["german"], n=4)
    effects = {
        d: wb.effects.edit_effect(tiny_moe, TEXTS[d][0], wb.ExpertMask(experts), max_new_tokens=0).delta_loss
        for d in ("python", "german")
    }
    assert effects["python"] > 0 and effects["python"] > effects["german"], effects
