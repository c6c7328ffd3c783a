"""The package's shape (docs/architecture.md): modules import only lower layers, stages never import
each other, no stage after ``shards`` reads the render config and none after ``cohort`` the cohort
config (they take those decisions from the verified records), short functions and modules."""
import ast
import fnmatch
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "radacx_cache"
# the layer order, bottom first; a module may import a lower layer, or its own subpackage's modules
LAYERS = (
    ("_version", "_io", "_lazy", "_yaml", "findings", "overlays"),
    ("sources", "sources.*"),
    ("config",),
    ("workdir", "arms", "render", "metrics", "models", "runtime", "augment", "figures", "archives"),
    ("saliency_metrics", "interventions"),
    ("estimators", "estimators.*", "formats", "formats.*", "phantom", "phantom.*", "attribution", "tables",
     "tables.*"),
    ("stages", "stages.*", "results"),
    ("cli", ""),
)
LONG_ALLOWED = {("phantom.generator", "generate")}  # the phantom generator reads as a script
# the stages that decide these sections; every later module takes them from the records
CONFIG_OWNERS = {"render": {"config", "stages.shards", "render"},
                 "cohort": {"config", "stages.cohort", "archives", "sources.*"}}  # the readers run in the cohort stage


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.with_suffix("").relative_to(PKG).parts
        out[".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)] = p
    return out


def layer_of(name: str) -> int:
    for k, patterns in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return k
    raise AssertionError(f"module radacx_cache.{name} is in no layer of tests/test_architecture.py (add it, "
                         f"and to docs/architecture.md)")


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


def _subpackage(name: str) -> str:
    return name.partition(".")[0] if "." in name else ""


def import_violations(graph) -> list[str]:
    """Imports that go up or sideways: to a higher layer, or to the same layer outside the module's
    own subpackage, or from one stage to another."""
    bad = []
    for name, deps in graph.items():
        for dep in deps:
            up, same = layer_of(dep) > layer_of(name), layer_of(dep) == layer_of(name)
            sideways = same and (_subpackage(dep) != _subpackage(name) or _subpackage(name) in ("", "stages"))
            if (up or sideways) and not (name == _subpackage(dep) or dep == _subpackage(name)):
                bad.append(f"{name} -> {dep}")
    return sorted(bad)


def test_every_module_has_a_layer(graph):
    for name in graph:
        layer_of(name)


def test_imports_follow_the_layer_order(graph):
    assert import_violations(graph) == []


def test_the_layer_check_can_fail(graph):
    """Planted: a stage importing another stage, a format importing a stage, the config importing a format."""
    planted = {**graph, "stages.embed": graph["stages.embed"] | {"stages.shards"},
               "formats.shard.reader": graph["formats.shard.reader"] | {"stages.report"},
               "config": graph["config"] | {"formats.features"}}
    assert import_violations(planted) == ["config -> formats.features", "formats.shard.reader -> stages.report",
                                          "stages.embed -> stages.shards"]


def cycles(graph) -> list[str]:
    """Modules that reach themselves through their imports."""
    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen
    return [m for m in graph if m in reach(m)]


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_the_cycle_check_can_fail(graph):
    """Planted: the metrics module importing the saliency metrics, which import it (a two-module cycle)."""
    planted = {**graph, "metrics": graph["metrics"] | {"saliency_metrics"}}
    assert sorted(cycles(planted)) == ["metrics", "saliency_metrics"]


READERS = ("formats.shard", "formats.shard.reader", "formats.shard.schema", "formats.stream", "formats.features",
           "stages.embed", "stages.probe", "stages.finetune")


def writer_imports(graph) -> list[str]:
    """Readers of the shards that import the shard writer (they must need only the format)."""
    return [reader for reader in READERS if "stages.shards" in graph[reader]]


def test_readers_do_not_import_the_writer(graph):
    assert writer_imports(graph) == []


def test_the_reader_writer_check_can_fail(graph):
    planted = {**graph, "formats.stream": graph["formats.stream"] | {"stages.shards"}}
    assert writer_imports(planted) == ["formats.stream"]


def config_reads(source: str) -> set[str]:
    """Config sections a module reads: ``<x>.render`` / ``<x>.cohort`` on a name or attribute called
    ``cfg``/``config``, and ``...to_dict()["render"]``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in CONFIG_OWNERS:
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
            if name in ("cfg", "config"):
                found.add(node.attr)
        if (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
                and node.slice.value in CONFIG_OWNERS and isinstance(node.value, ast.Call)
                and getattr(node.value.func, "attr", None) == "to_dict"):
            found.add(node.slice.value)
    return found


def test_later_stages_take_upstream_decisions_from_records():
    for name, path in modules().items():
        for section in config_reads(path.read_text()):
            assert any(fnmatch.fnmatchcase(name, owner) for owner in CONFIG_OWNERS[section]), (
                f"radacx_cache.{name} reads cfg.{section}: take it from the {section} stage's verified record")


def test_the_config_read_check_can_fail():
    assert config_reads("def f(cfg):\n    return cfg.render.line_width, run.cfg.cohort.priority\n") == \
        {"render", "cohort"}
    assert config_reads("x = cfg.to_dict()['render']") == {"render"}
    assert config_reads("x = shards.manifest['render_config']['line_width']") == set()


def too_long(name: str, text: str) -> list[str]:
    """A module over 420 lines, or a function over 80 (beyond ``LONG_ALLOWED``)."""
    out = [name] if len(text.splitlines()) > 420 else []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (name, node.name) not in LONG_ALLOWED:
            if node.end_lineno - node.lineno + 1 > 80:
                out.append(f"{name}.{node.name}")
    return out


def test_functions_and_modules_are_short():
    assert [bad for name, path in modules().items() for bad in too_long(name, path.read_text())] == []


def test_the_length_check_can_fail():
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    assert too_long("m", f"def f():\n{body}\n") == ["m.f"]
    assert too_long("m", "x = 1\n" * 421) == ["m"]
    assert too_long("m", "x = 1\n" * 420) == []

# ---------------------------------------------------------------- how far the config travels
MAX_CONFIG_RETURNS = 20  # issue 26: tracing cfg through the fine-tune stage


def test_the_config_comes_back_to_a_file_it_left_at_most_20_times_in_finetune():
    """``tests/cfg_trace.py`` follows ``cfg`` (and its sections, and objects that hold one) through the
    calls of ``run_finetune`` in execution order. Fine-tune's ``Run`` holds the stage context and its
    own settings, not the config, so the loop no longer carries the config through every file."""
    from cfg_trace import trace
    stays, returns, _ = trace(PKG, ("stages.finetune", "run_finetune"))
    assert returns <= MAX_CONFIG_RETURNS, f"{returns} returns, {stays} stays"


def _bouncing_package(root: Path, calls: int, carrier: bool) -> Path:
    pkg = root / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "b.py").write_text("def f(cfg):\n    return cfg\n\n\ndef g(x):\n    return x\n")
    body = "\n".join(["    f(cfg)"] * calls + ["    g(3)"])  # g gets no config: never followed
    holder = ("from dataclasses import dataclass\n\n\n@dataclass\nclass Run:\n    cfg: 'Config'\n\n\n"
              "def loop(run: Run):\n    f(run.cfg)\n\n\n" if carrier else "")
    tail = "    run = Run(cfg)\n    loop(run)\n" if carrier else ""
    (pkg / "a.py").write_text(f"from .b import f, g\n{holder}\ndef run(cfg):\n{body}\n{tail}")
    return pkg


@pytest.mark.parametrize("calls, carrier, returns", [(10, False, 19), (11, False, 21), (10, True, 21)])
def test_the_config_trace_counts_each_return_and_can_fail(tmp_path, calls, carrier, returns):
    """Planted: ``a.run`` hands ``cfg`` to ``b.f`` ``calls`` times (each call but the first comes back
    to b, each comes back to a): 2 * calls - 1 returns; a carrier object (``Run`` holding the config)
    handed on carries it too. 11 calls break the bound of 20."""
    from cfg_trace import trace
    found = trace(_bouncing_package(tmp_path, calls, carrier), ("a", "run"))[1]
    assert found == returns
    assert (found <= MAX_CONFIG_RETURNS) == (returns <= MAX_CONFIG_RETURNS)
