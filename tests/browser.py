"""Shared bits of the browser tests: Chromium's flags (offline, headless, as root) and where screenshots go."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def artifacts() -> Path:
    """Screenshot folder: ``$WORKBENCH_ARTIFACTS`` or ``test-artifacts/`` at the repository root."""
    path = Path(os.environ.get("WORKBENCH_ARTIFACTS", ROOT / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path
