"""CMU-MOSEI: sentiment of 22,856 YouTube opinion segments from audio, visual and text features.

Raw download: MulT's processed pickle, as BalanceBenchmark reads it (`Mosei_dataset.py`,
`dataset_config.yaml`: `data: mosei_senti`, `if_align: false`)::

    RAW/mosei_senti_data_noalign.pkl   audio (N, 500, 74) COVAREP, vision (N, 500, 35) Facet,
                                       text (N, 50, 300) GloVe; labels (N, 1, 1) in [-3, 3]
    RAW/mosei_senti_data.pkl           the same, word-aligned: 50 steps for every modality

(RAW may be the pickle itself.) Format and cleaning: datasets.mult_pickle (audio -inf -> 0,
float32, zero padding kept as the pickle has it).

Split: the pickle's own train / valid / test (MulT's 16,326 / 1,871 / 4,659). BalanceBenchmark
selects on valid (`validation: True`); so does the suite.

Pipelines (the label setting and which pickle):
  binary          BalanceBenchmark (acc2): sentiment < 0 -> negative, >= 0 -> non-negative (a
                  zero counts as positive; MulT's own binary metric leaves zeros out); unaligned
  binary_aligned  the same labels from the word-aligned pickle
  seven           7 classes, MulT's Acc-7: round(clip(y, -3, 3)) + 3 (numpy rounding, half to
                  even, as MulT's `multiclass_acc`); unaligned. BalanceBenchmark's file also has an
                  `acc7` with other bin edges (0 its own class, (0, 1] -> 4), which its loader never
                  calls; it is not reproduced.
  seven_aligned   the same from the word-aligned pickle
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from mmbalance.core.errors import DataError
from mmbalance.core.registry import DATASETS
from mmbalance.datasets.mult_pickle import MultFeatureDataset, MultPipeline, build_plan, pickle_splits
from mmbalance.datasets.prepared import CachedParams, Plan

FLAVOUR = "mult"
BINARY = ("negative", "non-negative")
SEVEN = ("-3", "-2", "-1", "0", "1", "2", "3")


class MoseiPipeline(MultPipeline):
    labels: Literal["binary", "seven"]


PIPELINES = {
    "binary": MoseiPipeline(description="BalanceBenchmark: unaligned pickle, y < 0 negative, y >= 0 non-negative",
                            flavour=FLAVOUR, labels="binary"),
    "binary_aligned": MoseiPipeline(description="aligned pickle, BalanceBenchmark's binary labels",
                                    flavour=FLAVOUR, labels="binary", aligned=True),
    "seven": MoseiPipeline(description="MulT Acc-7: unaligned pickle, round(clip(y, -3, 3)) + 3",
                           flavour=FLAVOUR, labels="seven"),
    "seven_aligned": MoseiPipeline(description="aligned pickle, MulT's 7 classes", flavour=FLAVOUR, labels="seven",
                                   aligned=True),
}


class MoseiParams(CachedParams):
    pipeline: Literal["binary", "binary_aligned", "seven", "seven_aligned"] | None = None


@DATASETS.register("cmu_mosei")
class CmuMosei(MultFeatureDataset):
    Params = MoseiParams
    PIPELINES: ClassVar = PIPELINES
    DEFAULT_PIPELINE: ClassVar = "binary"
    STEM: ClassVar = "mosei_senti"

    @classmethod
    def plan(cls, raw: Path, pipeline: MoseiPipeline) -> Plan:
        pkl = cls.read(raw, pipeline)
        labels = cls.labelled(pkl, lambda y: sentiment_class(sentiment(y, pkl.path), pipeline.labels))
        classes = BINARY if pipeline.labels == "binary" else SEVEN
        return build_plan(cls.registry_name, pkl, labels, pickle_splits(pkl, labels), classes, FLAVOUR, cls.KINDS)


def sentiment(label: np.ndarray, path: Path) -> float:
    """The sentiment score of one row's labels: (1, 1), or (1, 7) with sentiment first."""
    flat = np.ravel(label)
    if flat.size == 0 or not np.isfinite(flat[0]):
        raise DataError(f"cmu_mosei: {str(path)!r} has a label row {label!r}; expected a finite sentiment in [-3, 3]")
    return float(flat[0])


def sentiment_class(y: float, labels: str) -> int:
    if labels == "binary":
        return 0 if y < 0 else 1  # BalanceBenchmark's acc2
    return int(np.round(np.clip(y, -3.0, 3.0))) + 3
