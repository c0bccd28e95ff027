"""`mmbalance` command line: argument parsing only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import yaml

from mmbalance.bench.logs import to_stderr
from mmbalance.bench.resources import config_path, quickstart_config
from mmbalance.core.errors import EXIT_INTERRUPTED, MMBalanceError

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmbalance",
        description="Benchmark suite for multimodal learning under modality imbalance.",
    )
    parser.add_argument("--results", default="results", help="root of the results store (default: results)")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                          default=logging.INFO, help="also the debug lines (on stderr, with the progress lines)")
    loudness.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING,
                          help="no progress lines, only warnings and errors (results still go to stdout)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="registered methods, datasets, encoders and presets")

    p = sub.add_parser("run", help="train one run config, or every run of a sweep file")
    p.add_argument("config", help="YAML run config or sweep file (one with `cells:`)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 method.alpha=0.8")
    p.add_argument("--report", default=None, help="for a sweep: write its table to this directory")
    p.add_argument("--workers", type=int, default=1,
                   help="for a sweep: runs trained at once, each in a worker process that lives through many "
                        "runs (default: 1, all in this process)")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve and validate the config(s), print them with their run ids; load no data, "
                        "train nothing")

    p = sub.add_parser("sweep", help="launch every unfinished run of a sweep file (inline, local processes or SLURM)")
    p.add_argument("file", help="sweep file (configs/sweeps/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (finished / will resume / new, one line per run); load no data, submit nothing")
    p.add_argument("--wait", action="store_true", help="slurm: block until every job has ended, then summarise")
    p.add_argument("--report", default=None, help="inline/local: write the sweep's table to this directory")
    add_launcher_arguments(p)

    p = sub.add_parser("tune", help="equal-budget tuning: N trials per cell on validation (Optuna), run by the "
                                    "sweep's launcher, then the chosen configuration over the seeds as "
                                    "<cell>-tuned, beside the defaults")
    p.add_argument("file", help="sweep file (configs/sweeps/*.yaml); its `tune:` section sets what the flags do")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    p.add_argument("--trials", type=int, help="trials per cell, the same for every method (tune.trials)")
    p.add_argument("--lr-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="the optimiser's lr range, searched on a log scale (tune.lr_range; default 1e-4 1e-1)")
    p.add_argument("--parallel", type=int, help="trials of one cell run at once (tune.parallel; default: 1 "
                                                "inline, the local workers shared by the cells, 4 on slurm)")
    p.add_argument("--sampler-seed", type=int, help="seed of the TPE sampler (tune.sampler_seed; default 0)")
    p.add_argument("--schedule", choices=["rounds", "asap"],
                   help="ask the next trials once a round has ended (default; a rerun asks the same trials) "
                        "or as soon as each trial run ends (asap: inline and local launchers)")
    p.add_argument("--report", default=None, help="write the sweep's report (with its Tuning section) here")
    p.add_argument("--dry-run", action="store_true",
                   help="print each cell's search space and the trials it has spent; train nothing")
    add_launcher_arguments(p)

    p = sub.add_parser("cancel", help="scancel the SLURM jobs of every pending or running run under a directory")
    p.add_argument("dir", help="a group directory (results/<group>), a run directory, or the store root")

    p = sub.add_parser("run-one", help="(internal) train one prepared run directory; used by the launchers")
    p.add_argument("run_dir")

    p = sub.add_parser("prepare", help="turn a dataset's raw download into the cache its runs read")
    p.add_argument("name", help="dataset name (see `mmbalance list`)")
    p.add_argument("--raw", required=True, help="the raw download, in the layout the dataset documents")
    p.add_argument("--out", default=None, help="cache directory (default: data/<name>/<pipeline>)")
    p.add_argument("--pipeline", default=None, help="named preprocessing variant (default: the dataset's); "
                                                      "for manifest, the preset the options start from")
    p.add_argument("--pipeline-file", default=None, metavar="YAML",
                   help="manifest: pipeline options from this YAML file (datasets/manifest_pipeline.py lists them)")
    p.add_argument("--set", action="append", default=[], dest="options", metavar="KEY=VALUE",
                   help="manifest: one pipeline option, dotted, over the file's, e.g. audio.feature=logmel "
                        "audio.seconds=1 augment=[crop,flip] (repeatable)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: the available cores)")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="missing or corrupt files: leave those samples out (default) or stop")

    p = sub.add_parser("init", help="write a starter sweep for a prepared cache: encoders, learning rate and "
                                    "epochs fitted to it and to a time budget, every method, 3 seeds")
    p.add_argument("cache", help="a cache made by `mmbalance prepare` (its folder)")
    p.add_argument("--out", default="my_sweep.yaml", help="the sweep file to write (default: my_sweep.yaml)")
    add_starter_arguments(p, budget=60.0, seeds=3)
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")

    p = sub.add_parser("diagnose", help="does a prepared dataset have a modality imbalance, and which way? "
                                        "(short joint and unimodal runs, then a verdict with numbers and a figure)")
    p.add_argument("cache", help="a cache made by `mmbalance prepare` (its folder)")
    p.add_argument("--out", default=None,
                   help="where the verdict, figure and sweep go (default: reports/diagnose-<cache>)")
    add_starter_arguments(p, budget=10.0, seeds=3)

    p = sub.add_parser("quickstart", help="the main job on the embedded data, then its table")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    p.add_argument("--report", default="reports/quickstart", help="where the table goes")
    p.add_argument("--workers", type=int, default=None,
                   help="runs trained at once, each in a worker process that lives through many runs "
                        "(default: the cores this process may use)")

    p = sub.add_parser("report",
                       help="tables, statistics, paper-vs-ours, figures and an HTML page for a results directory")
    p.add_argument("dir", help="a group directory (results/<group>) or the store root")
    p.add_argument("--out", default=None, help="report folder (default: reports/<name of DIR>)")
    p.add_argument("--by", default="dataset,method",
                   help="row keys, from dataset,method,fusion,group (default: dataset,method)")
    p.add_argument("--select", choices=("val", "test", "last"), default="val",
                   help="epoch reported: best validation (default), best test (the papers'), or last")

    p = sub.add_parser("evaluate-robustness",
                       help="test accuracy of each finished run's best.pt with each modality zeroed and noised")
    p.add_argument("dir", help="a run directory, a group directory (results/<group>) or the store root")
    p.add_argument("--force", action="store_true", help="evaluate again runs that have a robustness.json")

    p = sub.add_parser("status", help="state of every run under a directory of the store")
    p.add_argument("dir", help="a group directory (results/<group>), a run directory, or the store root")

    p = sub.add_parser("bench", help="step cost of every method vs joint, loader speed, data path, packing")
    from mmbalance.bench.perf.bench import add_arguments

    add_arguments(p)
    p = sub.add_parser("show-config", help="print the fully resolved config (defaults filled in) and its run id")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    return parser


def add_starter_arguments(p: argparse.ArgumentParser, budget: float, seeds: int) -> None:
    p.add_argument("--budget-minutes", type=float, default=budget,
                   help=f"time for all the runs, one after another here; epochs are fitted to it (default: {budget:g})")
    p.add_argument("--seeds", type=int, default=seeds, help=f"seeds per cell (default: {seeds})")
    p.add_argument("--lr", type=float, default=None, help="use this learning rate (default: a range test chooses)")
    p.add_argument("--epochs", type=int, default=None, help="use this many epochs (default: fitted to the budget)")
    p.add_argument("--lr-steps", type=int, default=200, help="steps of the learning-rate range test (default: 200)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(), to_stderr(args.log_level):
        warnings.showwarning = one_line_warnings(warnings.showwarning)
        try:
            return COMMANDS[args.command](args)
        except MMBalanceError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # what was interrupted is recorded (runs' status) and said already
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except OSError as e:  # a full or read-only disk: the OS's words and the file, no traceback
            from mmbalance.bench.oserror import EXIT_OS_ERROR, os_message

            print(f"error: {os_message(e)}", file=sys.stderr)
            return EXIT_OS_ERROR


def one_line_warnings(default):
    """The suite's own warnings (a broken plugin, a suspicious manifest) as 'warning: ...' lines;
    any other warning as Python shows it."""
    from mmbalance.core.errors import MMBalanceWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MMBalanceWarning):
            print(f"warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def cmd_list(args: argparse.Namespace) -> int:
    from mmbalance.bench.catalog import describe_registries

    print(describe_registries())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from mmbalance.bench.config import load_config
    from mmbalance.bench.store import Store
    from mmbalance.bench.sweep import is_sweep_file

    path = config_path(args.config)
    if args.dry_run:
        return dry_run(path, args.overrides)
    if is_sweep_file(path):
        return run_sweep(path, args.overrides, Store(args.results).ensure_writable(), args.report, args.workers)
    from mmbalance.bench.train import run

    cfg = load_config(path, args.overrides)
    result = run(cfg, Store(args.results).ensure_writable())
    if result.state == "elsewhere":
        print(f"{result.path}: {result.note}")
        return 0
    best = result.summary["best_val"]
    print(f"{result.state}: {result.path}")
    print(f"test acc {best['test']['acc']:.4f} at best-val epoch {best['epoch']} (epochs count from 0); "
          f"own per-modality {fmt(best['test']['modality_acc'])}; "
          f"probes {fmt({m: p['test_acc'] for m, p in result.summary['probes'].items()})}")
    return 0


def run_sweep(path: Path, overrides: Sequence[str], store, report: str | None, workers: int = 1) -> int:
    from mmbalance.bench.sweep import labels_in_order, load_sweep, run_inline

    sweep, configs = load_sweep(path, overrides)
    points = len(configs) // len(sweep.seeds)  # cells (x grid points, + include rows), each over every seed
    log.info(f"sweep {sweep.group!r}: {points} cells x {len(sweep.seeds)} seeds = {len(configs)} runs, "
             f"{len(labels_in_order(configs))} row labels -> {store.root / sweep.group}")
    run_inline(configs, store, workers=workers)
    print_table(sweep.group, configs, store, report)
    return 0


def add_launcher_arguments(p: argparse.ArgumentParser) -> None:
    """The flags over a sweep file's `launcher:` section (bench.launch.options.FLAG_KEYS, and its name)."""
    p.add_argument("--launcher", choices=("inline", "local", "slurm"), default=None,
                   help="overrides the file's launcher.name (default: inline)")
    p.add_argument("--workers", type=int, help="local: worker processes (default: GPUs here x runs per GPU)")
    p.add_argument("--runs-per-gpu", type=int,
                   help="runs sharing one GPU at once (local: default 2; slurm: runs per array task, default 1)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time-min", type=int, help="slurm: time limit per run in minutes (time-outs requeue and resume)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--gpus-per-task", type=int)
    p.add_argument("--mem-gb", type=float)
    p.add_argument("--array-parallelism", type=int, help="slurm: at most this many runs at once")
    p.add_argument("--constraint")


def print_table(group: str, configs, store, report: str | None) -> None:
    """Print the sweep's table (bench.report.build.printed_tables); with `report`, write the whole
    report there too, whose table.md/csv hold the very strings printed."""
    from mmbalance.bench.report.build import build_report, table_text
    from mmbalance.bench.sweep import labels_in_order

    if not (store.root / group).is_dir():
        return
    ids, order = {c.run_id() for c in configs}, labels_in_order(configs)
    if report:
        print(build_report(store.root / group, Path(report), only=ids, order=order).summary)
    else:
        print(table_text(store.root / group, only=ids, order=order))


def cmd_sweep(args: argparse.Namespace) -> int:
    from mmbalance.bench.launch import launch
    from mmbalance.bench.launch.plan import format_plan, plan, to_run
    from mmbalance.bench.store import Store
    from mmbalance.bench.sweep import check_runs, load_sweep

    sweep, configs = load_sweep(config_path(args.file), args.overrides)
    options = launcher_options(sweep.launcher, launcher_flags(args))
    store = Store(args.results)
    log.info(f"sweep {sweep.group!r} ({options.name} launcher) -> {store.root / sweep.group}")
    if args.dry_run:
        planned = plan(configs, store)
        notes = check_runs([p.cfg for p in to_run(planned)], need_data=False)
        print("\n".join([format_plan(planned), *notes]))
        return 0
    code = launch(configs, store.ensure_writable(), options, wait=args.wait)
    if options.name != "slurm" or args.wait:
        print_table(sweep.group, configs, store, args.report)
    return code


def launcher_flags(args: argparse.Namespace) -> dict:
    from mmbalance.bench.launch.options import FLAG_KEYS

    flags = {k: getattr(args, k) for k in FLAG_KEYS if getattr(args, k) is not None}
    return {**flags, "name": args.launcher} if args.launcher else flags


def launcher_options(from_file, flags: dict):
    """The file's launcher section with the command-line flags over it."""
    from pydantic import ValidationError

    from mmbalance.core.errors import ConfigError
    from mmbalance.core.overrides import Sources, format_errors

    sources = Sources()
    sources.record({f"launcher.{k}": v for k, v in flags.items()}, "the command line")
    try:
        return type(from_file).model_validate({**from_file.model_dump(), **flags})
    except ValidationError as e:
        raise ConfigError(format_errors(e, type(from_file), sources, prefix="launcher")) from None


def cmd_tune(args: argparse.Namespace) -> int:
    from mmbalance.bench.store import Store
    from mmbalance.bench.sweep import load_sweep
    from mmbalance.bench.tune import chosen_text, tune
    from mmbalance.bench.tune_options import check_schedule, tune_options

    sweep, configs = load_sweep(config_path(args.file), args.overrides)
    options = tune_options(sweep.tune, {"trials": args.trials, "lr_range": args.lr_range, "parallel": args.parallel,
                                        "sampler_seed": args.sampler_seed, "schedule": args.schedule})
    launcher = launcher_options(sweep.launcher, launcher_flags(args))
    check_schedule(options, launcher.name)
    if args.dry_run:
        from mmbalance.bench.tune import plan_text

        print(plan_text(configs, Store(args.results), options, launcher))
        return 0
    store = Store(args.results).ensure_writable()
    log.info(f"tuning {sweep.group!r}: {options.trials} trials per cell ({launcher.name} launcher) "
             f"-> {store.root / sweep.group / 'tuning'}")
    tuned = tune(configs, store, options, launcher)
    print(chosen_text(tuned.records))
    print_table(sweep.group, tuned.configs, store, args.report)
    return tuned.code


def cmd_cancel(args: argparse.Namespace) -> int:
    from mmbalance.bench.status import cancel

    print(cancel(Path(args.dir)))
    return 0


def cmd_run_one(args: argparse.Namespace) -> int:
    from mmbalance.bench.launch.worker import run_one
    from mmbalance.bench.oserror import EXIT_OS_ERROR, os_cause
    from mmbalance.bench.store import RunDir
    from mmbalance.core.errors import EXIT_ELSEWHERE, RunFailed

    # the launchers stop a run with SIGINT (bench.launch.local.stop_running); a launcher started
    # where SIGINT is ignored (a `&` job of a script, nohup) hands that on, and the run would sit
    # out the grace period and be killed instead of recording its end
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        state = run_one(args.run_dir)
    except RunFailed as e:  # recorded in status.json; the traceback goes to this process's log too
        print(RunDir(Path(args.run_dir)).status().get("traceback", ""), file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_OS_ERROR if os_cause(e) else 1
    if state == "elsewhere":  # run_one said by whom, in one line
        return EXIT_ELSEWHERE
    print(f"{state}: {args.run_dir}")
    return 0


def dry_run(path: Path, overrides: Sequence[str]) -> int:
    from mmbalance.bench.config import load_config
    from mmbalance.bench.sweep import check_runs, is_sweep_file, load_sweep

    if is_sweep_file(path):
        _, configs = load_sweep(path, overrides)
    else:
        configs = [load_config(path, overrides)]
    notes = check_runs(configs, need_data=False)
    for cfg in configs:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        print(f"# run id: {cfg.run_id()}\n---")
    print("\n".join([*notes, f"{len(configs)} run config(s) valid"]))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from mmbalance.datasets.prepare.runner import prepare

    report = prepare(args.name, args.raw, args.out, args.pipeline, args.workers, args.on_error,
                     options=args.options, pipeline_file=args.pipeline_file)
    print(report.summary())
    return 0


def starter_plan(args: argparse.Namespace, **options):
    from mmbalance.bench.starter import plan_sweep

    if (args.seeds < 1 or args.budget_minutes <= 0 or (args.epochs is not None and args.epochs < 1)
            or args.lr_steps < 2 or (args.lr is not None and args.lr <= 0)):
        raise MMBalanceError(f"--seeds ({args.seeds}) and --epochs ({args.epochs}) must be at least 1, --lr-steps "
                             f"({args.lr_steps}) at least 2, --budget-minutes ({args.budget_minutes:g}) and --lr "
                             f"({args.lr}) above 0")
    return plan_sweep(args.cache, budget_minutes=args.budget_minutes, seeds=args.seeds, lr=args.lr, epochs=args.epochs,
                      lr_steps=args.lr_steps, **options)


def cmd_init(args: argparse.Namespace) -> int:
    from mmbalance.bench.starter import summary, write_plan

    plan = starter_plan(args)
    command = f"mmbalance init {args.cache} --budget-minutes {args.budget_minutes:g}"
    out = write_plan(plan, args.out, command, force=args.force)
    print(summary(plan, out))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from mmbalance.bench.report.diagnosis import diagnose
    from mmbalance.bench.starter import DIAGNOSE_METHODS, write_plan
    from mmbalance.bench.store import Store
    from mmbalance.bench.sweep import load_sweep, run_inline

    store = Store(args.results).ensure_writable()
    plan = starter_plan(args, methods=DIAGNOSE_METHODS, group_prefix="diagnose")
    out = Path(args.out) if args.out else Path("reports") / plan.group
    out.mkdir(parents=True, exist_ok=True)
    sweep_file = write_plan(plan, out / "sweep.yaml", f"mmbalance diagnose {args.cache}", force=True)
    _, configs = load_sweep(sweep_file)
    print(f"diagnose: {len(configs)} runs ({', '.join(plan.cells)} x {len(plan.seeds)} seeds, {plan.epochs} epochs, "
          f"lr {plan.lr:g}) -> {store.root / plan.group}")
    run_inline(configs, store)
    print(diagnose(store.root / plan.group, {c.run_id() for c in configs}, out, len(plan.info.classes)).text)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from mmbalance.bench.store import Store

    workers = args.workers or len(os.sched_getaffinity(0))
    return run_sweep(quickstart_config(), args.overrides, Store(args.results).ensure_writable(), args.report, workers)


def cmd_report(args: argparse.Namespace) -> int:
    from mmbalance.bench.report.build import build_report

    out = Path(args.out) if args.out else Path("reports") / Path(args.dir).resolve().name
    print(build_report(Path(args.dir), out, by=args.by, select=args.select).summary)
    return 0


def cmd_evaluate_robustness(args: argparse.Namespace) -> int:
    from mmbalance.bench.robustness import evaluate_run, run_dirs_under

    for run_dir in run_dirs_under(Path(args.dir)):
        print(evaluate_run(run_dir, force=args.force), flush=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from mmbalance.bench.status import status_table

    print(status_table(Path(args.dir)))
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    from mmbalance.bench.config import load_config

    cfg = load_config(None if args.config is None else config_path(args.config), args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    print(f"# run id: {cfg.run_id()}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mmbalance.bench.perf.bench import sections

    for text in sections(args):  # each as soon as it is measured: the whole takes minutes
        print(text, flush=True)
    return 0


def fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items()) or "n/a"


COMMANDS = {
    "list": cmd_list,
    "run": cmd_run,
    "prepare": cmd_prepare,
    "init": cmd_init,
    "diagnose": cmd_diagnose,
    "quickstart": cmd_quickstart,
    "evaluate-robustness": cmd_evaluate_robustness,
    "status": cmd_status,
    "report": cmd_report,
    "sweep": cmd_sweep,
    "cancel": cmd_cancel,
    "tune": cmd_tune,
    "run-one": cmd_run_one,
    "show-config": cmd_show_config,
    "bench": cmd_bench,
}

if __name__ == "__main__":
    raise SystemExit(main())
