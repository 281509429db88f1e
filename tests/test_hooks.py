"""The hook core: names on every architecture, user hooks vs plain torch hooks, reductions vs full
tensors, thread isolation, re-entrant captures, spec reuse across models, padding, TransformerLens and
nnsight interop."""
import threading

import pytest
import torch

import workbench as wb
from workbench import names as N
from workbench.models.testing import TINY_CONFIGS, byte_tokenizer, tiny_bridge, tiny_hf_model, tiny_model

ARCHS = sorted(TINY_CONFIGS)
IDS = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(0))


def _shape_ok(name: str, t: torch.Tensor, m, B: int, R: int) -> bool:
    """The documented shape of ``name`` (workbench.names.POINTS) on this model and input."""
    layer, suffix = N.split(name)
    spec = m.spec
    H = spec.n_heads
    rs = {r.layer: r for r in spec.routers}.get(layer)
    expected = {
        "attn.entropy": (B, H, R), "attn.lse": (B, H, R), "attn.top1": (B, H, R), "attn.top1_prob": (B, H, R),
        "attn.hook_z_norm": (B, H, R), "attn.alpha": (B, H, 4), "attn.key_mass": (B, H, R), "attn.key_count": (B, R),
        "hook_resid_pre": (B, R, spec.hidden_size), "hook_resid_post": (B, R, spec.hidden_size),
        "hook_attn_out": (B, R, spec.hidden_size), "hook_mlp_out": (B, R, spec.hidden_size),
        **{f"attn.{s}": (B, H, R) for s in ("self_mass", "prev_mass", "local_mass", "dist_mean", "dist_var", "induction_mass")},
    }  # fmt: skip
    if rs is not None:
        expected.update({"mlp.router.logits": (B, R, rs.n_experts), "mlp.router.scores": (B, R, rs.n_experts),
                         "mlp.router.experts": (B, R, rs.top_k), "mlp.router.weights": (B, R, rs.top_k),
                         "mlp.router.ran": (B, R, rs.top_k), "mlp.router.margin": (B, R), "mlp.router.agrees": (B, R)})  # fmt: skip
    if suffix.endswith((".norm", ".max_abs")):
        return t.shape == (B, R)
    if suffix.endswith((".topk", ".topk_dims")):
        return t.shape == (B, R, 8)
    if suffix == "attn.hook_z":
        return t.shape[:3] == (B, R, H)
    if suffix == "mlp.hook_post":
        return t.shape[:2] == (B, R)
    return tuple(t.shape) == expected[suffix]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_name_is_captured_with_its_documented_shape(tiny, arch):
    m = tiny(arch)
    known = N.available(m.spec)
    with wb.capture(m, names_filter=lambda n: True, max_elements=1 << 24) as cap, torch.no_grad():
        m.hf(input_ids=IDS)
    assert set(cap.names()) == set(known)
    for n in cap.names():
        assert _shape_ok(n, cap[n], m, 2, 7), (n, tuple(cap[n].shape))
    # every layer is its real layer number in stack()
    assert cap.stack("attn.entropy").shape == (m.spec.n_layers, 2, m.spec.n_heads, 7)


def test_every_name_on_smollm2(smollm):
    known = N.available(smollm.spec)
    assert len(known) == 30 * len([n for n in known if n.startswith("blocks.0.")])
    ids = smollm.encode("Names are the API.")
    with wb.capture(smollm, names_filter=["blocks.*.attn.*", "blocks.*.hook_resid_post.norm", "blocks.3.attn.hook_z"]) as cap:
        smollm.hf(input_ids=ids)
    R = ids.shape[1]
    assert cap["blocks.17.attn.top1"].shape == (1, 9, R)
    assert cap.stack("attn.top1").shape == (30, 1, 9, R)
    assert cap["blocks.3.attn.hook_z"].shape == (1, R, 9, 64)
    torch.testing.assert_close(cap["blocks.3.attn.hook_z"].norm(dim=-1).transpose(1, 2), cap["blocks.3.attn.hook_z_norm"], atol=1e-4, rtol=1e-5)


def test_names_filter_unknown_names_and_close_matches(tiny):
    m = tiny("llama")
    with pytest.raises(wb.ProbeError, match="unknown name 'blocks.1.attn.entrop'; did you mean blocks.1.attn.entropy"):
        with wb.capture(m, names_filter="blocks.1.attn.entrop"):
            pass
    with pytest.raises(wb.ProbeError, match="matches no name of this model"):
        with wb.capture(m, names_filter="blocks.*.mlp.router.*"):  # a dense model has no router
            pass
    with pytest.raises(wb.ProbeError, match="layer 9 does not exist"):
        with wb.capture(m, wb.AttentionStats(layers=[9])):
            pass
    with wb.capture(m, wb.AttentionStats(layers=[1]), names_filter="blocks.1.attn.top1") as cap:
        m.forward_text("abc")
    assert cap.names() == ["blocks.1.attn.top1"]
    with pytest.raises(wb.ProbeError, match="did you mean blocks.1.attn.top1"):
        cap["blocks.1.attn.top"]
    st = cap.stack("attn.top1")
    assert (st[0] == -1).all() and torch.equal(st[1], cap["blocks.1.attn.top1"])  # index = real layer number
    assert "blocks.1.attn.top1" in repr(cap) or "attn.top1 (layer 1)" in repr(cap)
    with pytest.raises(wb.ProbeError, match="probes go to workbench.capture"):
        with wb.intervene(m, wb.AttentionStats()):
            pass
    with pytest.raises(wb.ProbeError, match="edits go to workbench.intervene"):
        with wb.capture(m, wb.HeadAblation([(0, 1)])):
            pass


def test_compact_repr(smollm):
    with wb.capture(smollm, wb.AttentionStats(key_mass=True)) as cap:
        smollm.forward_text("A short text " * 40)
    assert len(repr(cap)) < 600


# --- user hooks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3", "olmoe"])
def test_user_hook_edit_equals_a_plain_torch_hook(tiny, arch):
    m = tiny(arch)
    direction = torch.randn(m.spec.hidden_size, generator=torch.Generator().manual_seed(1))

    def steer(x, hook):  # TransformerLens style: the second argument has .name
        assert hook.name == "blocks.0.hook_resid_post"
        return x + 3 * direction

    with torch.no_grad():
        with wb.intervene(m, wb.Hook("blocks.0.hook_resid_post", steer)):
            ours = m.hf(input_ids=IDS).logits
        layer = m.hf.get_submodule(m.spec.layer_paths[0])

        def plain(mod, args, out):
            return (out[0] + 3 * direction, *out[1:]) if isinstance(out, tuple) else out + 3 * direction

        h = layer.register_forward_hook(plain)
        try:
            theirs = m.hf(input_ids=IDS).logits
        finally:
            h.remove()
        base = m.hf(input_ids=IDS).logits
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert not torch.allclose(ours, base)


def test_hook_z_edit_equals_zero_ablation(tiny):
    """Zeroing a head in attn.hook_z (TransformerLens' way) equals HeadAblation(mode='zero')."""
    m = tiny("llama")

    def kill(z, name):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    with torch.no_grad():
        with wb.intervene(m, wb.Hook("blocks.1.attn.hook_z", kill)):
            a = m.hf(input_ids=IDS).logits
        with wb.intervene(m, wb.HeadAblation([(1, 2)], mode="zero")):
            b = m.hf(input_ids=IDS).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_hooks_compose_with_probes_and_edits_in_order(tiny):
    m = tiny("llama")
    seen = []
    with wb.capture(m, wb.Activations("blocks.0.hook_resid_post"), wb.Hook("blocks.*.attn.entropy", lambda x, n: x.mean(), key="mean")) as cap:
        with wb.intervene(m, wb.Hook("blocks.0.hook_resid_post", lambda x, n: x * 0 + 1)), wb.intervene(
            m, wb.Hook("blocks.0.hook_resid_post", lambda x, n: seen.append(float(x.mean())) or x * 2)
        ), torch.no_grad():
            m.hf(input_ids=IDS)
    assert seen == [1.0]  # the inner edit saw the outer edit's result
    assert (cap["blocks.0.hook_resid_post"] == 2).all()  # probes see the final value
    entropy_means = [cap[f"blocks.{l}.attn.entropy.mean"] for l in range(2)]
    assert all(t.dim() == 0 for t in entropy_means)
    assert "blocks.0.attn.entropy" not in cap.names()  # only the hook's result was asked for


def test_hook_value_per_call_and_errors(tiny):
    m = tiny("llama")
    with wb.capture(m, wb.Hook("blocks.1.hook_resid_post", lambda x, n: x.shape[1])) as cap:
        m.generate("ab", max_new_tokens=3, chat=False)
    assert cap["blocks.1.hook_resid_post"] == [3, 1, 1] and cap.values("blocks.1.hook_resid_post") == [3, 1, 1]
    with pytest.raises(wb.ProbeError, match="read-only"):
        with wb.intervene(m, wb.Hook("blocks.0.attn.entropy", lambda x, n: x)):
            pass
    with pytest.raises(wb.ProbeError, match="returned shape \\(2, 7\\), expected \\(2, 7, 64\\)"):
        with wb.intervene(m, wb.Hook("blocks.0.hook_resid_pre", lambda x, n: x.sum(-1))), torch.no_grad():
            m.hf(input_ids=IDS)
    with pytest.raises(wb.ProbeError, match="kept by a probe and by a Hook without a key"):
        with wb.capture(m, wb.Activations("blocks.0.hook_resid_post"), wb.Hook("blocks.0.hook_resid_post", lambda x, n: 1)):
            pass
    with pytest.raises(wb.ProbeError, match="did you mean blocks.0.hook_resid_post"):
        wb.Hook("blocks.0.hook_resid_pots", lambda x, n: x).bind(m)


def test_router_logits_edit_reroutes(tiny):
    m = tiny("olmoe")
    rs = m.spec.routers[0]

    def ban_expert_0(logits, name):
        out = logits.clone()
        out[:, 0] = -1e9
        return out

    with wb.intervene(m, wb.Hook(f"blocks.{rs.layer}.mlp.router.logits", ban_expert_0)), wb.capture(m, wb.Routing()) as cap:
        with torch.no_grad():
            edited = m.hf(input_ids=IDS).logits
    assert not (cap[f"blocks.{rs.layer}.mlp.router.experts"] == 0).any() and wb.routing.rows(cap).verified
    with wb.intervene(m, wb.ExpertMask([(rs.layer, 0)])), torch.no_grad():
        masked = m.hf(input_ids=IDS).logits
    torch.testing.assert_close(edited, masked, atol=1e-5, rtol=0)


# --- reductions ---------------------------------------------------------------------------------------


def test_reductions_equal_the_full_tensor(tiny):
    m = tiny("qwen2")
    names = [f"blocks.1.{p}" for p in ("hook_resid_post", "hook_mlp_out", "mlp.hook_post")]
    with wb.capture(m, wb.Activations([f"{n}{r}" for n in names for r in ("", ".norm", ".max_abs", ".topk", ".topk_dims")], k=5)) as cap:
        with torch.no_grad():
            m.hf(input_ids=IDS)
    for n in names:
        x = cap[n]
        torch.testing.assert_close(cap[f"{n}.norm"], x.norm(dim=-1))
        torch.testing.assert_close(cap[f"{n}.max_abs"], x.abs().amax(-1))
        dims = cap[f"{n}.topk_dims"]
        torch.testing.assert_close(cap[f"{n}.topk"], x.gather(-1, dims))
        torch.testing.assert_close(x.gather(-1, dims).abs(), x.abs().topk(5, dim=-1).values)


def test_full_tensors_have_a_budget(tiny):
    m = tiny("llama")
    with pytest.raises(wb.ProbeError, match="exceeds the capture's budget.*\\.norm"):
        with wb.capture(m, wb.Activations("blocks.*.hook_resid_post"), max_elements=1000), torch.no_grad():
            m.hf(input_ids=IDS)
    with wb.capture(m, wb.Activations("blocks.*.hook_resid_post.norm"), max_elements=1000) as cap, torch.no_grad():
        m.hf(input_ids=IDS)  # reductions are not charged
    assert cap["blocks.1.hook_resid_post.norm"].shape == (2, 7)


def test_activations_equal_transformerlens_bridge_cache():
    """Independent reference: TransformerLens' own run_with_cache on the same weights."""
    pytest.importorskip("transformer_lens")
    bridge, hf = tiny_bridge("llama")
    ids = IDS[:1]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    m = wb.load(bridge)
    points = ["hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_z", "mlp.hook_post"]
    with wb.capture(m, wb.Activations([f"blocks.{l}.{p}" for l in range(2) for p in points])) as cap, torch.no_grad():
        m.hf(input_ids=ids)
    for l in range(2):
        for p in points:
            torch.testing.assert_close(cap[f"blocks.{l}.{p}"], cache[f"blocks.{l}.{p}"], atol=1e-5, rtol=1e-5, msg=p)


def test_hooks_attached_to_the_bridge_keep_working():
    pytest.importorskip("transformer_lens")
    bridge, hf = tiny_bridge("llama")
    ids = IDS[:1]

    def halve(x, hook):
        return x * 0.5

    bridge.add_hook("blocks.0.hook_resid_post", halve)  # attached before wb.load
    with torch.no_grad():
        theirs = bridge(ids)
    m = wb.load(bridge)
    with torch.no_grad():
        ours = m.hf(input_ids=ids).logits
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        bridge.reset_hooks()  # removed on the bridge: gone here too
        plain = m.hf(input_ids=ids).logits
        assert not torch.allclose(plain, ours)
        bridge.add_hook("blocks.1.attn.hook_z", lambda z, hook: z * 0)  # attached after wb.load
        torch.testing.assert_close(m.hf(input_ids=ids).logits, bridge(ids), atol=1e-5, rtol=0)
    bridge.reset_hooks()
    bridge.add_hook("blocks.0.attn.hook_pattern", lambda p, hook: p)
    with pytest.warns(UserWarning, match="hook_pattern do not run in workbench"):
        wb.load(bridge)
    bridge.reset_hooks()


def test_nnsight_trace_gets_workbench_statistics(tmp_path):
    nnsight = pytest.importorskip("nnsight")
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    lm = nnsight.LanguageModel(str(tmp_path), attn_implementation="workbench", dispatch=True)
    m = wb.load(lm)
    text = "nnsight and workbench"
    with wb.capture(m, wb.AttentionStats(sink_keys=1)) as cap:
        with lm.trace(text):
            resid = lm.model.layers[1].output.save()
            logits = lm.lm_head.output.save()
    ref = wb.load(tiny_hf_model("llama"), tokenizer=byte_tokenizer())
    with wb.capture(ref, wb.AttentionStats(sink_keys=1), wb.Activations("blocks.1.hook_resid_post")) as want, torch.no_grad():
        want_logits = ref.hf(input_ids=ref.encode(text)).logits
    for s in ("attn.entropy", "attn.top1", "attn.alpha"):
        torch.testing.assert_close(cap.stack(s), want.stack(s), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
    r = resid[0] if isinstance(resid, tuple) else resid
    torch.testing.assert_close(r, want["blocks.1.hook_resid_post"], atol=1e-5, rtol=0)
    # an nnsight intervention inside a workbench capture: the capture sees the edited run
    with wb.capture(m, wb.Activations("blocks.1.hook_resid_pre.norm")) as cap2:
        with lm.trace(text):
            out = lm.model.layers[0].output
            (out[0] if isinstance(out, tuple) else out)[:] = 0
    assert torch.allclose(cap2["blocks.1.hook_resid_pre.norm"], torch.zeros(1))


# --- protocol: binding, re-entrancy, threads ------------------------------------------------------------


def test_binding_never_mutates_the_spec_and_means_follow_the_model():
    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    ref = ["one reference sentence", "and a second one"]
    spec = wb.HeadAblation([(1, 2)], mode="mean", reference=ref)
    before = repr(spec)
    ids = IDS[:1]
    with torch.no_grad():
        with wb.intervene(a, spec):
            la = a.hf(input_ids=ids).logits
        with wb.intervene(b, spec):
            lb = b.hf(input_ids=ids).logits
        with wb.intervene(b, wb.HeadAblation([(1, 2)], mode="mean", means=wb.head_output_means(b, ref))):
            lb_own = b.hf(input_ids=ids).logits
        with wb.intervene(b, wb.HeadAblation([(1, 2)], mode="mean", means=wb.head_output_means(a, ref))):
            lb_with_a = b.hf(input_ids=ids).logits
    assert repr(spec) == before
    torch.testing.assert_close(lb, lb_own, atol=1e-5, rtol=0)  # b used its own means ...
    assert not torch.allclose(lb, lb_with_a, atol=1e-3)  # ... not a's
    assert la.shape == lb.shape


def test_nested_captures_on_the_same_layer_both_record(tiny):
    m = tiny("llama")
    with wb.capture(m, wb.AttentionStats(sink_keys=1)) as outer:
        with wb.capture(m, wb.AttentionStats(sink_keys=3, layers=[0], topk=2)) as inner, torch.no_grad():
            m.hf(input_ids=IDS)
        with torch.no_grad():
            m.hf(input_ids=IDS)
    assert outer.n_calls == 2 and inner.n_calls == 1
    torch.testing.assert_close(inner["blocks.0.attn.alpha"][..., :1], outer.per_call("blocks.0.attn.alpha")[0][0] / outer.per_call("blocks.0.attn.alpha")[0][1][:, None, :].double(), check_dtype=False)
    torch.testing.assert_close(inner["blocks.0.attn.topk"][..., 0], inner["blocks.0.attn.top1"])
    torch.testing.assert_close(inner["blocks.0.attn.entropy"], outer["blocks.0.attn.entropy"][..., :7])


def test_two_threads_capture_on_one_model_in_isolation(tiny):
    """Thread A records plain forwards while thread B ablates heads on the same model at the same time:
    A's capture holds only A's rows and A's logits are untouched by B's ablation."""
    m = tiny("llama")
    ids_a, ids_b = IDS[:1], torch.randint(3, 250, (1, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        clean_a = m.hf(input_ids=ids_a).logits
        with wb.intervene(m, wb.HeadAblation([(l, h) for l in range(2) for h in range(4)])):
            ablated_b = m.hf(input_ids=ids_b).logits
    barrier, results, errors = threading.Barrier(2), {}, []

    def worker(name, ids, edits):
        try:
            with wb.intervene(m, *edits) if edits else _null(), wb.capture(m, wb.AttentionStats(sink_keys=1)) as cap:
                barrier.wait()  # both blocks are open before either runs
                outs = []
                for _ in range(5):
                    with torch.no_grad():
                        outs.append(m.hf(input_ids=ids).logits)
            results[name] = (cap, outs)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ta = threading.Thread(target=worker, args=("a", ids_a, ()))
    tb = threading.Thread(target=worker, args=("b", ids_b, (wb.HeadAblation([(l, h) for l in range(2) for h in range(4)]),)))
    ta.start(), tb.start()
    ta.join(), tb.join()
    assert not errors, errors
    cap_a, outs_a = results["a"]
    cap_b, outs_b = results["b"]
    assert cap_a.n_calls == 5 and cap_b.n_calls == 5
    assert cap_a["blocks.0.attn.entropy"].shape[-1] == 5 * 7 and cap_b["blocks.0.attn.entropy"].shape[-1] == 5 * 11
    for o in outs_a:
        torch.testing.assert_close(o, clean_a, atol=1e-5, rtol=0)
    for o in outs_b:
        torch.testing.assert_close(o, ablated_b, atol=1e-5, rtol=0)
    assert cap_b.provenance.extra["edits"] == ["head-ablation:zero"] and cap_a.provenance.extra["edits"] == []


def _null():
    from contextlib import nullcontext

    return nullcontext()


def test_hooks_are_removed_when_the_block_ends(tiny):
    m = tiny("olmoe")
    before = {n: (len(mod._forward_hooks), len(mod._forward_pre_hooks)) for n, mod in m.hf.named_modules()}
    with wb.capture(m, names_filter=lambda n: True, max_elements=1 << 24), wb.intervene(m, wb.ExpertMask([(0, 1)])):
        m.forward_text("abc")
    after = {n: (len(mod._forward_hooks), len(mod._forward_pre_hooks)) for n, mod in m.hf.named_modules()}
    assert before == after


# --- padding: α counts from each sequence's first real token ---------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_unpadded_answer(tiny, side):
    m = tiny("llama")
    short = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(3))
    long = torch.randint(3, 250, (1, 9), generator=torch.Generator().manual_seed(4))
    probe = wb.AttentionStats(sink_keys=3, key_positions=[4], key_mass=True)

    def alone(ids):
        with wb.capture(m, probe) as cap, torch.no_grad():
            m.hf(input_ids=ids)
        return cap

    pad = torch.full((1, 3), 256)
    ids = torch.cat([torch.cat([pad, short] if side == "left" else [short, pad], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0 if side == "left" else 1
    if side == "right":
        mask[0, 6:] = 0
    with wb.capture(m, probe) as both, torch.no_grad():
        m.hf(input_ids=ids, attention_mask=mask)
    a, b = alone(short), alone(long)
    for l in range(2):
        torch.testing.assert_close(both[f"blocks.{l}.attn.alpha"][0], a[f"blocks.{l}.attn.alpha"][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(both[f"blocks.{l}.attn.alpha"][1], b[f"blocks.{l}.attn.alpha"][0], atol=1e-5, rtol=0)
        km = both[f"blocks.{l}.attn.key_mass"][0, :, :6]
        torch.testing.assert_close(km, a[f"blocks.{l}.attn.key_mass"][0].float(), atol=1e-5, rtol=0, check_dtype=False)
        assert torch.equal(both[f"blocks.{l}.attn.key_count"][0, :6], a[f"blocks.{l}.attn.key_count"][0])
    mean = wb.sinks.alpha(both)
    torch.testing.assert_close(mean, (wb.sinks.alpha(a) + wb.sinks.alpha(b)) / 2, atol=1e-5, rtol=0)


def test_readme_lists_the_vocabulary():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert N.describe() in readme  # regenerate with workbench.names.describe() when a name changes


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_queries_and_keys_recompute_any_row_exactly(tiny, arch):
    """attn.hook_q / hook_k (post-RoPE) give any attention row without another forward pass."""
    m = tiny(arch)
    ids = IDS[:1]
    T = ids.shape[1]
    with wb.capture(m, wb.AttentionStats(qk=True, tiles=[(0, T, 0, T)])) as cap, torch.no_grad():
        m.hf(input_ids=ids)
    for layer in range(m.spec.n_layers):
        q, k = cap[f"blocks.{layer}.attn.hook_q"][0], cap[f"blocks.{layer}.attn.hook_k"][0]  # [T, H, D], [T, Hkv, D]
        assert q.shape == (T, m.spec.n_heads, m.spec.head_dim) and k.shape[:2] == (T, m.spec.n_kv_heads)
        scale = m.hf.get_submodule(m.spec.attention_paths[layer]).scaling
        k = k.repeat_interleave(m.spec.group_size, dim=1)
        s = torch.einsum("ihd,jhd->hij", q.double(), k.double()) * scale
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        vis = j <= i
        w = m.spec.sliding_windows[layer]
        if w:
            vis &= j > i - w
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1)
        torch.testing.assert_close(p.float(), cap[f"blocks.{layer}.attn.tile.0"][0], atol=1e-5, rtol=0)


def test_decode_only_capture_keeps_the_prompt_for_induction_keys(tiny):
    """capture(rows="decode") skips the prompt pass, but a decode row's induction key j*+1 may lie in it."""
    m = tiny("llama")
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5]])

    def run():
        out = m.hf(input_ids=ids, use_cache=True)
        m.hf(input_ids=torch.tensor([[6]]), past_key_values=out.past_key_values, use_cache=True)  # 6 occurred at 4 → key 5

    with torch.no_grad():
        with wb.capture(m, wb.AttentionStats(taxonomy=True, layers=[0]), rows="decode") as dec:
            run()
        with wb.capture(m, wb.AttentionStats(taxonomy=True, layers=[0])) as full:
            run()
    got, want = dec["blocks.0.attn.induction_mass"], full["blocks.0.attn.induction_mass"][..., -1:]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bad", [3, [3], ["blocks.0.attn.entropy", None]])
def test_names_filter_of_the_wrong_type_is_a_clear_error(tiny, bad):
    m = tiny("llama")
    with pytest.raises(wb.ProbeError, match="names_filter must be a name, a glob"):
        wb.Hook(bad, lambda t, n: None).bind(m)
    with pytest.raises(wb.ProbeError, match="names_filter must be a name, a glob"):
        wb.Activations(bad).bind(m)
    with pytest.raises(wb.ProbeError, match="names_filter must be a name, a glob"):
        with wb.capture(m, names_filter=bad):
            pass


def test_transformerlens_aliases_work_in_globs(tiny):
    m = tiny("mixtral")
    with wb.capture(m, names_filter="blocks.*.mlp.hook_expert_indices") as cap, torch.no_grad():
        m.hf(input_ids=IDS)
    assert cap.names() == [f"blocks.{l}.mlp.router.experts" for l in m.spec.moe_layers]


def test_budget_error_states_the_budget_asked_for(tiny):
    m = tiny("llama")
    with pytest.raises(wb.ProbeError, match="budget of 10 elements"):
        with wb.capture(m, wb.Activations("blocks.0.hook_resid_post"), max_elements=10), torch.no_grad():
            m.hf(input_ids=IDS)
    with pytest.raises(wb.ProbeError, match="max_elements must be a whole number"):
        with wb.capture(m, wb.Activations(), max_elements="many"):
            pass


def test_hook_edits_are_labelled_the_same_in_captures_and_results(tiny):
    from workbench.core.capture import edit_labels

    m = tiny("llama")

    def plant(t, name):
        return t

    hook = wb.Hook("blocks.0.hook_resid_post", plant)
    with wb.intervene(m, hook), wb.capture(m, wb.AttentionStats(layers=[0])) as cap, torch.no_grad():
        m.hf(input_ids=IDS)
    assert cap.provenance.extra["edits"] == edit_labels([hook]) == ["hook:plant"]
