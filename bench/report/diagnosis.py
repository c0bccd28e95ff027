"""`mmbalance diagnose`: does a dataset have a modality imbalance, and which way? Read from the
store's joint and unimodal-only runs of one dataset (paired by seed).

Per modality m, each number a mean over seeds with its 95% t-interval (stats.describe), the
test split at the best-validation epoch (LEGEND says the same in the files written):

* unimodal acc: test accuracy of the unimodal-only model of m (m trained alone, same backbone and
  budget) -- what m can do;
* probe alone / probe in joint: the frozen-encoder linear probe on m of that model, and of the
  joint model;
* deficit = probe alone - probe in joint, per seed (collect.add_deficits): how much less m's
  encoder learned inside the joint model than alone;
* own acc in the joint head: the accuracy of m's block of the joint model's concat head (its
  logits with the other modalities' features left out, OGM-GE's split): how much the fused
  prediction leans on m;
* learning speed: the validation accuracy gained over chance (1 / classes) per epoch during the
  first quarter of training (the first epoch when there are at most four): (acc after epoch k -
  chance) / (k + 1), k + 1 = ceil(epochs / 4). It does not saturate with the accuracy, as a
  curve's slope would for a modality learned within its first epoch. For the unimodal-only model
  of m and for m's own logits in the joint model.

Verdict: a modality whose deficit interval lies above 0 is under-trained by joint training (with a
single seed there is no interval, and a deficit above `DEFICIT_MIN` is reported as a sign only);
the modality with the highest own accuracy in the joint head dominates it. Imbalance is called
when some modality is under-trained; its direction is dominant -> under-trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mmbalance.bench.report.cells import aggregate  # noqa: E402
from mmbalance.bench.report.collect import load_runs  # noqa: E402
from mmbalance.bench.report.figures import DPI  # noqa: E402
from mmbalance.bench.report.stats import CI_NOTE, ci_bounds, describe  # noqa: E402
from mmbalance.bench.store import atomic_write_json, atomic_write_text  # noqa: E402
from mmbalance.core.errors import ConfigError  # noqa: E402

DEFICIT_MIN = 0.05  # single seed: a deficit above this is reported (as a sign, without an interval)
LEGEND = ("Numbers: mean [95% CI] over seeds; test split at each run's selected epoch (the first with the best "
          "validation accuracy: a joint model that a fast modality solves at once is probed early). "
          "unimodal acc: the model "
          "of that modality alone (same backbone and budget). probe: logistic regression on the frozen encoder's "
          "features, of the unimodal-only model (alone) and of the joint model (in joint). deficit = probe alone − "
          "probe in joint, paired by seed: how much less the encoder learned inside the joint model; a deficit "
          "whose interval lies above 0 makes the modality under-trained. own acc in joint head: the modality's "
          "block of the joint model's concat head alone; the highest dominates the fused prediction. speed: "
          "validation accuracy gained over chance per epoch in the first quarter of training.")
JOINT = "joint"


def unimodal_label(m: str) -> str:
    return f"unimodal-{m}"


@dataclass
class Diagnosis:
    """The verdict and every number behind it; `text` is what the command prints."""

    dataset: str
    seeds: int
    epochs: int
    modalities: dict[str, dict[str, Any]]
    joint_acc: dict[str, float]
    dominant: str | None
    head_margin: dict[str, float] | None
    under_trained: list[str]
    faster: str | None
    files: list[Path] = field(default_factory=list)

    @property
    def imbalance(self) -> bool:
        return bool(self.under_trained)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "seeds": self.seeds, "epochs": self.epochs, "imbalance": self.imbalance,
                "dominant": self.dominant, "under_trained": self.under_trained, "faster_alone": self.faster,
                "head_margin": self.head_margin, "joint_acc": self.joint_acc, "modalities": self.modalities,
                "verdict": self.verdict()}

    def verdict(self) -> str:
        """The verdict in a few sentences, with the numbers that carry it."""
        ms = self.modalities
        lines = []
        if self.imbalance:
            weak = ", ".join(self.under_trained)
            lines.append(f"Imbalance: yes. {self.dominant or 'no single modality'} dominates; {weak} "
                         f"{'is' if len(self.under_trained) == 1 else 'are'} under-trained by joint training.")
        else:
            lines.append("Imbalance: not detected at this budget: no modality's encoder learned significantly less "
                         "inside the joint model than alone.")
        for m in ms:
            d = ms[m]["deficit"]
            lines.append(f"- {m}: probe alone {fmt(ms[m]['probe_alone'])}, in joint {fmt(ms[m]['probe_joint'])}; "
                         f"deficit {fmt(d)}{' (under-trained)' if m in self.under_trained else ''}")
        if self.dominant is not None and self.head_margin is not None:
            others = ", ".join(f"{m} {fmt(ms[m]['own_joint'])}" for m in ms if m != self.dominant)
            lines.append(f"- the joint head leans on {self.dominant}: its own accuracy "
                         f"{fmt(ms[self.dominant]['own_joint'])} "
                         f"vs {others} (margin over the next {fmt(self.head_margin)})")
        if self.faster is not None:
            lines.append(f"- {self.faster} learns fastest alone: " + ", ".join(
                f"{m} {fmt(ms[m]['speed_alone'], signed=True)}/epoch" for m in ms)
            + " (validation accuracy gained per epoch "
                "over chance in the first quarter of training)")
        return "\n".join(lines)

    def table(self) -> pd.DataFrame:
        rows = [{"modality": m, "unimodal acc": fmt(v["unimodal_acc"]), "probe alone": fmt(v["probe_alone"]),
                 "probe in joint": fmt(v["probe_joint"]), "deficit (alone − joint)": fmt(v["deficit"]),
                 "own acc in joint head": fmt(v["own_joint"]),
                 "speed alone (acc/epoch)": fmt(v["speed_alone"], signed=True),
                 "speed in joint (acc/epoch)": fmt(v["speed_joint"], signed=True)} for m, v in self.modalities.items()]
        return pd.DataFrame(rows)

    @property
    def text(self) -> str:
        head = (f"modality imbalance diagnosis of {self.dataset}: {self.seeds} seed(s), {self.epochs} epochs; "
                f"joint test acc {fmt(self.joint_acc)}")
        files = f"\nwritten: {', '.join(str(f) for f in self.files)}" if self.files else ""
        return f"{head}\n\n{self.table().to_markdown(index=False)}\n\n{self.verdict()}{files}"


def fmt(d: dict[str, float] | None, signed: bool = False) -> str:
    """'0.812 [0.771, 0.853]' (mean [95% CI]); the mean alone without an interval."""
    if d is None or d.get("n", 0) == 0 or not math.isfinite(d["mean"]):
        return "–"
    spec = "+.3f" if signed else ".3f"
    if not math.isfinite(d.get("ci_low", math.nan)):
        return f"{d['mean']:{spec}}"
    return f"{d['mean']:{spec}} [{d['ci_low']:{spec}}, {d['ci_high']:{spec}}]"


# ---- reading the runs ---------------------------------------------------------------------------


def stat(agg: pd.DataFrame, label: str, col: str) -> dict[str, float] | None:
    """mean/std/n/ci of `col` in the aggregate row `label` (None when absent)."""
    row = agg[agg["label"] == label]
    if row.empty or f"{col}:mean" not in agg:
        return None
    r = row.iloc[0]
    return {k: float(r[f"{col}:{k}"]) for k in ("mean", "std", "n", "ci_low", "ci_high")}


def curves(runs: pd.DataFrame, metrics: dict[str, list[dict]]) -> pd.DataFrame:
    """(modality, model, seed, epoch, acc): per-epoch validation accuracy of each unimodal-only model
    and of each modality's own logits in the joint model."""
    rows = []
    for r in runs.itertuples():
        for rec in metrics.get(r.run_id, []):
            val = rec.get("val") or {}
            if r.label == JOINT:
                rows += [(m, "in joint (own logits)", r.seed, rec["epoch"], acc)
                         for m, acc in (val.get("modality_acc") or {}).items()]
            elif r.method == "unimodal":
                rows.append((r.unimodal_modality, "alone", r.seed, rec["epoch"], val.get("acc")))
    return pd.DataFrame(rows, columns=["modality", "model", "seed", "epoch", "acc"]).dropna()


def speeds(curve: pd.DataFrame, chance: float) -> list[float]:
    """Per seed, the accuracy gained over `chance` per epoch in the first quarter of its epochs."""
    out = []
    for _, g in curve.groupby("seed"):
        quarter = g.sort_values("epoch").head(math.ceil(len(g) / 4))
        out.append(float((quarter["acc"].iloc[-1] - chance) / len(quarter)))
    return out


def paired_margin(finished: pd.DataFrame, dominant: str, others: list[str]) -> dict[str, float]:
    """Per seed of the joint runs: own acc of `dominant` minus the best other modality's."""
    joint = finished[finished["label"] == JOINT]
    margin = joint[f"own.{dominant}"] - joint[[f"own.{m}" for m in others]].max(axis=1)
    return describe(margin.tolist())


def diagnose(group_dir: Path, only: set[str] | None, out: Path, num_classes: int) -> Diagnosis:
    """Read the joint and unimodal-only runs under `group_dir` (those in `only`) of a dataset with
    `num_classes` classes, judge, and write verdict.md, verdict.json and the figure (PNG and PDF)
    into `out`."""
    runs, metrics = load_runs(group_dir, "val", only)
    finished = runs[runs["state"] == "finished"] if not runs.empty else runs
    if finished.empty or JOINT not in set(finished["label"]) or not (finished["method"] == "unimodal").any():
        raise ConfigError(f"{group_dir}: a diagnosis needs finished joint and unimodal-only runs; found "
                          f"{len(finished)} finished of {len(runs)} (see `mmbalance status {group_dir}`)")
    if finished["dataset"].nunique() != 1:
        raise ConfigError(f"{group_dir}: runs of several datasets; a diagnosis is of one")
    agg = aggregate(finished)
    modalities = sorted(finished["unimodal_modality"].dropna().unique())
    curve = curves(finished, metrics)
    chance = 1 / num_classes
    per = {}
    for m in modalities:
        per[m] = {"unimodal_acc": stat(agg, unimodal_label(m), "acc"),
                  "probe_alone": stat(agg, unimodal_label(m), f"probe.{m}"),
                  "probe_joint": stat(agg, JOINT, f"probe.{m}"),
                  "deficit": stat(agg, JOINT, f"deficit.{m}"),
                  "own_joint": stat(agg, JOINT, f"own.{m}"),
                  "speed_alone": describe(speeds(curve[(curve.modality == m) & (curve.model == "alone")], chance)),
                  "speed_joint": describe(speeds(curve[(curve.modality == m) & (curve.model != "alone")], chance))}
    owned = {m: v["own_joint"]["mean"] for m, v in per.items()
             if v["own_joint"] and math.isfinite(v["own_joint"]["mean"])}
    dominant = max(owned, key=owned.get) if owned else None
    fast = {m: v["speed_alone"]["mean"] for m, v in per.items() if math.isfinite(v["speed_alone"]["mean"])}
    result = Diagnosis(
        dataset=str(finished["dataset"].iloc[0]), seeds=int(finished["seed"].nunique()),
        epochs=int(max(len(metrics.get(r, [])) for r in finished["run_id"])), modalities=per,
        joint_acc=stat(agg, JOINT, "acc"), dominant=dominant,
        head_margin=paired_margin(finished, dominant, [m for m in owned if m != dominant]) if len(owned) > 1 else None,
        under_trained=[m for m, v in per.items() if under_trained(v["deficit"])],
        faster=max(fast, key=fast.get) if len(fast) > 1 else None)
    out.mkdir(parents=True, exist_ok=True)
    result.files = write_files(result, finished, curve, out)
    return result


def under_trained(deficit: dict[str, float] | None) -> bool:
    if deficit is None or deficit["n"] == 0:
        return False
    if deficit["n"] < 2:
        return deficit["mean"] > DEFICIT_MIN
    return deficit["ci_low"] > 0


# ---- files --------------------------------------------------------------------------------------


def write_files(result: Diagnosis, finished: pd.DataFrame, curve: pd.DataFrame, out: Path) -> list[Path]:
    md, js = out / "verdict.md", out / "verdict.json"
    atomic_write_text(md, markdown(result))
    atomic_write_json(js, result.to_dict())  # an interval that does not exist (one seed) as null
    fig = figure(result, finished, curve)
    paths = [out / "diagnosis.png", out / "diagnosis.pdf"]
    for p in paths:
        fig.savefig(p, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return [md, js, *paths]


def markdown(result: Diagnosis) -> str:
    return (f"# Modality imbalance diagnosis: {result.dataset}\n\n"
            f"{result.seeds} seed(s), {result.epochs} epochs; joint test accuracy {fmt(result.joint_acc)}.\n\n"
            f"{result.table().to_markdown(index=False)}\n\n## Verdict\n\n{result.verdict()}\n\n"
            f"{LEGEND}\n\n{CI_NOTE}.\n\n![diagnosis](diagnosis.png)\n")


def figure(result: Diagnosis, finished: pd.DataFrame, curve: pd.DataFrame) -> plt.Figure:
    """Three panels: probes alone vs in joint, the joint head's own accuracy per modality, and the
    per-epoch validation accuracy of each modality alone and in the joint model."""
    modalities = list(result.modalities)
    palette = dict(zip(modalities, sns.color_palette("tab10", len(modalities))))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    probes = pd.concat([
        pd.DataFrame({"modality": m, "model": model, "probe": rows[f"probe.{m}"]})
        for m in modalities for model, rows in (("alone", finished[finished["label"] == unimodal_label(m)]),
                                                ("in joint", finished[finished["label"] == JOINT]))])
    sns.barplot(data=probes, x="modality", y="probe", hue="model", order=modalities, errorbar=ci_bounds, capsize=0.2,
                ax=axes[0], palette={"alone": "0.55", "in joint": "tab:red"})
    axes[0].set(title="Linear probe on the frozen encoder", ylabel="probe test accuracy", ylim=(0, 1.05))
    sns.move_legend(axes[0], "upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False, title=None)
    joint = finished[finished["label"] == JOINT]
    own = pd.DataFrame([(m, v) for m in modalities for v in joint[f"own.{m}"]], columns=["modality", "own"])
    sns.barplot(data=own, x="modality", y="own", hue="modality", order=modalities, palette=palette, errorbar=ci_bounds,
                capsize=0.2, legend=False, ax=axes[1])
    axes[1].axhline(result.joint_acc["mean"], color="black", linestyle="--", linewidth=1.2, label="fused")
    axes[1].legend(frameon=False, loc="lower right")
    axes[1].set(title=f"Joint head: each modality's own accuracy\n(dominant: {result.dominant})",
                ylabel="test accuracy", ylim=(0, 1.05))
    sns.lineplot(data=curve, x="epoch", y="acc", hue="modality", style="model", hue_order=modalities, palette=palette,
                 errorbar=ci_bounds, marker="o", ax=axes[2])
    axes[2].set(title="Learning speed: validation accuracy per epoch", ylabel="validation accuracy", ylim=(0, 1.05))
    axes[2].legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    verdict = "imbalance: " + (f"{result.dominant} dominates, {', '.join(result.under_trained)} under-trained"
                               if result.imbalance else "not detected")
    fig.suptitle(f"{result.dataset}: {verdict} (mean, 95% t-CI over {result.seeds} seed(s))", fontsize=11)
    fig.tight_layout()
    return fig
