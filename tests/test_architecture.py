"""The package graph of ARCHITECTURE.md: every import of quantfarm code, module-level or inside a
function, goes downward. Read from the source with ast, so a new upward import fails here. Also read
from the source: no import cycles between modules, format and algorithm names compared only in their
own modules and the tables, no service function with more than 6 parameters, no module over 420 lines.
Each checker takes the tree's root, and a test beside it plants a violation in tmp_path files."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "quantizers", "calibration", "evaluation", "service")
ALLOWED = {   # package -> the quantfarm packages it may import (besides itself)
    "core": set(),
    "quantizers": {"core"},
    "calibration": {"core"},
    "evaluation": {"core", "calibration", "quantizers"},
    "service.job": {"core", "quantizers", "calibration", "evaluation"},
    "service.farm": {"core", "quantizers", "calibration", "evaluation", "service.job"},
    "service.cli": {"core", "quantizers", "calibration", "evaluation", "service.job", "service.farm"},
}
TABLES = {"quantizers/formats/__init__.py", "quantizers/algorithms.py"}
MAX_PARAMETERS, MAX_LINES = 6, 420


def package_of(module: str) -> str | None:
    for p in sorted(ALLOWED, key=len, reverse=True):
        if module == p or module.startswith(p + "."):
            return p
    return "service" if module == "service" or module.startswith("service.") else None


def from_base(node: ast.ImportFrom, path: Path, module: str) -> str:
    """The module of `from X import ...`; a relative X resolved against the importing module's package."""
    if not node.level:
        return node.module
    parts = module.split(".")
    keep = len(parts) - node.level + (path.name == "__init__.py")
    return ".".join(parts[:keep] + ([node.module] if node.module else []))


def imports(path: Path, module: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add(from_base(node, path, module))
    return out


def modules(root: Path = ROOT):
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            rel = f.relative_to(root).with_suffix("")
            parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
            yield f, ".".join(parts)


def test_every_import_goes_downward():
    wrong = []
    for f, module in modules():
        own = package_of(module)
        if own == "service":          # service/__init__.py itself
            continue
        for target in imports(f, module):
            dep = package_of(target)
            if dep is not None and dep != own and dep not in ALLOWED[own]:
                wrong.append(f"{f.relative_to(ROOT)} imports {target}")
    assert not wrong, "imports against ARCHITECTURE.md's package graph:\n" + "\n".join(wrong)


def test_the_graph_finds_upward_imports(tmp_path):
    """The checker itself: an upward import in a quantizers module is reported."""
    f = tmp_path / "walk.py"
    f.write_text("def f():\n    from service.job import pipeline\n")
    assert package_of(next(iter(imports(f, "quantizers.walk")))) == "service.job"
    assert "service.job" not in ALLOWED["quantizers"]


@pytest.mark.parametrize("name", ["errors.py", "version.py"])
def test_core_imports_nothing_of_quantfarm(name):
    assert not {package_of(m) for m in imports(ROOT / "core" / name, f"core.{name[:-3]}")} - {None}


def plant(root: Path, files: dict[str, str]):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


# --- 1. import cycles, at module granularity --------------------------------------------------------
def module_imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The quantfarm modules this one imports anywhere: `from a.b import c` is a.b.c where that is a
    module, else a.b; a name outside `known` counts as its longest known prefix, or not at all."""
    def owner(name):
        parts = name.split(".")
        return next((m for i in range(len(parts), 0, -1) if (m := ".".join(parts[:i])) in known), None)
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = from_base(node, path, module)
            names += [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return {m for m in map(owner, names) if m}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    found = dict((m, f) for f, m in modules(root))
    return {m: module_imports(f, m, set(found)) for m, f in found.items()}


def reachable(graph: dict[str, set[str]], v: str) -> set[str]:
    seen, todo = set(), [v]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen                       # the modules v imports, directly or through others


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each strongly connected component of more than one module, or a module importing itself, as its
    shortest cycle through its first module, 'a -> b -> a', and its other members."""
    reach = {v: reachable(graph, v) for v in graph}
    sccs = {frozenset({v} | {w for w in reach[v] if v in reach[w]}) for v in graph if v in reach[v]}
    return [shortest_cycle(graph, scc) for scc in sorted(sccs, key=min)]


def shortest_cycle(graph: dict[str, set[str]], scc: set[str]) -> str:
    start, prev, todo = min(scc), {}, [min(scc)]
    for v in todo:                    # breadth first, inside the component, back to start
        for w in sorted(graph[v] & scc):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                rest = sorted(scc - set(path))
                return " -> ".join(path[::-1] + [start]) + (f"   (also in it: {', '.join(rest)})" if rest else "")
            if w not in prev:
                prev[w] = v
                todo.append(w)
    raise AssertionError(f"no cycle through {start}")


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"{len(found)} import cycles between quantfarm modules:\n" + "\n".join(found)


def test_the_cycle_check_finds_cycles(tmp_path):
    """The checker itself: a cycle closed by an import inside a function, a package's own `from . import`,
    and a self-import are reported; a plain chain of imports is not."""
    plant(tmp_path, {"core/__init__.py": "from . import a\n", "core/a.py": "from core.b import x\n",
                     "core/b.py": "def f():\n    from .a import y\n", "core/c.py": "import core.a\n",
                     "quantizers/__init__.py": "", "quantizers/d.py": "from quantizers import d\n"})
    graph = import_graph(tmp_path)
    assert graph["core"] == {"core.a"} and graph["core.c"] == {"core.a"}
    assert cycles(graph) == ["core.a -> core.b -> core.a", "quantizers.d -> quantizers.d"]


# --- 2. format and algorithm names compared only in their own modules and the tables ----------------
def table_names() -> set[str]:
    from quantizers.algorithms import ALGORITHMS
    from quantizers.formats import FORMATS
    return set(FORMATS) | set(ALGORITHMS)


def own_files(name: str) -> set[str]:
    stem = name.replace("-", "_")
    own = {f"quantizers/formats/{stem}.py", f"quantizers/{stem}.py", f"quantizers/{stem}_layer.py"}
    if name == "gguf":
        own |= {"quantizers/llama_cpp.py", "quantizers/imatrix.py", "service/job/gguf_job.py"}
    return own | TABLES


def literals(node: ast.AST) -> set[str]:
    elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}


def names_compared(tree: ast.AST, names: set[str]):
    """(line, names) of each ==, !=, in, not in with a name's literal on one side, and each match case."""
    for node in ast.walk(tree):
        found = set()
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            for op, a, b in zip(node.ops, sides, sides[1:]):
                if isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)):
                    found |= (literals(a) | literals(b)) & names
        elif isinstance(node, ast.MatchValue):
            found = literals(node.value) & names
        if found:
            yield node.lineno, found


def name_comparisons(root: Path, names: set[str]) -> list[str]:
    wrong = set()
    for f, _ in modules(root):
        rel, text = f.relative_to(root).as_posix(), f.read_text()
        wrong |= {(rel, line, text.splitlines()[line - 1].strip()) for line, found in
                  names_compared(ast.parse(text), names) if any(rel not in own_files(n) for n in found)}
    return [f"{rel}:{line}: {src}" for rel, line, src in sorted(wrong)]


def test_format_and_algorithm_names_are_compared_only_in_their_modules():
    names = table_names()
    assert {"gptq", "awq", "rtn", "compressed-tensors", "gguf"} <= names
    wrong = name_comparisons(ROOT, names)
    assert not wrong, (f"{len(wrong)} comparisons with a format or algorithm name ({', '.join(sorted(names))}) "
                       "outside its own module and the tables; ask the table instead:\n" + "\n".join(wrong))


def test_the_name_check_finds_comparisons(tmp_path):
    """The checker itself: ==, !=, in a tuple, a match case are reported outside the name's own modules."""
    files = {"service/job/spec.py": 'if spec.format == "gguf":\n    pass\nok = x == "other"\n'
                                    'y = fmt in ("gptq", "awq")\nz = "awq" != x.algorithm\n'
                                    'match f:\n    case "rtn" | "q":\n        pass\n',
             "quantizers/formats/compressed_tensors.py": 'a = f == "compressed-tensors"\nb = f == "gptq"\n',
             "quantizers/llama_cpp.py": 'c = t in {"gguf"}\n', "quantizers/algorithms.py": 'd = a == "rtn"\n'}
    plant(tmp_path, files)
    assert name_comparisons(tmp_path, {"gptq", "awq", "rtn", "compressed-tensors", "gguf"}) == [
        'quantizers/formats/compressed_tensors.py:2: b = f == "gptq"',
        'service/job/spec.py:1: if spec.format == "gguf":', 'service/job/spec.py:4: y = fmt in ("gptq", "awq")',
        'service/job/spec.py:5: z = "awq" != x.algorithm', 'service/job/spec.py:7: case "rtn" | "q":']


# --- 3. service functions take at most 6 parameters ---------------------------------------------------
def parameter_counts(node: ast.AST, prefix: str = ""):
    """(qualified name, parameters) of every function, nested or a method; a leading self/cls not counted."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = child.args
            positional = [*a.posonlyargs, *a.args]
            n = len(positional) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
            yield prefix + child.name, n - bool(positional and positional[0].arg in ("self", "cls"))
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield from parameter_counts(child, prefix + child.name + ".")
        else:
            yield from parameter_counts(child, prefix)


def wide_functions(root: Path) -> list[str]:
    return [f"{f.relative_to(root).as_posix()}:{name}:{n}" for f in sorted((root / "service").rglob("*.py"))
            for name, n in parameter_counts(ast.parse(f.read_text())) if n > MAX_PARAMETERS]


def test_service_functions_take_at_most_6_parameters():
    wrong = wide_functions(ROOT)
    assert not wrong, (f"{len(wrong)} functions in service/ with more than {MAX_PARAMETERS} parameters "
                       "(file:function:parameters):\n" + "\n".join(wrong))


def test_the_parameter_check_finds_wide_functions(tmp_path):
    """The checker itself: every kind of parameter counts, a leading self or cls does not."""
    plant(tmp_path, {"service/farm/api.py":
        "class A:\n    def ok(self, a, b, c, d, e, f): pass\n    async def wide(cls, a, /, b, *c, d, e, g, **f): pass\n"
        "def app():\n    def route(a, b, c, d, e, f, *, g=1): pass\ndef fine(*args, **kwargs): pass\n"})
    assert wide_functions(tmp_path) == ["service/farm/api.py:A.wide:7", "service/farm/api.py:app.route:7"]


# --- 4. no module over 420 lines ----------------------------------------------------------------------
def long_modules(root: Path) -> list[str]:
    lines = {f: len(f.read_text().splitlines()) for f, _ in modules(root)}
    return [f"{f.relative_to(root).as_posix()}:{n}" for f, n in lines.items() if n > MAX_LINES]


def test_no_module_over_420_lines():
    wrong = long_modules(ROOT)
    assert not wrong, f"{len(wrong)} modules over {MAX_LINES} lines (file:lines):\n" + "\n".join(wrong)


def test_the_length_check_finds_long_modules(tmp_path):
    """The checker itself: 421 lines is reported, 420 is not; files outside the packages are not read."""
    plant(tmp_path, {"core/a.py": "x = 1\n" * 420, "evaluation/b.py": "x = 1\n" * 421, "tests/c.py": "x\n" * 900})
    assert long_modules(tmp_path) == ["evaluation/b.py:421"]
