"""The report's figures: every file is written (PNG and PDF, non-empty, PNGs of a real size) from a
synthetic runs table and from a real (tiny) results store; colours are one mapping per label."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from bench.report.figures import (
    diagnostic_keys,
    label_colors,
    label_order,
    make_figures,
    t_interval,
)
from bench.report.table import run_rows
from bench.train import run

STEMS = ["fused_accuracy", "probe_vs_unimodal", "trajectories_modality", "diagnostics", "accuracy_vs_cost"]
DATASET = json.dumps({"name": "gaussian", "n": 100}, sort_keys=True)
CELLS = [("joint-concat", "joint", None), ("ogm-ge", "ogm_ge", None), ("mla", "mla", None),
         ("unimodal-audio", "unimodal", "audio"), ("unimodal-visual", "unimodal", "visual")]


def record(epoch: int, method: str, rng) -> dict:
    """One metrics.jsonl record shaped like bench.train's."""
    train = {"loss": 2.0 - epoch * 0.1, "seconds": 0.1, "samples_per_s": 1000.0}
    own = {}
    if method == "ogm_ge":
        train.update({"ratio.audio": 2.0, "coef.audio": 0.3, "ratio.visual": 0.5, "coef.visual": 1.0, "modulated": 1.0})
    logged = {"fusion_weight.audio": 0.7, "fusion_weight.visual": 0.3, "p_fro": 3.0} if method == "mla" else {}
    if method == "mla":
        logged["restored_from_epoch"] = None
    for m in ("audio", "visual"):
        own[m] = float(rng.uniform(0.1, 0.9))
    split = {"acc": float(rng.uniform(0.3, 0.9)), "macro_f1": 0.5, "map": 0.5, "loss": 1.0, "modality_acc": own}
    return {"epoch": epoch, "lr": 0.01, "train": train, "val": split, "test": split, "method": logged,
            "selectable": True}


def synthetic(n_seeds: int = 3, epochs: int = 4) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    rng = np.random.default_rng(0)
    rows, metrics = [], {}
    for label, method, modality in CELLS:
        for seed in range(n_seeds):
            rid = f"{method}-{label}-{seed}"
            row = {"run_id": rid, "label": label, "method": method, "dataset": DATASET, "seed": seed,
                   "unimodal_modality": modality, "acc": rng.uniform(0.4, 0.9), "macro_f1": 0.5, "map": 0.5,
                   "acc_best_test": 0.9, "s_per_epoch": rng.uniform(0.05, 0.2)}
            for m in ("audio", "visual"):
                if modality in (None, m):
                    row[f"own.{m}"] = rng.uniform(0.1, 0.9)
                    row[f"probe.{m}"] = rng.uniform(0.1, 0.9)
            rows.append(row)
            metrics[rid] = [record(e, method, rng) for e in range(epochs)]
    return pd.DataFrame(rows), metrics


def assert_figures(paths, out_dir, stems=STEMS):
    names = {p.name for p in paths}
    assert names == {f"{s}.{ext}" for s in stems for ext in ("png", "pdf")}
    for p in paths:
        assert p.parent == out_dir and p.stat().st_size > 1000, p
        if p.suffix == ".pdf":
            assert p.read_bytes().startswith(b"%PDF")
        else:
            width, height = Image.open(p).size
            assert width > 400 and height > 300, (p, width, height)


def test_t_interval_matches_scipy():
    values = np.array([0.61, 0.65, 0.58, 0.70])
    mean, half = t_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert mean == pytest.approx(values.mean())
    assert mean - half == pytest.approx(low) and mean + half == pytest.approx(high)
    assert t_interval([0.5]) == (0.5, 0.0)


def test_one_colour_per_label_in_one_order():
    runs, _ = synthetic(n_seeds=1)
    order = label_order(runs.iloc[::-1])  # the order does not depend on the rows' order
    assert order == ["joint-concat", "mla", "ogm-ge", "unimodal-audio", "unimodal-visual"]
    colors = label_colors(order)
    assert list(colors) == order and len({tuple(c) for c in colors.values()}) == len(order)
    many = label_colors([f"m{i}" for i in range(25)])
    assert len(many) == 25 and len({tuple(c) for c in many.values()}) == 25  # no repeats below 26 labels


def test_diagnostics_are_the_method_specific_numbers():
    runs, metrics = synthetic(n_seeds=1)
    ogm = diagnostic_keys(metrics["ogm_ge-ogm-ge-0"])
    assert ("train", "ratio.audio") in ogm and ("train", "modulated") in ogm
    assert not {k for _, k in ogm} & {"loss", "seconds", "samples_per_s"}
    mla = {k for _, k in diagnostic_keys(metrics["mla-mla-0"])}
    assert mla == {"fusion_weight.audio", "fusion_weight.visual", "p_fro"}  # None and bookkeeping dropped


def test_every_figure_from_a_synthetic_table(tmp_path):
    runs, metrics = synthetic()
    paths = make_figures(runs, metrics, tmp_path / "figs")
    assert_figures(paths, tmp_path / "figs")


def test_two_datasets_one_seed_and_missing_metrics(tmp_path):
    """A dataset per panel (trajectories per dataset, named by it); one seed has no CI; a run
    without metrics and a table without probes do not stop the other figures."""
    runs, metrics = synthetic(n_seeds=1)
    other = runs.assign(dataset=json.dumps({"name": "other"}), run_id=runs["run_id"] + "-b")
    metrics.update({f"{k}-b": v for k, v in metrics.items()})
    del metrics[runs["run_id"].iloc[0]]
    both = pd.concat([runs, other], ignore_index=True).drop(columns=["probe.audio", "probe.visual"])
    paths = make_figures(both, metrics, tmp_path)
    stems = ["fused_accuracy", "accuracy_vs_cost"] + [f"{s}_{d}" for s in ("trajectories_modality", "diagnostics")
                                                       for d in ("gaussian", "other")]
    assert_figures(paths, tmp_path, stems)
    assert make_figures(runs.iloc[:0], {}, tmp_path / "empty") == []


def test_every_figure_from_a_real_store(tmp_path, fast_config, store):
    cells = [c for c in CELLS if c[1] != "mla"]  # fewer runs; the synthetic table covers MLA's records
    for label, method, modality in cells:
        extra = [f"method.modality={modality}"] if modality else []
        for seed in (0, 1):
            run(fast_config(f"method.name={method}", *extra, "train.epochs=2", f"train.seed={seed}",
                            f"label={label}", "group=g"), store)
    runs = run_rows(store, "g")
    assert len(runs) == 2 * len(cells)
    metrics = {rd.run_id: rd.read_metrics() for rd in store.runs("g")}
    paths = make_figures(runs, metrics, tmp_path / "figs")
    assert_figures(paths, tmp_path / "figs")
