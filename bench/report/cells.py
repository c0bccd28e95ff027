"""The report's main table: one row per dataset × label, numbers aggregated over seeds.

`aggregate` gives the numbers (mean, std, n, CI per metric); `display` turns them into
"mean ± std" strings; `to_latex` writes booktabs with the best value of a column (within a
dataset) in bold and the second underlined. Failed, unfinished and missing seeds get columns of
their own, so a cell with fewer seeds is visible as such.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.report.stats import describe

HIGHER = ("acc", "macro_f1", "map")  # plus own.* and probe.*: higher is better
LOWER = ("s_per_epoch", "cpu_hours", "gpu_hours", "peak_mem_mb")  # plus deficit.*: lower is better
COST = ("s_per_epoch", "cpu_hours", "gpu_hours", "peak_mem_mb", "fwd_per_step", "bwd_per_step")
NAMES = {"acc": "fused acc", "macro_f1": "macro-F1", "map": "mAP", "s_per_epoch": "s/epoch",
         "cpu_hours": "CPU h", "gpu_hours": "GPU h", "peak_mem_mb": "peak MB",
         "fwd_per_step": "fwd/step", "bwd_per_step": "bwd/step"}
KIND = {"own": "own", "probe": "probe", "uni": "unimodal ref", "deficit": "probe deficit"}


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """The metric columns present, in the table's order."""
    modalities = sorted({c.split(".", 1)[1] for c in runs if c.startswith(("own.", "probe."))})
    cols = [c for c in HIGHER if c in runs]
    for kind in ("own", "probe", "uni", "deficit"):
        cols += [f"{kind}.{m}" for m in modalities if kind in ("uni", "deficit") or f"{kind}.{m}" in runs]
    return cols + [c for c in COST if c in runs]


def add_references(runs: pd.DataFrame) -> pd.DataFrame:
    """uni.<m> = mean fused acc of the dataset's unimodal-only model of m; deficit.<m> = uni − probe."""
    runs = runs.copy()
    if "unimodal_modality" not in runs:
        return runs
    uni = runs[(runs["method"] == "unimodal") & runs["acc"].notna()] if "acc" in runs else runs.iloc[:0]
    for (dataset, m), refs in uni.groupby(["dataset", "unimodal_modality"]):
        same = runs["dataset"] == dataset
        runs.loc[same, f"uni.{m}"] = refs["acc"].mean()
        if f"probe.{m}" in runs:
            runs.loc[same, f"deficit.{m}"] = refs["acc"].mean() - runs.loc[same, f"probe.{m}"]
    return runs


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, label): for each metric `<col>`, `<col>:mean/std/n/ci_low/ci_high`,
    plus the seeds finished, failed/unfinished run ids and seeds missing against the dataset."""
    runs = add_references(runs)
    finished = runs[runs["state"] == "finished"]
    cols = metric_columns(finished)
    rows = []
    for (dataset, label), g in runs.groupby(["dataset", "label"], sort=False):
        done = g[g["state"] == "finished"]
        all_seeds = set(runs.loc[runs["dataset"] == dataset, "seed"])
        row = {"dataset": dataset, "label": label, "method": g["method"].iloc[0],
               "n": done["seed"].nunique(),
               "seeds": ",".join(map(str, sorted(done["seed"].unique()))),
               "not finished": "; ".join(f"{r.run_id} ({r.state})" for r in g.itertuples() if r.state != "finished"),
               "missing seeds": ",".join(map(str, sorted(all_seeds - set(g["seed"]))))}
        for c in cols:
            for k, v in describe(values(finished, done, dataset, c)).items():
                row[f"{c}:{k}"] = v
        rows.append(row)
    return pd.DataFrame(rows)


def values(finished: pd.DataFrame, done: pd.DataFrame, dataset: str, col: str) -> list[float]:
    """A cell's per-seed values of `col`; for uni.<m>, the unimodal-only runs of m themselves
    (the reference's own spread over its seeds, the same for every row of the dataset)."""
    if col.startswith("uni."):
        ref = finished[(finished["dataset"] == dataset) & (finished["method"] == "unimodal")
                       & (finished["unimodal_modality"] == col.split(".", 1)[1])]
        return ref["acc"].tolist()
    return done[col].tolist() if col in done else []


def columns_of(agg: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(c.split(":")[0] for c in agg if c.endswith(":mean")))


def header(col: str) -> str:
    kind, _, m = col.partition(".")
    return f"{KIND[kind]} {m}" if m else NAMES.get(col, col)


def fmt(mean: float, std: float, digits: int = 3) -> str:
    if np.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def digits_of(col: str) -> int:
    return {"s_per_epoch": 3, "cpu_hours": 4, "gpu_hours": 4, "peak_mem_mb": 0}.get(col, 3)


def display(agg: pd.DataFrame) -> pd.DataFrame:
    """The aggregate as strings: mean ± std per metric, n and the not-finished/missing lists."""
    out = agg[["dataset", "label", "n", "seeds"]].copy()
    for c in columns_of(agg):
        out[header(c)] = [fmt(m, s, digits_of(c)) for m, s in zip(agg[f"{c}:mean"], agg[f"{c}:std"])]
    out["not finished"] = agg["not finished"]
    out["missing seeds"] = agg["missing seeds"]
    return out


def ranks(agg: pd.DataFrame) -> dict[tuple[int, str], int]:
    """{(row index, column): 1 or 2} for the best and second-best mean of a column within a dataset."""
    marks = {}
    for c in columns_of(agg):
        lower = c in LOWER or c.startswith("deficit.")
        if not (lower or c in HIGHER or c.startswith(("own.", "probe."))):
            continue
        for _, g in agg.groupby("dataset", sort=False):
            means = g[f"{c}:mean"].dropna()
            distinct = sorted(set(means), reverse=not lower)
            for i, v in means.items():
                if v in distinct[:2]:
                    marks[(i, c)] = distinct.index(v) + 1
    return marks


def latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def to_latex(agg: pd.DataFrame, caption: str) -> str:
    """A booktabs table (needs \\usepackage{booktabs}): best of a dataset bold, second underlined."""
    cols = columns_of(agg)
    marks = ranks(agg)
    lines = [r"\begin{table}[t]", r"\centering", r"\scriptsize",
             r"\begin{tabular}{ll r " + "l" * len(cols) + "}", r"\toprule",
             " & ".join(["dataset", "method", "$n$"] + [latex_escape(header(c)) for c in cols]) + r" \\",
             r"\midrule"]
    for i, r in agg.iterrows():
        cells = [latex_escape(str(r["dataset"])), latex_escape(str(r["label"])), str(r["n"])]
        for c in cols:
            text = fmt(r[f"{c}:mean"], r[f"{c}:std"], digits_of(c)).replace("±", r"$\pm$").replace("–", "--")
            mark = marks.get((i, c))
            cells.append(r"\textbf{" + text + "}" if mark == 1 else r"\underline{" + text + "}" if mark == 2 else text)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + latex_escape(caption) + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"
