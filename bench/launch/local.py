"""The local launcher: N worker processes on this machine, each running one run at a time
(`python -m mmbalance run-one RUN_DIR`), with the cores (and GPUs) split between them so that they
do not oversubscribe. K = runs_per_gpu workers share each GPU (small runs leave one GPU mostly
idle); without a GPU, one worker per core a run uses (the thread policy, bench.threads: one per
run on CPU unless train.threads says more). A run starts once the runs of this launch
it requires (Method.requires) have ended; a run that fails is recorded as failed; the others
go on, unless it failed on an OS error (a full disk): then no more runs start (halted_launch).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from contextlib import contextmanager

from mmbalance.bench.claim import elsewhere_line
from mmbalance.bench.launch.options import LauncherConfig
from mmbalance.bench.launch.plan import ENDED, PlannedRun, label
from mmbalance.bench.launch.worker import mark_pending, record_exit, restore_status, run_one_command, saved_status
from mmbalance.bench.oserror import EXIT_OS_ERROR, os_message
from mmbalance.bench.threads import cpu_share, run_threads
from mmbalance.core.errors import StoreError

log = logging.getLogger(__name__)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def worker_count(options: LauncherConfig, gpus: int, runs: int, threads: int = 1) -> int:
    """GPUs x K workers; on a machine without GPUs, one per `threads` cores (the threads each run
    uses there, run_threads: by default one, so one worker per core), or K processes sharing
    the cores where runs_per_gpu is given; or the explicit `workers`; never more than there are
    runs. An explicit count that is not GPUs x K is honoured, not refused: slots fill the GPUs K
    at a time (see gpu_of), so the last GPU gets fewer runs, or, past GPUs x K, the next K
    slots start again at GPU 0; placement_line says so."""
    if options.workers:
        count = options.workers
    elif gpus:
        count = gpus * options.packing()
    else:
        count = options.runs_per_gpu or max(1, cpu_share() // threads)
    return min(count, max(runs, 1))


def run_thread_count(todo: Sequence[PlannedRun], gpus: int, workers: int) -> int:
    """The intra-op threads the runs will use in their worker processes (the most of them), by
    the one thread policy (bench.threads.run_threads) with each worker's share of the cores."""
    def device(name: str) -> str:
        return "cpu" if name == "cpu" or (name == "auto" and not gpus) else "cuda"

    share = threads_per_worker(workers)
    return max((run_threads(p.cfg.train.threads, device(p.cfg.train.device), share)[0] for p in todo), default=1)


def gpu_of(slot: int, gpus: int, runs_per_gpu: int) -> int:
    """GPU-major packing: slots 0..K-1 on GPU 0, K..2K-1 on GPU 1, ...; wrapping round past GPUs x K."""
    return (slot // runs_per_gpu) % gpus


def visible_gpu(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of this process's `index`-th GPU: its own restriction, if it
    has one, is respected (GPU 1 of CUDA_VISIBLE_DEVICES=2,3 is device 3)."""
    inherited = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return inherited[index].strip() if index < len(inherited) else str(index)


def threads_per_worker(workers: int) -> int:
    """Each worker's share of the cores (its OMP_NUM_THREADS): what an accelerator run uses by default."""
    return max(1, cpu_share() // workers)


def worker_env(slot: int, workers: int, gpus: int, runs_per_gpu: int = 1) -> dict[str, str]:
    """Environment of worker `slot`: cores // workers threads; on a machine with GPUs, the GPU
    gpu_of(slot) only."""
    threads = str(threads_per_worker(workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = visible_gpu(gpu_of(slot, gpus, runs_per_gpu))
    return env


def placement_line(runs: int, workers: int, gpus: int, runs_per_gpu: int, threads: int) -> str:
    """The launch line: where the runs go and the threads each uses (run_thread_count), e.g.
    '4 runs on 1 GPU x 2 runs per GPU, 8 thread(s) each'."""
    threads = f"{threads} thread(s) each"
    if not gpus:
        return f"local: {runs} runs on {workers} worker process(es) (no GPU), {threads}"
    used = min(gpus, -(-workers // runs_per_gpu))
    per_gpu = [sum(gpu_of(s, gpus, runs_per_gpu) == g for s in range(workers)) for g in range(used)]
    line = f"local: {runs} runs on {used} GPU x {runs_per_gpu} runs per GPU, {threads}"
    if len(set(per_gpu)) > 1 or per_gpu[0] != runs_per_gpu:
        line += f" (workers={workers} is not GPUs x {runs_per_gpu}: runs at once per GPU {per_gpu})"
    return line


Follow = Callable[[PlannedRun], Sequence[PlannedRun]]


def launch_local(todo: Sequence[PlannedRun], options: LauncherConfig, follow: Follow | None = None) -> dict[str, str]:
    """Run every planned run; returns run id -> final state (finished | failed | ...).

    `follow(run)`, called each time a run ends, returns more runs for this launch (a tuning
    study's next trials, bench.tune): they start as soon as a worker is free, so no worker waits
    for the slowest run of a batch. The worker count is settled by `todo` alone.
    Ctrl-C (KeyboardInterrupt) stops the launch (see stop_launch), then goes on up."""
    gpus = gpu_count()
    workers = worker_count(options, gpus, len(todo), run_thread_count(todo, gpus, workers=1))  # threads: CPU only
    launch = LocalLaunch(workers, gpus, options.packing())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            if launch.add(todo):
                log.info(placement_line(len(launch.marked), workers, gpus, launch.runs_per_gpu,
                                        run_thread_count(launch.marked, gpus, workers)))
            launch.run(pool, follow)
        except KeyboardInterrupt:
            with sigint_ignored():  # a second Ctrl-C must not cut the clean-up short; it has a deadline
                pool.shutdown(wait=False, cancel_futures=True)
                stop_launch(launch.marked, launch.running, launch.futures, launch.states, launch.before)
            raise
        except OSError as e:  # marking the runs pending failed (a full disk, say): none has started
            launch.running.halt(os_message(e))
    if launch.running.halted:
        raise halted_launch(launch.runs, launch.running, launch.before)
    return launch.states


class LocalLaunch:
    """The runs of one local launch and where each stands: marked pending, waiting for the runs
    of this launch it requires, started on a free worker slot, ended."""

    def __init__(self, workers: int, gpus: int, runs_per_gpu: int) -> None:
        self.workers, self.gpus, self.runs_per_gpu = workers, gpus, runs_per_gpu
        self.slots: queue.Queue[int] = queue.Queue()
        for slot in range(workers):
            self.slots.put(slot)
        self.running = Workers()
        self.runs: list[PlannedRun] = []  # every run of this launch: the first ones and those added
        self.before: dict[str, str | None] = {}  # each run's status before this launch
        self.marked: list[PlannedRun] = []  # the runs this launch marked pending (or was marking)
        self.states: dict[str, str] = {}  # run id -> how it ended
        self.waits: dict[str, set[str]] = {}  # run not yet started -> the runs it waits for
        self.futures: dict[Future, PlannedRun] = {}
        self.pending: set[Future] = set()

    def add(self, new: Sequence[PlannedRun]) -> list[PlannedRun]:
        """Mark the runs of `new` not yet in the launch pending for this launcher (under each run's
        claim, see mark_pending); each waits for the runs of this launch it requires that have not
        ended. Returns those marked (one taken or finished by another launch since it was planned
        is reported as it stands)."""
        known = {q.run_dir.run_id for q in self.runs}
        new = [q for q in new if q.run_dir.run_id not in known]
        self.runs.extend(new)
        self.before.update((q.run_dir.run_id, saved_status(q.run_dir)) for q in new)
        added = []
        for q in new:
            self.marked.append(q)
            state = mark_pending(q.run_dir, q.cfg.to_dict(), job_id=None, log=str(q.run_dir.path / "run.log"),
                                 stdout=None)
            if state != "pending":
                self.marked.pop()
                report(q, state, 0.0, self.states, len(self.runs))
            else:
                added.append(q)
        live = {q.run_dir.run_id for q in self.marked if q.run_dir.run_id not in self.states}
        self.waits.update((q.run_dir.run_id, {rid for rid in q.needs.values() if rid in live}) for q in added)
        return added

    def run(self, pool: ThreadPoolExecutor, follow: Follow | None) -> None:
        """Start what is ready, and after each run's end what that made ready (and what `follow`
        added), until no run is left."""
        self.start_ready(pool)
        while self.pending:
            done, _ = wait(self.pending, return_when=FIRST_COMPLETED)
            for future in done:
                self.pending.discard(future)
                ended, (state, seconds) = self.futures[future], future.result()
                report(ended, state, seconds, self.states, len(self.runs))
                for left in self.waits.values():  # ended, finished or not: a dependent then fails naming it
                    left.discard(ended.run_dir.run_id)
                if follow is not None and state is not None and not self.running.stopped:
                    self.add(follow(ended))
            self.start_ready(pool)

    def start_ready(self, pool: ThreadPoolExecutor) -> None:
        """In plan order, hand the pool the runs whose requirements have ended."""
        for p in self.marked:
            if p.run_dir.run_id in self.waits and not self.waits[p.run_dir.run_id]:
                del self.waits[p.run_dir.run_id]
                future = pool.submit(run_in_process, p, self.slots, self.workers, self.gpus, self.runs_per_gpu,
                                     self.running)
                self.futures[future] = p
                self.pending.add(future)


def halted_launch(todo: Sequence[PlannedRun], running: Workers, before: dict[str, str | None]) -> StoreError:
    """After an OS error (a run's own, or the launcher's writing to the store) stopped the launch
    (the runs already started have ended): the runs that had not started get back the status they
    had before this launch (one whose old status cannot be written back either is named) and are
    listed; returns the one-line error to exit with."""
    left = [p for p in todo if not running.started(p)]
    lines = []
    for p in left:
        try:
            if saved_status(p.run_dir) != before[p.run_dir.run_id]:
                restore_status(p.run_dir, before[p.run_dir.run_id])
            kept = ""
        except OSError as e:
            kept = f" (still marked pending: {os_message(e)})"
        lines.append(f"  {label(p.cfg)} seed {p.cfg.train.seed} {p.run_dir.run_id}{kept}")
    log.warning("\n".join([f"stopped: {running.halted}; {len(left)} run(s) not started, left as they were:", *lines]))
    return StoreError(f"the launch stopped on an OS error: {running.halted}; fix that (free space on the results "
                      "disk, say) and launch the sweep again (finished runs are skipped, started ones resume)")


def stop_launch(todo: Sequence[PlannedRun], running: Workers, futures: dict[Future, PlannedRun],
                states: dict[str, str], before: dict[str, str | None]) -> None:
    """After a Ctrl-C (which may come while the runs are still being marked pending or handed to
    the pool): nothing new starts, each running run gets one SIGINT and is recorded interrupted
    (resumable; stop_running), the runs that had not started get back the status they had before
    this launch and are listed."""
    stop_running(running)
    for future in as_completed([f for f in futures if not f.cancelled()]):
        if futures[future].run_dir.run_id not in states:
            report(futures[future], *future.result(), states, len(todo))
    left = [p for p in todo if not running.started(p)]
    for p in left:
        restore_status(p.run_dir, before[p.run_dir.run_id])
    log.warning("\n".join([f"interrupted: {len(left)} run(s) not started, left as they were; launch the sweep again "
                           "to run them (interrupted runs resume)",
                           *(f"  {label(p.cfg)} seed {p.cfg.train.seed} {p.run_dir.run_id}" for p in left)]))


def report(p: PlannedRun, state: str | None, seconds: float, states: dict[str, str], total: int) -> None:
    """Log how a run ended (state None: the launch stopped before it started: nothing to say); a
    run that did not finish is a warning."""
    if state is None:
        return
    states[p.run_dir.run_id] = state
    if state == "elsewhere":
        log.info(f"[{len(states)}/{total}] {label(p.cfg)} seed {p.cfg.train.seed} {p.run_dir.run_id}: "
                 f"{elsewhere_line(p.run_dir)}")
        return
    tail = "" if state == "finished" else f": {p.run_dir.status().get('error', '?')} (log {p.run_dir.path / 'run.log'})"
    log.log(logging.INFO if state in ENDED else logging.WARNING,
            f"[{len(states)}/{total}] {state} {label(p.cfg)} seed {p.cfg.train.seed} "
            f"{p.run_dir.run_id} in {seconds:.1f} s{tail}")


class Workers:
    """The launch's run-one processes. A run starts only while the launch is not stopped, under
    the lock stop() takes, so that once stop() returns nothing new starts and every process ever
    started is among those it returns."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stopped = False
        self.procs: dict[str, subprocess.Popen] = {}  # run id -> its process, kept once it has ended
        self.halted: str | None = None  # why the launch stopped on an OS error

    def start(self, p: PlannedRun, env: dict[str, str]) -> subprocess.Popen | None:
        """Start `p`'s run-one process, or None once the launch is stopped. Each process leads a
        session of its own, so that a Ctrl-C at the terminal reaches the launcher only, which
        gives each running run exactly one SIGINT (a second one could cut short the recording
        of the first)."""
        with self.lock:
            if self.stopped:
                return None
            command = run_one_command(p.run_dir.path)
            log.debug(f"{p.run_dir.run_id}: {' '.join(command)} (CUDA_VISIBLE_DEVICES="
                      f"{env.get('CUDA_VISIBLE_DEVICES', 'unset')}, {env.get('OMP_NUM_THREADS', 'all')} thread(s)), "
                      f"log {p.run_dir.path / 'run.log'}")
            with open(p.run_dir.path / "run.log", "ab") as run_log:
                self.procs[p.run_dir.run_id] = subprocess.Popen(
                    command, stdout=run_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    start_new_session=True)
            return self.procs[p.run_dir.run_id]

    def started(self, p: PlannedRun) -> bool:
        return p.run_dir.run_id in self.procs

    def halt(self, reason: str) -> None:
        """Start no more runs (the running ones go on): an OS error, the first `reason` kept."""
        with self.lock:
            self.stopped = True
            self.halted = self.halted or reason

    def stop(self) -> list[subprocess.Popen]:
        with self.lock:
            self.stopped = True
            return list(self.procs.values())


STOP_GRACE_S = 30.0  # how long an interrupted run may take to record its state before it is killed


def stop_running(running: Workers, grace_s: float = STOP_GRACE_S) -> None:
    """Stop the launch: SIGINT each running run-one process (it records its run interrupted and
    exits), SIGKILL those still alive after `grace_s` (their runs are then recorded interrupted
    by record_exit). The pool's threads reap them."""
    live = [proc for proc in running.stop() if proc.poll() is None]
    if live:
        log.warning(f"interrupted: stopping {len(live)} running run(s) (up to {grace_s:.0f} s)")
    for proc in live:
        proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for proc in live:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in this (the main) thread for the block; elsewhere there is nothing to do."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_in_process(p: PlannedRun, slots: queue.Queue[int], workers: int, gpus: int, runs_per_gpu: int,
                   running: Workers) -> tuple[str | None, float]:
    """Run `p` in a run-one process on a free slot: its final state and the seconds it took, or
    (None, 0) when the launch was stopped before it started."""
    slot = slots.get()
    start = time.perf_counter()
    try:
        proc = running.start(p, worker_env(slot, workers, gpus, runs_per_gpu))
        if proc is None:
            return None, 0.0
        code = proc.wait()
        if code == EXIT_OS_ERROR:  # every other run would write to the same disk; before the slot is free
            running.halt(os_failure(p))
    finally:
        slots.put(slot)
    try:
        state = record_exit(p.run_dir, code, killed="interrupted" if running.stopped else "failed")
    except OSError as e:  # the store cannot take even the run's status
        running.halt(os_message(e))
        state = "failed"
    return state, time.perf_counter() - start


def os_failure(p: PlannedRun) -> str:
    """What a run that ended with an OS error recorded (its status may not have been writable)."""
    status = p.run_dir.status()
    if status["state"] == "failed" and status.get("error"):
        return f"{status['error']} (run {p.run_dir.run_id})"
    return f"run {p.run_dir.run_id} ended with an OS error it could not record; see {p.run_dir.path / 'run.log'}"
