"""The package graph of ARCHITECTURE.md: every import of quantfarm code, module-level or inside a
function, goes downward. Read from the source with ast, so a new upward import fails here."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {   # package -> the quantfarm packages it may import (besides itself)
    "core": set(),
    "quantizers": {"core"},
    "calibration": {"core"},
    "evaluation": {"core", "calibration", "quantizers"},
    "service.job": {"core", "quantizers", "calibration", "evaluation"},
    "service.farm": {"core", "quantizers", "calibration", "evaluation", "service.job"},
    "service.cli": {"core", "quantizers", "calibration", "evaluation", "service.job", "service.farm"},
}


def package_of(module: str) -> str | None:
    for p in sorted(ALLOWED, key=len, reverse=True):
        if module == p or module.startswith(p + "."):
            return p
    return "service" if module == "service" or module.startswith("service.") else None


def imports(path: Path, module: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:        # relative: resolve against this module's package
                base = module.split(".")[:-node.level] if path.name != "__init__.py" else \
                    module.split(".")[:len(module.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


def modules():
    for pkg in ("core", "quantizers", "calibration", "evaluation", "service"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).with_suffix("")
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
