"""The suite as a package: what the wheel holds, the commands run from a wheel installed outside
the checkout, and the suite beside foreign top-level `datasets`, `bench` and `methods` packages.

The wheel is built once per module from the checkout's files (as git lists them: tracked and new,
not ignored, so no run outputs or build leftovers) and installed without dependencies into a
scratch directory; the commands run in subprocesses of this interpreter, whose environment gives
the third-party packages, with PYTHONPATH naming only the scratch directory (or the checkout) and
the working directory outside the checkout. The driver runs `python -m mmbalance ARGS` in its own
process and then writes where every module came from, so that a test can tell that nothing was
imported from a checkout (this venv may hold an editable install of another one).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.fixtures.cremad import write_cremad
from tests.test_quickstart import MINI_EPOCHS, short_quickstart

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
FOREIGN = ("datasets", "bench", "methods")

# `python -m mmbalance ARGS` in this process, then a record of it. argv[1]: JSON with `out` (the
# record's file), `before` and `after` (modules imported before the command and after it).
DRIVER = """
import importlib, json, runpy, sys
from pathlib import Path

job = json.loads(sys.argv[1])
for name in job["before"]:
    importlib.import_module(name)
sys.argv = ["mmbalance", *sys.argv[2:]]
try:
    runpy.run_module("mmbalance", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
markers = {name: getattr(importlib.import_module(name), "MARKER", None) for name in job["after"]}
def files(m):  # absolute paths only: torch.ops and the like name no real file
    found = [m.__file__] if getattr(m, "__file__", None) else [str(p) for p in getattr(m, "__path__", [])]
    return [f for f in found if Path(f).is_absolute()]
modules = {name: files(m) for name, m in list(sys.modules.items())}
Path(job["out"]).write_text(json.dumps({"code": code, "markers": markers, "modules": modules}))
sys.exit(code)
"""


@dataclass
class Wheel:
    path: Path
    site: Path  # where it is installed (pip --target)

    def names(self) -> set[str]:
        with zipfile.ZipFile(self.path) as z:
            return set(z.namelist())


@dataclass
class Record:
    """What the driver saw: the exit code, the markers of the `after` modules and where every
    module was loaded from."""

    code: int
    markers: dict[str, str | None]
    modules: dict[str, list[str]]
    stdout: str
    stderr: str

    def from_outside(self, package: str, root: Path) -> dict[str, list[str]]:
        """Modules of `package` (it and its submodules) loaded from anywhere but under `root`."""
        return {name: files for name, files in self.modules.items()
                if (name == package or name.startswith(package + "."))
                and not all(Path(f).resolve().is_relative_to(root.resolve()) for f in files)}


def mmbalance(cwd: Path, pythonpath: list[Path], *args: str, before=(), after=()) -> Record:
    """Run `python -m mmbalance ARGS` in `cwd` with only `pythonpath` on PYTHONPATH."""
    out = cwd / f".record-{len(list(cwd.glob('.record-*')))}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    job = json.dumps({"out": str(out), "before": list(before), "after": list(after)})
    done = subprocess.run([sys.executable, "-c", DRIVER, job, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert out.is_file(), f"the driver wrote no record:\n{done.stderr}"
    record = json.loads(out.read_text())
    return Record(record["code"], record["markers"], record["modules"], done.stdout, done.stderr)


def finished(record: Record) -> Record:
    assert record.code == 0, f"exit {record.code}\n{record.stdout[-3000:]}\n{record.stderr[-3000:]}"
    return record


def pip(*args: str | Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *map(str, args), "--no-index", "-q",
                           "--disable-pip-version-check"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def source_tree(into: Path) -> Path:
    """A copy of the checkout's files as git lists them (tracked and new ones, none it ignores)."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("the wheel is built from the files git lists in a checkout; no git checkout here")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():  # a tracked file deleted in the work tree is left out
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, into / name)
    return into


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Wheel:
    """The wheel of this checkout, installed with no dependencies into a scratch directory."""
    src = source_tree(tmp_path_factory.mktemp("source"))
    dist = tmp_path_factory.mktemp("dist")
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", dist, src)
    [path] = dist.glob("mmbalance-*.whl")
    site = tmp_path_factory.mktemp("site")
    pip("install", "--no-deps", "--target", site, path)
    return Wheel(path, site)


# ---- what the wheel holds -------------------------------------------------------------------------


def mapped_folders() -> dict[str, Path]:
    """Package -> its folder in the checkout, for every root of pyproject's package-dir."""
    return {package: REPO / folder for package, folder in SETUPTOOLS["package-dir"].items()}


def checkout_packages() -> set[str]:
    """Every folder of Python code under a mapped root, as the dotted name it installs as."""
    found = set()
    for package, root in mapped_folders().items():
        for folder in [root, *(p for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
            if any(folder.glob("*.py")):
                found.add(".".join([package, *folder.relative_to(root).parts]))
    return found


def test_every_package_of_the_checkout_is_listed_in_pyproject():
    """A new subpackage under bench/, methods/, datasets/ (or any mapped folder) must be listed in
    [tool.setuptools] packages, or wheels go out without it."""
    listed = set(SETUPTOOLS["packages"])
    assert checkout_packages() - listed == set(), "add these to pyproject's [tool.setuptools] packages"
    missing = {p for p in listed if not mapped_folder_of(p).is_dir()}
    assert missing == set(), "listed packages without a folder"
    assert {"mmbalance.bench.report", "mmbalance.datasets.prepare", "mmbalance.configs"} <= checkout_packages()


def mapped_folder_of(package: str) -> Path:
    roots = mapped_folders()
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in roots:
            return roots[".".join(parts[:n])].joinpath(*parts[n:])
    raise AssertionError(f"{package} is under no package-dir root")


def in_wheel(path: Path) -> str:
    """The name a checkout file has inside the wheel."""
    for package, root in sorted(mapped_folders().items(), key=lambda kv: -len(kv[1].parts)):
        if path.is_relative_to(root):
            return "/".join([*package.split("."), *path.relative_to(root).parts])
    raise AssertionError(f"{path} is under no package-dir root")


def shipped_files() -> list[Path]:
    """What the commands read at run time, and every module."""
    lists = REPO / "datasets" / "manifests" / "lists"
    files = [*lists.iterdir(), *(REPO / "datasets" / "manifests").glob("*.json"),
             *(REPO / "datasets" / "data").glob("avdigits_v*.npz"),
             *(REPO / "configs").rglob("*.yaml"), REPO / "results" / "paper_tables.csv"]
    for root in mapped_folders().values():
        files += [p for p in root.rglob("*.py") if "__pycache__" not in p.parts]
    return files


def test_the_wheel_holds_every_module_the_split_lists_the_avdigits_cache_configs_and_paper_tables(wheel):
    names = wheel.names()
    files = shipped_files()
    assert {"cremad_ogmge_test.csv", "cremad_mla_test.txt", "ave_val.txt", "ave_test.txt"} <= {p.name for p in files}
    assert any(p.suffix == ".npz" for p in files) and any(p.name == "quickstart.yaml" for p in files)
    missing = sorted(in_wheel(p) for p in files if in_wheel(p) not in names)
    assert missing == [], "checkout files the wheel lacks"
    # the installed copy is the wheel's: byte for byte for the data files
    for name in ("mmbalance/datasets/manifests/lists/cremad_mla_test.txt", "mmbalance/results/paper_tables.csv"):
        assert (wheel.site / name).read_bytes() == (REPO / name.removeprefix("mmbalance/")).read_bytes()
    # nothing of the checkout's own outside the package: tests, scripts, top-level bench/ etc.
    assert {n.split("/")[0] for n in names} == {"mmbalance", wheel.path.name.split("-py3")[0] + ".dist-info"}


def test_every_imported_third_party_package_is_declared():
    """`pip install mmbalance` brings everything the suite imports (at the top or inside a function)."""
    # an optional extra counts: its module imports without it (bench/perf/reference.py's librosa)
    requirements = [*PYPROJECT["project"]["dependencies"],
                    *(d for extra in PYPROJECT["project"]["optional-dependencies"].values() for d in extra)]
    declared = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower().replace("_", "-") for d in requirements}
    dists = packages_distributions()
    imported = set()
    for root in mapped_folders().values():
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"mmbalance", "__future__"}
    assert {"torch", "yaml", "threadpoolctl"} <= third_party
    undeclared = {name for name in third_party
                  if not {d.lower().replace("_", "-") for d in dists.get(name, [name])} & declared}
    assert undeclared == set(), "imported but not in pyproject's dependencies"


# ---- the commands from the wheel, outside the checkout -------------------------------------------

SHORT_QUICKSTART = short_quickstart("seeds=[0]", "train.progress=false", "eval.probe_c_grid=[1.0]")


def in_checkout(file: str) -> bool:
    """Under the checkout, but not in a virtual environment kept inside it (`make venv`'s .venv)."""
    path = Path(file).resolve()
    return path.is_relative_to(REPO) and not path.is_relative_to(Path(sys.prefix).resolve())


def from_the_wheel(record: Record, wheel: Wheel) -> Record:
    assert record.modules["mmbalance"] == [str(wheel.site / "mmbalance" / "__init__.py")]
    assert record.from_outside("mmbalance", wheel.site) == {}, "suite modules imported from elsewhere"
    assert not [name for name, files in record.modules.items()
                if any(in_checkout(f) for f in files)], "modules imported from the checkout"
    return record


@pytest.mark.slow  # ~110 s here: the whole quickstart (56 runs) for 3 epochs from the wheel, and two reports
def test_short_quickstart_and_its_report_from_the_wheel(wheel, tmp_path):
    run = from_the_wheel(finished(mmbalance(tmp_path, [wheel.site], "--results", "R", "quickstart",
                                            *SHORT_QUICKSTART)), wheel)
    cells = yaml.safe_load((wheel.site / "mmbalance/configs/quickstart.yaml").read_text())["cells"]
    labels = {cell.get("label", name) for name, cell in cells.items()}
    assert f"{len(cells)} cells x 1 seeds = {len(cells)} runs, {len(labels)} row labels" in run.stderr  # the log
    assert (tmp_path / "reports/quickstart/table.csv").is_file()  # quickstart's own --report default

    from_the_wheel(finished(mmbalance(tmp_path, [wheel.site], "report", "R/quickstart", "--out", "rep")), wheel)
    report = tmp_path / "rep"
    for name in ("README.md", "report.html", "table.md", "table.tex", "stats.md", "figures/fused_accuracy.png"):
        assert (report / name).stat().st_size > 0, name
    table = pd.read_csv(report / "table.csv")
    assert sorted(table["label"]) == sorted(cell.get("label", name) for name, cell in cells.items())
    assert (table["n"] == 1).all()
    assert set(table["dataset"]) == {"avdigits (preset=audio-dominant)", "avdigits (preset=three-modality)"}
    runs = pd.read_csv(report / "runs.csv")
    assert (runs["state"] == "finished").all() and len(runs) == len(cells)
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "R/quickstart").glob("*/summary.json")]
    assert [s["epochs"] for s in summaries] == [MINI_EPOCHS] * len(cells)


def test_a_shipped_recipe_by_name_and_paper_vs_ours_from_the_wheel(wheel, tmp_path):
    """MLA's CREMA-D recipe, named as shipped, on a fixture download prepared with MLA's pipeline
    (its test split is the shipped 744-clip list: the fixture clips it names): the report matches
    its runs with the published CREMA-D numbers of MLA. Small encoders and one epoch keep it short;
    dataset, pipeline and method are the recipe's, which is what the published rows match."""
    write_cremad(tmp_path / "raw")
    prepared = from_the_wheel(finished(mmbalance(tmp_path, [wheel.site], "prepare", "cremad", "--raw", "raw",
                                                 "--out", "cache", "--pipeline", "mla")), wheel)
    assert re.search(r"test +listed 744 .* prepared [1-9]", prepared.stdout), prepared.stdout
    from_the_wheel(finished(mmbalance(
        tmp_path, [wheel.site], "--results", "R", "run", "recipes/mla_cremad", "group=paper", "dataset.root=cache",
        "dataset.frame_size=32", "model.encoders.audio.name=small_cnn", "model.encoders.visual.name=small_cnn",
        "train.epochs=1", "train.batch_size=8", "train.progress=false", "eval.probe_c_grid=[1.0]")), wheel)
    report = from_the_wheel(finished(mmbalance(tmp_path, [wheel.site], "report", "R/paper", "--out", "rep")), wheel)

    paper = pd.read_csv(REPO / "results" / "paper_tables.csv")
    published = paper[(paper["dataset"] == "cremad") & (paper["method"] == "mla")]
    rows = pd.read_csv(tmp_path / "rep" / "paper_vs_ours.csv")
    assert len(published) > 0 and f"paper vs ours: {len(published)} published cells matched" in report.stdout
    assert sorted(zip(rows["paper"], rows["metric"], rows["published"])) == \
        sorted(zip(published["paper"], published["metric"], published["value"]))
    assert (rows["method"] == "mla").all() and (rows["n"] == 1).all()
    assert (rows["ours dataset"] == "cremad (pipeline=mla, root=cache)").all()
    assert "## Paper vs ours" in (tmp_path / "rep" / "paper_vs_ours.md").read_text()


# ---- beside foreign top-level datasets, bench and methods ----------------------------------------


def foreign_packages(root: Path) -> Path:
    """Top-level packages named like the suite's folders (HuggingFace's `datasets`, say)."""
    for name in FOREIGN:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"MARKER = 'foreign {name}'\n")
    return root


@pytest.mark.parametrize("install", ["checkout", "wheel"])
def test_foreign_datasets_bench_and_methods_first_on_the_path(install, request, tmp_path):
    """With the foreign packages first on sys.path, `datasets` imported before the suite and
    `bench`, `methods` after it, a quick run on the embedded data trains, and each name is still
    the foreign package."""
    site = REPO if install == "checkout" else request.getfixturevalue("wheel").site
    foreign = foreign_packages(tmp_path / "foreign")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({
        "dataset": {"name": "avdigits"}, "model": {"encoders": {m: {"name": "mlp", "hidden": 32, "out_dim": 16}
                                                                for m in ("audio", "visual")}},
        "train": {"epochs": 1, "progress": False}, "eval": {"probe_c_grid": [1.0]}}))
    run = finished(mmbalance(tmp_path, [foreign, site], "--results", "R", "run", "tiny.yaml",
                             before=["datasets"], after=FOREIGN))
    assert run.stdout.startswith("finished: R/default/joint-")
    assert run.markers == {name: f"foreign {name}" for name in FOREIGN}
    for name in FOREIGN:
        assert run.from_outside(name, foreign) == {}, f"a module named {name} from elsewhere"
    assert run.from_outside("mmbalance", site) == {}
    assert {"mmbalance.datasets.avdigits", "mmbalance.methods.joint", "mmbalance.bench.train"} <= set(run.modules)
