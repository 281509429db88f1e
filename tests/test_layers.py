"""The package's layers: load → capture → measure → store → view. A module never imports from a layer
above its own (at module level or inside a function), and no two modules import each other in a circle."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "workbench"

#: the package's layers, one folder each (lower number = lower layer); a new module goes in its layer's folder,
#: a new folder must be placed here. Folders on one line may import each other (the hook core and the attention
#: backend: hooks carry the attention request, the backend plugs into the hooks).
LAYERS = {
    0: ["base"],  # errors, provenance, files, plots, display: no workbench imports above them
    1: ["models"],  # the load layer: sources, embedded, model, spec, architectures, loading, zoo, testing
    2: ["core", "attention", "kernels"],  # names, hooks, capture, activations, interop; the backend and its kernels
    3: ["measure"],  # scan, result and one module per measurement
    4: ["routing"],  # MoE: router probe, edits, rules, analyses, routing scan (reads the sink measurement)
    5: ["store"],
    6: ["views", "study"],  # widgets, dashboard, report; scripted studies (the dashboard's runs tab reads them)
    7: ["cli", "__main__", "train"],  # the command on top; the zoo's training scripts
}
_LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


KERNELS = ROOT / "kernels"  # workbench.kernels (through the symlink workbench/kernels; no __init__.py)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("") if PKG in path.parents else Path("kernels") / path.relative_to(KERNELS).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    """The layer of a module: its folder's (measure.sinks → measure, attention.backend → attention)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in _LAYER_OF:
            return _LAYER_OF[".".join(parts[:i])]
    raise KeyError(module)


def _imports(path: Path, module: str) -> set[str]:
    """Workbench modules ``path`` imports anywhere (module level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*anchor, *(node.module.split(".") if node.module else [])])
                names = [f"{target}.{a.name}" if target else a.name for a in node.names]
                out |= {_known(n) or target for n in names}
            elif node.module and node.module.startswith("workbench"):
                out.add(node.module.removeprefix("workbench").lstrip(".") or "")
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("workbench").lstrip(".") for a in node.names if a.name.startswith("workbench.")}
    return {m for m in out if m and m != module}


def _known(name: str) -> str | None:
    """``name`` if it is a module of the package (``from . import sinks``), else None (an attribute)."""
    parts = name.split(".")
    p = KERNELS.joinpath(*parts[1:]) if parts[0] == "kernels" else PKG.joinpath(*parts)
    package = (p / "__init__.py").exists() or (p.is_dir() and any(p.glob("*.py")))  # kernels/ has no __init__.py
    return name if p.with_suffix(".py").exists() or package else None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in {p.resolve() for p in [*PKG.rglob("*.py"), *KERNELS.rglob("*.py")]}:
        if "static" in path.parts:
            continue
        mod = _module_name(path)
        graph[mod] = {m for m in _imports(path, mod) if _known(m)}
    return graph


def test_every_module_has_a_layer():
    missing = sorted(m for m in _graph() if m and _safe_layer(m) is None)
    assert not missing, f"place these modules in tests/test_layers.py LAYERS: {missing}"


def _safe_layer(m):
    try:
        return _layer(m)
    except KeyError:
        return None


def test_no_module_imports_a_layer_above_its_own():
    bad = []
    for mod, deps in _graph().items():
        if not mod:
            continue
        for d in deps:
            if _layer(d) > _layer(mod):
                bad.append(f"{mod} (layer {_layer(mod)}) imports {d} (layer {_layer(d)})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles_between_modules():
    graph = {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")} for m, deps in _graph().items() if m}
    # a package importing its own submodules (re-exports) is not a cycle; modules in a loop are
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            visit(d)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, "\n".join(" → ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_table_names_existing_modules(layer):
    for name in LAYERS[layer]:
        assert _known(name), f"{name} in LAYERS does not exist"
