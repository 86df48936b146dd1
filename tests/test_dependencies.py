"""Product code imports only what `pip install .` installs: [project].dependencies and what they pull in.

The test extra (pytest, schemathesis, transformers, datasets, ...) brings packages of its own; product
code that imports one of them works under `scripts/test` and fails under `scripts/run`, as
`simulate_annotators` did with `requests`. Every import is read from the source (lazy ones inside
functions too), so code that no test runs is checked as well."""
import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def runtime_distributions(requirements: list[str]) -> set[str]:
    """The installed distributions these requirements bring, transitively, extras and markers applied."""
    found: set[str] = set()
    todo = [(Requirement(r), frozenset(Requirement(r).extras)) for r in requirements]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        found.add(name)
        for line in importlib.metadata.distribution(name).requires or []:
            needed = Requirement(line)
            if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in (*extras, "")):
                todo.append((needed, frozenset(needed.extras)))
    return found


def product_imports(packages: list[str]) -> dict[str, set[str]]:
    """Top-level module name -> the files that import it, for every absolute import in the packages."""
    imports: dict[str, set[str]] = {}
    for path in [REPO / "manage.py", *(p for package in packages for p in (REPO / package).rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                imports.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return imports


def test_product_code_imports_only_runtime_dependencies():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    allowed = runtime_distributions(pyproject["project"]["dependencies"])
    providers = importlib.metadata.packages_distributions()
    imports = product_imports(packages)
    assert {"django", "rest_framework", "torch"} <= set(imports)  # the scan sees the code
    missing = {
        module: sorted(files) for module, files in imports.items()
        if module not in sys.stdlib_module_names and module not in packages and module != "__future__"
        and not {canonicalize_name(d) for d in providers.get(module, [])} & allowed
    }
    assert not missing, f"imported by product code, not installed by [project].dependencies: {missing}"
