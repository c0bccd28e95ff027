"""MVSA-Single: tweets (image + text) labelled positive / neutral / negative (Niu et al., MMM 2016).

Raw download as users have it (the MVSA release, Kaggle "vincemarcs/mvsasingle", with MMBT's
split files beside it, as QMF ships them in text-image-classification/datasets/MVSA_Single/)::

    RAW/data/<id>.jpg, RAW/data/<id>.txt    the tweets' images and texts
    RAW/labelResultAll.txt                  the annotators' text,image labels (not read: the split
                                            files carry one label per tweet)
    RAW/{train,dev,test}.jsonl              MMBT/QMF split: {"id", "label", "text", "img": "data/<id>.jpg"}
    RAW/my_{train,test}_mvsa.txt            MLA's lists (`<id>.jpg <label>`), optional: the
                                            vendored copies are used when absent

A tweet's text is its jsonl row's (what MLA tokenized); a tweet no jsonl row names is read from
data/<id>.txt. Labels are in sorted order (negative 0, neutral 1, positive 2), as MLA sorts
stat_mvsa.txt.

Splits (both of the 2,592 tweets whose two labels do not conflict):
  mla   MLA's lists: 1,555 train (= MMBT's train) / 519 test, which are 487 tweets of MMBT's test
        and 32 of its dev (verified on the stored lists: MLA re-drew dev/test); MLA has no
        validation split: the other 486 tweets of MMBT's dev are it. The lists are pinned in
        datasets/manifests/lists.
  mmbt  MMBT/QMF's jsonl as they are: 1,555 / 518 (dev, the validation split) / 519.

Pipelines (one per split):
  mla, mmbt  bert-base-uncased ids, max_length 256, no special tokens (MLA's
             data/extract_token.py); images RandomResizedCrop(224) + flip / Resize((224, 224))
             (TVDataset, MLA's ResNet path; it draws the image 3 times as a 3-frame clip, here
             once). Departure: MLA's README run feeds pretrained M3AE ViTs (256-px images).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from mmbalance.core.errors import DataError
from mmbalance.core.registry import DATASETS
from mmbalance.datasets.image_text import (
    ImageTextDataset,
    ImageTextParams,
    ImageTextPipeline,
    image_id,
    read_jsonl,
)
from mmbalance.datasets.prepared import Plan, SampleSource
from mmbalance.datasets.splits import MANIFEST_DIR, load_manifest, read_pinned_list
from mmbalance.datasets.text import Tokenization

SENTIMENTS = ("negative", "neutral", "positive")  # sorted, as MLA orders them
SPLIT_FILES = {"train": "train.jsonl", "val": "dev.jsonl", "test": "test.jsonl"}
MLA_FILES = {"train": "my_train_mvsa.txt", "test": "my_test_mvsa.txt"}
TEXT = Tokenization(tokenizer="bert-base-uncased", max_len=256, special_tokens=False)
DESCRIPTION = "bert-base-uncased ids (256, no special tokens), RandomResizedCrop 224"

PIPELINES = {
    "mla": ImageTextPipeline(description=f"MLA's split: {DESCRIPTION}", flavour="mla", text=TEXT),
    "mmbt": ImageTextPipeline(description=f"MMBT/QMF jsonl split: {DESCRIPTION}", flavour="mmbt", text=TEXT),
}


class MvsaSingleParams(ImageTextParams):
    pipeline: Literal["mla", "mmbt"] | None = None


@DATASETS.register("mvsa_single")
class MvsaSingle(ImageTextDataset):
    Params = MvsaSingleParams
    PIPELINES: ClassVar = PIPELINES
    DEFAULT_PIPELINE: ClassVar = "mla"

    @classmethod
    def plan(cls, raw: Path, pipeline: ImageTextPipeline) -> Plan:
        if not all((raw / f).is_file() for f in SPLIT_FILES.values()):
            raise DataError(f"mvsa_single: --raw {str(raw)!r} must hold MMBT's split files train.jsonl, dev.jsonl and "
                            f"test.jsonl (QMF ships them: text-image-classification/datasets/MVSA_Single/) "
                            f"beside the tweets' data/ folder")
        rows = {s: read_jsonl(raw / f, "mvsa_single") for s, f in SPLIT_FILES.items()}
        labelled = {image_id(r["img"]): (r["label"], repr(str(raw / SPLIT_FILES[s]))) for s, split in rows.items()
                    for r in split}
        texts = {image_id(r["img"]): r["text"] for split in rows.values() for r in split}
        splits = {s: [image_id(r["img"]) for r in split] for s, split in rows.items()}
        notes = []
        if pipeline.flavour == "mla":
            listed = _mla_lists(raw)
            for where, pairs in listed.values():
                labelled.update({sid: (label, where) for sid, label in pairs})
            held = {sid for sid, _ in listed["test"][1]}
            splits = {"train": [sid for sid, _ in listed["train"][1]],
                      "val": [sid for sid in splits["val"] if sid not in held],
                      "test": [sid for sid, _ in listed["test"][1]]}
            notes.append(f"val: the {len(splits['val'])} tweets of dev.jsonl not in MLA's test list")
        samples = []
        for sid in (i for split in splits.values() for i in split):
            label, where = labelled[sid]
            if label not in SENTIMENTS:
                raise DataError(f"mvsa_single: {where} labels {sid!r} {label!r}; allowed: {', '.join(SENTIMENTS)}")
            image = raw / "data" / f"{sid}.jpg"
            if sid in texts:
                samples.append(SampleSource(sid, SENTIMENTS.index(label), {"visual": image}, {"text": texts[sid]}))
            else:  # in MLA's lists but in no jsonl: the release's own text file
                files = {"visual": image, "text": raw / "data" / f"{sid}.txt"}
                samples.append(SampleSource(sid, SENTIMENTS.index(label), files))
        return Plan(list(SENTIMENTS), samples, splits, pipeline.flavour, notes)


def _mla_lists(raw: Path) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """split -> (where its list was read, [(id, label)]) of MLA's train and test lists: RAW's
    my_{train,test}_mvsa.txt, else the vendored copies (their SHA-256 checked)."""
    out = {}
    for split, name in MLA_FILES.items():
        path = raw / name
        if not path.is_file():
            flavour = load_manifest("mvsa_single").flavour("mla")
            read_pinned_list(flavour, split)  # checks the vendored file's SHA-256
            path = MANIFEST_DIR / flavour.lists[split]["file"]
        pairs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split()
            if len(parts) != 2 or not parts[0].endswith(".jpg"):
                raise DataError(f"{str(path)!r} line {n}: {line!r} is not `<id>.jpg <label>` (MLA's list format)")
            pairs.append((image_id(parts[0]), parts[1]))
        out[split] = (repr(str(path)), pairs)
    return out
