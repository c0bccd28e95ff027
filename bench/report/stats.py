"""Statistics over seeds: mean ± std with a t confidence interval, and paired tests against joint.

Every method (label) of a dataset is compared with that dataset's joint baseline on the seeds
both finished (a paired t-test, scipy.stats.ttest_rel); the p-values of one dataset and metric
are Holm-corrected together. Wins/ties/losses count seeds: a seed is a tie when the method and
the baseline differ by less than TIE_THRESHOLD (absolute, in accuracy units).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

CONFIDENCE = 0.95
TIE_THRESHOLD = 0.005  # half an accuracy point
CI_NOTE = ("95% CI: Student-t interval mean ± t(0.975, n−1)·std/√n over seeds, used for every n "
           "(with fewer than 10 seeds a bootstrap over seeds is unreliable); none for n < 2")
TEST_NOTE = (f"paired t-test (scipy.stats.ttest_rel) of each method against the joint baseline of "
             f"its dataset on shared seeds; p_holm = p Holm-corrected (Holm–Bonferroni) over the methods of a "
             f"dataset and metric; p_wilcoxon = Wilcoxon signed-rank (scipy.stats.wilcoxon, exact; "
             f"uncorrected; cannot go below 0.25 with 3 seeds); "
             f"W/T/L = seeds where the method beats / ties (|Δ| < {TIE_THRESHOLD}) / loses to the baseline")


def describe(values: Sequence[float]) -> dict[str, float]:
    """mean, sample std (ddof=1), n and the two-sided t confidence interval of `values` (NaNs
    dropped): the one interval of the report, in its tables and its figures."""
    x = np.asarray([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    n = len(x)
    out = {"n": n, "mean": np.nan, "std": np.nan, "ci_low": np.nan, "ci_high": np.nan}
    if n == 0:
        return out
    out["mean"] = float(x.mean())
    if n < 2:
        return out
    std = float(x.std(ddof=1))
    # scipy has no interval for scale 0: equal values (a deficit of 0 on every seed) have [mean, mean]
    low, high = (sps.t.interval(CONFIDENCE, n - 1, loc=out["mean"], scale=std / np.sqrt(n)) if std > 0
                 else (out["mean"], out["mean"]))
    out.update(std=std, ci_low=float(low), ci_high=float(high))
    return out


def ci_bounds(values: Sequence[float]) -> tuple[float, float]:
    """(low, high) of `describe`'s interval: the `errorbar` callable the figures give seaborn."""
    d = describe(list(values))
    return d["ci_low"], d["ci_high"]


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (NaNs kept as NaN and not counted), in input order."""
    p = np.asarray(pvalues, dtype=float)
    valid = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(len(p), np.nan)
    m = len(valid)
    running = 0.0
    for rank, i in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def baseline_label(runs: pd.DataFrame) -> str | None:
    """The joint baseline among one dataset's runs: the label 'joint' if present, else the joint
    run with concat fusion, else the first joint label; None when the dataset has no joint run."""
    joint = runs[runs["method"] == "joint"]
    if joint.empty:
        return None
    labels = list(dict.fromkeys(joint["label"]))
    if "joint" in labels:
        return "joint"
    concat = joint[joint["fusion"] == "concat"]
    return concat["label"].iloc[0] if not concat.empty else labels[0]


def paired_tests(finished: pd.DataFrame, metric: str = "acc") -> pd.DataFrame:
    """One row per (dataset, label ≠ baseline): paired Δ vs joint, t, p, Holm p, W/T/L."""
    rows = []
    for dataset, runs in finished.groupby("dataset", sort=False):
        base = baseline_label(runs)
        if base is None:
            continue
        ref = runs[runs["label"] == base].groupby("seed")[metric].mean()
        block = []
        for label, g in runs.groupby("label", sort=False):
            if label == base:
                continue
            block.append(compare(dataset, label, base, g.groupby("seed")[metric].mean(), ref))
        for row, p in zip(block, holm([r["p"] for r in block])):
            row["p_holm"] = p
        rows += block
    return pd.DataFrame(rows, columns=["dataset", "label", "baseline", "metric", "n_pairs", "mean_diff",
                                       "t", "p", "p_holm", "p_wilcoxon", "wins", "ties", "losses"]
                        ).assign(metric=metric)


def compare(dataset: str, label: str, base: str, x: pd.Series, ref: pd.Series) -> dict:
    """Paired comparison of per-seed values `x` against `ref` on their shared seeds."""
    shared = sorted(set(x.dropna().index) & set(ref.dropna().index))
    d = (x[shared] - ref[shared]).to_numpy(dtype=float)
    t = p = w = np.nan
    if len(shared) >= 2 and np.any(d != d[0]):  # a constant difference has no t statistic
        res = sps.ttest_rel(x[shared].to_numpy(float), ref[shared].to_numpy(float))
        t, p = float(res.statistic), float(res.pvalue)
    if len(shared) >= 2 and np.any(d != 0):
        w = float(sps.wilcoxon(d, zero_method="wilcox", method="exact" if np.all(d != 0) else "auto").pvalue)
    return {"dataset": dataset, "label": label, "baseline": base, "n_pairs": len(shared),
            "mean_diff": float(d.mean()) if len(d) else np.nan, "t": t, "p": p, "p_wilcoxon": w,
            "wins": int((d >= TIE_THRESHOLD).sum()), "ties": int((np.abs(d) < TIE_THRESHOLD).sum()),
            "losses": int((d <= -TIE_THRESHOLD).sum())}
