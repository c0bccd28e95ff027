"""The `manifest` dataset's pipeline options: how your files become cached arrays and inputs.

`mmbalance prepare manifest` starts from a preset (`--pipeline default|small`), then applies a
YAML file of options (`--pipeline-file opts.yaml`), then `--set key=value` overrides (dotted
keys, YAML values), in that order. Every option, with the `default` preset's value::

    audio:
      sample_rate: 16000     # Hz every clip is resampled to
      seconds: null          # clip length the model sees; null: the whole clip, then audio.frames
      crop: start            # a longer clip: keep its start | center | a random window at
                             # training (random-at-train; the centre window at test)
      max_seconds: 10.0      # random-at-train: the cache keeps up to this much of each clip
      pad: silence           # a shorter clip: append silence | repeat it (tiled end to end)
      feature: fbank         # fbank (Kaldi, as MLA/AST) | logmel (log mel power; FFT zero-padded
                             # until each mel filter covers a bin) | stft (log |STFT|)
      bins: 128              # mel filters (fbank, logmel); frequency bins (stft: FFT 2 * (bins - 1))
      frames: 1024           # frames per clip when seconds is null (cropped or zero-padded);
                             # null with seconds set (the frames those seconds give)
      window_ms: 25.0        # frame length
      hop_ms: 10.0           # frame step
    image:
      size: 224              # images and video frames are stored size x size (aspect not kept)
    video:
      slots: 10              # 1-fps frames kept per video (evenly spaced beyond that)
      frames: 3              # frames per video given to the model (segment sampling)
    augment: [crop]          # at training: crop (random resized crop), flip (horizontal flip);
                             # flip is off by default: orientation may carry the class
    normalize: true          # audio and npy columns z-scored with the train split's mean/std

The `small` preset differs in audio.bins 64, audio.frames 128 and image.size 64 (quick CPU
runs). Setting audio.seconds without audio.frames makes audio.frames follow it (null); setting
both is refused. Features are (frames, bins), frames cut as Kaldi cuts them: a clip of n samples
gives 1 + (n - window) // hop frames (datasets/audio.py, frame_count). Without audio.seconds a
clip's features are cropped to audio.frames or padded with zero-valued frames (MLA's fbank
padding); crop and pad act only with audio.seconds, on the waveform.

The cache records every option (meta.json `pipeline_params`), and a run reads them from there:
its config need not repeat them. A run may still change the options that act at load time
(RUN_OPTIONS: video.frames, augment, normalize); any other option a run config gives
(`dataset.options`) must equal the cache's, or the run is refused, naming both values.

Normalisation: prepare stores each audio and npy column's mean and std over the train split (in
meta.json `stats`; over real frames only where a cache keeps frame counts), and the views map
x to (x - mean) / std, as AST normalises its fbank by dataset statistics (AST divides by 2 std;
this is the plain z-score; a constant column, std 0, is only centred). Images keep their
ImageNet normalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmbalance.core.errors import ConfigError, DataError
from mmbalance.core.overrides import Sources, apply_overrides, deep_merge, flat, format_errors, read_yaml
from mmbalance.datasets import audio as fe
from mmbalance.datasets.prepared import Pipeline

RUN_OPTIONS = ("video.frames", "augment", "normalize")  # act at load time: a run may change them
AUGMENTATIONS = ("crop", "flip")


class Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AudioOptions(Options):
    sample_rate: int = Field(16000, ge=1000, le=384000, description="Hz every clip is resampled to")
    seconds: float | None = Field(None, gt=0, le=300, description="clip length the model sees; null: the whole clip "
                                                          "cropped or padded to `frames` frames")
    crop: Literal["start", "center", "random-at-train"] = Field(
        "start", description="a clip longer than `seconds`: keep its start, its centre, or a random window "
                             "at training (centre window at test) out of up to `max_seconds` kept")
    # at most 300 s: the cache counts a clip's frames in int16
    max_seconds: float = Field(10.0, gt=0, le=300, description="random-at-train: seconds of each clip the cache keeps")
    pad: Literal["silence", "repeat"] = Field("silence", description="a clip shorter than `seconds`: "
                                                                      "append silence, or repeat it")
    feature: Literal["fbank", "logmel", "stft"] = Field(
        "fbank", description="fbank: Kaldi log-mel filterbank (MLA, AST); logmel: log mel power spectrum; "
                             "stft: log magnitude STFT")
    bins: int = Field(128, ge=4, le=2048, description="mel filters (fbank, logmel); frequency bins (stft)")
    frames: int | None = Field(1024, ge=1, le=30000, description="frames per clip when `seconds` is null (cropped or "
                                                       "zero-padded at the end); null when `seconds` is set")
    window_ms: float = Field(25.0, gt=0, description="frame length in milliseconds")
    hop_ms: float = Field(10.0, gt=0, description="frame step in milliseconds")

    @model_validator(mode="after")
    def _consistent(self) -> AudioOptions:
        window, hop = self.window, self.hop
        if hop < 1 or window < 2:
            raise ValueError(f"window_ms={self.window_ms:g} and hop_ms={self.hop_ms:g} give {window} and {hop} "
                             f"samples at {self.sample_rate} Hz; each needs at least 2 and 1")
        if (self.seconds is None) == (self.frames is None):
            raise ValueError("set exactly one of seconds and frames (seconds: the frames follow from it; "
                             f"got seconds={self.seconds}, frames={self.frames})")
        if self.seconds is None and self.crop != "start":
            raise ValueError(f"crop={self.crop!r} cuts a clip to `seconds`, which is null; set seconds")
        if self.seconds is not None and self.window_frames < 1:
            raise ValueError(f"seconds={self.seconds:g} is shorter than one {self.window_ms:g} ms frame")
        if self.crop == "random-at-train" and self.max_seconds < self.seconds:
            raise ValueError(f"max_seconds={self.max_seconds:g} must be at least seconds={self.seconds:g}")
        if self.feature == "stft" and 2 * (self.bins - 1) < window:
            raise ValueError(f"stft with bins={self.bins} is an FFT of {2 * (self.bins - 1)} points, shorter than "
                             f"the {window}-sample window; use bins >= {window // 2 + 1} or a shorter window_ms")
        if self.feature == "fbank" and self.bins > fe.fft_size(window) // 2:
            raise ValueError(f"fbank with bins={self.bins}: a {window}-sample window has only "
                             f"{fe.fft_size(window) // 2} FFT bins to share; use fewer bins or a longer window_ms")
        if self.feature == "logmel" and fe.empty_mel_filters(
                self.sample_rate, self.bins, fe.mel_fft_size(self.sample_rate, self.bins, window)):
            n_fft = fe.MAX_FFT_PADDING * fe.fft_size(window)
            raise ValueError(f"logmel with bins={self.bins}: some mel filters stay empty even with a {n_fft}-point "
                             f"FFT of the {window}-sample window; use fewer bins or a longer window_ms")
        return self

    @property
    def window(self) -> int:
        return fe.window_samples(self.sample_rate, self.window_ms)

    @property
    def hop(self) -> int:
        return fe.window_samples(self.sample_rate, self.hop_ms)

    @property
    def window_frames(self) -> int:
        """Frames the model sees per clip."""
        if self.seconds is None:
            return self.frames
        return fe.frame_count(round(self.seconds * self.sample_rate), self.window, self.hop)

    @property
    def stored_frames(self) -> int:
        """Frames the cache keeps per clip (more than the model sees with random-at-train)."""
        if self.crop != "random-at-train":
            return self.window_frames
        return fe.frame_count(round(self.max_seconds * self.sample_rate), self.window, self.hop)


class ImageOptions(Options):
    size: int = Field(224, ge=8, le=2048, description="side of the stored square images and video frames")


class VideoOptions(Options):
    slots: int = Field(10, ge=1, le=1000, description="1-fps frames kept per video (evenly spaced beyond that)")
    frames: int = Field(3, ge=1, description="frames per video given to the model (segment sampling)")


class PipelineOptions(Options):
    audio: AudioOptions = AudioOptions()
    image: ImageOptions = ImageOptions()
    video: VideoOptions = VideoOptions()
    augment: tuple[Literal["crop", "flip"], ...] = Field(
        ("crop",), description="image and video augmentations at training: crop (random resized crop), flip "
                               "(horizontal flip; off by default, orientation may carry the class)")
    normalize: bool = Field(True, description="z-score audio and npy columns with the train split's mean and std")

    @model_validator(mode="after")
    def _unique(self) -> PipelineOptions:
        if len(set(self.augment)) != len(self.augment):
            raise ValueError(f"augment={list(self.augment)} names an augmentation twice")
        return self


class ManifestPipeline(Pipeline):
    options: PipelineOptions = PipelineOptions()


PIPELINES = {
    "default": ManifestPipeline(description="fbank 128x1024 at 16 kHz; frames 224x224, 3 per video", flavour="own"),
    "small": ManifestPipeline(
        description="fbank 64x128 at 16 kHz; frames 64x64, 3 per video (quick CPU runs)", flavour="own",
        options=PipelineOptions(audio=AudioOptions(bins=64, frames=128), image=ImageOptions(size=64))),
}


# ---- prepare: a preset, a YAML file and --set overrides -----------------------------------------


def configure(preset: str, pipeline_file: str | Path | None = None, overrides: Sequence[str] = ()) -> ManifestPipeline:
    """The preset's options with the file's over them and the overrides over those, validated;
    every error names the key, where its value came from and what is allowed."""
    base = PIPELINES[preset]
    given: dict[str, Any] = {}
    sources = Sources()
    if pipeline_file is not None:
        from_file = read_yaml(Path(pipeline_file), "pipeline file")
        sources.record(from_file, f"file {str(pipeline_file)!r}")
        deep_merge(given, from_file)
    apply_overrides(given, sources, overrides, "--set")
    audio = given.get("audio")
    if isinstance(audio, Mapping) and audio.get("seconds") is not None and "frames" not in audio:
        audio["frames"] = None  # the frames follow the seconds rather than the preset's count
    data = base.options.model_dump(mode="json")
    deep_merge(data, given)
    try:
        options = PipelineOptions.model_validate(data)
    except ValidationError as e:
        what = f"pipeline options (preset {preset!r})"
        raise ConfigError(format_errors(e, PipelineOptions, sources, what=what)) from None
    return base.model_copy(update={"options": options})


# ---- a run: the cache's options, checked against the config's -----------------------------------


def recorded_pipeline(meta_params: Mapping[str, Any], root: Path) -> ManifestPipeline:
    """The pipeline a cache was prepared with, from its meta.json."""
    try:
        return ManifestPipeline.model_validate(meta_params)
    except ValidationError:
        raise DataError(f"cache {str(root)!r} records no pipeline options this version reads (it was prepared "
                        f"by an earlier mmbalance); prepare it again") from None


def settle(recorded: PipelineOptions, given: Mapping[str, Any], root: Path,
           origin_of: Callable[[str], str] = lambda key: "the dataset params") -> PipelineOptions:
    """The options a run uses: the cache's, with the run's RUN_OPTIONS from `given` (the config's
    `dataset.options`) over them. Any other option `given` names must equal the cache's."""
    data = recorded.model_dump(mode="json")
    deep_merge(data, given)  # copies what it merges
    sources = Sources()
    for key, value in flat(given).items():
        sources.record({f"dataset.options.{key}": value}, origin_of(f"dataset.options.{key}"))
    try:
        merged = PipelineOptions.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, PipelineOptions, sources, prefix="dataset.options")) from None
    have, want = flat(recorded.model_dump(mode="json")), flat(merged.model_dump(mode="json"))
    differ = [k for k in flat(given) if k in have and k not in RUN_OPTIONS and want[k] != have[k]]
    if differ:
        raise ConfigError("; ".join(
            f"dataset.options.{k}={want[k]!r} (from {origin_of('dataset.options.' + k)}) differs from the cache's "
            f"{have[k]!r}" for k in differ
        ) + f": cache {str(root)!r} was prepared with those; a run can change only {', '.join(RUN_OPTIONS)}. "
            f"Leave the key out, or prepare again with --set {differ[0]}={_yaml(want[differ[0]])}")
    return merged


def _yaml(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# ---- decoding audio -----------------------------------------------------------------------------


def audio_features(wave: np.ndarray, sr: int, audio: AudioOptions) -> np.ndarray:
    """A mono clip at `sr` Hz -> (frames, bins) float16 as the options say: resampled, cut or
    padded to `seconds`, turned into the feature, its frames fitted to `frames`."""
    x = fe.resample(torch.from_numpy(wave), sr, audio.sample_rate)
    if audio.seconds is not None:
        x = fit_clip(x, audio)
    if audio.feature == "fbank":
        spec = fe.kaldi_fbank(x, audio.sample_rate, audio.bins, None, window_ms=audio.window_ms, hop_ms=audio.hop_ms)
    elif audio.feature == "logmel":
        spec = fe.log_mel(x, audio.sample_rate, audio.bins, audio.window, audio.hop)
    else:
        spec = fe.log_stft(x, audio.bins, audio.window, audio.hop)
    if audio.frames is not None:
        spec = fe.fit_frames(spec, audio.frames)
    return spec.numpy().astype(np.float16)


def fit_clip(x: torch.Tensor, audio: AudioOptions) -> torch.Tensor:
    """The waveform cut to `seconds` (start or centre; up to `max_seconds` from the start for
    random-at-train, whose window is drawn at load time) and padded to at least `seconds`."""
    n = round(audio.seconds * audio.sample_rate)
    keep = round(audio.max_seconds * audio.sample_rate) if audio.crop == "random-at-train" else n
    if len(x) > keep:
        start = (len(x) - keep) // 2 if audio.crop == "center" else 0
        x = x[start : start + keep]
    if len(x) < n:
        x = fe.tile_to(x, n) if audio.pad == "repeat" else torch.nn.functional.pad(x, (0, n - len(x)))
    return x
