"""The package's own import graph has no cycle, and ``import qcompile`` stays cheap.

Edges come from parsing every module with ``ast``. Importing ``a.b.c`` also runs ``a.b``'s ``__init__``, so an
edge goes to each package above the target too, except the importer's own packages (those are initialized, or
initializing, before it runs). ``from pkg import name`` points at the submodule ``pkg.name`` where there is one.
"""

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

import qcompile

ROOT = Path(qcompile.__file__).parent
CORE = ("qcompile.recipe", "qcompile.pipeline", "qcompile.passes")  # the modules that used to import in a circle


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = ("qcompile", *f.relative_to(ROOT).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _targets(node: ast.stmt, mods: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in mods]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                for a in node.names if node.module in mods or f"{node.module}.{a.name}" in mods]
    return []


def _top_level(tree: ast.Module):
    """Import statements that run when the module is imported: the module body, and inside its top-level
    ``if``/``try`` blocks (not inside functions or classes)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            todo += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                     *(s for h in getattr(node, "handlers", []) for s in h.body)]
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node


def import_graph(deferred: bool = False) -> nx.DiGraph:
    """qcompile's modules and their imports (``deferred``: also those inside functions)."""
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for m, f in mods.items():
        tree = ast.parse(f.read_text(), str(f))
        own = {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)} | {m}
        for node in (ast.walk(tree) if deferred else _top_level(tree)):
            for t in _targets(node, mods):
                parents = {".".join(t.split(".")[:i]) for i in range(1, t.count(".") + 1)}
                for target in ({t} | parents) - own:
                    g.add_edge(m, target)
    return g


def test_the_graph_sees_the_package():
    g = import_graph()
    assert {"qcompile.recipe", "qcompile.pipeline", "qcompile.passes.registry", "qcompile.passes.options"} <= set(g)
    assert g.has_edge("qcompile.pipeline", "qcompile.passes.registry")
    assert g.has_edge("qcompile.passes.rotate", "qcompile.passes.weights")
    assert g.has_edge("qcompile.recipe", "qcompile.passes")  # the package whose __init__ runs first


def test_a_cycle_would_be_found():
    g = import_graph()
    g.add_edge("qcompile.passes.options", "qcompile.pipeline")  # what a registry importing the pipeline would do
    assert list(nx.simple_cycles(g))


def test_no_import_cycle_at_module_level():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, f"import cycles: {cycles}"


def test_no_cycle_among_recipe_pipeline_and_passes_even_through_deferred_imports():
    g = import_graph(deferred=True)
    core = g.subgraph(n for n in g if n.startswith(CORE))
    cycles = list(nx.simple_cycles(core))
    assert not cycles, f"import cycles (imports inside functions included): {cycles}"


def test_options_and_recipe_do_not_import_the_passes_or_the_pipeline():
    g = import_graph(deferred=True)
    for m in ("qcompile.passes.options", "qcompile.recipe"):
        reached = nx.descendants(g, m)
        assert not reached & {"qcompile.pipeline", "qcompile.passes.registry", "qcompile.passes.quantize",
                              "qcompile.passes.rotate"}, (m, sorted(reached))


def test_import_qcompile_is_cheap():
    code = "import sys, qcompile; print(sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_name_in_a_modules_all_exists():
    """``from m import *`` fails on a name ``__all__`` lists but the module does not define."""
    import importlib
    missing = {}
    for m, f in _modules().items():
        if "__all__" not in f.read_text():
            continue
        mod = importlib.import_module(m)
        absent = [n for n in getattr(mod, "__all__", ()) if not hasattr(mod, n)]
        if absent:
            missing[m] = absent
    assert not missing, f"names in __all__ the module does not define: {missing}"
