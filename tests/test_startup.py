"""Start-up cost of the `mmbalance` command: what `--help`, `status` and `list` import in a fresh
interpreter (`python -X importtime`), counted in modules rather than seconds, so that a loaded
machine cannot make the check flaky. The commands that only parse arguments or read the store load
none of the numerical stack; `list` imports every registered class, hence torch, but neither the
report's stack nor the probes'. The seconds these make are measured by hand (README, "Start-up").
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmbalance.bench.store import Store

ROOT = Path(__file__).resolve().parents[1]
# what a command that reads no tensor must not load: torch and its vision and audio packages, and
# the numerical stack of the probes (scikit-learn) and of the reports (pandas, scipy, matplotlib, seaborn)
TENSORS = ("torch", "torchvision", "torchaudio")
NUMERICAL = ("numpy", "scipy", "sklearn", "pandas", "matplotlib", "seaborn")
# modules imported, with room for other Python versions' standard library (201 and 285 here;
# importing torch and pandas made status 1,586)
HELP_BUDGET = 260
STATUS_BUDGET = 360
LIST_BUDGET = 1700  # 1,408 here; importing torchvision and scipy made it 3,050


def imported(*args: str) -> tuple[set[str], str]:
    """The modules `python -m mmbalance ARGS` imports (by -X importtime's report), and its stdout."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "mmbalance", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    modules = {line.rsplit("|", 1)[1].strip() for line in lines if "imported package" not in line}
    return modules, done.stdout


def loaded(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    """The `packages` of which `modules` holds the package itself or a module of it."""
    return sorted({m.split(".")[0] for m in modules} & set(packages))


def test_help_parses_arguments_only():
    modules, out = imported("--help")
    assert "status" in out and "list" in out
    assert loaded(modules, TENSORS + NUMERICAL) == []
    assert len(modules) <= HELP_BUDGET, sorted(modules)


def finished_run(store: Store, group: str, run_id: str, epochs: int = 10) -> Path:
    """A finished run's records as the harness writes them (config.yaml, metrics.jsonl with one
    line per epoch, summary.json, status.json), through the store's own writers."""
    rd = store.run_dir(group, run_id)
    rd.write_config({"label": "joint", "dataset": {"name": "gaussian"}, "method": {"name": "joint"},
                     "model": {"fusion": "concat"}, "train": {"seed": 0, "epochs": epochs, "batch_size": 32},
                     "eval": {"select_metric": "acc"}})
    scores = lambda acc: {"acc": acc, "macro_f1": acc, "loss": 1 - acc, "modality_acc": {"a": acc / 2, "b": acc}}  # noqa: E731
    rd.write_metrics([{"epoch": e, "train": {"loss": 1.0 / (e + 1), "seconds": 0.5},
                       "val": scores(0.5 + 0.04 * e), "test": scores(0.45 + 0.04 * e)} for e in range(epochs)])
    best = {"epoch": epochs - 1, "val": scores(0.5 + 0.04 * (epochs - 1)), "test": scores(0.45 + 0.04 * (epochs - 1))}
    rd.write_summary({"epochs": epochs, "best_val": best, "best_test": best, "last": best,
                      "probes": {"a": {"test_acc": 0.3}, "b": {"test_acc": 0.6}}})
    rd.set_status("finished", epochs_done=epochs, epochs=epochs)
    return rd.path


@pytest.fixture(scope="module")
def store_of_1000_runs(tmp_path_factory) -> Path:
    """10 groups of 100 finished runs, in the store's layout (copies of one run)."""
    store = Store(tmp_path_factory.mktemp("startup") / "results")
    first = finished_run(store, "g0", "joint-000")
    for n in range(1, 1000):
        shutil.copytree(first, store.root / f"g{n // 100}" / f"joint-{n:03d}")
    return store.root


def test_status_of_1000_runs_reads_the_store_without_torch(store_of_1000_runs):
    modules, out = imported("status", str(store_of_1000_runs))
    assert "1000 runs: 1000 finished, 0 running, 0 pending, 0 failed, 0 interrupted" in out
    row = [line for line in out.splitlines() if "g9/joint-999" in line]
    assert [cell.strip() for cell in row[0].split("|")[1:-1]][:8] == [
        "g9/joint-999", "joint", "0", "finished", "10/10", "9", "acc 0.860", "0.810"]
    assert "torch" not in modules
    assert loaded(modules, TENSORS + NUMERICAL) == []
    assert len(modules) <= STATUS_BUDGET, sorted(modules)


def test_list_imports_the_registered_classes_but_no_report_or_probe_stack():
    """torch is the registered classes' own dependency; torchvision (which loads torch._dynamo) and
    scipy are imported by the functions that crop frames, build a ResNet or compute DI-MML's
    spectrogram, when they are called."""
    modules, out = imported("list")
    assert "methods:" in out and "encoders:" in out
    assert loaded(modules, ("torchvision", "scipy", "sklearn", "pandas", "matplotlib", "seaborn")) == []
    assert len(modules) <= LIST_BUDGET
