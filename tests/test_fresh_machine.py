"""A fresh machine in any directory: nothing in the repository root shadows an installed package, and the
wheel works outside the repository.

- From the repository root (where ``python -m ...`` and ``python -c`` put the root first on ``sys.path``),
  ``import kernels`` must be Hugging Face's package (transformers imports it), and the README's commands run.
- The wheel, installed into a fresh virtual environment in a temporary directory, runs the embedded model,
  a capture, a sink scan and the CLI from a directory outside the checkout: it carries the kernels, the widget
  JavaScript, the data and the zoo model. The venv's dependencies are the lock's versions (requirements/lock.txt).
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
WHEELS = Path("/opt/wheels")  # torch's CPU build on the CI machine kind (see the Makefile)


def _run(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> str:
    env = {**os.environ, **(env or {})}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{args} in {cwd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_no_root_folder_is_a_package_named_like_an_installed_one():
    """A root folder with ``__init__.py`` shadows any installed package of that name for code run from the root."""
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists())
    assert packages == ["workbench"], packages
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_the_version_is_our_distributions():
    from importlib import metadata

    import workbench as wb
    from workbench.base.provenance import library_versions

    assert wb.__version__ == metadata.version("interp-workbench") == library_versions()["workbench"]


def test_commands_from_the_repository_root_with_hugging_faces_kernels_installed():
    origin = _run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], ROOT).strip()
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(origin).resolve().is_relative_to(site), f"`import kernels` from the root gives {origin}"
    assert "Usage" in _run([sys.executable, "-m", "workbench", "--help"], ROOT)
    out = _run([sys.executable, "-c", "import workbench as wb; m = wb.load('tiny:llama'); m.forward_text('hi'); "
                "import workbench.kernels.semantics as s; print(s.__file__)"], ROOT)  # fmt: skip
    assert Path(out.strip()).resolve() == ROOT / "kernels" / "semantics.py"
    collected = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], ROOT)
    assert " collected" in collected.splitlines()[-1] or "tests collected" in collected.splitlines()[-1], collected[-500:]
    assert "error" not in collected.splitlines()[-1]


def test_readme_quick_start_in_a_python_shell_at_the_repository_root():
    """The README's quick start, fed to an interactive interpreter started in the root (as a user types it)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme[readme.index("## Quick start"):]
    code = quick[quick.index("```python") + len("```python"):quick.index("```", quick.index("```python") + 9)]
    assert "wb.load()" in code
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    proc = subprocess.run([sys.executable, "-i", "-q"], cwd=ROOT, input=code + "\n", capture_output=True, text=True,
                          timeout=900, env=env)  # fmt: skip
    assert "Paris" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed with its dependencies (pinned by the lock) into a fresh venv."""
    uv = pytest.importorskip("uv", reason="the set-up installs uv (requirements/uv.txt)").find_uv_bin()
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)], tmp)
    wheels = list(dist.glob("interp_workbench-*.whl"))
    assert len(wheels) == 1, list(dist.iterdir())
    venv = tmp / "venv"
    _run([uv, "venv", "-q", "--python", sys.executable, str(venv)], tmp)
    links = ["--find-links", str(WHEELS)] if WHEELS.is_dir() else []
    _run([uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), *links, "-c", str(LOCK), str(wheels[0])], tmp)
    return venv


def test_the_wheel_works_outside_the_repository(wheel_venv, tmp_path):
    py, cli = wheel_venv / "bin" / "python", wheel_venv / "bin" / "workbench"
    where = tmp_path / "elsewhere"  # not the checkout, not the venv
    where.mkdir()
    script = """
import pathlib, sys
import workbench as wb
import workbench.kernels.attention_stats, workbench.kernels.reference
here = pathlib.Path(wb.__file__).resolve().parent
assert here.is_relative_to(pathlib.Path(sys.prefix).resolve()), here
for rel in ["kernels/semantics.py", "views/widgets/static/head_grid.js", "data/needles.json", "models/zoo/tiny-moe/model.safetensors"]:
    assert (here / rel).is_file(), rel
m = wb.load()                                    # the embedded SmolLM2 (the shared model cache)
with wb.capture(m, wb.AttentionStats(sink_keys=1)) as cap:
    m.forward_text("The quick brown fox jumps over the lazy dog.")
assert cap.stack("attn.alpha").shape[0] == m.spec.n_layers
r = wb.sinks.scan(m, T=32, texts=[wb.niah.haystack()[:2000]], progress=False)
print("sink rate", r.sink_rate(0))
moe = wb.load("tiny-moe")                         # the zoo model shipped in the wheel
with wb.capture(moe, wb.Routing()) as cap:
    moe.forward_text("def f(x): return x")
print("ok", len(cap.names()))
"""
    out = _run([str(py), "-c", script], where, timeout=900)
    assert "sink rate" in out and out.strip().splitlines()[-1].startswith("ok")
    res = where / "sinks"
    out = _run([str(cli), "scan", "sinks", "--T", "64", "--out", str(res)], where, timeout=900)
    assert any(res.rglob("*.parquet")), out
    assert "Usage" in _run([str(cli), "serve", "--help"], where)
