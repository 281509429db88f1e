"""Routing capture on tiny random models of every MoE architecture: the recorded top-k equals what
the router returned, what ``output_router_logits`` reports and what the experts module received —
in forward and in generate — and the margin equals a brute-force computation from the logits."""
import dataclasses

import pytest
import torch

import workbench as wb
from workbench.routing import RuleInputs, route, rule_inputs
from workbench.models.testing import tiny_bridge, tiny_model

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run as fast on one thread; two thrash when the machine's other core is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "granitemoe", "phimoe"]


def routing_model(name: str):
    """A tiny model whose rule-specific inputs are non-trivial: DeepSeek gets a random correction bias
    (large enough to change choices), PhiMoE a SparseMixer threshold that masks experts."""
    m = tiny_model(name)
    g = torch.Generator().manual_seed(7)
    for rs in m.spec.routers:
        router = m.hf.get_submodule(rs.router_path)
        if rs.has_correction_bias:
            router.e_score_correction_bias.copy_(torch.rand(rs.n_experts, generator=g) * 0.2)
        if rs.rule == "sparsemixer":
            router.router_jitter_noise = 0.3
    return m


class Spy:
    """The test's own hooks (independent of workbench's): router outputs and experts inputs."""

    def __init__(self, m):
        self.router, self.experts, self.handles = {}, {}, []
        for rs in m.spec.routers:
            r, ex = m.hf.get_submodule(rs.router_path), m.hf.get_submodule(rs.experts_path)
            self.handles.append(r.register_forward_hook(lambda mod, a, out, l=rs.layer: self.router.setdefault(l, []).append(out)))
            self.handles.append(ex.register_forward_pre_hook(lambda mod, a, l=rs.layer: self.experts.setdefault(l, []).append(a[1])))

    def cat(self, what, layer, i):
        return torch.cat([o[i] if what == "router" else o for o in getattr(self, what)[layer]]).detach()

    def remove(self):
        for h in self.handles:
            h.remove()


def _sets_equal(a, b):
    return torch.equal(a.sort(-1).values, b.sort(-1).values)


@pytest.mark.parametrize("arch", MOE)
def test_recorded_topk_is_what_ran(arch):
    m = routing_model(arch)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    spy = Spy(m)
    with wb.capture(m, wb.Routing()) as cap, torch.no_grad():
        out = m.hf(input_ids=ids, output_router_logits=True)
    spy.remove()
    rec = wb.routing.rows(cap)
    assert rec.experts.shape == (len(m.spec.routers), 22, 2)
    assert rec.token_ids.tolist() == ids.flatten().tolist()
    assert rec.positions.tolist() == list(range(11)) * 2 and rec.batch.tolist() == [0] * 11 + [1] * 11
    assert rec.verified, rec.check()
    for li, rs in enumerate(m.spec.routers):
        torch.testing.assert_close(rec.logits[li], out.router_logits[li].float(), rtol=0, atol=0)
        router_idx, router_w = spy.cat("router", rs.layer, 2), spy.cat("router", rs.layer, 1)
        assert _sets_equal(rec.experts[li], router_idx)
        assert _sets_equal(rec.experts[li], spy.cat("experts", rs.layer, 0))
        # the rule, run on the logits alone, reproduces the router's decision and weights
        d = route(rec.logits[li], rs, rule_inputs(m.hf.get_submodule(rs.router_path)))
        assert _sets_equal(d.indices, router_idx)
        order = lambda idx: torch.argsort(idx, 1)  # noqa: E731
        torch.testing.assert_close(d.weights.gather(1, order(d.indices)), router_w.float().gather(1, order(router_idx)))
        if rs.has_correction_bias or rs.rule == "sparsemixer":  # the extra rule inputs matter here
            plain = route(rec.logits[li], rs, RuleInputs())
            assert not (_sets_equal(plain.indices, router_idx) and torch.allclose(plain.weights, d.weights))
        # the record lists experts best first by the rule's score
        s = rec.scores[li].gather(1, rec.experts[li])
        assert (s[:, 0] >= s[:, 1]).all()


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3", "phimoe"])
def test_generate_decode_steps_are_recorded(arch):
    m = routing_model(arch)
    prompt = m.encode("hello there", chat=False)
    spy = Spy(m)
    with wb.capture(m, wb.Routing()) as cap, torch.no_grad():
        out = m.hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, pad_token_id=256)
    spy.remove()
    rec = wb.routing.rows(cap)
    T = prompt.shape[1]
    assert rec.experts.shape[1] == T + 4  # prefill rows, then one row per decode step
    assert rec.positions.tolist() == list(range(T + 4))
    new = out[0, T:].tolist()
    assert rec.token_ids.tolist()[:T] == prompt[0].tolist()
    assert rec.token_ids.tolist()[T:] == new[:4]  # decode step i feeds generated token i−1
    assert rec.call.tolist() == [0] * T + [1, 2, 3, 4]
    assert rec.verified
    for li, rs in enumerate(m.spec.routers):
        assert _sets_equal(rec.experts[li], spy.cat("experts", rs.layer, 0))


def test_margin_equals_brute_force():
    """k-th minus (k+1)-th score per rule, computed independently in float64 from the logits."""
    for arch in ["olmoe", "granitemoe", "phimoe", "deepseek_v3"]:
        m = routing_model(arch)
        ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
        with wb.capture(m, wb.Routing()) as cap, torch.no_grad():
            m.hf(input_ids=ids)
        rec = wb.routing.rows(cap)
        for li, rs in enumerate(m.spec.routers):
            x = rec.logits[li].double()
            if rs.rule == "softmax_topk":
                s = torch.softmax(x, -1).sort(-1, descending=True).values
                want = s[:, 1] - s[:, 2]
            elif rs.rule in ("topk_softmax", "sparsemixer"):
                s = x.sort(-1, descending=True).values
                want = s[:, 1] - s[:, 2]
            else:  # DeepSeek: best groups by their top-2 sum, then experts inside them
                bias = m.hf.get_submodule(rs.router_path).e_score_correction_bias.double()
                want = []
                for row in torch.sigmoid(x) + bias:
                    groups = row.view(rs.n_group, -1)
                    gs = sorted(((float(g.topk(2).values.sum()), i) for i, g in enumerate(groups)), reverse=True)
                    kept = torch.cat([groups[i] for _, i in gs[: rs.topk_group]]).sort(descending=True).values
                    want.append(min(float(kept[1] - kept[2]), (gs[rs.topk_group - 1][0] - gs[rs.topk_group][0]) / 2))
                want = torch.tensor(want, dtype=torch.float64)
            torch.testing.assert_close(rec.margin[li].double(), want, atol=1e-6, rtol=0)


def test_wrong_rule_is_detected_not_silent():
    """A model described with the wrong rule: the check reports it, margins become NaN, a warning says so."""
    m = routing_model("deepseek_v3")
    wrong = tuple(dataclasses.replace(rs, rule="softmax_topk") for rs in m.spec.routers)
    m.spec = dataclasses.replace(m.spec, routers=wrong)
    with pytest.warns(UserWarning, match="disagrees"):
        with wb.capture(m, wb.Routing()) as cap, torch.no_grad():
            m.hf(input_ids=torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2)))
    rec = wb.routing.rows(cap)
    assert not rec.verified
    bad = rec.check().router_mismatch
    assert (bad > 0).all()
    assert int(rec.margin.isnan().sum()) == int(bad.sum())


def test_layers_subset_frame_and_provenance():
    m = routing_model("qwen2_moe")
    with wb.capture(m, wb.Routing(layers=[1])) as cap, torch.no_grad():
        m.forward_text("abc")
    rec = wb.routing.rows(cap)
    assert rec.layers == (1,) and rec.experts.shape == (1, 4, 2)
    assert cap.names() == [f"blocks.1.mlp.router.{p}" for p in ("agrees", "experts", "logits", "margin", "ran", "scores", "weights")]
    assert cap["blocks.1.mlp.hook_expert_indices"].shape == (1, 4, 2)  # TransformerLens' name is an alias
    df = rec.to_frame()
    assert len(df) == 4 * 2 and set(df.columns) >= {"layer", "position", "token_id", "expert", "weight", "margin", "rank"}
    assert df[df["rank"] == 0].expert.tolist() == rec.experts[0, :, 0].tolist()
    prov = cap.provenance
    assert prov.token_ids == tuple(rec.token_ids.tolist())
    assert prov.weights_hash == m.provenance.weights_hash


def test_transformerlens_bridge():
    """Routing through a TransformerBridge-wrapped model equals the bridge's own expert-index hooks."""
    pytest.importorskip("transformer_lens")
    bridge, hf = tiny_bridge("olmoe")
    ids = torch.randint(3, 250, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    m = wb.load(bridge)
    with wb.capture(m, wb.Routing()) as cap, torch.no_grad():
        m.hf(input_ids=ids)
    rec = wb.routing.rows(cap)
    assert rec.verified
    for li, layer in enumerate(rec.layers):
        assert _sets_equal(rec.experts[li], cache[f"blocks.{layer}.mlp.hook_expert_indices"].reshape(-1, 2))


def test_routing_and_attention_probes_together():
    m = routing_model("olmoe")
    with wb.capture(m, wb.AttentionStats(), wb.Routing()) as cap:
        m.generate("abc", max_new_tokens=3, chat=False)
    rec = wb.routing.rows(cap)
    assert rec.verified and rec.experts.shape[1] == cap.q_pos.numel() == 4 + 2
    assert torch.equal(rec.positions, cap.q_pos)
    assert cap["blocks.0.mlp.router.experts"].shape == (1, 6, 2) and cap["blocks.0.attn.top1"].shape == (1, 4, 6)


def test_error_inside_the_block_is_not_masked():
    m = routing_model("olmoe")
    router = m.hf.get_submodule(m.spec.routers[1].router_path)
    h = router.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):  # layer 0 was recorded, layer 1 never ran
        with wb.capture(m, wb.Routing()), torch.no_grad():
            m.hf(input_ids=torch.tensor([[1, 2, 3]]))
    h.remove()
    assert not router._forward_hooks  # hooks removed all the same


@pytest.mark.parametrize("layers, match", [([1.7], "layer must be an integer, got 1.7"), (1, "must be a list"),
                                           (["x"], "must be an integer"), ([True], "must be an integer")])  # fmt: skip
def test_routing_layers_are_checked(layers, match):
    m = routing_model("mixtral")
    with pytest.raises(wb.ProbeError, match=match):
        wb.Routing(layers=layers).bind(m)


def test_padding_tokens_are_left_out_of_the_routing_rows():
    """A padded batch routes its pad tokens too; the analyses must see only the text's tokens."""
    m = routing_model("mixtral")
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with wb.capture(m, wb.Routing()) as cap, torch.no_grad():
        m.hf(input_ids=ids, attention_mask=mask)
    rec = wb.routing.rows(cap)
    assert rec.token_ids.tolist() == [5, 6, 7, 5, 6, 7, 8, 9, 10]
    assert rec.positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    experts = cap["blocks.0.mlp.router.experts"]
    assert torch.equal(rec.experts[0], torch.cat([experts[0, 3:], experts[1]]))
    assert wb.routing.activation_rate(cap).sum(1).allclose(torch.tensor(2.0))
