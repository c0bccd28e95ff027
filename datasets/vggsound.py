"""VGGSound: 10-s YouTube clips of 309 sound classes, as OGM-GE uses them.

Raw download: the official list, which ships with the dataset and is also its split, plus the
clips::

    RAW/vggsound.csv                          rows `youtube_id,start_seconds,label,split`, no
                                              header; split is train or test; labels holding
                                              a comma are quoted ("male speech, man speaking")
    RAW/video/<youtube_id>_<start:06d>.mp4    one 10-s clip per row

Classes are the sorted distinct labels of the csv's rows, whichever files are present, so a
label index never depends on what could be downloaded. OGM-GE numbers classes in the order they
first appear among the clips it found, so its indices differ from ours. VGGSound has no
validation split: 10% of the listed train clips are carved per class with seed 0. That carving
is ours, not the papers'.

Pipeline `ogmge` (OGM-GE `dataset/VGGSoundDataset.py` and `pre-processing/VGG&KS`): audio at
16 kHz (FFmpeg resamples the track, as `mp4_to_wav.py` does), tiled to at least 10 s, clipped to
[-1, 1], log(|STFT| + 1e-7) with n_fft 256 / hop 128. The cache holds the whole 10 s (129 x
1251), and a 5-s window of 626 frames is taken when a sample is loaded: a random one in training,
the centred one at test (`audio_crop_at_test`). Visual: 1-fps frames (the first of each second),
up to 10 stored, 3 used per clip. Clips with 3 frames or fewer are not prepared, because OGM-GE
keeps only clips with more than 3. Each is reported as corrupt, with its frame count as the
reason, in the prepare report and in the cache's `skipped` list; it is never dropped silently.
With `--on-error fail` such clips stop the prepare like any other bad file.

Deliberate differences from the released code:
- the 5-s crop is drawn at test time too in the released loader; here test crops are centred
  unless `audio_crop_at_test: random` restores that behaviour;
- the crop is taken from the cached 10-s spectrogram, so it starts on a 128-sample hop (8 ms)
  rather than on any sample, and its first and last frames see the neighbouring audio instead of
  librosa's padding at the ends of a separately cut 5-s waveform;
- frames are sampled as the paper describes (a random frame of each of 3 equal segments in
  training, the segment centres at test), not the first files of an unsorted directory listing;
- frames are stored at 341 x 256 with the size they were decoded at: training crops are drawn
  on that original size as torchvision's RandomResizedCrop(224) draws them and cut from the
  stored frame at the same place in the picture, test frames are the whole frame resized to
  224 x 224; what remains is interpolation and the 4:3 storage of other aspects, as for
  Kinetics-Sounds (datasets/kinetics_sounds.py).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from mmbalance.core.errors import DataError
from mmbalance.core.registry import DATASETS
from mmbalance.datasets import audio as fe
from mmbalance.datasets.cache import ArraySpec
from mmbalance.datasets.kinetics_sounds import FRAME_SIZE, FRAME_SLOTS
from mmbalance.datasets.media import STORED_FRAME_HW, decode_video_audio, sized_clip_frames
from mmbalance.datasets.prepared import AudioVisualDataset, CachedParams, Pipeline, Plan, SampleSource, View
from mmbalance.datasets.splits import carve_val, load_manifest
from mmbalance.datasets.transforms import FrameClip, SpectrogramView

CSV_NAME = "vggsound.csv"
SPLITS = ("train", "test")


class VggSoundPipeline(Pipeline):
    sample_rate: int = 16000
    samples: int = 160000  # 10 s after tiling: what the cache holds
    n_fft: int = 256
    hop: int = 128
    crop_frames: int = 626  # the 5-s window (80,000 samples) drawn at load time
    frames: int = 3  # frames per clip at training time
    min_frames: int = 4  # OGM-GE keeps clips with more than 3 frames


PIPELINES = {
    "ogmge": VggSoundPipeline(
        description="OGM-GE: STFT 256/128 of 10 s (129x1251) cropped to 5 s (129x626) at load, 3 of 10 1-fps frames",
        flavour="ogmge"),
}


class VggSoundParams(CachedParams):
    pipeline: Literal["ogmge"] | None = None
    frames: int | None = Field(None, ge=1)  # default: the pipeline's
    frame_size: int = Field(FRAME_SIZE, ge=8)
    # where the 5-s audio window sits at val/test time; the released code draws it at random
    audio_crop_at_test: Literal["center", "random"] = "center"


@DATASETS.register("vggsound")
class VggSound(AudioVisualDataset):
    Params = VggSoundParams
    PIPELINES: ClassVar = PIPELINES
    DEFAULT_PIPELINE: ClassVar = "ogmge"

    # ---- prepare ------------------------------------------------------------------------------

    @classmethod
    def plan(cls, raw: Path, pipeline: VggSoundPipeline) -> Plan:
        path, videos = raw / CSV_NAME, raw / "video"
        if not path.is_file():
            raise DataError(f"vggsound: {str(path)!r} does not exist; --raw must be the folder holding the "
                            f"official vggsound.csv and video/")
        if not videos.is_dir():
            raise DataError(f"vggsound: {str(videos)!r} does not exist; the clips are read from "
                            f"video/<youtube_id>_<start:06d>.mp4 under --raw")
        notes: list[str] = []
        rows = read_csv(path, notes)
        classes = sorted({label for label, _ in rows.values()})
        index = {c: i for i, c in enumerate(classes)}
        notes.append(f"{len(classes)} classes: the sorted distinct labels of {CSV_NAME}")
        lists = {s: [i for i, (_, split) in rows.items() if split == s] for s in SPLITS}
        flavour = load_manifest("vggsound").flavour(pipeline.flavour)
        train, val = carve_val(lists["train"], [index[rows[i][0]] for i in lists["train"]], flavour.val)
        samples = [SampleSource(i, index[rows[i][0]], {"video": videos / f"{i}.mp4"})
                   for i in train + val + lists["test"]]
        return Plan(classes, samples, {"train": train, "val": val, "test": lists["test"]}, pipeline.flavour, notes)

    @classmethod
    def array_specs(cls, pipeline: VggSoundPipeline) -> dict[str, ArraySpec]:
        audio = (pipeline.n_fft // 2 + 1, 1 + pipeline.samples // pipeline.hop)
        return {
            "audio": ArraySpec(audio, "float16"),
            "visual": ArraySpec((FRAME_SLOTS, *STORED_FRAME_HW, 3), "uint8", frames=True, resized=True),
        }

    @classmethod
    def load_sample(cls, source: SampleSource, pipeline: VggSoundPipeline) -> dict[str, np.ndarray]:
        video = source.files["video"]
        frames = sized_clip_frames(video, FRAME_SLOTS, STORED_FRAME_HW)  # first: an ineligible clip costs no audio
        if len(frames.frames) < pipeline.min_frames:
            raise DataError(
                f"{str(video)!r} has {len(frames.frames)} frame(s) at 1 fps; OGM-GE keeps only clips with more "
                f"than {pipeline.min_frames - 1} (ineligible, left out)"
            )
        return {"audio": spectrogram(video, pipeline), "visual": frames}

    # ---- training -----------------------------------------------------------------------------

    def views(self, train: bool) -> dict[str, View]:
        p, pipe = self.params, self.pipeline(self.params.pipeline)
        # SpectrogramView crops at random when told `train`; that flag does nothing else there
        random_crop = train or p.audio_crop_at_test == "random"
        return {
            "audio": SpectrogramView(random_crop, crop=pipe.crop_frames),
            "visual": FrameClip(train, p.frames or pipe.frames, p.frame_size),
        }


def read_csv(path: Path, notes: list[str]) -> dict[str, tuple[str, str]]:
    """Clip id (`<youtube_id>_<start:06d>`) -> (label, split) for each row of vggsound.csv, in
    file order; a repeated clip keeps its first row (noted)."""
    rows: dict[str, tuple[str, str]] = {}
    repeated = 0
    with open(path, newline="", encoding="utf-8-sig") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or row[0].startswith("#"):
                continue
            fields = [x.strip() for x in row]
            if len(fields) != 4 or not fields[1].isdigit() or not fields[2] or fields[3] not in SPLITS:
                raise DataError(f"{str(path)!r} line {n}: {','.join(row)!r} is not "
                                f"`youtube_id,start_seconds,label,split` with split train or test")
            clip = f"{fields[0]}_{int(fields[1]):06d}"
            if clip in rows:
                repeated += 1
                continue
            rows[clip] = (fields[2], fields[3])
    if repeated:
        notes.append(f"{CSV_NAME}: {repeated} repeated clips dropped (the first row of each is kept)")
    return rows


def spectrogram(video: Path, pipeline: VggSoundPipeline) -> np.ndarray:
    """(n_fft/2 + 1, 1 + samples/hop) float16: log |STFT| of the clip's audio tiled to 10 s."""
    x = torch.from_numpy(decode_video_audio(video, pipeline.sample_rate))
    x = fe.clip_unit(fe.tile_to(x, pipeline.samples))
    return fe.stft_log(x, pipeline.n_fft, pipeline.hop).numpy().astype(np.float16)
