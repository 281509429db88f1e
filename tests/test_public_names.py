"""Every public name the README lists resolves: ``wb.*`` attributes (``wb.sinks.scan``, ``wb.widgets.HeadGrid``),
``from workbench… import …`` lines and dotted ``workbench.…`` module paths. Moving a module between layer
folders must not move a name users type."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import workbench as wb

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _attr_chains() -> list[str]:
    """``wb.a.b.c`` chains in the README (a chain ends before a call, an index or a non-name)."""
    return sorted({m.group(0) for m in re.finditer(r"(?<![\w.])wb(?:\.[A-Za-z_]\w*)+", README)})


def _from_imports() -> list[tuple[str, str]]:
    out = []
    for m in re.finditer(r"^\s*from (workbench[\w.]*) import ([^\n#]+)", README, re.M):
        for name in m.group(2).replace("(", "").replace(")", "").split(","):
            if name.strip():
                out.append((m.group(1), name.strip().split(" as ")[0]))
    return sorted(set(out))


def _module_paths() -> list[str]:
    """``workbench.x.y`` paths in backticks that name modules (not attributes of one)."""
    return sorted({m.group(1) for m in re.finditer(r"`(workbench(?:\.[a-z_]\w*)+)", README)})


def test_the_readme_lists_names():
    assert len(_attr_chains()) > 20 and _from_imports() and _module_paths()


@pytest.mark.parametrize("chain", _attr_chains())
def test_wb_attribute_resolves(chain):
    obj = wb
    for part in chain.split(".")[1:]:
        assert hasattr(obj, part), f"{chain}: {obj!r} has no {part!r}"
        obj = getattr(obj, part)


@pytest.mark.parametrize("module,name", _from_imports())
def test_from_import_resolves(module, name):
    assert hasattr(importlib.import_module(module), name), f"from {module} import {name}"


@pytest.mark.parametrize("path", _module_paths())
def test_dotted_path_resolves(path):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable prefix, the rest attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            assert hasattr(obj, part), f"{path}: {obj!r} has no {part!r}"
            obj = getattr(obj, part)
        return
    pytest.fail(f"{path} does not import")
