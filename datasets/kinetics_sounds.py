"""Kinetics-Sounds: 31 audible Kinetics-400 actions, 10-s YouTube clips (OGM-GE's 14,799 / 2,597 lists).

Raw download, as the Kinetics downloaders save the clips, plus OGM-GE's two split files::

    RAW/my_train.txt                                  rows `youtubeid_start_end,10,classidx`
    RAW/my_test.txt                                   rows `youtubeid_start,10,classidx`
    RAW/videos/<youtubeid>_<start:06d>_<end:06d>.mp4  (.mkv / .webm are read too)

or clips already split into OGM-GE's extracted files (used instead of decoding a video wherever
they are present, per sample and per modality)::

    RAW/audio/<id>.wav                                any rate, resampled to 16 kHz
    RAW/Image-01-FPS/<id>/frame_00001.jpg ...         1-fps frames, used in name order

`<id>` is `youtubeid_start_end` with 6-digit seconds (a test row's short `youtubeid_start` form
is accepted for the extracted files too). The split files are GeWu-Lab/OGM-GE_CVPR2022's
`data/KineticSound/my_{train,test}.txt`. They are not shipped here: put them in RAW. Their
`classidx` is an index into CLASSES, the 31 names in alphabetical order. We checked this
against BML_TPAMI2024's `KS.json`, whose labelled ids agree with the lists for all 31 indices.
The test list writes ids without the end second; its end is start + the row's
duration (the middle column), and a test clip's video is found by (youtube id, start). No
validation list exists: 1,320 clips (the size of BML_TPAMI2024's validation set, which is not
part of these lists) are carved from train per class with seed 0.

Pipelines (both keep up to 10 frames at 1 fps and train on 3):
  ogmge  OGM-GE `data/KineticSound/process_audio.py`: Kaldi fbank, 128 mel bins x 1024 frames
         (10 ms shift, zero-padded or cropped), then (x - mean) / (2 * std) with AST's AudioSet
         statistics (mean -4.503877, std 5.141276)
  mla    the same fbank without normalisation, as MLA computes it for CREMA-D (MLA's own KS
         branch is an empty `pass`, so it defines no KS preprocessing of its own)

Deliberate differences from the reference code:
- audio is computed at 16 kHz always (what OGM-GE's `mp4_to_wav.py` extracts); a wav at another
  rate is resampled first, where process_audio.py would take the file's own rate. A stereo wav
  is averaged to mono; process_audio.py's fbank reads the first channel only.
- frames are sampled as the papers describe: a random frame of each of 3 equal segments in
  training, segment centres at test. OGM-GE's generic `AVDataset` takes column 1 of a list row as
  the clip id and column 0 as the class name, so it finds no clip in these lists as shipped, and
  it reads `frame_0000{seg*i+1}.jpg`, the same frames in training and test.
- frames are stored at 341 x 256 with the size they were decoded at, and the first 10 seconds'
  frames are kept. Training crops are drawn as torchvision's RandomResizedCrop(224) draws them
  on that original size and cut from the stored frame at the same place in the picture; test
  frames are the whole frame resized to 224 x 224, as the reference's Resize((224, 224)). A 4:3
  video keeps its aspect; other aspects are stretched to 4:3 in storage (a 16:9 frame keeps
  less of its width's resolution), which moves no crop, since boxes are scaled per axis. What
  remains is interpolation: the reference resizes once from the original frame (PIL bilinear,
  antialiased); here the frame was resized once to 341 x 256 and the crop is resized from
  there (torch's antialiased bilinear on uint8 over whole stored pixels, or roi_align with
  `train.augment: device`), within a few intensity levels of the reference (0.3-2.4 mean on
  CREMA-D-sized test images, tests/test_batch_views.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from mmbalance.core.errors import DataError
from mmbalance.core.registry import DATASETS
from mmbalance.datasets import audio as fe
from mmbalance.datasets.cache import ArraySpec
from mmbalance.datasets.media import STORED_FRAME_HW, decode_video_audio, read_audio, sized_clip_frames
from mmbalance.datasets.prepared import AudioVisualDataset, CachedParams, Pipeline, Plan, SampleSource, View
from mmbalance.datasets.splits import carve_val, load_manifest
from mmbalance.datasets.transforms import FrameClip, SpectrogramView

CLASSES = (
    "blowing_nose", "blowing_out_candles", "bowling", "chopping_wood", "dribbling_basketball",
    "laughing", "mowing_lawn", "playing_accordion", "playing_bagpipes", "playing_bass_guitar",
    "playing_clarinet", "playing_drums", "playing_guitar", "playing_harmonica", "playing_keyboard",
    "playing_organ", "playing_piano", "playing_saxophone", "playing_trombone", "playing_trumpet",
    "playing_violin", "playing_xylophone", "ripping_paper", "shoveling_snow", "shuffling_cards",
    "singing", "stomping_grapes", "tap_dancing", "tapping_guitar", "tapping_pen", "tickling",
)
SPLIT_FILES = {"train": "my_train.txt", "test": "my_test.txt"}
# a YouTube id is 11 characters of [A-Za-z0-9_-]; train rows add _start_end, test rows _start
CLIP_ID = re.compile(r"^(?P<yt>[\w-]{11})_(?P<start>\d+)(?:_(?P<end>\d+))?$")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm")
SAMPLE_RATE = 16000
FRAME_SLOTS = 10  # 1 fps of a 10-s clip
FRAME_SIZE = 224  # the crop (and test resize) the encoder sees


class KineticsSoundsPipeline(Pipeline):
    normalise: bool  # process_audio.py's (x - mean) / (2 * std)
    num_mel_bins: int = 128
    target_frames: int = 1024
    frames: int = 3  # frames per clip at training time


PIPELINES = {
    "ogmge": KineticsSoundsPipeline(
        description="OGM-GE: Kaldi fbank 1024x128 normalised as process_audio.py, 3 of 10 1-fps frames",
        flavour="ogmge", normalise=True),
    "mla": KineticsSoundsPipeline(
        description="MLA's fbank (its CREMA-D recipe; MLA has no KS code): 1024x128 unnormalised, 3 frames",
        flavour="ogmge", normalise=False),
}


class KineticsSoundsParams(CachedParams):
    pipeline: Literal["ogmge", "mla"] | None = None
    frames: int | None = Field(None, ge=1)  # default: the pipeline's
    frame_size: int = Field(FRAME_SIZE, ge=8)


@dataclass(frozen=True)
class ListedClip:
    """One row of a split file: the clip's canonical id, the id as the file spells it, and its label."""

    id: str
    listed: str
    youtube_id: str
    start: int
    label: int


@DATASETS.register("kinetics_sounds")
class KineticsSounds(AudioVisualDataset):
    Params = KineticsSoundsParams
    PIPELINES: ClassVar = PIPELINES
    DEFAULT_PIPELINE: ClassVar = "ogmge"

    # ---- prepare ------------------------------------------------------------------------------

    @classmethod
    def plan(cls, raw: Path, pipeline: KineticsSoundsPipeline) -> Plan:
        paths = {s: raw / f for s, f in SPLIT_FILES.items()}
        absent = [str(p) for p in paths.values() if not p.is_file()]
        if absent:
            raise DataError(
                f"kinetics_sounds: split file(s) {', '.join(absent)} not found; put OGM-GE's "
                f"data/KineticSound/my_train.txt and my_test.txt (GeWu-Lab/OGM-GE_CVPR2022) in --raw {str(raw)!r}"
            )
        notes: list[str] = []
        train = _unique(read_split_file(paths["train"]), "my_train.txt", notes)
        test = _unique(read_split_file(paths["test"]), "my_test.txt", notes)
        in_test = {c.id for c in test}
        leaked = [c.id for c in train if c.id in in_test]
        if leaked:
            notes.append(f"{len(leaked)} clips listed in both my_train.txt and my_test.txt are kept in test only "
                         f"(first: {leaked[0]})")
            train = [c for c in train if c.id not in in_test]
        flavour = load_manifest("kinetics_sounds").flavour(pipeline.flavour)
        train_ids, val_ids = carve_val([c.id for c in train], [c.label for c in train], flavour.val)
        layout = RawLayout(raw)
        clips = {c.id: c for c in train + test}
        samples = [layout.source(clips[i]) for i in train_ids + val_ids + [c.id for c in test]]
        return Plan(list(CLASSES), samples, {"train": train_ids, "val": val_ids, "test": [c.id for c in test]},
                    pipeline.flavour, notes)

    @classmethod
    def array_specs(cls, pipeline: KineticsSoundsPipeline) -> dict[str, ArraySpec]:
        return {
            "audio": ArraySpec((pipeline.target_frames, pipeline.num_mel_bins), "float16"),
            "visual": ArraySpec((FRAME_SLOTS, *STORED_FRAME_HW, 3), "uint8", frames=True, resized=True),
        }

    @classmethod
    def load_sample(cls, source: SampleSource, pipeline: KineticsSoundsPipeline) -> dict[str, np.ndarray]:
        audio = source.files.get("audio", source.files.get("video"))
        visual = source.files.get("visual", source.files.get("video"))
        return {"audio": fbank_features(audio, pipeline),
                "visual": sized_clip_frames(visual, FRAME_SLOTS, STORED_FRAME_HW)}

    # ---- training -----------------------------------------------------------------------------

    def views(self, train: bool) -> dict[str, View]:
        p, pipe = self.params, self.pipeline(self.params.pipeline)
        return {
            "audio": SpectrogramView(train),
            "visual": FrameClip(train, p.frames or pipe.frames, p.frame_size),
        }


def read_split_file(path: Path) -> list[ListedClip]:
    """The rows of an OGM-GE Kinetics-Sounds list (`id,duration,classidx`), in file order."""
    clips = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        fields = line.split(",")
        m = CLIP_ID.match(fields[0])
        if len(fields) != 3 or m is None or not fields[1].isdigit() or not fields[2].isdigit():
            raise DataError(f"{str(path)!r} line {n}: {line!r} is not `youtubeid_start[_end],duration,classidx`")
        label = int(fields[2])
        if label >= len(CLASSES):
            raise DataError(f"{str(path)!r} line {n}: class index {label} is out of range; "
                            f"allowed: 0-{len(CLASSES) - 1}")
        start = int(m["start"])
        end = int(m["end"]) if m["end"] is not None else start + int(fields[1])
        clips.append(ListedClip(f"{m['yt']}_{start:06d}_{end:06d}", fields[0], m["yt"], start, label))
    return clips


def _unique(clips: list[ListedClip], name: str, notes: list[str]) -> list[ListedClip]:
    """`clips` without repeated ids (the first row wins), with a note when any were dropped."""
    seen: dict[str, ListedClip] = {}
    for c in clips:
        seen.setdefault(c.id, c)
    if len(seen) < len(clips):
        notes.append(f"{name}: {len(clips) - len(seen)} repeated rows dropped (the first row of each clip is kept)")
    return list(seen.values())


class RawLayout:
    """Where each clip's audio and frames are found in RAW: extracted files where present, else the video."""

    def __init__(self, raw: Path) -> None:
        self.videos = raw / "videos"
        self.audio = raw / "audio"
        self.frames = raw / "Image-01-FPS"
        self.has_videos = self.videos.is_dir()
        if not self.has_videos and not (self.audio.is_dir() and self.frames.is_dir()):
            raise DataError(
                f"kinetics_sounds: {str(raw)!r} holds neither videos/ (<youtubeid>_<start>_<end>.mp4) nor "
                f"both audio/ (<id>.wav) and Image-01-FPS/ (<id>/frame_000NN.jpg); --raw must be the "
                f"folder that holds them"
            )
        self.by_name, self.by_start = _video_index(self.videos) if self.has_videos else ({}, {})

    def source(self, clip: ListedClip) -> SampleSource:
        # the clip's own name first; else any video of the same YouTube id and start second
        default = self.videos / f"{clip.id}.mp4"
        video = self.by_name.get(clip.id) or self.by_start.get((clip.youtube_id, clip.start), default)
        stems = list(dict.fromkeys([clip.id, clip.listed]))
        audio = self._pick([self.audio / f"{s}.wav" for s in stems], video, Path.is_file)
        frames = self._pick([self.frames / s for s in stems], video, Path.is_dir)
        files = {"video": video} if audio == frames == video else {"audio": audio, "visual": frames}
        return SampleSource(clip.id, clip.label, files)

    def _pick(self, candidates: list[Path], video: Path, exists: Callable[[Path], bool]) -> Path:
        # an extracted file wins; without one the video is read, or, with no videos/ folder at
        # all, the extracted file is reported missing under its canonical name
        found = next((c for c in candidates if exists(c)), None)
        if found is not None:
            return found
        return video if self.has_videos else candidates[0]


def _video_index(folder: Path) -> tuple[dict[str, Path], dict[tuple[str, int], Path]]:
    """The videos of `folder` named like a clip, by name (without suffix) and by (youtube id,
    start second); where several share a start, the first name in sorted order wins."""
    by_name: dict[str, Path] = {}
    by_start: dict[tuple[str, int], Path] = {}
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries)
    for name in names:
        stem, suffix = os.path.splitext(name)
        m = CLIP_ID.match(stem)
        if suffix.lower() in VIDEO_SUFFIXES and m is not None:
            by_name.setdefault(stem, folder / name)
            by_start.setdefault((m["yt"], int(m["start"])), folder / name)
    return by_name, by_start


def fbank_features(path: Path, pipeline: KineticsSoundsPipeline) -> np.ndarray:
    """(target_frames, mel bins) float16 Kaldi fbank of a wav or of a video's audio track, at 16 kHz."""
    if path.suffix.lower() == ".wav":
        wave, sr = read_audio(path)
        x = fe.resample(torch.from_numpy(wave), sr, SAMPLE_RATE)
    else:
        x = torch.from_numpy(decode_video_audio(path, SAMPLE_RATE))
    norm = (fe.KS_FBANK_MEAN, fe.KS_FBANK_STD) if pipeline.normalise else None
    fbank = fe.kaldi_fbank(x, SAMPLE_RATE, pipeline.num_mel_bins, pipeline.target_frames, norm)
    return fbank.numpy().astype(np.float16)
