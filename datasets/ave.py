"""AVE (Audio-Visual Event localisation): 10-s YouTube videos, 28 event classes, one annotated
event segment per row.

Raw download as the official AVE_Dataset ships it (Tian et al., ECCV 2018)::

    RAW/AVE/<VideoID>.mp4      10-s videos with their audio track (4,097 files)
    RAW/trainSet.txt           rows `Category&VideoID&Quality&StartTime&EndTime` (no header),
    RAW/valSet.txt             start and end in whole seconds; the event is [start, end)
    RAW/testSet.txt
    RAW/Annotations.txt        every row of the three lists, under a header line (not needed)

Splits: the official train/val/test lists (3,339 / 402 / 402 rows). One train row has an empty
event (VWi2ENBuTbw, 0 to 0 s) and is left out, as DI-MML's copy of the list (3,338 rows) does.
A video with two events has two rows; within a list the first row of a video is kept (DI-MML;
OGM-GE's reader kept the last): train has 27 such videos, which leaves 3,311, and val has one
(402 -> 401). 18 videos are in two lists under different events (10 train+val, 8 train+test);
each list keeps its own sample, and the train copy's id is `<VideoID>@train` so that val and
test keep the bare video ids of the published lists. If valSet.txt or testSet.txt is missing,
the vendored copy in datasets/manifests/lists is used.

Class index: the order in which the classes first appear in testSet.txt (DI-MML); for the
official list: Church bell, Male speech, Bark, Fixed-wing aircraft, Race car, Female speech,
Helicopter, Violin, Flute, Ukulele, Frying (food), Truck, Shofar, Motorcycle, Acoustic guitar,
Train horn, Clock, Banjo, Goat, Baby cry, Bus, Chainsaw, Cat, Horse, Toilet flush, Rodents,
Accordion, Mandolin (shortened here; the full names are those of the lists).

Pipelines:
  dimml  DI-MML's "SE" data: the audio track at 16 kHz cut to the event [start, end), tiled to
         160,000 samples (10 s), scipy-style PSD spectrogram 512/353, log, z-scored per clip ->
         257x1004; 1-fps frames inside the event (up to 10 stored), 4 per clip at training time.
  ogmge  OGM-GE: OGM-GE's AVE preprocessing script was removed from its repository and its
         maintainers say AVE follows Kinetics-Sounds, so this is KS's `process_audio.py` on the
         whole 10-s clip: 16 kHz Kaldi fbank 128 bins x 1024 frames, normalised (x + 4.503877) /
         (2 * 5.141276) -> 1024x128; 1-fps frames of the whole clip, 3 per clip.
Frames are sampled as the papers describe them: a random frame of each of T equal segments in
training, the segment centres at test.

Deliberate differences from the reference code:
  - audio is decoded from the mp4 at 16 kHz by FFmpeg; DI-MML first wrote a wav with moviepy
    and resampled it with librosa (values close, not identical);
  - event frames are those at seconds start <= t < end; DI-MML's extractor also keeps the frame
    at second `end` and pads every event to at least 10 frames with randomly drawn duplicates,
    neither of which is reproduced (segment sampling already handles short events);
  - DI-MML fixes the frame choice with np.random.seed(999) inside __getitem__; frames here are
    drawn from the run's torch RNG;
  - DI-MML's feature files are keyed by video id, so a video with two events carries the segment
    of whichever row its preprocessing loop met last; here each sample uses its own row's segment;
  - frames are stored at 341 x 256 with the size they were decoded at: training crops are drawn
    on that original size as torchvision's RandomResizedCrop(224) draws them and cut from the
    stored frame at the same place in the picture, test frames are the whole frame resized to
    224 x 224; what remains is interpolation and the 4:3 storage of other aspects, as for
    Kinetics-Sounds (datasets/kinetics_sounds.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from mmbalance.core.errors import DataError
from mmbalance.core.registry import DATASETS
from mmbalance.datasets import audio as fe
from mmbalance.datasets.cache import ArraySpec, SizedFrames
from mmbalance.datasets.media import STORED_FRAME_HW, decode_video_audio, sized_clip_frames
from mmbalance.datasets.prepared import AudioVisualDataset, CachedParams, Pipeline, Plan, SampleSource, View
from mmbalance.datasets.splits import MANIFEST_DIR, load_manifest
from mmbalance.datasets.transforms import FrameClip, SpectrogramView

SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
FLAVOUR = "official"
CLIP_SECONDS = 10
FRAME_SLOTS = 10  # 1 fps of a 10-s clip
FRAME_SIZE = 224  # the crop (and test resize) the encoder sees


class AvePipeline(Pipeline):
    """How one AVE pipeline turns a video and its event into arrays."""

    segment: bool  # audio and frames restricted to the annotated event
    audio: Literal["psd", "fbank"]
    sample_rate: int = 16000
    samples: int = 160000  # psd: after tiling
    n_fft: int = 512
    noverlap: int = 353
    fbank_bins: int = 128
    fbank_frames: int = 1024
    frames: int = 4  # frames per clip at training time


PIPELINES = {
    "dimml": AvePipeline(description="DI-MML SE: event-segment PSD 257x1004 z-scored, event frames, 4 frames",
                         flavour=FLAVOUR, segment=True, audio="psd", frames=4),
    "ogmge": AvePipeline(description="OGM-GE (KS recipe): whole-clip fbank 1024x128 normalised, 3 frames",
                         flavour=FLAVOUR, segment=False, audio="fbank", frames=3),
}


class AveParams(CachedParams):
    pipeline: Literal["dimml", "ogmge"] | None = None
    frames: int | None = Field(None, ge=1)  # default: the pipeline's
    frame_size: int = Field(FRAME_SIZE, ge=8)


@DATASETS.register("ave")
class Ave(AudioVisualDataset):
    Params = AveParams
    PIPELINES: ClassVar = PIPELINES
    DEFAULT_PIPELINE: ClassVar = "dimml"

    # ---- prepare ------------------------------------------------------------------------------

    @classmethod
    def plan(cls, raw: Path, pipeline: AvePipeline) -> Plan:
        video_dir = raw / "AVE"
        if not video_dir.is_dir():
            raise DataError(f"ave: {str(video_dir)!r} does not exist; --raw must be the AVE_Dataset folder "
                            f"holding AVE/<VideoID>.mp4 and {', '.join(SPLIT_FILES.values())}")
        notes: list[str] = []
        rows = {split: _split_rows(raw, split, notes) for split in SPLIT_FILES}
        classes = list(dict.fromkeys(r.category for r in rows["test"]))
        kept = {split: _first_per_video(_nonempty(split_rows, SPLIT_FILES[split], notes), SPLIT_FILES[split], notes)
                for split, split_rows in rows.items()}
        ids = _sample_ids(kept, notes)
        samples = [_source(r, ids[split, r.video], classes, video_dir) for split, rs in kept.items() for r in rs]
        splits = {split: [ids[split, r.video] for r in rs] for split, rs in kept.items()}
        return Plan(classes, samples, splits, FLAVOUR, notes)

    @classmethod
    def array_specs(cls, pipeline: AvePipeline) -> dict[str, ArraySpec]:
        if pipeline.audio == "psd":  # 160,000 samples, 512 / 353 -> 257 x 1004
            step = pipeline.n_fft - pipeline.noverlap
            audio = (pipeline.n_fft // 2 + 1, (pipeline.samples - pipeline.n_fft) // step + 1)
        else:
            audio = (pipeline.fbank_frames, pipeline.fbank_bins)
        return {
            "audio": ArraySpec(audio, "float16"),
            "visual": ArraySpec((FRAME_SLOTS, *STORED_FRAME_HW, 3), "uint8", frames=True, resized=True),
        }

    @classmethod
    def load_sample(cls, source: SampleSource, pipeline: AvePipeline) -> dict[str, np.ndarray]:
        start, end = (source.extra["start"], source.extra["end"]) if pipeline.segment else (0, CLIP_SECONDS)
        video = source.files["video"]
        return {"audio": audio_features(video, start, end, pipeline), "visual": event_frames(video, start, end)}

    # ---- training -----------------------------------------------------------------------------

    def views(self, train: bool) -> dict[str, View]:
        p, pipe = self.params, self.pipeline(self.params.pipeline)
        return {"audio": SpectrogramView(train), "visual": FrameClip(train, p.frames or pipe.frames, p.frame_size)}


@dataclass(frozen=True)
class EventRow:
    """One line of a split file: an event of `category` in seconds [start, end) of `video`."""

    category: str
    video: str
    start: int
    end: int
    where: str  # file and line, for error messages


def _source(row: EventRow, sid: str, classes: list[str], video_dir: Path) -> SampleSource:
    if row.category not in classes:
        raise DataError(f"ave: {row.where}: class {row.category!r} does not occur in testSet.txt, "
                        f"which defines the class index ({len(classes)} classes)")
    return SampleSource(sid, classes.index(row.category), {"video": video_dir / f"{row.video}.mp4"},
                        {"start": row.start, "end": row.end})


def _split_rows(raw: Path, split: str, notes: list[str]) -> list[EventRow]:
    """The rows of RAW/<split file>, or of the vendored copy of the published list if it is absent."""
    path = raw / SPLIT_FILES[split]
    if not path.is_file():
        entry = load_manifest("ave").flavour(FLAVOUR).lists.get(split)
        if entry is None:
            raise DataError(f"ave: split file {str(path)!r} does not exist (the official download has it)")
        notes.append(f"{SPLIT_FILES[split]} is not in {str(raw)!r}: used the vendored published list {entry['file']}")
        path = MANIFEST_DIR / entry["file"]
    return read_split_file(path)


def read_split_file(path: Path) -> list[EventRow]:
    """Rows `Category&VideoID&Quality&StartTime&EndTime`; a header line and blank lines are skipped."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = line.strip()
        if not line or line.lower().startswith("category&"):
            continue
        fields = line.split("&")
        where = f"{str(path)!r} line {n}"
        if len(fields) != 5 or not fields[1]:
            raise DataError(f"ave: {where}: {line!r} is not `Category&VideoID&Quality&StartTime&EndTime`")
        try:
            start, end = int(fields[3]), int(fields[4])
        except ValueError:
            raise DataError(f"ave: {where}: start and end seconds must be integers, "
                            f"got {fields[3]!r} and {fields[4]!r}") from None
        if not (0 <= start <= CLIP_SECONDS and 0 <= end <= CLIP_SECONDS):
            raise DataError(f"ave: {where}: event [{start}, {end}) is not inside the {CLIP_SECONDS}-s clip "
                            f"(need 0 <= start, end <= {CLIP_SECONDS})")
        rows.append(EventRow(fields[0].strip(), fields[1].strip(), start, end, where))
    return rows


def _nonempty(rows: list[EventRow], name: str, notes: list[str]) -> list[EventRow]:
    """The rows whose event lasts at least a second. The official trainSet.txt has one row with
    an empty event (VWi2ENBuTbw, 0 to 0 s); DI-MML's copy of the list leaves it out."""
    empty = [r.video for r in rows if r.end <= r.start]
    if empty:
        notes.append(f"{name}: left out {len(empty)} row(s) whose event is empty (end <= start): "
                     f"{', '.join(empty[:5])}")
    return [r for r in rows if r.end > r.start]


def _first_per_video(rows: list[EventRow], name: str, notes: list[str]) -> list[EventRow]:
    """The first row of every video (a video with two events is one sample, as in DI-MML)."""
    kept: dict[str, EventRow] = {}
    for r in rows:
        kept.setdefault(r.video, r)
    dropped = len(rows) - len(kept)
    if dropped:
        notes.append(f"{name}: {dropped} row(s) name a video already listed (videos with two events); "
                     f"kept the first row of each, as DI-MML does ({len(kept)} of {len(rows)} rows)")
    return list(kept.values())


def _sample_ids(kept: dict[str, list[EventRow]], notes: list[str]) -> dict[tuple[str, str], str]:
    """(split, video) -> sample id: the bare video id, except for a video that an earlier split of
    (test, val, train) already holds, which becomes `<video>@<split>`."""
    ids: dict[tuple[str, str], str] = {}
    owner: dict[str, str] = {}
    for split in ("test", "val", "train"):
        for r in kept[split]:
            first = owner.setdefault(r.video, split)
            ids[split, r.video] = r.video if first == split else f"{r.video}@{split}"
    shared = sorted(sid for sid in ids.values() if "@" in sid)
    if shared:
        notes.append(f"{len(shared)} video(s) in two split lists under different events (e.g. {shared[0]}); "
                     f"each list keeps its own sample, the later one named <video>@<split>")
    return ids


def audio_features(video: Path, start: int, end: int, pipeline: AvePipeline) -> np.ndarray:
    """The spectrogram of the video's audio between `start` and `end` seconds (float16)."""
    sr = pipeline.sample_rate
    wave = torch.from_numpy(decode_video_audio(video, sr))
    segment = wave[start * sr : end * sr]
    if segment.numel() == 0:
        raise DataError(f"the audio of {str(video)!r} ({wave.numel() / sr:.2f} s) has no samples in [{start}, {end}) s")
    if pipeline.audio == "fbank":
        spec = fe.kaldi_fbank(segment, sr, pipeline.fbank_bins, pipeline.fbank_frames,
                              norm=(fe.KS_FBANK_MEAN, fe.KS_FBANK_STD))
    else:
        tiled = fe.clip_unit(fe.tile_to(segment, pipeline.samples))
        spec = fe.scipy_spectrogram_log(tiled, sr, pipeline.n_fft, pipeline.noverlap, zscore=True)
    return spec.numpy().astype(np.float16)


def event_frames(video: Path, start: int, end: int) -> SizedFrames:
    """The video's 1-fps frames at seconds start <= t < end, stored at STORED_FRAME_HW, with their size."""
    return sized_clip_frames(video, FRAME_SLOTS, STORED_FRAME_HW, start_s=start, end_s=end)
