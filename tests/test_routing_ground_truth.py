"""Ground truth: hand-built MoEs whose routers follow a known function of the token id (or of the
position only). Capture must recover the function exactly and the analyses must name its cause."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import workbench as wb
from workbench.models.testing import byte_tokenizer, tiny_config

from test_routing_capture import one_thread  # noqa: F401,E402  (autouse fixture)

E = 8
BOS = 257
PERM = [3, 7, 0, 5, 1, 6, 2, 4]  # layer 1 routes expert e's tokens to PERM[e]


def first(t: int) -> int:
    return t % E


def second(t: int) -> int:
    return (t + 1 + (t // E) % (E - 1)) % E  # never equal to first(t)


def _mixtral(layers: int):
    cfg = tiny_config("mixtral")
    cfg.num_local_experts, cfg.num_hidden_layers, cfg.sliding_window = E, layers, None
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@torch.no_grad()
def token_router_model():
    """Residual stream = token embedding at every layer (attention and experts write nothing); the
    embedding one-hot-codes first(t) (dims 0..7, value 4) and second(t) (dims 8..15, value 2), every
    token with the same norm, so RMSNorm scales all alike; router row e reads dims e and 8+e."""
    hf = _mixtral(2)
    emb = hf.model.embed_tokens.weight
    emb.zero_()
    for t in range(emb.shape[0]):
        emb[t, first(t)], emb[t, E + second(t)] = 4.0, 2.0
    for i, layer in enumerate(hf.model.layers):
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.experts.down_proj.zero_()
        w = layer.mlp.gate.weight
        w.zero_()
        for e in range(E):
            target = e if i == 0 else PERM[e]
            w[target, e], w[target, E + e] = 1.0, 1.0
    return wb.load(hf, tokenizer=byte_tokenizer(), source_label="test:token-router")


CENTRES = [0, 1, 2, 3, 5, 8, 13, 21]  # expert e is "nearest" to position CENTRES[e]


def position_expert(p: int) -> int:
    """The expert whose centre 1/(q+1) is nearest to 1/(p+1)."""
    return min(range(E), key=lambda e: abs(1 / (p + 1) - 1 / (CENTRES[e] + 1)))


@torch.no_grad()
def position_router_model():
    """Only BOS has a value (dim 0); queries are zero, so attention is uniform over the causal prefix
    and writes u = a/(p+1) into dim 1 at position p. Dim 2 is a constant 1 in every token; the other
    tokens' identities live in dims 16.. with a fixed norm (so RMSNorm depends on position only).
    Router row e = 2·μ_e·dim1 − μ_e²·dim2 with μ_e = a/(q_e+1): argmax = nearest centre to u."""
    hf = _mixtral(1)
    emb = hf.model.embed_tokens.weight
    g = torch.Generator().manual_seed(1)
    directions = torch.randn(emb.shape[0], emb.shape[1] - 16, generator=g)
    emb.zero_()
    emb[:, 16:] = 4 * directions / directions.norm(dim=1, keepdim=True)
    emb[:, 2] = 1.0
    emb[BOS, 16:] = 0.0
    emb[BOS, 0] = 4.0
    layer = hf.model.layers[0]
    attn = layer.self_attn
    for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
        p.weight.zero_()
    attn.v_proj.weight[0, 0] = 1.0  # KV head 0, value dim 0 <- hidden dim 0 (BOS only)
    attn.o_proj.weight[1, 0] = 1.0  # hidden dim 1 <- query head 0, value dim 0
    bos_normed = 4.0 / torch.sqrt(torch.tensor((16.0 + 1.0) / emb.shape[1]))  # input RMSNorm of the BOS row
    a = float(bos_normed)
    w = layer.mlp.gate.weight
    w.zero_()
    for e, q in enumerate(CENTRES):
        mu = a / (q + 1)
        w[e, 1], w[e, 2] = 2 * mu, -(mu**2)
    return wb.load(hf, tokenizer=byte_tokenizer(), source_label="test:position-router")


def _sequences(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(0, vocab, (n, length - 1), generator=g)
    return torch.cat([torch.full((n, 1), BOS), body], dim=1)


@pytest.fixture(scope="module")
def token_capture():
    m = token_router_model()
    ids = _sequences(8, 48, 32, seed=0)
    with wb.capture(m, wb.Routing()) as cap, torch.no_grad():
        m.hf(input_ids=ids)
    return ids, wb.routing.rows(cap)


def test_capture_recovers_token_function_exactly(token_capture):
    ids, rec = token_capture
    assert rec.verified
    assert rec.token_ids.tolist() == ids.flatten().tolist()
    want0 = torch.tensor([[first(t), second(t)] for t in ids.flatten().tolist()])
    assert torch.equal(rec.experts[0], want0)
    want1 = torch.tensor([[PERM[first(t)], PERM[second(t)]] for t in ids.flatten().tolist()])
    assert torch.equal(rec.experts[1], want1)
    assert torch.equal(rec.ran, rec.experts)  # what the experts module received
    # logits are (4, 2, 0, ...) / rms: the margin is p(second) − p(third) of their softmax
    rms = (20.0 / 64) ** 0.5
    p = torch.softmax(torch.tensor([4.0, 2.0] + [0.0] * (E - 2)) / rms, 0)
    torch.testing.assert_close(rec.margin, torch.full_like(rec.margin, float(p[1] - p[2])))


@pytest.mark.parametrize("choice", ["top1", "set"])
def test_token_specialisation_is_maximal(token_capture, choice):
    _, rec = token_capture
    spec = wb.routing.token_specialisation(rec, choice=choice)
    assert spec.score.tolist() == [1.0, 1.0]
    assert (spec.context.abs() < 1e-9).all()  # the context adds nothing beyond the token id
    pos = wb.routing.position_dependence(rec, choice=choice)
    assert (pos.score < 0.15).all(), pos


def test_transitions_recover_the_permutation(token_capture):
    _, rec = token_capture
    t = wb.routing.transitions(rec)
    seen = sorted(set(rec.experts[0, :, 0].tolist()))
    assert seen == list(range(E))  # tokens 0..31 reach every expert
    want = torch.zeros(E, E)
    for e in seen:
        want[e, PERM[e]] = 1.0
    torch.testing.assert_close(t[0], want)


def test_position_router_is_found_position_dependent():
    m = position_router_model()
    ids = _sequences(16, 32, 32, seed=3)
    with wb.capture(m, wb.Routing()) as cap, torch.no_grad():
        m.hf(input_ids=ids)
    rec = wb.routing.rows(cap)
    assert rec.verified
    want = torch.tensor([position_expert(p) for p in range(32)]).repeat(16)
    assert torch.equal(rec.experts[0, :, 0], want)
    assert len(set(want.tolist())) >= 6  # the construction really varies with position
    pos = wb.routing.position_dependence(rec)
    assert pos.score.tolist() == [1.0]
    # BOS is token 257 exactly when position is 0: leave it out, it would (rightly) look token-determined
    tok = wb.routing.token_specialisation(rec, rows=rec.positions > 0)
    assert float(tok.score[0]) < 0.1, tok
    assert float(wb.routing.position_dependence(rec, rows=rec.positions > 0).score[0]) == 1.0
