"""Trace the run configuration through a stage: which files a call that carries ``cfg`` (or a section
of it) enters, in execution order (depth first), counting stays (the next frame in the same file)
and returns (control coming back to a file already left)."""
import ast
from pathlib import Path

CONFIG_NAMES = ("cfg", "config")


def _functions(pkg: Path) -> dict:
    """{(module, qualname): (FunctionDef, path)} and the import table of each module."""
    funcs, imports = {}, {}
    for p in sorted(pkg.rglob("*.py")):
        parts = p.with_suffix("").relative_to(pkg).parts
        mod = ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)
        tree = ast.parse(p.read_text())
        table = {}
        package = mod if p.name == "__init__.py" else mod.rpartition(".")[0]
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = [x for x in package.split(".") if x]
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    table[a.asname or a.name] = (target, a.name)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs[(mod, node.name)] = (node, p)
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        funcs[(mod, f"{node.name}.{item.name}")] = (item, p)
                funcs.setdefault((mod, node.name), (node, p))  # a dataclass constructor: no body to enter
        imports[mod] = table
    return funcs, imports


def _resolve(funcs, imports, mod, func):
    """The (module, qualname) a call's callee names, following re-exports; None outside the package."""
    if isinstance(func, ast.Name):
        key = (mod, func.id)
        if key in funcs:
            return key
        target = imports.get(mod, {}).get(func.id)
    elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        target = imports.get(mod, {}).get(func.value.id)
        if target is None:
            return (mod, f"{func.value.id}.{func.attr}") if (mod, f"{func.value.id}.{func.attr}") in funcs else None
        target = (target[0], f"{target[1]}.{func.attr}")
    else:
        return None
    for _ in range(5):  # through package __init__ re-exports
        if target is None or target in funcs:
            return target
        head, _, rest = target[1].partition(".")
        found = imports.get(target[0], {}).get(head)
        target = None if found is None else (found[0], f"{found[1]}.{rest}" if rest else found[1])
    return None


CONFIG_FIELDS: set = set()  # attributes that hold the config or a section of it (filled by trace)
CARRIERS: set = set()  # classes with such a field: an object of one carries the config


def _is_config(expr, tainted, carriers=()) -> bool:
    """A name bound to the config (or a section of it), an attribute chain from one or through a field
    that holds the config or a section (``run.cfg``, ``run.ft``), or an object that carries one
    (``carriers``: passed whole; its other fields are not the config)."""
    node = expr
    while isinstance(node, ast.Attribute):
        if node.attr in CONFIG_FIELDS:
            return True
        node = node.value
    if isinstance(node, ast.Name) and node.id in carriers:
        return node is expr
    return isinstance(node, ast.Name) and node.id in tainted


def _config_type(annotation) -> bool:
    name = ast.unparse(annotation).strip("'\"") if annotation is not None else ""
    return name.endswith("Config")


def _collect_carriers(pkg: Path) -> None:
    CONFIG_FIELDS.clear()
    CARRIERS.clear()
    CONFIG_FIELDS.update(CONFIG_NAMES)
    for p in pkg.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.endswith("Config"):
                fields = [i for i in node.body if isinstance(i, ast.AnnAssign) and isinstance(i.target, ast.Name)]
                held = [f.target.id for f in fields if _config_type(f.annotation)]
                if held:
                    CARRIERS.add(node.name)
                    CONFIG_FIELDS.update(held)


def trace(pkg: Path, start: tuple[str, str], tainted=("cfg",)) -> tuple[int, int, list[str]]:
    funcs, imports = _functions(pkg)
    _collect_carriers(pkg)
    path: list[str] = []
    stack: set = set()

    def enter(key, tainted_params):
        node, p = funcs[key]
        path.append(key[0])
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or key in stack:
            return
        stack.add(key)
        tainted, types = set(tainted_params), {}
        for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
            kind = ast.unparse(a.annotation).strip('"') if a.annotation is not None else ""
            if kind.endswith("Config"):
                tainted.add(a.arg)
            elif kind in CARRIERS:
                types[a.arg] = kind
        if key[1].count(".") == 1 and key[1].split(".")[0] in CARRIERS:
            types["self"] = key[1].split(".")[0]
        tainted -= set(types)
        for sub in ast.walk(node):
            if not isinstance(sub, ast.Assign):
                continue
            names = [t.id for t in sub.targets if isinstance(t, ast.Name)]
            if _is_config(sub.value, tainted, types):
                tainted |= set(names)
            elif isinstance(sub.value, ast.Call):
                callee = _resolve(funcs, imports, key[0], sub.value.func)
                made = funcs[callee][0] if callee else None
                ret = getattr(made, "returns", None)
                kind = made.name if isinstance(made, ast.ClassDef) else ast.unparse(ret).strip('"') if ret else ""
                if kind in CARRIERS:
                    types.update({n: kind for n in names})
        calls = sorted((c for c in ast.walk(node) if isinstance(c, ast.Call)), key=lambda c: (c.lineno, c.col_offset))
        for call in calls:
            callee = _resolve(funcs, imports, key[0], call.func)
            f = call.func
            if callee is None and isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in types:
                owner = [k for k in funcs if k[1] == f"{types[f.value.id]}.{f.attr}"]
                if owner:
                    enter(owner[0], ["self"])
                    path.append(key[0])
                continue
            if callee is None:
                continue
            args = [(i, a) for i, a in enumerate(call.args) if _is_config(a, tainted, types)]
            kws = [k.arg for k in call.keywords if k.arg and _is_config(k.value, tainted, types)]
            if not args and not kws:
                continue
            target, _ = funcs[callee]
            params = []
            if isinstance(target, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in target.args.posonlyargs + target.args.args + target.args.kwonlyargs]
                offset = 1 if names[:1] in (["self"], ["cls"]) else 0
                params = [names[i + offset] for i, _ in args if i + offset < len(names)] + kws
            enter(callee, params)
            path.append(key[0])
        stack.discard(key)

    enter(start, tainted)
    stays = sum(a == b for a, b in zip(path, path[1:]))
    left, returns = set(), 0
    for a, b in zip(path, path[1:]):
        if a != b:
            left.add(a)
            returns += b in left
    return stays, returns, path


if __name__ == "__main__":  # python tests/cfg_trace.py [PACKAGE_DIR] [MODULE FUNCTION]
    import sys
    pkg = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "radacx_cache"
    start = tuple(sys.argv[2:4]) if len(sys.argv) > 3 else ("stages.finetune", "run_finetune")
    stays, returns, frames = trace(pkg, start)
    print(f"{start[0]}.{start[1]}: {stays} stays, {returns} returns to a file already left, {len(frames)} frames")
