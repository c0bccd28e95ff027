"""ModelNet40 as two "modalities": the front and the rear rendered view of each CAD model.

Raw download as users have it (the MVCNN 12-view shaded renders)::

    RAW/modelnet40_images_new_12x/<class>/{train,test}/<class>_XXXX.obj.shaded_v001.png ... _v012.png

(RAW may also be the modelnet40_images_new_12x folder itself.) Modalities: `front` = view v001
and `rear` = view v007, as DI-MML (`.replace('v001', 'v007')`) and the greedy learner
(`specific_views=[0, 6]`) take them. Classes are the class folders in sorted order, which is
DI-MML's label order (airplane 0, bathtub 1, ...).

Split: the train/test folders (published 9,843 / 2,468). There is no validation split: 20% of
train is carved per class with seed 10, the greedy learner's fraction and seed; its own draw
(numpy over its file order) is not reproduced, so the validation objects differ from its.

Pipeline:
  dimml  each view stored once as 224 x 224 uint8 (PIL bilinear; the renders are already 224 x
         224, so this is a copy); training: RandomResizedCrop(224) + horizontal flip, drawn
         independently for the two views as DI-MML does; test: Resize(224, 224); ImageNet
         normalisation. Each view is a 1-frame clip, (3, 1, 224, 224).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from mmbalance.core.errors import DataError
from mmbalance.core.registry import DATASETS
from mmbalance.datasets.cache import ArraySpec
from mmbalance.datasets.media import read_image, resize_image
from mmbalance.datasets.prepared import CachedParams, Pipeline, Plan, PreparedDataset, SampleSource, View
from mmbalance.datasets.splits import carve_val, load_manifest
from mmbalance.datasets.transforms import FrameClip

RENDERS = "modelnet40_images_new_12x"
RENDER = re.compile(r"^(?P<object>.+)\.obj\.shaded_v(?P<view>\d{3})\.png$")
FLAVOUR = "mvcnn12x"
NUM_CLASSES = 40


class Modelnet40Pipeline(Pipeline):
    size: int = 224  # stored square side
    views: dict[str, int] = Field(default_factory=lambda: {"front": 1, "rear": 7})  # modality -> view number


PIPELINES = {
    "dimml": Modelnet40Pipeline(description="DI-MML: views v001/v007, RandomResizedCrop 224 + flip, ImageNet norm",
                                flavour=FLAVOUR),
}


class Modelnet40Params(CachedParams):
    pipeline: Literal["dimml"] | None = None
    frame_size: int = Field(224, ge=8)


@DATASETS.register("modelnet40")
class ModelNet40(PreparedDataset):
    Params = Modelnet40Params
    MODALITIES = ("front", "rear")
    KINDS: ClassVar = {"front": "image", "rear": "image"}
    DEFAULT_ENCODERS: ClassVar = {"front": {"name": "resnet18"}, "rear": {"name": "resnet18"}}
    PIPELINES: ClassVar = PIPELINES
    DEFAULT_PIPELINE: ClassVar = "dimml"

    # ---- prepare ------------------------------------------------------------------------------

    @classmethod
    def plan(cls, raw: Path, pipeline: Modelnet40Pipeline) -> Plan:
        root = renders_root(raw)
        classes = sorted(d.name for d in root.iterdir() if (d / "train").is_dir() or (d / "test").is_dir())
        if not classes:
            raise DataError(f"modelnet40: {str(root)!r} holds no <class>/train or <class>/test folders")
        objects = {split: list_objects(root, classes, split) for split in ("train", "test")}
        labels = {obj: classes.index(c) for split in objects.values() for obj, (c, _) in split.items()}
        flavour = load_manifest("modelnet40").flavour(pipeline.flavour)
        train = sorted(objects["train"])
        train, val = carve_val(train, [labels[o] for o in train], flavour.val)
        test = sorted(objects["test"])
        samples = []
        for split in ("train", "test"):
            for obj, (_, folder) in objects[split].items():
                files = {m: folder / f"{obj}.obj.shaded_v{v:03d}.png" for m, v in pipeline.views.items()}
                samples.append(SampleSource(obj, labels[obj], files))
        notes = [] if len(classes) == NUM_CLASSES else [f"{len(classes)} class folders found (ModelNet40 has 40)"]
        return Plan(classes, samples, {"train": train, "val": val, "test": test}, FLAVOUR, notes)

    @classmethod
    def array_specs(cls, pipeline: Modelnet40Pipeline) -> dict[str, ArraySpec]:
        return {m: ArraySpec((1, pipeline.size, pipeline.size, 3), "uint8") for m in pipeline.views}

    @classmethod
    def load_sample(cls, source: SampleSource, pipeline: Modelnet40Pipeline) -> dict[str, np.ndarray]:
        size = (pipeline.size, pipeline.size)
        out = {}
        for m in pipeline.views:
            img = read_image(source.files[m])
            out[m] = (img if img.shape[:2] == size else resize_image(img, size))[None]
        return out

    # ---- training -----------------------------------------------------------------------------

    def views(self, train: bool) -> dict[str, View]:
        size = self.params.frame_size
        return {m: FrameClip(train, 1, size, crop="random_resized", test_crop="resize") for m in self.MODALITIES}


def renders_root(raw: Path) -> Path:
    """The folder holding the class folders: RAW/modelnet40_images_new_12x, or RAW itself."""
    nested = raw / RENDERS
    if nested.is_dir():
        return nested
    if raw.is_dir() and any((d / "train").is_dir() for d in raw.iterdir()):
        return raw
    raise DataError(f"modelnet40: {str(nested)!r} does not exist; --raw must be the folder holding "
                    f"{RENDERS}/<class>/{{train,test}}/*.obj.shaded_v001.png ... _v012.png")


def list_objects(root: Path, classes: list[str], split: str) -> dict[str, tuple[str, Path]]:
    """Object name -> (class, folder) of every object with at least one rendered view in `split`
    (an object whose front or rear view is missing is then reported by path)."""
    found: dict[str, tuple[str, Path]] = {}
    for c in classes:
        folder = root / c / split
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = RENDER.match(path.name)
            if match is None:
                continue
            obj = match["object"]
            if obj in found and found[obj][1] != folder:
                raise DataError(f"modelnet40: object {obj!r} appears in {str(found[obj][1])!r} and {str(folder)!r}")
            found[obj] = (c, folder)
    return dict(sorted(found.items()))
