"""IEMOCAP: 4-way emotion (Neutral, Angry, Sad, Happy) of acted utterances from audio, visual and text features.

Raw download: MulT's processed pickle (the same format as CMU-MOSEI's, datasets.mult_pickle)::

    RAW/iemocap_data_noalign.pkl   audio (N, T, 74) COVAREP, vision (N, T, 35) Facet, text (N, T, 300)
    RAW/iemocap_data.pkl           GloVe; labels (N, 4, 2): per emotion (Neutral, Happy, Sad, Angry)
                                   a one-hot (absent, present), read as BalanceBenchmark's loader does
                                   (argmax over the last axis)

(RAW may be the pickle itself.) A row's class is its one present emotion; rows with none or
several are left out (counted in the prepare's notes). Classes are numbered in MLA's order
(`data/stat_iemo.txt`: Neutral, Angry, Sad, Happy).

Splits:
  mla   MLA's (Zhang et al., CVPR 2024) random 60/20/20 shuffle of the utterances of Sessions
        1-5 (`data/gen_iemo_txt.py`: an unseeded `random.shuffle`, so it cannot be redrawn). Its
        train (3,318) and test (1,107) lists are vendored (datasets/manifests/lists/iemocap_mla_*,
        utterance and label only); its dev list was not released: validation is every other
        labelled utterance of the pickle (MLA's dev is exactly the rest of its 5,531). Needs
        utterance names (Ses01F_impro01_F000) in the pickle's `id` rows. Not speaker- or
        session-independent, as in MLA. MLA merges excited into Happy; the labels here are the
        pickle's, and the prepare notes how many differ from MLA's lists.
  mult  the pickle's own train / valid / test (MulT's split).

Pipelines: `mla` and `mult` read the unaligned pickle, `mla_aligned` and `mult_aligned` the
word-aligned one. MLA itself trains on raw media (fbank, face frames, BERT ids), which this
feature-based setting does not reproduce: it keeps MLA's task, classes and split.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from mmbalance.core.errors import DataError
from mmbalance.core.registry import DATASETS
from mmbalance.datasets.mult_pickle import (
    SPLIT_KEYS,
    MultFeatureDataset,
    MultPickle,
    MultPipeline,
    build_plan,
    pickle_splits,
)
from mmbalance.datasets.prepared import CachedParams, Plan
from mmbalance.datasets.splits import Flavour, load_manifest, read_pinned_list

CLASSES = ("Neutral", "Angry", "Sad", "Happy")  # MLA's stat_iemo.txt order
MULT_EMOTIONS = ("Neutral", "Happy", "Sad", "Angry")  # the pickle's label rows (MulT's `emos`)
UTTERANCE = re.compile(r"Ses0[1-5][FM]_[A-Za-z0-9_]+?_[FM]\d{3}")


class IemocapPipeline(MultPipeline):
    split: Literal["mla", "mult"]


PIPELINES = {
    "mla": IemocapPipeline(description="MLA's 60/20/20 utterance split (vendored lists), unaligned pickle",
                           flavour="mla", split="mla"),
    "mla_aligned": IemocapPipeline(description="MLA's split, word-aligned pickle", flavour="mla", split="mla",
                                   aligned=True),
    "mult": IemocapPipeline(description="the pickle's own train/valid/test, unaligned pickle", flavour="mult",
                            split="mult"),
    "mult_aligned": IemocapPipeline(description="the pickle's own split, word-aligned pickle", flavour="mult",
                                    split="mult", aligned=True),
}


class IemocapParams(CachedParams):
    pipeline: Literal["mla", "mla_aligned", "mult", "mult_aligned"] | None = None


@DATASETS.register("iemocap")
class Iemocap(MultFeatureDataset):
    Params = IemocapParams
    PIPELINES: ClassVar = PIPELINES
    DEFAULT_PIPELINE: ClassVar = "mla"
    STEM: ClassVar = "iemocap"

    @classmethod
    def plan(cls, raw: Path, pipeline: IemocapPipeline) -> Plan:
        pkl = cls.read(raw, pipeline)
        labels = cls.labelled(pkl, lambda y: emotion_class(y, pkl.path))
        notes = []
        dropped = len(pkl.rows) - len(labels)
        if dropped:
            notes.append(f"{dropped} rows of the pickle have no single emotion present and are left out")
        if pipeline.split == "mult":
            splits = pickle_splits(pkl, labels)
        else:
            pkl, labels = by_utterance(pkl, labels)
            splits, more = mla_splits(pkl, labels)
            notes += more
        return build_plan(cls.registry_name, pkl, labels, splits, CLASSES, pipeline.flavour, cls.KINDS, notes)


def emotion_class(label: np.ndarray, path: Path) -> int | None:
    """The class (in CLASSES' order) of a (4, 2) label row's one present emotion; None if none or several."""
    y = np.asarray(label)
    if y.shape != (len(MULT_EMOTIONS), 2):
        raise DataError(f"iemocap: {str(path)!r} has a label row of shape {y.shape}; expected (4, 2): per emotion "
                        f"({', '.join(MULT_EMOTIONS)}) a one-hot (absent, present)")
    present = np.flatnonzero(np.argmax(y, axis=-1) == 1)
    return CLASSES.index(MULT_EMOTIONS[present[0]]) if len(present) == 1 else None


def by_utterance(pkl: MultPickle, labels: dict[str, int]) -> tuple[MultPickle, dict[str, int]]:
    """The pickle with every labelled row renamed to the utterance its id names (Ses01F_impro01_F000)."""
    names = {}
    for r in pkl.rows:
        match = UTTERANCE.search(r.id)
        if r.id in labels and match is not None:
            names[r.id] = match.group(0)
    if not names:
        example = pkl.rows[0].id if pkl.rows else "none"
        raise DataError(f"iemocap: MLA's split lists utterances (Ses01F_impro01_F000), and no 'id' of "
                        f"{str(pkl.path)!r} names one (first id: {example!r}); use the pickle's own split: "
                        f"--pipeline mult")
    taken: dict[str, str] = {}
    for old, new in names.items():
        if new in taken:
            raise DataError(f"iemocap: {str(pkl.path)!r} has two rows of utterance {new!r} ({taken[new]!r}, {old!r})")
        taken[new] = old
    rows = [replace(r, id=names.get(r.id, r.id)) for r in pkl.rows]
    return replace(pkl, rows=rows), {names.get(i, i): y for i, y in labels.items()}


def mla_splits(pkl: MultPickle, labels: dict[str, int]) -> tuple[dict[str, list[str]], list[str]]:
    """MLA's train and test lists (those of their utterances the pickle has, labelled), and every
    other labelled utterance as validation; plus notes on what the pickle lacks or labels otherwise."""
    flavour = load_manifest("iemocap").flavour("mla")
    listed = {s: mla_list(flavour, s) for s in ("train", "test")}
    present = {r.id for r in pkl.rows if r.id in labels and UTTERANCE.fullmatch(r.id)}
    splits = {s: [u for u in names if u in present] for s, names in listed.items()}
    held = set(splits["train"]) | set(splits["test"])
    splits = {"train": splits["train"], "val": sorted(present - held), "test": splits["test"]}
    notes = []
    for s, names in listed.items():
        missing = [u for u in names if u not in present]
        if missing:
            notes.append(f"{len(missing)} of MLA's {len(names)} {s} utterances are not labelled rows of the pickle "
                         f"(first {missing[0]!r})")
    differ = [u for s in listed for u, y in listed[s].items() if u in present and labels[u] != CLASSES.index(y)]
    if differ:
        notes.append(f"{len(differ)} utterances are labelled otherwise in the pickle than in MLA's lists (first "
                     f"{differ[0]!r}; MLA counts excited as Happy); the pickle's labels are used")
    order = {s: i for i, s in enumerate(SPLIT_KEYS)}
    return dict(sorted(splits.items(), key=lambda kv: order[kv[0]])), notes


def mla_list(flavour: Flavour, split: str) -> dict[str, str]:
    """utterance -> MLA's label, from the vendored list's `utterance Label` lines (hash-checked)."""
    whole_lines = {split: {**flavour.lists[split], "id_regex": r"^(\S+ \S+)$"}}
    lines = read_pinned_list(flavour.model_copy(update={"lists": whole_lines}), split) or []
    return dict(line.split() for line in lines)
