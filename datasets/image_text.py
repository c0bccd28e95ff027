"""The image + text datasets (UPMC Food-101, MVSA-Single): what they share besides their layouts.

Each sample is one image and one text. The prepare stores the image once, resized to a square
of `image_size` (with the size it had, so that training crops are drawn on the original picture
as torchvision draws them; datasets.batch_views), and the text as token ids (datasets.text).
Training views: the image as a 1-frame clip (3, 1, frame_size, frame_size), ImageNet-normalised,
cropped and flipped as the pipeline says in training and resized whole at test (the references'
Resize((224, 224))); the text as its (max_len,) int64 ids.

A subclass gives its layout (`plan`) and its named pipelines. The one pipeline option a prepare
takes is where the tokenizer is (`--set text.tokenizer=DIR`, for a tokenizer kept in a folder
rather than in the Hugging Face cache): the pipelines are otherwise the references' as they are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from mmbalance.core.errors import ConfigError, DataError
from mmbalance.core.overrides import parse_override
from mmbalance.core.types import ModalityKind
from mmbalance.datasets.cache import ArraySpec, SizedFrames
from mmbalance.datasets.media import read_image, resize_image
from mmbalance.datasets.prepared import CachedParams, Pipeline, PreparedDataset, SampleSource, View
from mmbalance.datasets.text import Tokenization, TokenView, load_tokenizer, read_text_file, token_ids
from mmbalance.datasets.transforms import FrameClip

IMAGE_SIZE = 256  # stored side: above the 224 crops


class ImageTextPipeline(Pipeline):
    text: Tokenization
    image_size: int = IMAGE_SIZE
    train_crop: Literal["random_resized", "none"] = "random_resized"  # none: resize whole, then flip
    drop_empty_text: bool = False  # leave out samples whose text is empty (MLA's lists do)


class ImageTextParams(CachedParams):
    frame_size: int = Field(224, ge=8)  # the side the encoder sees


class ImageTextDataset(PreparedDataset):
    """Base of the image + text datasets: modalities `text` and `visual` (in BalanceBenchmark's
    order, Unimodal-1 = text), a BERT text encoder and a ResNet18 by default."""

    Params = ImageTextParams
    MODALITIES: ClassVar[tuple[str, ...]] = ("text", "visual")
    KINDS: ClassVar[dict[str, ModalityKind]] = {"text": "text", "visual": "image"}
    DEFAULT_ENCODERS: ClassVar[dict[str, dict[str, Any]]] = {"text": {"name": "hf_text"},
                                                             "visual": {"name": "resnet18"}}
    OPTIONS: ClassVar[tuple[str, ...]] = ("text.tokenizer",)

    # ---- prepare ------------------------------------------------------------------------------

    @classmethod
    def configure(cls, name: str, pipeline_file: str | Path | None = None, options: Sequence[str] = ()) -> Pipeline:
        """The named pipeline, with `text.tokenizer=...` if given (the only option: where the
        tokenizer is); its tokenizer is loaded here, so a missing one stops the prepare at once."""
        pipe = cls.pipeline(name)
        if pipeline_file is not None:
            raise ConfigError(f"dataset {cls.registry_name!r} takes no --pipeline-file; its pipelines are the "
                              f"reference repos' ({', '.join(sorted(cls.PIPELINES))}); --set text.tokenizer=DIR "
                              f"says where the tokenizer is")
        for option in options:
            key, value = parse_override(option)
            dotted = ".".join(key)
            if dotted not in cls.OPTIONS or not isinstance(value, str) or not value:
                raise ConfigError(f"dataset {cls.registry_name!r}: pipeline option {option!r} (--set) is not "
                                  f"allowed; allowed: text.tokenizer=<hub name or directory>")
            pipe = pipe.model_copy(update={"text": pipe.text.model_copy(update={"tokenizer": value})})
        load_tokenizer(pipe.text.tokenizer, f"pipeline {name!r} text.tokenizer")
        return pipe

    @classmethod
    def array_specs(cls, pipeline: ImageTextPipeline) -> dict[str, ArraySpec]:
        return {"text": ArraySpec((pipeline.text.max_len,), "int32"),
                "visual": ArraySpec((1, pipeline.image_size, pipeline.image_size, 3), "uint8", resized=True)}

    @classmethod
    def load_sample(cls, source: SampleSource, pipeline: ImageTextPipeline) -> dict[str, np.ndarray | SizedFrames]:
        """The image (squashed to the stored square, with its own size) and the text's ids; the
        text comes in `extra["text"]` (read by plan from the split files) or, where those hold
        none, from the file `files["text"]`."""
        img = read_image(source.files["visual"])
        side = pipeline.image_size
        text = source.extra["text"] if "text" in source.extra else read_text_file(source.files["text"])
        return {"text": token_ids(text, pipeline.text),
                "visual": SizedFrames(resize_image(img, (side, side))[None], img.shape[:2])}

    # ---- training -----------------------------------------------------------------------------

    def views(self, train: bool) -> dict[str, View]:
        pipe = self.pipeline(self.params.pipeline)
        return {"text": TokenView(),
                "visual": FrameClip(train, 1, self.params.frame_size, crop=pipe.train_crop, test_crop="resize")}


def read_jsonl(path: Path, dataset: str, fields: Sequence[str] = ("label", "text", "img")) -> list[dict[str, Any]]:
    """The rows of an MMBT-style split file (one JSON object per line with `fields`), or a
    DataError naming the file and line."""
    if not path.is_file():
        raise DataError(f"{dataset}: split file {str(path)!r} does not exist")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{str(path)!r} line {n}: not a JSON object ({e})") from None
        missing = [f for f in fields if not isinstance(row, dict) or not isinstance(row.get(f), str)]
        if missing:
            raise DataError(f"{str(path)!r} line {n}: no string field {', '.join(map(repr, missing))} "
                            f"(MMBT split rows hold {', '.join(fields)})")
        rows.append(row)
    return rows


def image_id(img: str) -> str:
    """A sample's id: its image's file name without the extension (as MLA's lists name them)."""
    return Path(img).stem
