"""Shared bits of the browser tests: Debian's Chromium under Playwright (flags: offline, headless, as root),
where screenshots go, and a server subprocess on a free loopback port that is waited for and stopped. The
``browser`` fixture (tests/conftest.py) is :func:`launched`."""
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@contextmanager
def launched():
    """Debian's ``chromium`` driven by Playwright (never ``playwright install``); skips the test when either is missing."""
    import pytest

    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (`make browser` installs it); browser tests skipped")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def artifacts() -> Path:
    """Screenshot folder: ``$WORKBENCH_ARTIFACTS`` or ``test-artifacts/`` at the repository root."""
    path = Path(os.environ.get("WORKBENCH_ARTIFACTS", ROOT / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(cmd: list[str], ready_url: str, log: Path, *, env: dict | None = None, cwd: Path = ROOT, timeout: float = 180):
    """Start ``cmd`` (output to ``log``), wait until ``ready_url`` answers 200, stop it with SIGTERM afterwards."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            end = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    if urllib.request.urlopen(ready_url, timeout=2).status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > end:
                    raise AssertionError(f"{ready_url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
