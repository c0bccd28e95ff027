"""CREMA-D: 7,442 audio-visual clips of 91 actors speaking with one of 6 emotions.

Raw download as the dataset repository ships it (CheyneyComputerScience/CREMA-D)::

    RAW/AudioWAV/1001_DFA_ANG_XX.wav ...       16 kHz mono
    RAW/VideoFlash/1001_DFA_ANG_XX.flv ...     ~30 fps; frames are decoded from here at 1 fps,
    RAW/Image-01-FPS/1001_DFA_ANG_XX/*.jpg     unless OGM-GE's extracted frames are present (used
                                               in name order, so the frame choice never depends
                                               on the file system's listing order)

Splits: the OGM-GE split (6,698 train / 744 test, shared by DI-MML and PMR) or MLA's own random
draw of the same sizes. If the reference repo's split files are in RAW (`train.csv`/`test.csv`
rows `name,EMO`; `my_train_cre.txt`/`my_test_cre.txt` rows `name.flv Label`) they are used;
otherwise the vendored test list (datasets/manifests/lists) is the test split and every other
clip of AudioWAV is train. Neither split has a validation set: 744 clips (the size of
Diagnosing & Relearning's validation set) are carved from train per class with seed 0.

Pipelines:
  ogmge  OGM-GE / MIE: 22,050 Hz, tiled to 3 s, STFT 512/353, log -> 257x188; 1 frame
  mla    MLA: Kaldi fbank 128 x 1024 frames, no normalisation; 3 frames; MLA's split and labels
  dimml  DI-MML: 22,050 Hz tiled to 160,000 samples, scipy-style PSD spectrogram 512/353, log,
         z-scored per clip -> 257x1004; 3 frames; N(0, 0.1^2) pixel noise (set
         frame_noise_at_test to reproduce the released code, which adds it at test too)
Frames are sampled as the papers describe them: a random frame of each of T equal segments in
training and the segment centres at test (the released loaders' listdir-order bug is not kept).

Frame geometry: frames are stored at 341 x 256 (the 480 x 360 frames with their aspect kept),
with the size they were extracted at. A training crop is drawn as torchvision's
RandomResizedCrop(224) draws it on that 480 x 360 frame (scale 0.08-1, ratio 3/4-4/3) and cut
from the stored frame at the same place in the picture, then flipped and normalised as the
reference does; a test frame is the whole frame resized to 224 x 224, as the reference's
Resize((224, 224)). What remains different is interpolation: the reference resizes once, from
the original jpg (PIL bilinear, antialiased); here the frame was resized once to 341 x 256 at
prepare time and the crop is resized again from there (torch's antialiased bilinear on uint8
over whole stored pixels, or roi_align with `train.augment: device`). On 480 x 360 test images
the pixels are within 0.3 (smooth) to 2.4 (grainy) intensity levels of the reference's on
average for training crops, 0.2-0.7 for test frames (tests/test_batch_views.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from mmbalance.core.errors import DataError
from mmbalance.core.registry import DATASETS
from mmbalance.datasets import audio as fe
from mmbalance.datasets.cache import ArraySpec
from mmbalance.datasets.media import STORED_FRAME_HW, read_audio, sized_clip_frames
from mmbalance.datasets.prepared import AudioVisualDataset, CachedParams, Pipeline, Plan, SampleSource, View
from mmbalance.datasets.splits import carve_val, load_manifest, read_pinned_list
from mmbalance.datasets.transforms import FrameClip, SpectrogramView

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")  # OGM-GE / DI-MML label order
MLA_NAMES = {"ANG": "Anger", "DIS": "Disgust", "FEA": "Fear", "HAP": "Happy", "NEU": "Neutral", "SAD": "Sad"}
MLA_ORDER = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")  # MLA: alphabetical by name
CLIP = re.compile(r"^\d{4}_[A-Z]{3}_(?P<emo>[A-Z]{3})_[A-Z]{2}$")
FRAME_SLOTS = 6  # 1 fps of clips up to 5.x s
FRAME_SIZE = 224  # the crop (and test resize) the encoder sees


class CremadPipeline(Pipeline):
    audio: Literal["stft", "fbank", "psd"]
    sample_rate: int = 22050
    samples: int = 66150  # after tiling
    n_fft: int = 512
    hop: int = 353  # STFT hop
    noverlap: int = 353  # PSD segments overlap (hop 159)
    zscore: bool = False
    frames: int = 1  # frames per clip at training time
    frame_noise_std: float = 0.0


PIPELINES = {
    "ogmge": CremadPipeline(description="OGM-GE: STFT 257x188, 1 frame", flavour="ogmge", audio="stft"),
    "mla": CremadPipeline(description="MLA: fbank 1024x128, 3 frames, MLA split", flavour="mla",
                          audio="fbank", sample_rate=16000, samples=0, frames=3),
    "dimml": CremadPipeline(description="DI-MML: PSD 257x1004 z-scored, 3 frames, frame noise 0.1", flavour="ogmge",
                            audio="psd", samples=160000, zscore=True, frames=3, frame_noise_std=0.1),
}


class CremadParams(CachedParams):
    pipeline: Literal["ogmge", "mla", "dimml"] | None = None
    frames: int | None = Field(None, ge=1)  # default: the pipeline's
    frame_size: int = Field(FRAME_SIZE, ge=8)
    frame_noise_std: float | None = Field(None, ge=0)  # default: the pipeline's
    frame_noise_at_test: bool = False


@DATASETS.register("cremad")
class CremaD(AudioVisualDataset):
    Params = CremadParams
    PIPELINES: ClassVar = PIPELINES
    DEFAULT_PIPELINE: ClassVar = "ogmge"

    # ---- prepare ------------------------------------------------------------------------------

    @classmethod
    def plan(cls, raw: Path, pipeline: CremadPipeline) -> Plan:
        wav_dir = raw / "AudioWAV"
        if not wav_dir.is_dir():
            raise DataError(f"cremad: {str(wav_dir)!r} does not exist; --raw must be the CREMA-D folder holding "
                            "AudioWAV/")
        order = MLA_ORDER if pipeline.flavour == "mla" else EMOTIONS
        classes = [MLA_NAMES[e] for e in order] if pipeline.flavour == "mla" else list(EMOTIONS)
        flavour = load_manifest("cremad").flavour(pipeline.flavour)
        train, test = _split_lists(raw, pipeline.flavour, sorted(p.stem for p in wav_dir.glob("*.wav")))
        labels = {c: order.index(_emotion(c)) for c in train + test}
        train, val = carve_val(train, [labels[c] for c in train], flavour.val)
        frames_dir = raw / "Image-01-FPS"
        samples = [
            SampleSource(c, labels[c], {
                "audio": wav_dir / f"{c}.wav",
                "visual": frames_dir / c if frames_dir.is_dir() else raw / "VideoFlash" / f"{c}.flv",
            })
            for c in train + val + test
        ]
        return Plan(classes, samples, {"train": train, "val": val, "test": test}, pipeline.flavour)

    @classmethod
    def array_specs(cls, pipeline: CremadPipeline) -> dict[str, ArraySpec]:
        audio = {"stft": (257, 188), "fbank": (1024, 128), "psd": (257, 1004)}[pipeline.audio]
        return {
            "audio": ArraySpec(audio, "float16"),
            "visual": ArraySpec((FRAME_SLOTS, *STORED_FRAME_HW, 3), "uint8", frames=True, resized=True),
        }

    @classmethod
    def load_sample(cls, source: SampleSource, pipeline: CremadPipeline) -> dict[str, np.ndarray]:
        return {"audio": audio_features(source.files["audio"], pipeline),
                "visual": sized_clip_frames(source.files["visual"], FRAME_SLOTS, STORED_FRAME_HW, "spaced")}

    # ---- training -----------------------------------------------------------------------------

    def views(self, train: bool) -> dict[str, View]:
        p, pipe = self.params, self.pipeline(self.params.pipeline)
        noise = pipe.frame_noise_std if p.frame_noise_std is None else p.frame_noise_std
        return {
            "audio": SpectrogramView(train),
            "visual": FrameClip(train, p.frames or pipe.frames, p.frame_size,
                                noise_std=noise, noise_at_test=p.frame_noise_at_test),
        }


def _emotion(clip: str) -> str:
    m = CLIP.match(clip)
    if m is None or m["emo"] not in EMOTIONS:
        raise DataError(f"cremad: {clip!r} is not a CREMA-D clip name (ACTOR_SENTENCE_EMOTION_LEVEL)")
    return m["emo"]


def _split_lists(raw: Path, flavour: str, all_clips: list[str]) -> tuple[list[str], list[str]]:
    """(train, test) clip names: the reference repo's split files if present in RAW, else the
    vendored test list with every other clip as train."""
    files = {"ogmge": ("train.csv", "test.csv"), "mla": ("my_train_cre.txt", "my_test_cre.txt")}[flavour]
    paths = [raw / f for f in files]
    if all(p.is_file() for p in paths):
        return _read_split_file(paths[0]), _read_split_file(paths[1])
    test = read_pinned_list(load_manifest("cremad").flavour(flavour), "test")
    if test is None:
        raise DataError(f"cremad: the {flavour} split needs {files[0]} and {files[1]} in {str(raw)!r}")
    held = set(test)
    return [c for c in all_clips if c not in held], test


def _read_split_file(path: Path) -> list[str]:
    """Clip names from an OGM-GE csv (`name,EMO`) or MLA txt (`name.flv Label`) split file."""
    names = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = line.strip()
        if not line or line.lower().startswith("name,"):
            continue
        name = re.split(r"[,\s]", line)[0].removesuffix(".flv")
        if not CLIP.match(name):
            raise DataError(f"{str(path)!r} line {n}: {line!r} does not start with a CREMA-D clip name")
        names.append(name)
    return names


def audio_features(path: Path, pipeline: CremadPipeline) -> np.ndarray:
    wave, sr = read_audio(path)
    x = fe.resample(torch.from_numpy(wave), sr, pipeline.sample_rate)
    if pipeline.audio == "fbank":
        return fe.kaldi_fbank(x, pipeline.sample_rate).numpy().astype(np.float16)
    x = fe.clip_unit(fe.tile_to(x, pipeline.samples))
    if pipeline.audio == "stft":
        spec = fe.stft_log(x, pipeline.n_fft, pipeline.hop)
    else:
        spec = fe.scipy_spectrogram_log(x, pipeline.sample_rate, pipeline.n_fft, pipeline.noverlap,
                                        zscore=pipeline.zscore)
    return spec.numpy().astype(np.float16)
