"""Paper vs ours: each published number of results/paper_tables.csv that our store has runs for.

The CSV names datasets and methods as the papers do; DATASETS and METHODS map them to our
registry names. A published row matches our runs of that dataset and method (and, for a
unimodal row, that modality; for "baseline"/"concat", the dataset's joint baseline label), once
per dataset config we ran (two presets of one dataset are two rows, named by `ours dataset`).
Ours is given under both our protocol (test at the best-validation epoch) and best-on-test; the
difference is ours under the paper's own protocol minus the published value (percent points).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mmbalance.bench.report.stats import baseline_label, describe

# paper_tables.csv dataset -> our registry name
DATASETS = {"cremad": "cremad", "ks": "kinetics_sounds", "ucf101": "ucf101", "vggsound": "vggsound",
            "ave": "ave", "modelnet40": "modelnet40", "avdigits": "avdigits", "mosei": "cmu_mosei",
            "food101": "food101"}
# paper_tables.csv method -> (our method, unimodal modality or None). BalanceBenchmark's "OGM" is
# its OGM-GE implementation, so both map to ours.
METHODS = {"baseline": ("joint", None), "concat": ("joint", None), "joint": ("joint", None),
           "ogm": ("ogm_ge", None), "ogm-ge": ("ogm_ge", None), "mla": ("mla", None),
           "mie": ("mie", None), "di-mml": ("di_mml", None), "opm": ("opm", None), "pmr": ("pmr", None),
           "agm": ("agm", None), "mmpareto": ("mmpareto", None), "reconboost": ("reconboost", None),
           "inforeg": ("inforeg", None), "relearning": ("relearning", None),
           # part 2 of the field's methods (issue 18), as BalanceBenchmark names them
           "mmcosine": ("mmcosine", None), "cml": ("cml", None), "amco": ("amco", None), "mbsd": ("mbsd", None),
           "lfm": ("lfm", None), "umt": ("umt", None), "gblending": ("gblending", None),
           "greedy": ("greedy", None), "modality-valuation": ("valuation", None),
           "unimodal-audio": ("unimodal", "audio"), "unimodal-visual": ("unimodal", "visual"),
           "unimodal-text": ("unimodal", "text")}
# paper_tables.csv selection -> our --select value
PROTOCOLS = {"best-test-epoch": "test", "best-val-epoch": "val"}
COLUMNS = ["paper", "table", "dataset", "method", "metric", "published", "paper protocol", "ours dataset", "ours label",
           "n", "ours (best-val)", "ours (best-test)", "ours (paper protocol)", "Δ (ours − published)"]


def ours_rows(runs: pd.DataFrame, dataset: str, method: str, modality: str | None) -> pd.DataFrame:
    """Our finished runs of one dataset config (its label, collect.dataset_labels) for a
    published method."""
    same = runs[(runs["dataset"] == dataset) & (runs["state"] == "finished")]
    if method == "joint":
        base = baseline_label(same)
        return same[same["label"] == base] if base else same.iloc[:0]
    hit = same[same["method"] == method]
    return hit[hit["unimodal_modality"] == modality] if modality else hit


def pct(values: pd.Series) -> dict:
    return describe((100 * values).tolist())


def text(d: dict) -> str:
    if d["n"] == 0:
        return "–"
    return f"{d['mean']:.2f}" if np.isnan(d["std"]) else f"{d['mean']:.2f} ± {d['std']:.2f}"


def paper_vs_ours(paper_csv: Path, by_select: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per published cell we have runs for. `by_select` maps 'val' and 'test' to the
    runs loaded under that selection (collect.load_runs)."""
    paper = pd.read_csv(paper_csv)
    ours = by_select["val"]
    rows = []
    for p in paper.itertuples(index=False):
        name, (method, modality) = DATASETS.get(p.dataset), METHODS.get(p.method, (None, None))
        if name is None or method is None:
            continue
        for dataset in sorted(ours.loc[ours["dataset_name"] == name, "dataset"].unique()):
            got = {s: ours_rows(r, dataset, method, modality) for s, r in by_select.items()}
            if got["val"].empty or p.metric not in got["val"]:
                continue
            d = {s: pct(g[p.metric]) for s, g in got.items()}
            theirs = PROTOCOLS.get(p.selection)
            diff = d[theirs]["mean"] - p.value if theirs else np.nan
            rows.append([p.paper, p.table, name, method + (f" ({modality})" if modality else ""), p.metric,
                         p.value, p.selection, dataset, got["val"]["label"].iloc[0], d["val"]["n"],
                         text(d["val"]), text(d["test"]), text(d[theirs]) if theirs else "– (protocol unknown)",
                         diff])
    return pd.DataFrame(rows, columns=COLUMNS)
