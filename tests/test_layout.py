"""The layout's rules, read from the source: imports go one way, scripts never import scripts, the
training recipe builds nothing the library cannot build."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("qformer", "adapters", "bench", "demos")


def project_files() -> dict[str, Path]:
    """module name -> file, for every module of the project (train.py included)."""
    modules = {"train": ROOT / "train.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `name` imports anywhere in its file: at the top, inside functions (lazy), or guarded."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_lazy_imports_included():
    graph = import_graph()
    assert "qformer.bridge" in graph and "adapters.video" in graph["qformer.recaption"]
    assert cycles(graph) == []


def test_imports_go_one_way_scripts_library_adapters():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("adapters"):
            assert not {t for t in targets if not t.startswith("adapters")}, f"{name} imports {targets}"
        if name.startswith("qformer"):
            assert not {t for t in targets if t.split(".")[0] in ("bench", "demos", "train")}, f"{name} imports {targets}"


def test_no_script_imports_a_script_or_edits_sys_path():
    graph = import_graph()
    for name, path in project_files().items():
        if name.split(".")[0] in ("bench", "demos"):
            assert "train" not in graph[name], f"{path} imports train.py"
            assert "sys.path" not in path.read_text(), f"{path} edits sys.path"


def test_train_py_builds_no_bridge_itself():
    """Construction lives in the library (qformer.build); the recipe only calls it."""
    tree = ast.parse((ROOT / "train.py").read_text())
    builders = {"Bridge", "load_vision", "load_llm", "load_bert_into_qformer", "grown_cross_attention"}
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    called |= {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert not called & builders
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert not {d for d in defined if "bridge" in d and d.startswith(("build", "make", "new", "grow"))}
