"""Runs of one sweep in a few worker processes that each live through many runs.

`mmbalance quickstart` trains dozens of small runs on one machine. The local launcher starts a
process per run (a claim, a log and a GPU slot each), which costs a Python and torch start-up per
run; here each worker process starts once, builds each dataset config once (sweep.DatasetCache)
and trains run after run, so that two workers on two cores do about twice the work of one. A run
starts once the runs it requires (bench.requirements) have ended, in the order given otherwise.
"""

from __future__ import annotations

import functools
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from tqdm.auto import tqdm

from mmbalance.bench.config import RunConfig
from mmbalance.bench.requirements import needs
from mmbalance.bench.store import Store
from mmbalance.bench.train import RunResult, run
from mmbalance.core.errors import RunFailed


def run_in_workers(configs: Sequence[RunConfig], store: Store, workers: int,
                   on_failure: Callable[[RunFailed], None]) -> list[RunResult]:
    """Train `configs` (requirements before the runs that need them) in `workers` processes;
    a failed run goes to `on_failure`, which may raise to stop the rest."""
    ids = {cfg.run_id() for cfg in configs}
    waits = {cfg.run_id(): set(needs(cfg).values()) & ids for cfg in configs}
    todo, ended, results = list(configs), set(), []
    running: dict[Future, RunConfig] = {}
    # spawn: a forked child would inherit torch's thread pools and locks mid-use
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool, tqdm(total=len(configs), desc="runs",
                                                                       unit="run", dynamic_ncols=True) as bar:
        def start_ready() -> None:
            for cfg in [c for c in todo if waits[c.run_id()] <= ended]:
                todo.remove(cfg)
                running[pool.submit(run_here, cfg, str(store.root))] = cfg

        start_ready()
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                cfg = running.pop(future)
                ended.add(cfg.run_id())
                bar.update()
                bar.set_postfix_str(f"{cfg.label or cfg.method['name']} seed {cfg.train.seed}")
                try:
                    results.append(future.result())
                except RunFailed as e:
                    on_failure(e)
            start_ready()
    return results


def run_here(cfg: RunConfig, root: str) -> RunResult:
    """One run in a worker process, on that process's datasets."""
    return run(cfg, Store(Path(root)), datasets=worker_datasets())


@functools.cache
def worker_datasets():  # noqa: ANN201 (the sweep module imports this one)
    """This worker process's dataset cache: each dataset config is built once per process."""
    from mmbalance.bench.sweep import DatasetCache

    return DatasetCache()
