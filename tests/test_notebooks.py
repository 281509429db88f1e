"""The tutorial notebooks (``notebooks/*.ipynb``) run top to bottom, headlessly, and are committed stripped.

Each notebook is executed with nbclient in a kernel started from *this* interpreter (the venv's
ipykernel, whatever kernelspecs the machine has installed), with ``notebooks/`` as the working
directory. Every notebook is in the slow tier (tests/conftest.py); those that load the embedded SmolLM2
(``wb.load()`` / ``workbench.load()`` with no source) also carry the ``smollm`` marker, like the tests
that use the ``smollm`` fixture. A notebook can override that detection with
``metadata.workbench.slow: true|false``.
The kernel runs torch single-threaded (see :func:`test_notebook_runs`).
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # one cell (a scan) on a slow, shared 2-core CPU
NOTEBOOK_TIMEOUT_S = 1200  # the whole notebook, kernel start included
try:  # the dev extra lists pytest-timeout; without it each cell is still bounded by CELL_TIMEOUT_S
    import pytest_timeout  # noqa: F401

    HAVE_PYTEST_TIMEOUT = True
except ImportError:  # pragma: no cover
    HAVE_PYTEST_TIMEOUT = False
EMBEDDED_LOAD = re.compile(r"\b(?:wb|workbench)\.load\(\s*\)")


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _code(nb: dict) -> str:
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def needs_embedded_model(path: Path) -> bool:
    nb = _read(path)
    override = nb.get("metadata", {}).get("workbench", {}).get("slow")
    return bool(override) if override is not None else bool(EMBEDDED_LOAD.search(_code(nb)))


def _param(path: Path):
    marks = [pytest.mark.timeout(NOTEBOOK_TIMEOUT_S)] if HAVE_PYTEST_TIMEOUT else []
    if needs_embedded_model(path):
        marks.append(pytest.mark.smollm)
    return pytest.param(path, id=path.stem, marks=marks)


def _kernel_manager(ipc_dir: Path):
    """A KernelManager whose kernel is ``sys.executable -m ipykernel_launcher`` (not a machine-wide spec)."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    class ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name=f"Python ({sys.executable})", language="python", resource_dir=str(NOTEBOOK_DIR),
            )  # fmt: skip

    # IPC sockets: local only, and no "running over TCP without encryption" warning from ipykernel
    return KernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter(), transport="ipc", ip=str(ipc_dir / "kernel"))


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks under {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_stripped(path):
    nb = _read(path)
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", "kernelspec name must be python3"
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name}: code cells {dirty} carry outputs; clear outputs before committing"


@pytest.mark.parametrize("path", [_param(p) for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # One intra-op thread in the kernel: on a shared small CPU (CI runners, several jobs on 2 cores) torch's
    # OpenMP workers spin-wait on each other and 2 threads ran these notebooks ~8x slower than 1.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    km = _kernel_manager(tmp_path)
    client = NotebookClient(
        nb, km=km, timeout=CELL_TIMEOUT_S, startup_timeout=120, resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        client.execute()
    finally:
        if km.has_kernel:  # nbclient leaves a kernel it did not create running
            km.shutdown_kernel(now=True)
        nbformat.write(nb, tmp_path / path.name)  # the executed copy, for a look after a failure
    elapsed = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    print(f"\n{path.name}: executed in {elapsed:.0f} s")
