"""UPMC Food-101: ~90,700 recipe-page images with their page titles, 101 food classes.

Raw download as users have it (Kaggle "gianmarco96/upmcfood101", the layout QMF and
BalanceBenchmark read), with MMBT's split files beside it where the `mla` pipeline is wanted::

    RAW/images/{train,test}/<class>/<class>_<n>.jpg
    RAW/texts/{train,test}_titles.csv       header Image_path,text,label (BalanceBenchmark's split)
    RAW/{train,dev,test}.jsonl              MMBT/QMF split: {"id", "label", "text", "img"}, img
                                            relative to RAW (images/train/<class>/<file>.jpg)

Modalities: `text` (the title's token ids) and `visual` (the image). Samples are named by their
image file's stem (`apple_pie_12`), as MLA's lists name them.

Pipelines:
  mla           MLA (datasets MMBT/QMF jsonl): train.jsonl / dev.jsonl (validation; MLA has none
                and ignores it) / test.jsonl; labels in sorted class-name order (MLA sorts
                stat_food.txt); bert-base-uncased ids, max_length 256, no special tokens
                (data/extract_token.py); samples with an empty title are left out, as MLA's lists
                leave out test.jsonl's one (peking_duck_476: 62,970 / 22,714 listed). Images:
                RandomResizedCrop(224) + flip / Resize((224, 224)), MLA's ResNet path (TVDataset).
                Departure: MLA's Food-101 runs feed pretrained M3AE ViTs 256-px images (timm
                create_transform with colour jitter; Resize(256) + CenterCrop(256) at test).
  balancebench  BalanceBenchmark (FOOD101Dataset): texts/{train,test}_titles.csv; labels in sorted
                order of the images/train class folders; titles cleaned (leading RT, URLs, '#'),
                bert-base-uncased ids with [CLS]/[SEP], max_length 40; images Resize((224, 224))
                + flip / Resize((224, 224)). Departure: its RandomRotation(30) is not applied. No
                validation split: 10% of train is carved per class, seed 0.
"""

from __future__ import annotations

import csv
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
from mmbalance.datasets.splits import carve_val, load_manifest
from mmbalance.datasets.text import Tokenization, is_empty

BERT = "bert-base-uncased"
TITLE_COLUMNS = ("Image_path", "text", "label")

PIPELINES = {
    "mla": ImageTextPipeline(
        description="MLA: MMBT jsonl split, bert-base-uncased ids (256, no special tokens), RandomResizedCrop 224",
        flavour="mmbt", text=Tokenization(tokenizer=BERT, max_len=256, special_tokens=False),
        drop_empty_text=True),
    "balancebench": ImageTextPipeline(
        description="BalanceBenchmark: titles csv split, cleaned titles, bert-base-uncased ids (40), Resize 224 + flip",
        flavour="titles", text=Tokenization(tokenizer=BERT, max_len=40, clean="tweet"), train_crop="none"),
}


class Food101Params(ImageTextParams):
    pipeline: Literal["mla", "balancebench"] | None = None


@DATASETS.register("food101")
class Food101(ImageTextDataset):
    Params = Food101Params
    PIPELINES: ClassVar = PIPELINES
    DEFAULT_PIPELINE: ClassVar = "mla"

    @classmethod
    def plan(cls, raw: Path, pipeline: ImageTextPipeline) -> Plan:
        if not (raw / "images").is_dir():
            raise DataError(f"food101: {str(raw / 'images')!r} does not exist; --raw must be the UPMC Food-101 "
                            f"folder holding images/{{train,test}}/<class>/ (and texts/ or the MMBT *.jsonl)")
        rows = _mmbt_rows(raw) if pipeline.flavour == "mmbt" else _title_rows(raw)
        flavour = load_manifest("food101").flavour(pipeline.flavour)
        notes = []
        if pipeline.drop_empty_text:
            empty = {s: [r[0] for r in split if is_empty(r[1], pipeline.text)] for s, split in rows.items()}
            rows = {s: [r for r in split if not is_empty(r[1], pipeline.text)] for s, split in rows.items()}
            notes += [f"{split}: {len(ids)} sample(s) with an empty title left out ({', '.join(ids[:5])})"
                      for split, ids in empty.items() if ids]
        if pipeline.flavour == "mmbt":
            classes = sorted({r[2] for split in rows.values() for r in split})
        else:
            classes = sorted(d.name for d in (raw / "images" / "train").iterdir() if d.is_dir())
        labels = {}
        for split in rows.values():
            for sid, _, label, _ in split:
                if label not in classes:
                    raise DataError(f"food101: sample {sid!r} has label {label!r}, which is no class folder of "
                                    f"{str(raw / 'images' / 'train')!r}")
                labels[sid] = classes.index(label)
        splits = {s: [r[0] for r in split] for s, split in rows.items()}
        if "val" not in splits:
            splits["train"], splits["val"] = carve_val(splits["train"], [labels[i] for i in splits["train"]],
                                                       flavour.val)
        samples = [SampleSource(sid, labels[sid], {"visual": path}, {"text": text})
                   for split in rows.values() for sid, text, _, path in split]
        if len(classes) != 101:
            notes.append(f"{len(classes)} classes found (Food-101 has 101)")
        return Plan(classes, samples, {s: splits[s] for s in ("train", "val", "test")}, pipeline.flavour, notes)


Row = tuple[str, str, str, Path]  # id, text, label name, image path


def _mmbt_rows(raw: Path) -> dict[str, list[Row]]:
    """MMBT's train/dev/test.jsonl as split -> rows (dev is the validation split)."""
    files = {"train": "train.jsonl", "val": "dev.jsonl", "test": "test.jsonl"}
    if not all((raw / f).is_file() for f in files.values()):
        raise DataError(f"food101: the mla pipeline reads MMBT's split files train.jsonl, dev.jsonl and test.jsonl "
                        f"in {str(raw)!r} (QMF ships them: text-image-classification/datasets/food101/); "
                        f"without them use --pipeline balancebench (texts/*_titles.csv)")
    return {s: [(image_id(r["img"]), r["text"], r["label"], raw / r["img"]) for r in read_jsonl(raw / f, "food101")]
            for s, f in files.items()}


def _title_rows(raw: Path) -> dict[str, list[Row]]:
    """texts/{train,test}_titles.csv as split -> rows; images at images/<split>/<label>/<Image_path>."""
    out = {}
    for split in ("train", "test"):
        path = raw / "texts" / f"{split}_titles.csv"
        if not path.is_file():
            raise DataError(f"food101: {str(path)!r} does not exist; the balancebench pipeline reads "
                            f"texts/{{train,test}}_titles.csv (columns {', '.join(TITLE_COLUMNS)})")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in TITLE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{str(path)!r}: no column {', '.join(map(repr, missing))}; its header is "
                                f"{reader.fieldnames} (expected {', '.join(TITLE_COLUMNS)})")
            out[split] = [(image_id(r["Image_path"]), r["text"] or "", r["label"],
                           raw / "images" / split / r["label"] / r["Image_path"]) for r in reader]
    return out
