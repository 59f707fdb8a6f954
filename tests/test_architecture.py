"""The house rules the layout promises: no import circle between the package's modules
(counting imports inside functions too), and one place for each policy."""

from __future__ import annotations

import ast
import os

import relex_kernels

PKG_DIR = os.path.dirname(relex_kernels.__file__)


def _modules() -> dict[str, str]:
    out = {}
    for dp, _, fns in os.walk(PKG_DIR):
        for fn in fns:
            if fn.endswith(".py"):
                path = os.path.join(dp, fn)
                rel = os.path.relpath(path, os.path.dirname(PKG_DIR))[:-3].replace(os.sep, ".")
                out[rel[:-9] if rel.endswith(".__init__") else rel] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its body; a name imported from a
    package counts as the package unless it is a submodule; compiled extensions are leaves)."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        with open(path) as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            found = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = m.split(".")[:len(m.split(".")) - (0 if is_pkg else 1) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    if a.name.startswith("_C"):
                        continue  # the compiled extension modules
                    sub = f"{base}.{a.name}"
                    found.append(sub if sub in mods else base)
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            edges[m].update(t for t in found if t in mods and t != m)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions():
    g = import_graph()
    assert "relex_kernels.engine.spmd" in g["relex_kernels.engine.run"]  # imported in _execute


def test_one_range_policy_and_one_gram_sum():
    """The range rule and the two-level Gram sum live in one module each: no executor
    re-derives them (the duplication this layout removed)."""
    engine = os.path.join(PKG_DIR, "engine")
    for fn in os.listdir(engine):
        if not fn.endswith(".py") or fn in ("plan.py", "gramsum.py"):
            continue
        with open(os.path.join(engine, fn)) as fh:
            text = fh.read()
        assert "// GRAM_BLOCK + 1) * GRAM_BLOCK" not in text, fn  # block edges: GramSum.pieces
        assert "def ranges(" not in text or "self.policy.ranges" in text, fn
