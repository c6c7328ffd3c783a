"""The package's shape (docs/architecture.md): no import cycles, stages import only lower layers,
short functions and modules."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "radacx_cache"
STAGES = {"cohort", "shards", "embed", "zeroshot", "probe", "finetune", "saliency", "report"}
LONG_ALLOWED = {("phantom", "generate")}  # the phantom generator reads as a script


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.with_suffix("").relative_to(PKG).parts
        out[".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)] = p
    return out


def internal_imports(name: str, path: Path, known) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = [p for p in package.split(".") if p]
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join(base + ([node.module] if node.module else []))
            if target in known:
                deps.add(target)
            for alias in node.names:
                full = f"{target}.{alias.name}".strip(".")
                if full in known:
                    deps.add(full)
    return deps - {name}


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return {name: internal_imports(name, path, mods) for name, path in mods.items()}


def test_no_import_cycles(graph):
    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen
    assert [m for m in graph if m in reach(m)] == []


def test_stages_do_not_import_each_other(graph):
    for stage in STAGES:
        assert not graph[stage] & STAGES, (stage, graph[stage] & STAGES)


def test_readers_do_not_import_the_writer(graph):
    for reader in ("shardset", "stream", "features", "embed", "probe", "finetune"):
        assert "shards" not in graph[reader], reader


def test_functions_and_modules_are_short():
    for name, path in modules().items():
        text = path.read_text()
        assert len(text.splitlines()) <= 420, name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (name, node.name) not in LONG_ALLOWED:
                assert node.end_lineno - node.lineno + 1 <= 80, f"{name}.{node.name}"
