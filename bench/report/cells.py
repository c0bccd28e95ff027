"""The report's one aggregation: runs (bench.report.collect.load_runs) -> one row per dataset × label.

`aggregate` gives the numbers (mean, std, n and the t confidence interval of every metric, from
`stats.describe`); every table is a view of it: `display` ("mean ± std" strings, the table.md /
table.csv / HTML table), `printed` (the columns the command line prints, the same strings) and
`to_latex` (booktabs, the best value of a column within a dataset in bold, the second
underlined). The figures draw its means and intervals too. Failed, unfinished and missing seeds
get columns of their own, so a cell with fewer seeds is visible as such.

The probe deficit has one sign everywhere, stated in its header: uni − probe (see
collect.DEFICIT_NOTE), positive when the encoder learned less than the unimodal-only model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mmbalance.bench.report.stats import describe

HIGHER = ("acc", "macro_f1", "map")  # plus own.* and probe.*: higher is better
COST = ("s_per_epoch", "cpu_hours", "gpu_hours", "peak_mem_mb", "fwd_per_step", "bwd_per_step")
LOWER = ("s_per_epoch", "cpu_hours", "gpu_hours", "peak_mem_mb")  # plus deficit.*: lower is better
NAMES = {"acc": "fused acc", "macro_f1": "macro-F1", "map": "mAP", "s_per_epoch": "s/epoch",
         "cpu_hours": "CPU h", "gpu_hours": "GPU h", "peak_mem_mb": "peak MB",
         "fwd_per_step": "fwd/step", "bwd_per_step": "bwd/step", "imbalance": "imbalance degree"}
# shapley.<m>: m's Shapley contribution to the fused test accuracy, and its imbalance degree
# (bench.contribution, at the selected epoch); neither ranked: no direction is better
PER_MODALITY = ("own", "probe", "deficit", "shapley")
IMBALANCE = ("imbalance",)
DIGITS = {"cpu_hours": 4, "gpu_hours": 4, "peak_mem_mb": 0}
KEY = ["dataset", "family", "label", "n"]
# the field's method families (BalanceBenchmark's taxonomy), in the order tables list them; the
# same names as methods.base.FAMILIES, which the report does not import (it would import torch)
FAMILY_ORDER = ("baseline", "data", "feed-forward", "objective", "optimisation", "reference")
LISTS = ["not finished", "missing seeds"]
# the columns the command line prints (besides KEY, and LISTS when a row has something in them)
PRINTED = ("acc", "own.", "probe.", "deficit.", "s_per_epoch")


def label_order(runs: pd.DataFrame, order: list[str] | None = None) -> list[str]:
    """The rows' (and the figures' colours') order: grouped by method family (joint training
    first, the field's four families, then methods whose runs recorded none, then unimodal-only
    references); within a family `order` first (a sweep's cells), then alphabetical, so that one
    set of labels gets one order whatever order the runs were read in."""
    families = label_families(runs)
    given = {label: i for i, label in enumerate(order or [])}
    return sorted(families, key=lambda label: (family_rank(families[label]), given.get(label, len(given)), label))


def label_families(runs: pd.DataFrame) -> dict[str, str | None]:
    """Each label's method family, from its finished runs' summaries (None where none recorded one)."""
    pairs = zip(runs["label"], runs["family"]) if "family" in runs else ()
    families = {label: family for label, family in pairs if isinstance(family, str)}
    return {label: families.get(label) for label in runs["label"].drop_duplicates()}


def family_rank(family: str | None) -> float:
    if family == "reference":
        return len(FAMILY_ORDER)
    return FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER) - 0.5


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """The metric columns with at least one value, in the table's order."""
    present = [c for c in runs if runs[c].notna().any()]
    modalities = sorted({c.split(".", 1)[1] for c in present if c.startswith(PER_MODALITY)})
    cols = [c for c in HIGHER if c in present]
    cols += [f"{kind}.{m}" for kind in PER_MODALITY for m in modalities if f"{kind}.{m}" in present]
    return cols + [c for c in (*IMBALANCE, *COST) if c in present]


def aggregate(runs: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """One row per (dataset, label), datasets sorted and labels in `label_order`: for each metric
    `<col>`, `<col>:mean/std/n/ci_low/ci_high` over the finished seeds, plus the seeds finished,
    the failed/unfinished run ids and the seeds missing against the rest of the dataset."""
    finished = runs[runs["state"] == "finished"]
    cols = metric_columns(finished)
    rank = {label: i for i, label in enumerate(label_order(runs, order))}
    families = label_families(runs)
    rows = []
    for dataset in sorted(runs["dataset"].unique()):
        block = runs[runs["dataset"] == dataset]
        for label in sorted(block["label"].unique(), key=rank.get):
            g = block[block["label"] == label]
            done = g[g["state"] == "finished"]
            row = {"dataset": dataset, "family": families[label] or "–", "label": label, "method": g["method"].iloc[0],
                   "n": done["seed"].nunique(),
                   "seeds": ",".join(map(str, sorted(done["seed"].unique()))),
                   "not finished": "; ".join(f"{r.run_id} ({r.state})" for r in g.itertuples()
                                             if r.state != "finished"),
                   "missing seeds": ",".join(map(str, sorted(set(block["seed"]) - set(g["seed"]))))}
            for c in cols:
                row.update({f"{c}:{k}": v for k, v in describe(done[c].tolist()).items()})
            rows.append(row)
    return pd.DataFrame(rows)


def columns_of(agg: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(c.split(":")[0] for c in agg if c.endswith(":mean")))


def header(col: str) -> str:
    kind, _, m = col.partition(".")
    if kind == "deficit":
        return f"deficit {m} (uni − probe)"  # the sign convention, in the header itself
    return f"{kind} {m}" if m else NAMES.get(col, col)


def fmt(mean: float, std: float, n: int, of: int, digits: int = 3) -> str:
    """'mean ± std', with '(n=k)' when only k of the row's `of` seeds have a value."""
    if np.isnan(mean):
        return "–"
    text = f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text if n >= of else f"{text} (n={n})"


def display(agg: pd.DataFrame) -> pd.DataFrame:
    """The aggregate as strings: mean ± std per metric, n and the not-finished/missing lists."""
    out = agg[KEY].copy()
    for c in columns_of(agg):
        out[header(c)] = [fmt(m, s, k, of, DIGITS.get(c, 3))
                          for m, s, k, of in zip(agg[f"{c}:mean"], agg[f"{c}:std"], agg[f"{c}:n"], agg["n"])]
    out[LISTS] = agg[LISTS]
    return out


def printed(agg: pd.DataFrame) -> pd.DataFrame:
    """The columns of `display` the command line prints: the same strings as table.csv."""
    table = display(agg)
    cols = [header(c) for c in columns_of(agg) if c.startswith(PRINTED)]
    lists = [c for c in LISTS if (table[c] != "").any()]
    return table[KEY + cols + lists]


def ranks(agg: pd.DataFrame) -> dict[tuple[int, str], int]:
    """{(row index, column): 1 or 2} for the best and second-best mean of a column within a dataset
    (for a deficit, among the multimodal rows: a unimodal-only model's is 0 by definition)."""
    marks = {}
    for c in columns_of(agg):
        lower = c in LOWER or c.startswith("deficit.")
        if not (lower or c in HIGHER or c.startswith(("own.", "probe."))):
            continue
        ranked = agg[agg["method"] != "unimodal"] if c.startswith("deficit.") else agg
        for _, g in ranked.groupby("dataset", sort=False):
            means = g[f"{c}:mean"].dropna()
            distinct = sorted(set(means), reverse=not lower)
            for i, v in means.items():
                if v in distinct[:2]:
                    marks[(i, c)] = distinct.index(v) + 1
    return marks


# characters of our own text that pdflatex's default input encoding has no glyph for
LATEX_UNICODE = {"±": r"$\pm$", "–": "--", "−": "$-$", "Δ": r"$\Delta$"}


def to_latex(agg: pd.DataFrame, caption: str) -> str:
    """A booktabs table (needs \\usepackage{booktabs}): best of a dataset bold, second underlined.
    Every cell and header is escaped by pandas (& % $ # _ { } ~ ^ \\); `caption` is LaTeX source."""
    table = display(agg).drop(columns=LISTS).rename(columns={"label": "method"})
    marks = ranks(agg)
    names = {header(c): c for c in columns_of(agg)}
    style = (table.style.hide(axis="index").format(escape="latex")
             .format_index(escape="latex", axis=1)
             .apply(lambda col: [_mark(marks.get((i, names.get(col.name)))) for i in col.index], axis=0))
    tex = style.to_latex(hrules=True, column_format="lllr" + "l" * (table.shape[1] - 4), position="t",
                         position_float="centering", caption=caption)
    for a, b in LATEX_UNICODE.items():
        tex = tex.replace(a, b)
    return tex.replace(r"\begin{tabular}", "\\scriptsize\n\\begin{tabular}")


def _mark(rank: int | None) -> str:
    return {1: "textbf:--rwrap;", 2: "underline:--rwrap;"}.get(rank, "")
