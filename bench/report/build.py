"""`mmbalance report`: read a results directory, write the report folder, return its summary.

Every file is a view of one aggregation (`cells.aggregate` over `collect.load_runs`): the folder
holds table.{md,csv,tex} (dataset × method, as printed), aggregate.csv (its numbers: mean, std,
n and 95% CI per metric), stats.{md,csv} (paired tests against joint), paper_vs_ours.{md,csv},
runs.csv (every run, failed ones too), figures/, README.md (renders on GitHub) and report.html
(self-contained: tables and figures inlined).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mmbalance.bench.report.cells import KEY, aggregate, display, printed, to_latex
from mmbalance.bench.report.collect import DEFICIT_NOTE, SELECTIONS, damaged_runs, load_runs
from mmbalance.bench.report.contribution import NOTE as CONTRIBUTION_NOTE
from mmbalance.bench.report.paper import paper_vs_ours
from mmbalance.bench.report.robustness import write_robustness
from mmbalance.bench.report.stats import CI_NOTE, TEST_NOTE, paired_tests
from mmbalance.bench.report.tuning import write_tuning
from mmbalance.bench.resources import paper_tables_csv
from mmbalance.bench.store import atomic_write_text
from mmbalance.core.errors import ConfigError

BY_KEYS = ("dataset", "method", "fusion", "group")  # "method" is the cell label of a sweep


@dataclass
class Report:
    """What `build_report` wrote, and the lines it prints."""

    out: Path
    files: list[Path] = field(default_factory=list)
    summary: str = ""


def parse_by(by: str | list[str]) -> list[str]:
    keys = by.split(",") if isinstance(by, str) else list(by)
    keys = [k.strip() for k in keys if k.strip()]
    bad = [k for k in keys if k not in BY_KEYS]
    if bad or "dataset" not in keys:
        raise ConfigError(f"--by {','.join(keys)!r}: keys must include 'dataset' and come from "
                          f"{', '.join(BY_KEYS)} ('method' is the sweep's cell label)")
    return keys


def relabel(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The row label of each run: the cell label, with any extra --by keys appended."""
    runs = runs.copy()
    extra = [k for k in keys if k not in ("dataset", "method")]
    parts = ([runs["label"].astype(str)] if "method" in keys else []) + [runs[k].astype(str) for k in extra]
    if parts:
        label = parts[0]
        for p in parts[1:]:
            label = label + "/" + p
        runs["label"] = label
    else:
        runs["label"] = "all"
    return runs


def build_report(results_dir: Path, out: Path, by: str | list[str] = "dataset,method",
                 select: str = "val", paper_csv: Path | None = None, only: set[str] | None = None,
                 order: list[str] | None = None) -> Report:
    """Write the report of every run under `results_dir` (or of the run ids in `only`) into `out`;
    rows follow `order` (a sweep's cells) where given (cells.label_order)."""
    # matplotlib and seaborn (~0.5 s more than pandas) only for the figures: `table_text` prints without them
    from mmbalance.bench.report.figures import make_figures

    keys = parse_by(by)
    runs, metrics = load_runs(results_dir, select, only)
    damaged = damaged_runs(results_dir, only)
    if runs.empty:
        raise ConfigError(f"no runs under {results_dir} (looked for */config.yaml and */*/config.yaml)"
                          + damaged_text(damaged))
    runs = relabel(runs, keys)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out)
    finished = runs[runs["state"] == "finished"]
    agg = aggregate(runs, order)
    table = display(agg)
    tests = pd.concat([paired_tests(finished, m) for m in ("acc", "macro_f1") if m in finished],
                      ignore_index=True) if not finished.empty else pd.DataFrame()
    paper = paper_table(paper_csv, results_dir, runs, select, keys, only)
    protocol = SELECTIONS[select][1]
    write = lambda name, text: report.files.append(_write(out / name, text))  # noqa: E731
    write("table.md", "\n".join(md_section(*sec) for sec in split_sections(table, protocol)))
    write("table.csv", table.to_csv(index=False))
    write("aggregate.csv", agg.to_csv(index=False))
    write("table.tex", to_latex(agg, f"{protocol}; mean $\\pm$ std over seeds; best of a dataset bold, second "
                                     "underlined; deficit = the unimodal-only model's probe $-$ this probe, same "
                                     "seed."))
    write("stats.md", md_section("Paired tests against joint", tests, TEST_NOTE))
    write("stats.csv", tests.to_csv(index=False))
    write("paper_vs_ours.md", md_section("Paper vs ours", paper, PAPER_NOTE))
    write("paper_vs_ours.csv", paper.to_csv(index=False))
    write("runs.csv", runs.to_csv(index=False))
    if not damaged.empty:
        write("damaged.csv", damaged.to_csv(index=False))
    figures = make_figures(agg, finished, metrics, out / "figures")
    robust_files, robust_sections, robust_figures = write_robustness(results_dir, finished, agg, order, out)
    tuning_files, tuning_sections, tuning_figures = write_tuning(results_dir, finished, out)
    report.files += robust_files + tuning_files
    figures += robust_figures + tuning_figures
    sections = [*split_sections(table, protocol),
                ("Confidence intervals (95%)", ci_table(agg), CI_NOTE),
                ("Paired tests against joint", tests, TEST_NOTE),
                ("Paper vs ours", paper, PAPER_NOTE), *robust_sections, *tuning_sections] + (
                   [("Left out: runs with damaged files", damaged, DAMAGED_NOTE)] if not damaged.empty else [])
    title = f"mmbalance report: {Path(results_dir).resolve().name}"
    write("README.md", markdown_page(title, sections, figures, out))
    write("report.html", html_page(title, sections, figures))
    report.files += figures
    report.summary = summary_text(runs, agg, tests, paper, out, protocol) + damaged_text(damaged)
    return report


def damaged_text(damaged: pd.DataFrame) -> str:
    """The lines that list the runs left out for a damaged file ('' when there are none)."""
    if damaged.empty:
        return ""
    lines = [f"  {r.group}/{r.run_id}: {r.file}: {r.why}" for r in damaged.itertuples()]
    return (f"\nleft out {damaged['run_id'].nunique()} run(s) with damaged files (listed in damaged.csv; "
            "launching the sweep again repairs them):\n" + "\n".join(lines))


def table_text(results_dir: Path, only: set[str] | None = None, order: list[str] | None = None,
               select: str = "val") -> str:
    """The table `build_report` prints, without writing a report."""
    runs, _ = load_runs(results_dir, select, only)
    if runs.empty:
        raise ConfigError(f"no runs under {results_dir} (looked for */config.yaml and */*/config.yaml)")
    return printed_tables(aggregate(runs, order), SELECTIONS[select][1])


def paper_table(paper_csv: Path | None, results_dir: Path, runs: pd.DataFrame, select: str, keys: list[str],
                only: set[str] | None) -> pd.DataFrame:
    """Paper vs ours needs our runs under both selections; reload under the one not loaded yet.
    `paper_csv` defaults to the shipped results/paper_tables.csv."""
    paper_csv = Path(paper_csv) if paper_csv is not None else paper_tables_csv()
    if not paper_csv.exists():
        return pd.DataFrame()
    other = "test" if select != "test" else "val"
    by_select = {select: runs, other: relabel(load_runs(results_dir, other, only)[0], keys)}
    return paper_vs_ours(Path(paper_csv), {"val": by_select["val"], "test": by_select["test"]})


def split_sections(table: pd.DataFrame, protocol: str) -> list[tuple[str, pd.DataFrame, str]]:
    """The wide table as three readable ones: fused metrics (with n and the runs not counted),
    per-modality accuracies, and cost."""
    key = KEY
    kinds = ("own ", "probe ", "deficit ")
    modal = [c for c in table if c.startswith(kinds)]
    cost = [c for c in table if c in ("s/epoch", "CPU h", "GPU h", "peak MB", "fwd/step", "bwd/step")]
    contribution = [c for c in table if c.startswith("shapley ") or c == "imbalance degree"]
    fused = [c for c in table if c not in key + modal + cost + contribution]
    return [("Results", table[key + fused],
             f"{protocol}; mean ± std over seeds (sample std); n = seeds finished. {LEGEND}"),
            ("Per modality", table[key + modal], LEGEND_MODAL),
            *([("Modality contribution", table[key + contribution], CONTRIBUTION_NOTE)] if contribution else []),
            ("Cost", table[key + cost], LEGEND_COST)]


def ci_table(agg: pd.DataFrame) -> pd.DataFrame:
    """Fused accuracy and macro-F1 with their 95% t intervals."""
    out = agg[KEY].copy()
    for c in ("acc", "macro_f1"):
        if f"{c}:mean" in agg:
            out[f"{c} mean"] = agg[f"{c}:mean"].round(4)
            out[f"{c} 95% CI"] = [("–" if pd.isna(lo) else f"[{lo:.4f}, {hi:.4f}]")
                                  for lo, hi in zip(agg[f"{c}:ci_low"], agg[f"{c}:ci_high"])]
    return out


def _write(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


def md_table(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False) if not df.empty else "_(none)_"


def md_section(title: str, df: pd.DataFrame, note: str) -> str:
    return f"## {title}\n\n{md_table(df)}\n\n{note}\n"


def markdown_page(title: str, sections, figures: list[Path], out: Path) -> str:
    parts = [f"# {title}\n", "Files: table.{md,csv,tex}, aggregate.csv, stats.{md,csv}, paper_vs_ours.{md,csv}, "
                              "runs.csv, report.html.\n"]
    parts += [md_section(*s) for s in sections]
    pngs = [f for f in figures if f.suffix == ".png"]
    if pngs:
        links = (f"![{f.stem}]({f.relative_to(out).as_posix()})" for f in pngs)
        parts.append("## Figures\n\n" + "\n\n".join(links) + "\n")
    return "\n".join(parts)


def html_page(title: str, sections, figures: list[Path]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for name, df, note in sections:
        table = df.to_html(index=False, na_rep="–", border=0) if not df.empty else "<p><em>(none)</em></p>"
        body += [f"<h2>{html.escape(name)}</h2>", table, f"<p class='note'>{html.escape(note)}</p>"]
    pngs = [f for f in figures if f.suffix == ".png"]
    if pngs:
        body.append("<h2>Figures</h2>")
        for f in pngs:
            data = base64.b64encode(f.read_bytes()).decode()
            body.append(f"<figure><img alt='{html.escape(f.stem)}' src='data:image/png;base64,{data}'>"
                        f"<figcaption>{html.escape(f.stem)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def summary_text(runs: pd.DataFrame, agg: pd.DataFrame, tests: pd.DataFrame, paper: pd.DataFrame, out: Path,
                 protocol: str) -> str:
    """What the command line prints: the run counts, `printed_tables`, the paired tests, the files."""
    states = runs["state"].value_counts().to_dict()
    lines = [f"{len(runs)} runs ({', '.join(f'{n} {s}' for s, n in states.items())}); "
             f"{len(agg)} rows over {runs['dataset'].nunique()} dataset(s)", printed_tables(agg, protocol)]
    if not tests.empty:
        acc = tests[tests["metric"] == "acc"]
        for dataset, block in acc.groupby("dataset", sort=False):
            lines.append(f"vs joint on {dataset} (acc, W/T/L over seeds; Holm p): " + "; ".join(
                f"{r.label} {r.wins}/{r.ties}/{r.losses} p={r.p_holm:.3g}" for r in block.itertuples()))
    lines.append(f"paper vs ours: {len(paper)} published cells matched")
    lines.append(f"report written to {out}/ (README.md, report.html, table.md/.csv/.tex, aggregate.csv)")
    return "\n".join(lines)


def printed_tables(agg: pd.DataFrame, protocol: str) -> str:
    """The table as printed: one markdown block per dataset (the same strings as table.csv), then
    the legend with the deficit's sign."""
    table = printed(agg)
    blocks = [f"dataset: {ds}\n{block.drop(columns='dataset').to_markdown(index=False)}"
              for ds, block in table.groupby("dataset", sort=False)]
    return "\n\n".join(blocks) + f"\n{protocol}, mean ± std over seeds (n). {PRINTED_LEGEND}\n"


LEGEND = ("'not finished' lists failed, interrupted or unfinished runs (not counted in n); 'missing "
          "seeds' lists seeds that other rows of the dataset have but this row has no run for.")
LEGEND_MODAL = ("own = the method's own per-modality logits (selected epoch); probe = linear probe on the "
                f"frozen best-val encoder (C chosen on val); {DEFICIT_NOTE}.")
PRINTED_LEGEND = ("own = the method's own per-modality logits, probe = linear probe on the frozen encoder; "
                  f"{DEFICIT_NOTE}.")
LEGEND_COST = ("s/epoch; CPU or GPU hours = s/epoch × epochs on the run's device; peak memory in MB "
               "(GPU allocated on CUDA, process RSS on CPU: runs sharing one process share it); "
               "forward passes per step per encoder and backward passes per step.")
DAMAGED_NOTE = ("Runs with a file that cannot be read or holds impossible values (bench/schema.py) are "
                "not counted anywhere in this report; launching their sweep again repairs them.")
PAPER_NOTE = ("Published values and ours in percent; Δ = ours under the paper's selection protocol − "
              "published. Our default protocol is best-val; best-test is the papers' usual (optimistic) one. "
              "Dataset/method names mapped by bench/report/paper.py (DATASETS, METHODS).")
CSS = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:12px}"
       "th,td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}th{background:#f3f3f3}"
       ".note{color:#555;font-size:12px}img{max-width:100%}")
