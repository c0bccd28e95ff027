"""The layers of the suite: each package imports only the ones below it (README, "Architecture").

    core                         shared types, params, errors, registries
    datasets, models             built on core
    methods                      built on core and models
    bench (the harness)          train, evaluate, probe, data, store, sweep, launch, perf, cli
    bench.report                 reads the store only: core, bench.store/schema/selection/resources
    bench.cli                    the command line, on top of everything

Every import statement is checked, those inside functions too (a late import is still a
dependency). The registries find the built-in classes by package name at run time, which is
discovery, not an import of a layer above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANK = {"core": 0, "datasets": 1, "models": 1, "methods": 2, "bench": 3, "bench.report": 4, "bench.cli": 5}
ALLOWED = {  # packages of a rank that may import each other (none so far) or a rank's exceptions
    "datasets": {"core", "datasets"},
    "models": {"core", "models"},
    "methods": {"core", "models", "methods"},
}
# bench.threads (os only): the cores the report's figure workers may use; bench.naming: dataset labels
REPORT_READS = {"core", "bench.report", "bench.store", "bench.schema", "bench.selection", "bench.resources",
                "bench.claim", "bench.cancel", "bench.oserror", "bench.threads", "bench.naming"}


def layer_of(module: str) -> str:
    """'mmbalance.bench.report.cells' -> 'bench.report'; 'mmbalance.methods.mla' -> 'methods'."""
    parts = module.split(".")[1:]
    if parts[:2] in (["bench", "report"], ["bench", "cli"], ["bench", "__main__"]):
        return "bench.cli" if parts[1] == "__main__" else ".".join(parts[:2])
    return parts[0]


def suite_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmbalance."):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("mmbalance.")]
    return found


def modules() -> list[tuple[str, Path]]:
    out = []
    for package in ("core", "datasets", "models", "methods", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            out.append(("mmbalance." + ".".join(rel.parts).removesuffix(".__init__"), path))
    return out


def violations(module: str, path: Path) -> list[str]:
    source = layer_of(module)
    bad = []
    for line, target in suite_imports(path):
        dest = layer_of(target)
        if source == "bench.report":
            ok = any(target == f"mmbalance.{r}" or target.startswith(f"mmbalance.{r}.") for r in REPORT_READS)
        elif source in ALLOWED:
            ok = dest in ALLOWED[source]
        else:
            ok = RANK[dest] <= RANK[source]
        if not ok:
            bad.append(f"{path.name}:{line} ({source}) imports {target} ({dest})")
    return bad


def test_no_package_imports_a_layer_above_it():
    bad = [v for module, path in modules() for v in violations(module, path)]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path):
    """The check itself can fail: a method importing the training loop, a dataset importing a
    method, and a report importing the training loop are each caught."""
    cases = {"mmbalance.methods.bad": "from mmbalance.bench.train import run\n",
             "mmbalance.datasets.bad": "def f():\n    from mmbalance.methods.base import Method\n",
             "mmbalance.bench.report.bad": "import mmbalance.bench.train\n",
             "mmbalance.core.bad": "from mmbalance.datasets.base import Dataset\n"}
    for module, code in cases.items():
        path = tmp_path / f"{module}.py"
        path.write_text(code)
        assert violations(module, path) != [], module
    ok = tmp_path / "ok.py"
    ok.write_text("from mmbalance.core.types import Batch\nfrom mmbalance.models.fusion import linear\n")
    assert violations("mmbalance.methods.ok", ok) == []


@pytest.mark.parametrize("package", ["core", "datasets", "models", "methods"])
def test_lower_layers_import_without_the_harness(package):
    """Importing a lower layer in a fresh interpreter loads no module of the harness."""
    import subprocess
    import sys

    code = (f"import sys, mmbalance.{package}, pkgutil, importlib\n"
            f"p = mmbalance.{package}\n"
            "for i in pkgutil.iter_modules(p.__path__):\n"
            "    if not i.ispkg: importlib.import_module(p.__name__ + '.' + i.name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('mmbalance.bench')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def is_submodule(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent is a module, not a package
        return False


def test_every_import_of_the_suite_names_something_that_exists():
    """`from mmbalance.x import name` anywhere in the code or the tests names a module or an
    attribute that exists (a move between layers can leave an import behind that only a late
    import or a subprocess would trip on)."""
    import importlib

    missing = []
    for path in sorted([*(p for _, p in modules()), *(ROOT / "tests").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmbalance")):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name) and not is_submodule(f"{node.module}.{alias.name}"):
                    missing.append(f"{path.name}:{node.lineno} {node.module}.{alias.name}")
    assert not missing, "\n".join(missing)
