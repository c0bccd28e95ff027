"""How fast batches reach the model: the prepared cache against decoding every sample every epoch.

Synthetic CREMA-D clips (16 kHz wavs and 480x360 jpg frames, as OGM-GE extracts them) are
written once. The decode path is the reference repos' loader: each read decodes the wav
(resample to 22,050 Hz, tile to 3 s, STFT 512/353, log) and one random frame (jpg, random
resized crop to 224, flip, normalise). The cache path reads the same clips from a cache made by
the `ogmge` pipeline: with the views per sample (`train.augment: loader`), or with only their
per-sample half in the loader (`train.augment: device`), the rest timed separately on the device.
Loader rates are per CPU core: one process, one thread.

The data-path check trains joint ResNet18s on the cache through the real loader (persistent
workers, pinned memory, augmentation on the device) and compares the step time with steps on a
batch already on the device: on a GPU the loader should hide behind the model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from mmbalance.bench.config import TrainConfig
from mmbalance.bench.data import SplitLoader, build_loaders
from mmbalance.bench.perf.steps import Shapes, Variant, build_subject, sync, timed
from mmbalance.datasets.cache import CacheMeta, CacheWriter
from mmbalance.datasets.cremad import EMOTIONS, PIPELINES, CremaD, CremadParams, audio_features
from mmbalance.datasets.media import natural_key, read_image
from mmbalance.datasets.prepared import SampleSource
from mmbalance.datasets.transforms import FrameClip

PIPELINE = "ogmge"
FRAME_HW = (360, 480)  # CREMA-D's VideoFlash frames
FRAMES_PER_CLIP = 3  # 1 fps of a 2.5 s clip, as OGM-GE extracts them


def write_clips(root: Path, n: int, seconds: float = 2.5, rate: int = 16000) -> list[SampleSource]:
    """`n` CREMA-D-like clips under `root`: a wav each and a folder of jpg frames."""
    rng = np.random.default_rng(0)
    (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sources = []
    for i in range(n):
        clip = f"{1001 + i // 60}_DFA_{EMOTIONS[i % 6]}_XX{i % 60:02d}"
        wav = root / "AudioWAV" / f"{clip}.wav"
        tone = 0.3 * np.sin(2 * np.pi * (200 + 40 * (i % 6)) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(wav, tone.astype(np.float32), rate, subtype="PCM_16")
        frames = root / "Image-01-FPS" / clip
        frames.mkdir(parents=True, exist_ok=True)
        for k in range(FRAMES_PER_CLIP):
            Image.fromarray(smooth_image(rng, *FRAME_HW)).save(frames / f"{k + 1:06d}.jpg", quality=90)
        sources.append(SampleSource(clip, i % 6, {"audio": wav, "visual": frames}))
    return sources


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like uint8 image (smooth colour fields plus grain), so that jpg sizes are realistic."""
    coarse = rng.integers(0, 256, (h // 40 + 1, w // 40 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.int16)
    return np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)


def build_cache(sources: list[SampleSource], out: Path) -> Path:
    """The `ogmge` cache of `sources` (all in train), decoded by CremaD.load_sample as prepare does."""
    pipe = PIPELINES[PIPELINE]
    meta = CacheMeta(
        dataset="cremad", pipeline=PIPELINE, pipeline_params=pipe.model_dump(), classes=list(EMOTIONS),
        arrays={m: s.to_dict() for m, s in CremaD.array_specs(pipe).items()}, kinds=dict(CremaD.KINDS),
        ids=[s.id for s in sources], labels=[s.label for s in sources],
        splits={"train": list(range(len(sources))), "val": [0], "test": [0]},
    )
    writer = CacheWriter(out, meta)
    for row, source in enumerate(sources):
        writer.write(row, CremaD.load_sample(source, pipe))
    writer.flush()
    writer.finish({}, {})
    return out


class DecodeSplit(torch.utils.data.Dataset):
    """The reference repos' loader: every read decodes the clip's wav and one random frame."""

    def __init__(self, sources: list[SampleSource]) -> None:
        self.sources = sources
        self.frames = [sorted(s.files["visual"].glob("*.jpg"), key=natural_key) for s in sources]
        self.view = FrameClip(train=True, frames=1, size=224)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        source = self.sources[i]
        audio = torch.from_numpy(audio_features(source.files["audio"], PIPELINES[PIPELINE]).astype(np.float32))
        frame = read_image(self.frames[i][int(torch.randint(len(self.frames[i]), ()))])[None]  # (1, H, W, 3)
        return {"audio": audio[None], "visual": self.view(frame, 1)}, source.label


@dataclass
class LoaderSetup:
    """The synthetic clips, their cache, and the dataset that reads it."""

    sources: list[SampleSource]
    cache: Path

    def dataset(self) -> CremaD:
        return CremaD(CremadParams(root=str(self.cache), pipeline=PIPELINE))


def setup_loader_data(workdir: Path, n: int) -> LoaderSetup:
    sources = write_clips(workdir / "raw", n)
    return LoaderSetup(sources, build_cache(sources, workdir / "cache"))


def rate(loader: SplitLoader, device: torch.device) -> float:
    """Samples per second of one shuffled pass, after a first pass that warms the page cache and
    lazy imports (the device's queued work counted)."""
    for _ in loader(torch.Generator().manual_seed(0)):
        pass
    start, n = time.perf_counter(), 0
    for batch in loader(torch.Generator().manual_seed(1)):
        n += len(batch)
    sync(device)
    return n / (time.perf_counter() - start)


def measure_loaders(data: LoaderSetup, batch_size: int, device: torch.device) -> list[dict[str, Any]]:
    """Samples/s per CPU core of each path, and the cache's speed-up over the decode path."""
    cpu = torch.device("cpu")
    dataset = data.dataset()
    per_sample, _ = dataset.loader_split("train", augment=True, on_device=False)
    deferred, finish = dataset.loader_split("train", augment=True, on_device=True)
    paths = {
        "decode per sample (wav -> STFT, jpg -> crop)": SplitLoader(DecodeSplit(data.sources), batch_size, cpu),
        "cache, views per sample (augment: loader)": SplitLoader(per_sample, batch_size, cpu),
        "cache, loader half (augment: device)": SplitLoader(deferred, batch_size, cpu),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [{"path": label, "samples_per_s_per_core": rate(loader, cpu)} for label, loader in paths.items()]
    finally:
        torch.set_num_threads(threads)
    device_half = SplitLoader(deferred, batch_size, device, finish=finish)
    rows.append({"path": f"  its device half on {device.type} (crop, flip, normalise per batch)",
                 "samples_per_s_per_core": rate(device_half, device)})
    decode = rows[0]["samples_per_s_per_core"]
    for r in rows:
        r["vs_decode"] = r["samples_per_s_per_core"] / decode
    return rows


def measure_data_path(data: LoaderSetup, batch_size: int, device: torch.device, steps: int, workers: int,
                      encoder: str = "resnet18") -> dict[str, Any]:
    """Joint training's step time fed by the real loader vs on a batch already on the device."""
    train = TrainConfig(batch_size=batch_size, workers=workers, augment="device", drop_last=True)
    dataset = data.dataset()
    loader = build_loaders(dataset, train, device)["train"]  # the training loader exactly as a run builds it
    if len(loader) == 0:
        raise ValueError(f"the data-path check needs at least {batch_size} cached clips")
    audio, visual = (m.shape for m in dataset.modalities)
    shapes = Shapes("cache", audio, visual, batch=batch_size, encoder=encoder)
    on_device = next(loader(torch.Generator().manual_seed(0)))
    subject = build_subject(Variant("joint", {"name": "joint"}), shapes, on_device, train, device)
    timed(subject, on_device, 2, device)  # warm-up (cuDNN autotuning)
    resident = timed(subject, on_device, steps, device)

    def fed() -> Iterator:
        epoch = 0
        while True:
            yield from loader(torch.Generator().manual_seed(epoch))
            epoch += 1

    stream = fed()
    next(stream)  # the workers start
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        subject.step(next(stream))
    sync(device)
    loaded = (time.perf_counter() - start) / steps
    return {"batch": batch_size, "workers": workers, "steps": steps, "resident_step_s": resident,
            "loaded_step_s": loaded, "loaded_vs_resident": loaded / resident}
