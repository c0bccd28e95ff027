"""The suite's logging: library modules log (bench/logs.py), the command line shows the records on
stderr (-q: warnings and errors only; -v: debug lines too) and keeps stdout for its results; used
as a library the suite says nothing below WARNING."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from mmbalance.bench.cli import main as cli
from mmbalance.bench.launch.slurm import PackedSweepJob, SweepJob
from mmbalance.bench.launch.worker import run_one_command
from mmbalance.bench.logs import LOGGER, child_level, to_stderr

ROOT = Path(__file__).resolve().parents[1]

# one run that trains, one whose loss becomes nan at once (a learning rate of 1e30): a warning
SWEEP = """
group: loud
base:
  dataset: {name: gaussian}
  train: {epochs: 1, batch_size: 32, progress: false}
  eval: {probe_c_grid: [1.0]}
seeds: [0]
cells:
  joint: {method: {name: joint}}
  diverges: {method: {name: joint}, optim.lr: 1.0e+30}
"""


@pytest.fixture
def sweep(tmp_path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    return path


def test_quiet_hides_the_progress_lines_not_the_warnings_or_the_results(sweep, tmp_path, capsys):
    results = str(tmp_path / "results")
    assert cli(["-q", "--results", results, "sweep", str(sweep)]) == 1  # a run failed
    out, err = capsys.readouterr()
    assert "| label" in out  # the table, on stdout
    assert "sweep 'loud'" not in err and "2 runs:" not in err  # the progress lines (INFO)
    assert "warning: FAILED: " in err and "warning: not finished:\n" in err  # what went wrong
    # the command leaves no handler behind: in-process use is as if it had never run
    assert logging.getLogger(LOGGER).handlers == [] and logging.getLogger(LOGGER).level == logging.NOTSET

    assert cli(["--results", results, "sweep", str(sweep)]) == 1  # the failed run is tried again
    out, err = capsys.readouterr()
    assert "| label" in out and "sweep 'loud' (inline launcher) -> " not in out
    assert "sweep 'loud' (inline launcher) -> " in err and "2 runs: 1 finished, " in err


def test_verbose_adds_the_debug_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the argument names the shipped config
    assert cli(["show-config", "recipes/mla_cremad"]) == 0
    out, err = capsys.readouterr()
    assert "# run id: mla-" in out and err == ""
    assert cli(["-v", "show-config", "recipes/mla_cremad"]) == 0
    out_verbose, err = capsys.readouterr()
    assert out_verbose == out  # stdout holds the result only, however loud
    shipped = ROOT / "configs" / "recipes" / "mla_cremad.yaml"
    assert err == f"debug: config 'recipes/mla_cremad': no such file here, the shipped {shipped}\n"


def test_quiet_and_verbose_together_are_refused(capsys):
    with pytest.raises(SystemExit) as refused:
        cli(["-q", "-v", "list"])
    assert refused.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


LIBRARY_USE = """
from mmbalance.bench.launch import launch
from mmbalance.bench.launch.options import LauncherConfig
from mmbalance.bench.store import Store
from mmbalance.bench.sweep import load_sweep

_, configs = load_sweep({sweep!r})
raise SystemExit(launch(configs, Store({results!r}), LauncherConfig(name="inline")))
"""


def test_as_a_library_the_suite_says_nothing_below_warning(sweep, tmp_path):
    """No logging configured by the caller: the progress lines (INFO) go nowhere, the warnings
    reach stderr through Python's last-resort handler, stdout stays empty."""
    script = LIBRARY_USE.format(sweep=str(sweep), results=str(tmp_path / "results"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert "2 runs: 2 new" not in done.stderr and "2 runs: 1 finished" not in done.stderr  # INFO: not shown
    assert "FAILED: " in done.stderr and "not finished:\n" in done.stderr  # WARNING: shown
    assert "Traceback" not in done.stderr


def test_the_processes_a_launch_starts_log_at_least_info_and_debug_after_v(tmp_path):
    """run-one processes and SLURM tasks write to log files: -q does not empty those, -v fills them."""
    for level, flags, child in [(logging.INFO, [], logging.INFO), (logging.WARNING, [], logging.INFO),
                                (logging.DEBUG, ["-v"], logging.DEBUG)]:
        with to_stderr(level):
            assert run_one_command(tmp_path) == [sys.executable, "-m", "mmbalance", *flags, "run-one", str(tmp_path)]
            assert child_level() == child
    job = pickle.loads(pickle.dumps(PackedSweepJob(cpus_per_task=2, log_level=logging.DEBUG)))  # as submitit does
    assert (job.cpus_per_task, job.log_level) == (2, logging.DEBUG)
    assert pickle.loads(pickle.dumps(SweepJob(logging.DEBUG))).log_level == logging.DEBUG
