"""The local launcher: N worker processes on this machine, each running one run at a time
(`python -m bench run-one RUN_DIR`), with the cores (and GPUs) split between them so that they
do not oversubscribe. K = runs_per_gpu workers share each GPU (small runs leave one GPU mostly
idle). A run that fails is recorded as failed; the others go on.
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
from bench.launch.worker import record_exit


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def worker_count(options: LauncherConfig, gpus: int, runs: int) -> int:
    """GPUs x K workers (K on a machine without GPUs, splitting its cores), or the explicit
    `workers`, and never more than there are runs. An explicit count that is not GPUs x K is
    honoured, not refused: slots fill the GPUs K at a time (see gpu_of), so the last GPU gets
    fewer runs, or, past GPUs x K, the next K slots start again at GPU 0; placement_line says so."""
    k = options.packing()
    return min(options.workers or max(gpus, 1) * k, max(runs, 1))


def gpu_of(slot: int, gpus: int, runs_per_gpu: int) -> int:
    """GPU-major packing: slots 0..K-1 on GPU 0, K..2K-1 on GPU 1, ...; wrapping round past GPUs x K."""
    return (slot // runs_per_gpu) % gpus


def visible_gpu(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of this process's `index`-th GPU: its own restriction, if it
    has one, is respected (GPU 1 of CUDA_VISIBLE_DEVICES=2,3 is device 3)."""
    inherited = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return inherited[index].strip() if index < len(inherited) else str(index)


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def worker_env(slot: int, workers: int, gpus: int, runs_per_gpu: int = 1) -> dict[str, str]:
    """Environment of worker `slot`: cores // workers threads; on a machine with GPUs, the GPU
    gpu_of(slot) only."""
    threads = str(threads_per_worker(workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = visible_gpu(gpu_of(slot, gpus, runs_per_gpu))
    return env


def placement_line(runs: int, workers: int, gpus: int, runs_per_gpu: int) -> str:
    """The launch line: where the runs go, e.g. '4 runs on 1 GPU x 2 runs per GPU, 8 thread(s) each'."""
    threads = f"{threads_per_worker(workers)} thread(s) each"
    if not gpus:
        return f"local: {runs} runs on {workers} worker process(es) (no GPU), {threads}"
    used = min(gpus, -(-workers // runs_per_gpu))
    per_gpu = [sum(gpu_of(s, gpus, runs_per_gpu) == g for s in range(workers)) for g in range(used)]
    line = f"local: {runs} runs on {used} GPU x {runs_per_gpu} runs per GPU, {threads}"
    if len(set(per_gpu)) > 1 or per_gpu[0] != runs_per_gpu:
        line += f" (workers={workers} is not GPUs x {runs_per_gpu}: runs at once per GPU {per_gpu})"
    return line


def launch_local(todo: Sequence[PlannedRun], options: LauncherConfig) -> dict[str, str]:
    """Run every planned run; returns run id -> final state (finished | failed)."""
    gpus, k = gpu_count(), options.packing()
    workers = worker_count(options, gpus, len(todo))
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)
    for p in todo:
        p.run_dir.write_config(p.cfg.to_dict())
        p.run_dir.set_status("pending", job_id=None, log=str(p.run_dir.path / "run.log"), stdout=None)
    print(placement_line(len(todo), workers, gpus, k), flush=True)
    states: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_in_process, p, slots, workers, gpus, k): p for p in todo}
        for done, future in enumerate(as_completed(futures), 1):
            p = futures[future]
            state, seconds = future.result()
            states[p.run_dir.run_id] = state
            tail = "" if state == "finished" else f": {p.run_dir.status().get('error', '?')} (log {p.run_dir.path / 'run.log'})"
            print(f"[{done}/{len(todo)}] {state} {label(p.cfg)} seed {p.cfg.train.seed} "
                  f"{p.run_dir.run_id} in {seconds:.1f} s{tail}", flush=True)
    return states


def run_in_process(p: PlannedRun, slots: queue.Queue[int], workers: int, gpus: int,
                   runs_per_gpu: int = 1) -> tuple[str, float]:
    slot = slots.get()
    start = time.perf_counter()
    try:
        cmd = [sys.executable, "-m", "bench", "run-one", str(p.run_dir.path)]
        with open(p.run_dir.path / "run.log", "ab") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env=worker_env(slot, workers, gpus, runs_per_gpu)).returncode
    finally:
        slots.put(slot)
    return record_exit(p.run_dir, code), time.perf_counter() - start
