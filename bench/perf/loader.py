"""How fast batches reach the model: the prepared cache against the reference loader, which
decodes every sample every epoch.

Synthetic CREMA-D clips (16 kHz wavs and 480x360 jpg frames, as OGM-GE extracts them) are
written once and read by:

- the reference: OGM-GE's own `CramedDataset.__getitem__` (bench/perf/reference.py; librosa
  load and resample, STFT, PIL, torchvision transforms), when librosa is installed;
- the suite's decode path: the same per-sample computation built from the suite's parts, the
  wav through the `ogmge` front-end that prepare runs (resample to 22,050 Hz, tile to 3 s, STFT
  512/353, log) and one random frame (jpg, random resized crop to 224, flip, normalise). It
  stands for the reference where librosa is missing, so it must cost what the reference costs;
- the cache made by the `ogmge` pipeline: with the views per sample (`train.augment: loader`),
  or with only their per-sample half in the loader (`train.augment: device`), and that half
  followed by the batch half on the device.

All paths are timed in the same interleaved rounds, one process, one thread: samples per
CPU-second, i.e. per core (the device half on a GPU: per second of wall clock), the fastest round
of each.

The data-path check trains joint ResNet18s on the cache through the real loader (persistent
workers, pinned memory, augmentation on the device) and compares the step time with steps on a
batch already on the device: on a GPU the loader should hide behind the model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from mmbalance.bench.config import TrainConfig
from mmbalance.bench.data import SplitLoader, build_loaders
from mmbalance.bench.perf import reference
from mmbalance.bench.perf.steps import Shapes, Variant, build_subject, sync, timed
from mmbalance.datasets.cache import CacheMeta, CacheWriter
from mmbalance.datasets.cremad import EMOTIONS, PIPELINES, CremaD, CremadParams, audio_features
from mmbalance.datasets.media import natural_key, read_image
from mmbalance.datasets.prepared import SampleSource
from mmbalance.datasets.transforms import FrameClip

PIPELINE = "ogmge"
FRAME_HW = (360, 480)  # CREMA-D's VideoFlash frames
FRAMES_PER_CLIP = 3
PASS_BATCHES = 64  # the data-path check's batches per pass  # 1 fps of a 2.5 s clip, as OGM-GE extracts them


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
    """The suite's decode path: every read decodes the clip's wav through the `ogmge` front-end
    (as prepare computes it: datasets.cremad.audio_features) and one random frame (FrameClip)."""

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


class ReferenceSplit(torch.utils.data.Dataset):
    """The reference loader's items as the suite's loaders batch them: ({modality: tensor}, label)."""

    def __init__(self, dataset: reference.CramedDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        spectrogram, images, label = self.dataset[i]
        return {"audio": torch.from_numpy(spectrogram)[None], "visual": images}, label


def reference_split(sources: list[SampleSource]) -> ReferenceSplit | None:
    """OGM-GE's own loader over `sources` (training mode, 1 frame), or None without librosa."""
    if reference.librosa is None:
        return None
    return ReferenceSplit(reference.CramedDataset([str(s.files["audio"]) for s in sources],
                                                  [str(s.files["visual"]) for s in sources],
                                                  [s.label for s in sources]))


@dataclass
class LoaderSetup:
    """The synthetic clips, their cache, and the dataset that reads it."""

    sources: list[SampleSource]
    cache: Path

    def dataset(self) -> CremaD:
        return CremaD(CremadParams(root=str(self.cache), pipeline=PIPELINE))

    def repeated(self, times: int, out: Path) -> LoaderSetup:
        """The same cache with its train split listed `times` over (the arrays linked, not
        copied): passes of many batches from a few clips."""
        out.mkdir(parents=True, exist_ok=True)
        for f in self.cache.iterdir():
            if f.name != "meta.json" and not (out / f.name).exists():
                (out / f.name).symlink_to(f.resolve())
        meta = json.loads((self.cache / "meta.json").read_text())
        meta["splits"]["train"] = meta["splits"]["train"] * times
        (out / "meta.json").write_text(json.dumps(meta))
        return LoaderSetup(self.sources, out)


def setup_loader_data(workdir: Path, n: int) -> LoaderSetup:
    sources = write_clips(workdir / "raw", n)
    return LoaderSetup(sources, build_cache(sources, workdir / "cache"))


# the loader paths, reference first: key -> (row label, target as a multiple of the reference's rate)
LOADER_PATHS: dict[str, tuple[str, float | None]] = {
    "reference": ("reference: OGM-GE CramedDataset (librosa, PIL, torchvision)", None),
    "decode": ("decode per sample (wav -> STFT, jpg -> crop)", None),
    "cache_loader": ("cache, views per sample (augment: loader)", 10.0),
    "cache_loader_half": ("cache, loader half (augment: device)", 30.0),
    "device_half": ("  its device half on {device} (crop, flip, normalise per batch)", None),
}
REFERENCE_MISSING = "librosa not installed: pip install mmbalance[reference]"


def measure_loaders(data: LoaderSetup, batch_size: int, device: torch.device, rounds: int) -> list[dict[str, Any]]:
    """One row per LOADER_PATHS entry: samples/s per CPU core (None for the reference without
    librosa), the fastest of `rounds` interleaved rounds, and its ratios to the reference and to
    the decode path (None where either is missing)."""
    cpu = torch.device("cpu")
    dataset = data.dataset()
    per_sample, _ = dataset.loader_split("train", augment=True, on_device=False)
    deferred, finish = dataset.loader_split("train", augment=True, on_device=True)
    copy = reference_split(data.sources)
    loaders = {
        "reference": SplitLoader(copy, batch_size, cpu) if copy is not None else None,
        "decode": SplitLoader(DecodeSplit(data.sources), batch_size, cpu),
        "cache_loader": SplitLoader(per_sample, batch_size, cpu),
        "cache_loader_half": SplitLoader(deferred, batch_size, cpu),
        "device_half": SplitLoader(deferred, batch_size, device, finish=finish),
    }
    with one_thread():
        seconds = interleaved_rounds({k: v for k, v in loaders.items() if v is not None}, rounds, device)
    rows = [loader_row(key, seconds.get(key), len(data.sources), device) for key in loaders]
    rates = {r["key"]: r["samples_per_s_per_core"] for r in rows}
    for r in rows:
        for basis in ("reference", "decode"):
            ok = r["samples_per_s_per_core"] is not None and rates[basis] is not None
            r[f"vs_{basis}"] = r["samples_per_s_per_core"] / rates[basis] if ok else None
    return rows


def loader_row(key: str, seconds: dict[str, list[float]] | None, clips: int, device: torch.device) -> dict[str, Any]:
    """A path's row from its rounds' seconds (None: not timed, the reference without librosa)."""
    label, target = LOADER_PATHS[key]
    # the device half on a GPU runs mostly outside this process's CPU time: timed by the wall clock
    clock = "wall" if key == "device_half" and device.type == "cuda" else "cpu"
    label = label.format(device=device.type) + (", wall clock" if clock == "wall" else "")
    row: dict[str, Any] = {"key": key, "path": label, "target": target, "clock": clock}
    if seconds is None:
        return row | {"samples_per_s_per_core": None, "note": REFERENCE_MISSING}
    return row | {"samples_per_s_per_core": clips / min(seconds[clock]), "round_cpu_s": seconds["cpu"],
                  "round_wall_s": seconds["wall"]}


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch's intra-op threads set to 1 inside (per-core rates), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def interleaved_rounds(loaders: dict[str, SplitLoader], rounds: int,
                       device: torch.device) -> dict[str, dict[str, list[float]]]:
    """CPU and wall seconds of one shuffled pass (every clip) of each loader per round, the
    loaders taking turns in an order rotated every round, after a first pass of each that warms
    the page cache and lazy imports. Every loader reads the same shuffle in a round."""
    for loader in loaders.values():
        timed_pass(loader, torch.Generator().manual_seed(0), device)
    seconds: dict[str, dict[str, list[float]]] = {key: {"cpu": [], "wall": []} for key in loaders}
    keys = list(loaders)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            cpu, wall = timed_pass(loaders[key], torch.Generator().manual_seed(1 + r), device)
            seconds[key]["cpu"].append(cpu)
            seconds[key]["wall"].append(wall)
    return seconds


def timed_pass(loader: SplitLoader, generator: torch.Generator, device: torch.device) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one pass, the device's queued work counted."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in loader(generator):
        pass
    sync(device)
    return time.process_time() - cpu, time.perf_counter() - wall


def measure_data_path(data: LoaderSetup, batch_size: int, device: torch.device, steps: int, workers: int,
                      encoder: str = "resnet18") -> dict[str, Any]:
    """Joint training's step time fed by the real loader vs on a batch already on the device."""
    train = TrainConfig(batch_size=batch_size, workers=workers, augment="device", drop_last=True)
    # every pass restarts the workers' pipeline, so a pass of 2 batches (128 clips) would time
    # the restarts: the train split is listed over until a pass holds PASS_BATCHES batches
    times = max(1, math.ceil(PASS_BATCHES * batch_size / len(data.sources)))
    dataset = data.repeated(times, data.cache.with_name(data.cache.name + "-repeated")).dataset()
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
    return {"batch": batch_size, "workers": workers, "steps": steps, "batches_per_pass": len(loader),
            "resident_step_s": resident,
            "loaded_step_s": loaded, "loaded_vs_resident": loaded / resident}
