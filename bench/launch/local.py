"""The local launcher: N worker processes on this machine, each running one run at a time
(`python -m bench run-one RUN_DIR`), with the cores (and GPUs) split between them so that they
do not oversubscribe. A run that fails is recorded as failed; the others go on.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

from bench.launch.options import LauncherConfig
from bench.launch.plan import PlannedRun, label


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def worker_env(slot: int, workers: int, gpus: int) -> dict[str, str]:
    """Environment of worker `slot`: cores // workers threads; GPU slot % gpus where there are GPUs."""
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    return env


def launch_local(todo: Sequence[PlannedRun], options: LauncherConfig) -> dict[str, str]:
    """Run every planned run; returns run id -> final state (finished | failed)."""
    gpus = gpu_count()
    workers = min(options.workers or max(gpus, 1), max(len(todo), 1))
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)
    for p in todo:
        p.run_dir.write_config(p.cfg.to_dict())
        p.run_dir.set_status("pending", job_id=None, log=str(p.run_dir.path / "run.log"), stdout=None)
    print(f"local: {len(todo)} runs on {workers} worker process(es), "
          f"{worker_env(0, workers, gpus)['OMP_NUM_THREADS']} thread(s) each", flush=True)
    states: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_in_process, p, slots, workers, gpus): p for p in todo}
        for done, future in enumerate(as_completed(futures), 1):
            p = futures[future]
            state, seconds = future.result()
            states[p.run_dir.run_id] = state
            tail = "" if state == "finished" else f": {p.run_dir.status().get('error', '?')} (log {p.run_dir.path / 'run.log'})"
            print(f"[{done}/{len(todo)}] {state} {label(p.cfg)} seed {p.cfg.train.seed} "
                  f"{p.run_dir.run_id} in {seconds:.1f} s{tail}", flush=True)
    return states


def run_in_process(p: PlannedRun, slots: queue.Queue[int], workers: int, gpus: int) -> tuple[str, float]:
    slot = slots.get()
    start = time.perf_counter()
    try:
        cmd = [sys.executable, "-m", "bench", "run-one", str(p.run_dir.path)]
        with open(p.run_dir.path / "run.log", "ab") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env=worker_env(slot, workers, gpus)).returncode
    finally:
        slots.put(slot)
    state = p.run_dir.status()["state"]
    if code != 0 and state not in ("failed", "interrupted"):  # killed before it could record anything (OOM, signal)
        p.run_dir.set_status("failed", error=f"worker process exited with code {code}",
                             traceback=f"see {p.run_dir.path / 'run.log'}")
        state = "failed"
    return state, time.perf_counter() - start
