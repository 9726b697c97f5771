"""Repository layout: the shipped packages (mmm4rec_kernels, mmm4rec) hold no test or benchmark helpers and import
each other one way, without cycles; tests/, benchmarks/, tools/ and experiments/ import everything as packages from
the repo root (no sys.path edits); no reference to a design document or RESULTS section that does not exist."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mmm4rec_kernels", "mmm4rec")
SCRIPT_DIRS = ("tests", "benchmarks", "tools", "experiments")


def _files(*dirs, ext=(".py",)):
    """Files under the dirs whose name ends with one of ext (None: every file)."""
    for d in dirs:
        for base, subdirs, names in os.walk(os.path.join(ROOT, d)):
            subdirs[:] = [s for s in subdirs if not s.startswith(".") and s != "__pycache__"]
            for name in sorted(names):
                if ext is None or name.endswith(ext):
                    yield os.path.join(base, name)


def _module_name(path):
    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(tree):
    """Import nodes that run when the module is imported: not inside a def / class body, not under
    `if TYPE_CHECKING:`."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        else:
            todo.extend(ast.iter_child_nodes(node))


def import_graph():
    """{module: set of in-package modules it imports at module level} over mmm4rec_kernels and mmm4rec.
    `from X import name` points at X.name when that is a module of ours, else at X; relative imports resolved."""
    paths = {_module_name(p): p for p in _files(*PACKAGES)}

    def ours(name):
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in paths.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        deps = set()
        for node in _module_level_imports(tree):
            if isinstance(node, ast.Import):
                deps.update(ours(a.name) for a in node.names)
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for a in node.names:
                sub = f"{source}.{a.name}"
                deps.add(sub if a.name != "*" and sub in paths else ours(source))
        deps.discard(None)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_sys_path_edits_in_tests_benchmarks_tools_experiments():
    pattern = re.compile(r"sys\.path\.(insert|append)\s*\(")
    hits = []
    for path in _files(*SCRIPT_DIRS):
        with open(path, encoding="utf-8") as f:
            hits += [f"{os.path.relpath(path, ROOT)}:{i}" for i, line in enumerate(f, 1) if pattern.search(line)]
    assert not hits, "import as packages from the repo root instead of editing sys.path: " + ", ".join(hits)


def test_script_folders_are_packages():
    for d in ("benchmarks", "tools", "experiments", "examples"):
        assert os.path.isfile(os.path.join(ROOT, d, "__init__.py")), f"{d}/ is not a package"


def test_import_graph_has_no_cycles_and_kernels_never_import_the_model():
    graph = import_graph()
    assert "mmm4rec.model.layers" in graph["mmm4rec.model.mmm4rec"]   # relative imports resolved
    assert "mmm4rec_kernels.limits" in graph["mmm4rec.model.config"]  # cross-package imports seen
    assert cycles(graph) == []
    up = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.split(".")[0] == "mmm4rec_kernels"
                for d in deps if d.split(".")[0] == "mmm4rec")
    assert not up, up
    # also imports inside functions: the kernels package never reaches into the model package
    for path in _files("mmm4rec_kernels"):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
        assert not [n for n in names if n.split(".")[0] == "mmm4rec"], path


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_benchmark_helpers_in_the_shipped_packages():
    shipped = {_module_name(p).rpartition(".")[2] for p in _files(*PACKAGES)}
    assert not {m for m in shipped if m.startswith(("bench", "gpu_check", "offline_"))}, shipped


def test_no_references_to_missing_design_or_results_sections():
    # built from pieces so that this file does not match itself
    pattern = re.compile("DESIGN" + r"\.md" + "|" + "RESULTS" + " \u00a7")
    hits = []
    for path in _files("mmm4rec", "mmm4rec_kernels", *SCRIPT_DIRS, ext=None):
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data:                                                # binary (a built library)
            continue
        lines = data.decode("utf-8", errors="replace").splitlines()
        hits += [f"{os.path.relpath(path, ROOT)}:{i}" for i, line in enumerate(lines, 1) if pattern.search(line)]
    assert not hits, hits
