"""Issue 14, bare tracebacks → clear errors: every CLI option is checked before a model loads, each failure
names the problem and exits non-zero, and an unexpected exception says "internal error, please report" with
its traceback in a log file. In-process through typer's CliRunner (fast), plus one real subprocess."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import workbench
from workbench.cli import app

STUDY = 'name = "s"\n[model]\nsource = "tiny:llama"\n[task]\nkind = "loss"\n[[grid]]\nselect = "none"\n'


@pytest.fixture
def no_model(monkeypatch):
    """Validation must finish before any model loads."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(workbench, "load", refuse)
    monkeypatch.setattr("workbench.models.loading.load", refuse)


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _fails(result, message: str, code: int = 2):
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, AssertionError), result.exception


def test_options_are_checked_before_the_model_loads(tmp_path, no_model):
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    _fails(_run("scan", "sinks", "--model", "tiny:llama", "--out", existing), "is an existing file")
    _fails(_run("scan", "retrieval", "--model", "tiny:llama", "--lengths", "300", "--mode", "bogus"), "--mode must be one of")
    _fails(_run("scan", "retrieval", "--model", "tiny:llama", "--lengths", "300", "--variant", "x"), "--variant must be one of")
    _fails(_run("scan", "retrieval", "--model", "tiny:llama", "--lengths", "300", "--ablation-k", "8"), "must be below the model's 8 heads")
    _fails(_run("scan", "retrieval", "--model", "tiny:llama", "--lengths", "600"), "exceeds the model's 512 positions")
    _fails(_run("scan", "sinks", "--T", "100000"), "--T 100000 exceeds the model's 8192 positions")
    _fails(_run("scan", "sinks", "--model", "tiny:llama", "--eps", "2"), "ε must lie in (0, 1)")
    _fails(_run("demo", "--model", tmp_path / "no-such-model"), "model not found")
    _fails(_run("demo", "--model", tmp_path / "missing.gguf"), "GGUF file not found")
    _fails(_run("study", "run", tmp_path), "is a directory; give the study file")
    (tmp_path / "bin.toml").write_bytes(b'name = "s"\n\xff')
    _fails(_run("study", "run", tmp_path / "bin.toml"), "is not UTF-8 text")
    (tmp_path / "deep.toml").write_bytes(b"a = " + b"[" * 5000 + b"]" * 5000)
    _fails(_run("study", "run", tmp_path / "deep.toml"), "nested too deeply")
    (tmp_path / "ok.toml").write_text(STUDY)
    _fails(_run("study", "run", tmp_path / "ok.toml", "--workers", "0", "--executor", "ray"), "--workers")
    _fails(_run("study", "report", existing), "is not a directory")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        _fails(_run("serve", "--port", busy.getsockname()[1], "--model", "tiny:llama"), "already in use")
    _fails(_run("serve", "--address", "no-such-host.invalid", "--model", "tiny:llama", "--basic-auth", "pw", "--cookie-secret", "s"), "does not resolve")
    _fails(_run("serve", "--model", tmp_path / "nope", "--port", _free_port()), "model not found")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_prompts_are_errors_not_tracebacks(tmp_path):
    # a non-UTF-8 byte in argv reaches Python as a lone surrogate (surrogateescape)
    _fails(_run("demo", "--model", "tiny:llama", "--prompt", "caf\udce9", "--lengths", "300", "--out", tmp_path), "lone surrogate")


def test_an_unexpected_exception_is_an_internal_error_with_a_log(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("workbench.measure.sinks.scan", bug)
    result = _run("scan", "sinks", "--model", "tiny:llama", "--out", tmp_path / "out")
    assert result.exit_code == 3 and "internal error, please report: ZeroDivisionError: a bug" in result.output
    log = result.output.split("traceback written to ")[1].strip()
    text = open(log).read()
    assert "Traceback" in text and "ZeroDivisionError: a bug" in text


def test_the_real_command_exits_2_without_a_traceback(tmp_path):
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "workbench", "scan", "sinks", "--model", "tiny:llama", "--out", str(existing)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "is an existing file" in proc.stderr and "Traceback" not in proc.stderr
    assert "loading" not in proc.stdout


# --- the library calls behind the CLI: clear errors for bad arguments -------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return workbench.load("tiny:llama")


@pytest.mark.parametrize(
    "ids, message",
    [
        ([1, 260], r"token id 260 is outside the model's vocabulary \(ids 0..259\)"),
        ([-1, 5], r"token id -1 is outside"),
        (["a", "b"], r"token ids must be integers, got 'a'"),
        ([1.5], r"token ids must be integers"),
        ("caf\udce9", r"lone surrogate"),
        (3.5, r"a prompt is text \(str\) or token ids"),
    ],
)
def test_model_encode_rejects_what_it_cannot_run(llama, ids, message):
    with pytest.raises(workbench.ProbeError, match=message):
        llama.encode(ids)


def test_model_encode_checks_tensors(llama):
    import torch

    with pytest.raises(workbench.ProbeError, match="integer tensor"):
        llama.encode(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(workbench.ProbeError, match="outside the model's vocabulary"):
        llama.encode(torch.tensor([[1, 999]]))
    assert llama.encode(torch.tensor([1, 2])).shape == (1, 2)


def test_generate_beyond_the_models_positions(llama):
    with pytest.raises(workbench.ProbeError, match=r"\+ 600 new tokens exceeds the model's 512 positions"):
        llama.generate("hello", max_new_tokens=600, chat=False)
    with pytest.raises(workbench.ProbeError, match="max_new_tokens must be a whole number ≥ 1"):
        llama.generate("hello", max_new_tokens=0, chat=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depths": 2.5}, r"depths \(a count; or give a list of percentages\) must be an integer, got 2.5"),
        ({"lengths": "500"}, r"lengths must be a list of integers"),
        ({"lengths": 500}, r"lengths must be a list of integers"),
        ({"lengths": [300], "max_new_tokens": 0}, r"max_new_tokens must be ≥ 2"),
        ({"lengths": [300.5]}, r"lengths: each value must be an integer, got 300.5"),
        ({"lengths": [300], "depths": ["a"]}, r"depths must be numbers"),
        ({"lengths": [300], "n_needles": 0}, r"n_needles must be in 1\.\.12, got 0"),
    ],
)
def test_retrieval_scan_arguments(llama, kwargs, message):
    from workbench import retrieval

    with pytest.raises(workbench.ProbeError, match=message):
        retrieval.scan(llama, progress=False, **kwargs)


def test_ablation_mode_is_checked_before_the_scans(llama):
    from workbench import retrieval

    with pytest.raises(workbench.ProbeError, match="mode must be one of"):
        retrieval.ablation_check(llama, result=None, mode="bogus")


def test_sink_scan_arguments(llama):
    from workbench import sinks

    with pytest.raises(workbench.ProbeError, match=r"T = 100000 needs texts of about 600,000 characters"):
        sinks.texts_for(100_000)
    with pytest.raises(workbench.ProbeError, match=r"T = 1000 exceeds the model's 512 positions"):
        sinks.scan(llama, texts=["x " * 2000], T=1000)
    with pytest.raises(workbench.ProbeError, match="non-empty list of non-empty strings"):
        sinks.scan(llama, texts="one text", T=8)


def test_doctor_reports_an_empty_cache_without_repairing(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    result = _run("doctor", "--no-repair")
    assert result.exit_code == 1 and "GGUF: not downloaded; conversion: not converted yet" in result.output


def test_exposure_rules(monkeypatch):
    pytest.importorskip("panel")
    from workbench.views.dashboard import serve

    def situation(hosts, auth, argv=("panel", "serve", "apps/dashboard.py")):
        monkeypatch.setattr(serve, "listening_addresses", lambda: hosts)
        monkeypatch.setattr(serve, "_auth_configured", lambda: auth)
        monkeypatch.setattr(sys, "orig_argv", list(argv), raising=False)
        return serve.exposure_problem()

    assert "every interface" in situation(["0.0.0.0", "::"], False)
    assert "10.1.2.3" in situation(["127.0.0.1", "10.1.2.3"], False)
    assert situation(["0.0.0.0"], True) is None
    assert situation(["127.0.0.1", "::1"], False) is None
    assert situation(["unix"], False) is None
    assert "every interface" in situation(None, False)  # --warm: no socket yet, no --address: all interfaces
    assert situation(None, False, ("panel", "serve", "app.py", "--address", "127.0.0.1", "--args", "--address", "0.0.0.0")) is None
    assert "0.0.0.0" not in (situation(None, False, ("panel", "serve", "app.py", "--address=localhost")) or "")
    assert situation(None, False, ("panel", "serve", "app.py", "--unix-socket", "/tmp/s")) is None
