"""The code's shape: no import cycle among the package's modules (or the benchmark scripts'), function-level
imports included, no module of the package over 400 lines, a docstring on every module."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 400


def _modules(folder: str, package: bool) -> dict[str, str]:
    """{module name: path} of the .py files under ROOT/folder (dotted names for a package, bare for scripts)."""
    out = {}
    for d, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            if package:
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            else:
                name = f[:-3]
            out[name] = path
    return out


def _imports(name: str, path: str, known: dict) -> set[str]:
    """The modules of `known` that the file imports anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            found.update(subs)
            if len(subs) < len(node.names):  # names from the module itself, not submodules of it
                found.add(base)
    found = {m for m in found if m in known}
    # Importing a.b.c first runs the package a.b's __init__: an edge to it too, unless this module is inside
    # that package already (then the package is being initialized, and Python hands out its partial module).
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    found |= {p for p in parents if p in known and not name.startswith(p + ".")}
    return found - {name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of graph as [a, b, ..., a], or None (depth-first search, iterative)."""
    state = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done
    for start in sorted(graph):
        if state[start]:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state[nxt] == 1:
                return path[path.index(nxt) :] + [nxt]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_a_package_init_counts_for_modules_outside_it_only():
    known = {"p": "", "p.sub": "", "p.sub.x": "", "p.sub.y": "", "p.z": ""}

    def edges(name, source):
        return _imports(name, _source(source), known)

    assert edges("p.z", "from p.sub import x") == {"p.sub.x", "p.sub"}  # runs p/sub/__init__.py first
    assert edges("p.sub.y", "from p.sub import x") == {"p.sub.x"}  # inside p.sub: its package is initializing


def _source(text: str) -> str:
    """A file holding text, for _imports."""
    import tempfile

    f = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    f.write(text)
    f.close()
    return f.name


def test_find_cycle_finds_one_and_only_where_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a2"}, "a2": set(), "x": {"y"}, "y": {"x"}}) == ["x", "y", "x"]


def test_no_import_cycle_in_the_package_or_the_benchmarks():
    """A cycle (even through an import inside a function, or through a package's __init__) means two modules
    each need the other: the shared part belongs in a lower module both import."""
    for folder, package in (("semflow_jax", True), ("benchmarks", False)):
        known = _modules(folder, package)
        graph = {name: _imports(name, path, known) for name, path in known.items()}
        assert sum(map(len, graph.values())) > (50 if package else 10)  # the reader sees the imports
        cycle = find_cycle(graph)
        assert cycle is None, f"import cycle in {folder}/: {' -> '.join(cycle)}"


def test_no_module_of_the_package_is_over_400_lines_and_each_says_what_it_is():
    too_long, undocumented = [], []
    for name, path in _modules("semflow_jax", True).items():
        text = open(path).read()
        if text.count("\n") > MAX_LINES:
            too_long.append(f"{name} ({text.count(chr(10))} lines)")
        if not ast.get_docstring(ast.parse(text)):
            undocumented.append(name)
    assert not too_long, f"over {MAX_LINES} lines: {too_long}"
    assert not undocumented, f"no module docstring: {undocumented}"
