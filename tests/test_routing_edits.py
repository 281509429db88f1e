"""Routing edits against independent references: the model's own router code run on penalised
logits (ExpertMask), with its ``top_k`` attribute changed (TopK), PhiMoE's own ``sparsemixer``, and a
brute-force chooser (ExpertForce). Plus SCMoE, edit-effect reports and bad input."""
import itertools

import pytest
import torch

import workbench as wb
from workbench.models.testing import tiny_model

from test_routing_capture import MOE, one_thread, routing_model  # noqa: F401  (one_thread: autouse)

IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(5))


class Runs:
    """Counts forward passes of a model (to prove errors come before any)."""

    def __init__(self, m):
        self.n = 0
        self.h = m.hf.register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))


def _experts_inputs(m):
    """Install a pre-hook on every experts module; returns {layer: [(indices, weights), ...]}."""
    seen, handles = {}, []
    for rs in m.spec.routers:
        ex = m.hf.get_submodule(rs.experts_path)
        handles.append(ex.register_forward_pre_hook(lambda mod, a, l=rs.layer: seen.setdefault(l, []).append((a[1], a[2]))))
    return seen, handles


def _penalise(monkeypatch, m, penalty: dict):
    """Make the routers' own linear layers return logits + penalty[layer] (−1e9 = never chosen)."""
    weights = {id(m.hf.get_submodule(rs.router_path).weight): penalty[rs.layer] for rs in m.spec.routers if rs.layer in penalty}
    linear = torch.nn.functional.linear

    def patched(x, w, b=None):
        out = linear(x, w, b)
        return out + weights[id(w)].to(out.dtype) if id(w) in weights else out

    monkeypatch.setattr(torch.nn.functional, "linear", patched)


@pytest.mark.parametrize("arch", MOE)
def test_expert_mask_equals_router_on_penalised_logits(arch, monkeypatch):
    m = routing_model(arch)
    with torch.no_grad():
        plain = m.hf(input_ids=IDS).logits
    with torch.no_grad(), wb.capture(m, wb.Routing()) as cap, wb.intervene(m, wb.ExpertMask([(rs.layer, 1) for rs in m.spec.routers])):
        ours = m.hf(input_ids=IDS).logits
    rec = wb.routing.rows(cap)
    assert rec.verified and not (rec.ran == 1).any() and not (rec.experts == 1).any()
    assert "expert-mask" in cap.provenance.extra["edits"]
    penalty = {}
    for rs in m.spec.routers:
        penalty[rs.layer] = torch.zeros(rs.n_experts)
        penalty[rs.layer][1] = -1e9
        if rs.has_correction_bias:  # DeepSeek chooses on sigmoid + bias: penalise the bias too
            m.hf.get_submodule(rs.router_path).e_score_correction_bias[1] -= 1e9
    _penalise(monkeypatch, m, penalty)
    with torch.no_grad():
        ref = m.hf(input_ids=IDS).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, ours, atol=1e-4)  # the edit changed something


@pytest.mark.parametrize("arch", [a for a in MOE if a != "phimoe"])
@pytest.mark.parametrize("k", [1, 3])
def test_topk_equals_router_with_k(arch, k):
    m = routing_model(arch)
    seen, handles = _experts_inputs(m)
    with torch.no_grad(), wb.intervene(m, wb.TopK(k)):
        ours = m.hf(input_ids=IDS).logits
    ran = {l: v[-1] for l, v in seen.items()}
    for rs in m.spec.routers:
        m.hf.get_submodule(rs.router_path).top_k = k
    with torch.no_grad():
        ref = m.hf(input_ids=IDS).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for l, v in seen.items():
        assert v[-1][0].shape[1] == k
        assert torch.equal(ran[l][0].sort(1).values, v[-1][0].sort(1).values)


@pytest.mark.parametrize("k", [1, 2])
def test_sparsemixer_rule_equals_phimoe_code(k):
    """Our SparseMixer (any k) against transformers' own ``sparsemixer`` (which always takes 2)."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    rs = routing_model("phimoe").spec.routers[0]
    x = torch.randn(64, rs.n_experts, generator=torch.Generator().manual_seed(0))
    for eps in (0.0, 0.05, 0.3):
        w_ref, idx_ref = sparsemixer(x, jitter_eps=eps, training=False)
        d = wb.routing.route(x, rs, wb.routing.RuleInputs(jitter_eps=eps), k=k)
        assert torch.equal(d.indices, idx_ref[:, :k])
        torch.testing.assert_close(d.weights, w_ref[:, :k])


def _brute_force_force(x, rs, forced, bias=None):
    """Chosen set = forced ∪ the best others by the rule's ranking; weights by the rule's formula."""
    k, rows = rs.top_k, []
    for row in x.double():
        if rs.rule == "softmax_topk":
            score = torch.softmax(row, 0)
        elif rs.rule == "topk_softmax":
            score = row
        else:  # sigmoid_grouped with one kept group: the forced expert's group
            score = torch.sigmoid(row) + bias.double()
        size = rs.n_experts // (rs.n_group or 1)
        candidates = [e for e in range(rs.n_experts) if e not in forced]
        if rs.rule == "sigmoid_grouped":
            candidates = [e for e in candidates if e // size == forced[0] // size]
        best = max(itertools.combinations(candidates, k - len(forced)), key=lambda c: sum(float(score[e]) for e in c))
        chosen = sorted(forced + list(best))
        if rs.rule == "softmax_topk":
            w = torch.softmax(row, 0)[chosen]
            w = w / w.sum() if rs.norm_topk_prob else w
        elif rs.rule == "topk_softmax":
            w = torch.softmax(row[chosen], 0)
        else:
            w = torch.sigmoid(row)[chosen]
            w = w / w.sum() * rs.routed_scaling_factor
        rows.append((chosen, w))
    return rows


@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe", "granitemoe", "deepseek_v3"])
def test_expert_force_equals_brute_force(arch):
    m = routing_model(arch)
    seen, handles = _experts_inputs(m)
    with torch.no_grad(), wb.capture(m, wb.Routing()) as cap, wb.intervene(m, wb.ExpertForce([(0, 2)])):
        m.hf(input_ids=IDS)
    for h in handles:
        h.remove()
    rec = wb.routing.rows(cap)
    rs = m.spec.routers[0]
    idx, w = seen[0][-1]
    bias = m.hf.get_submodule(rs.router_path).e_score_correction_bias if rs.has_correction_bias else None
    for r, (chosen, want_w) in enumerate(_brute_force_force(rec.logits[0], rs, [2], bias)):
        order = torch.argsort(idx[r])
        assert idx[r][order].tolist() == chosen
        torch.testing.assert_close(w[r][order].double(), want_w, atol=1e-6, rtol=1e-6)
    assert (rec.ran[0] == 2).any(-1).all() and rec.verified


def test_edits_compose_with_each_other_and_attention(monkeypatch):
    m = routing_model("qwen3_moe")
    edits = [wb.ExpertMask([(0, 0)]), wb.ExpertForce([(1, 3)]), wb.TopK({0: 1}), wb.HeadAblation([(0, 1)])]
    seen, handles = _experts_inputs(m)
    with torch.no_grad(), wb.intervene(m, *edits):
        ours = m.hf(input_ids=IDS).logits
    idx0, idx1 = seen[0][-1][0], seen[1][-1][0]
    assert idx0.shape[1] == 1 and not (idx0 == 0).any() and (idx1 == 3).any(-1).all()
    # reference: layer 0 via a −1e9 penalty and the router's own top_k; layer 1 by brute force; heads by HeadAblation
    rs1 = m.spec.routers[1]
    router1 = m.hf.get_submodule(rs1.router_path)
    forced = {}

    def force_hook(mod, args, out):  # replace layer 1's decision by the brute-force one
        rows = _brute_force_force(out[0].detach(), rs1, [3])
        forced["n"] = len(rows)
        return out[0], torch.stack([w.float() for _, w in rows]), torch.tensor([c for c, _ in rows])

    h = router1.register_forward_hook(force_hook)
    m.hf.get_submodule(m.spec.routers[0].router_path).top_k = 1
    _penalise(monkeypatch, m, {0: torch.tensor([-1e9, 0, 0, 0])})
    with torch.no_grad(), wb.intervene(m, wb.HeadAblation([(0, 1)])):
        ref = m.hf(input_ids=IDS).logits
    h.remove()
    for hd in handles:
        hd.remove()
    assert forced["n"] == IDS.numel()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_edit_applies_during_generate_and_is_removed_after():
    m = routing_model("olmoe")
    with wb.capture(m, wb.Routing()) as cap, wb.intervene(m, wb.ExpertMask([(0, 2), (1, 2)])):
        m.generate("ab", max_new_tokens=4, chat=False)
    rec = wb.routing.rows(cap)
    assert rec.call.max() == 3 and not (rec.ran == 2).any() and rec.verified
    with wb.capture(m, wb.Routing()) as cap2, torch.no_grad():
        m.hf(input_ids=IDS)
    assert (wb.routing.rows(cap2).ran == 2).any()  # the mask is gone
    assert not m.hf.get_submodule(m.spec.routers[0].router_path)._forward_hooks


# --- SCMoE --------------------------------------------------------------------------------------------


def test_contrastive_logits_formula():
    g = torch.Generator().manual_seed(0)
    s, w = torch.randn(50, generator=g), torch.randn(50, generator=g)
    out = wb.routing.contrastive_logits(s, w, beta=0.7, plausibility=0.2)
    ls, lw = torch.log_softmax(s, 0), torch.log_softmax(w, 0)
    ps = ls.exp()
    keep = ps >= 0.2 * ps.max()
    assert torch.equal(torch.isinf(out), ~keep)
    torch.testing.assert_close(out[keep], (1.7 * ls - 0.7 * lw)[keep])


def test_scmoe_generate():
    m = routing_model("mixtral")
    greedy = m.generate("hi", max_new_tokens=6, chat=False)
    # β = 0 is plain greedy decoding; a weak routing equal to the strong one changes nothing either
    assert wb.routing.scmoe_generate(m, "hi", beta=0.0, plausibility=0.0, max_new_tokens=6, chat=False) == greedy
    assert wb.routing.scmoe_generate(m, "hi", beta=1.0, plausibility=0.0, weak=[wb.TopK(2)], max_new_tokens=6, chat=False) == greedy
    # first token = argmax of the formula over a strong and a top-1 forward
    ids = m.encode("hi", chat=False)
    with torch.no_grad():
        strong = m.hf(input_ids=ids).logits[0, -1]
        with wb.intervene(m, wb.TopK(1)):
            weak = m.hf(input_ids=ids).logits[0, -1]
    want = int(wb.routing.contrastive_logits(strong, weak, beta=2.0, plausibility=0.1).argmax())
    got = wb.routing.scmoe_generate(m, "hi", beta=2.0, plausibility=0.1, max_new_tokens=1, chat=False)
    assert got == m.tokenizer.decode([want], skip_special_tokens=True)


# --- effect reports ------------------------------------------------------------------------------------


def test_edit_effect_report():
    m = routing_model("qwen3_moe")
    text = "the cat sat on the mat"
    eff = wb.effects.edit_effect(m, text, wb.ExpertMask([(0, 1), (1, 1)]), max_new_tokens=5)
    ids = m.encode(text)
    with torch.no_grad():
        with wb.intervene(m, wb.ExpertMask([(0, 1), (1, 1)])):
            loss = float(m.hf(input_ids=ids, labels=ids).loss)
        assert eff.loss_before == pytest.approx(float(m.hf(input_ids=ids, labels=ids).loss), rel=1e-5)
    assert eff.loss_after == pytest.approx(loss, rel=1e-5)
    assert eff.max_logit_change > 0 and eff.mean_kl > 0 and eff.labels == ("expert-mask",)
    assert "loss" in eff.summary()
    same = wb.effects.edit_effect(m, text, wb.TopK(2), max_new_tokens=5)  # the model's own k: no change
    assert same.delta_loss == 0 and same.max_logit_change == 0 and same.text_before == same.text_after and not same.diff


# --- bad input: clear errors before any forward pass -------------------------------------------------------


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda: wb.ExpertMask([(0, 4)]), "expert 4 is out of range in layer 0"),
        (lambda: wb.ExpertMask([(0, -1)]), "out of range"),
        (lambda: wb.ExpertMask([(5, 0)]), "layer 5 does not exist"),
        (lambda: wb.ExpertMask([(0, 0), (0, 1), (0, 2)]), "leaves fewer than the top-2"),
        (lambda: wb.ExpertMask([]), "no experts given"),
        (lambda: wb.ExpertMask([0]), r"\(layer, expert\) pairs"),
        (lambda: wb.ExpertForce([(0, 0), (0, 1), (0, 2)]), "forcing 3 experts in layer 0 but tokens use only top-2"),
        (lambda: wb.ExpertForce([(0, 0), (0, 1), (0, 2), (0, 3), (0, 4)]), "out of range"),
        (lambda: wb.TopK(0), "k = 0"),
        (lambda: wb.TopK(5), "exceeds the 4 experts"),
        (lambda: wb.TopK({0: 1.5}), "must be an int"),
        (lambda: wb.TopK({}), "empty"),
        (lambda: wb.TopK({0.9: 1}), "layer must be an integer, got 0.9"),  # not layer 0
    ],
)
def test_bad_edits(edit, match):
    m = routing_model("olmoe")
    runs = Runs(m)
    with pytest.raises(wb.ProbeError, match=match):
        with wb.intervene(m, edit()):
            m.hf(input_ids=IDS)
    assert runs.n == 0


@pytest.mark.parametrize(
    "edits, match",
    [
        ([wb.ExpertMask([(0, 1)]), wb.ExpertForce([(0, 1)])], r"experts \[1\] are both deactivated and forced"),
        ([wb.TopK(1), wb.ExpertForce([(0, 1), (0, 2)])], "2 forced experts do not fit in top-1"),
        ([wb.TopK({0: 1}), wb.TopK({0: 3})], "two TopK edits"),
        ([wb.TopK(3), wb.ExpertMask([(0, 0), (0, 1)])], "only 2 of 4 experts remain active"),
    ],
)
def test_bad_edit_combinations(edits, match):
    m = routing_model("olmoe")
    runs = Runs(m)
    with pytest.raises(wb.ProbeError, match=match):
        with wb.intervene(m, *edits):
            m.hf(input_ids=IDS)
    assert runs.n == 0
    assert not m.hf.get_submodule(m.spec.routers[0].router_path)._forward_hooks  # nothing left attached


def test_deepseek_group_limits():
    m = routing_model("deepseek_v3")  # 8 experts in 2 groups of 4, 1 group kept
    for edit, match in [
        (wb.ExpertForce([(0, 0), (0, 5)]), "span 2 groups but only 1"),
        (wb.TopK(5), "exceeds the experts in the 1 groups"),
    ]:
        with pytest.raises(wb.ProbeError, match=match):
            with wb.intervene(m, edit):
                pass


def test_dense_model_and_dense_layers_are_refused():
    dense = tiny_model("llama")
    runs = Runs(dense)
    for make in (lambda: wb.capture(dense, wb.Routing()), lambda: wb.intervene(dense, wb.ExpertMask([(0, 0)])),
                 lambda: wb.intervene(dense, wb.TopK(1)), lambda: wb.intervene(dense, wb.ExpertForce([(0, 0)]))):  # fmt: skip
        with pytest.raises(wb.ProbeError, match="model has no MoE layers.*'llama'"):
            with make():
                pass
    with pytest.raises(wb.ProbeError, match="model has no MoE layers"):
        wb.routing.scmoe_generate(dense, "hi")
    assert runs.n == 0
    from workbench.models.testing import tiny_config
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen2_moe")
    cfg.mlp_only_layers = [0]  # layer 0 dense, layer 1 sparse
    mixed = wb.load(AutoModelForCausalLM.from_config(cfg).eval(), tokenizer=dense.tokenizer)
    assert mixed.spec.moe_layers == (1,)
    with pytest.raises(wb.ProbeError, match=r"layer 0 is a dense layer \(no router\); MoE layers: \[1\]"):
        with wb.intervene(mixed, wb.ExpertMask([(0, 0)])):
            pass
    with pytest.raises(wb.ProbeError, match="layer 0 is a dense layer"):
        with wb.capture(mixed, wb.Routing(layers=[0])):
            pass
