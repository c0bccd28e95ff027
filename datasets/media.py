"""Decoding raw dataset files (wav, video containers, images) into numpy arrays.

Every failure to read a file becomes a DataError that names the file and what was wrong, so a
prepare step can report the bad file and carry on with the rest.
"""

from __future__ import annotations

import re
import struct
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
import soundfile
from PIL import Image, UnidentifiedImageError

from mmbalance.core.errors import ConfigError, DataError
from mmbalance.datasets.cache import SizedFrames

IMAGE_MODES = ("RGB", "L")
# (height, width) the audio-visual datasets store their frames at: shorter side 256 (above the
# 224 crops) at 4:3, the aspect of CREMA-D's 480 x 360 frames, which keep it (341.3 rounds to 341)
STORED_FRAME_HW = (256, 341)


def _missing(path: Path, what: str) -> DataError:
    return DataError(f"{what} {str(path)!r} does not exist")


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """(mono float32 samples in [-1, 1], sample rate) of an audio file soundfile can read.

    Channels are averaged, as librosa.load(mono=True) does in the reference repos. A wav cut
    short (an interrupted download) is an error: libsndfile would read what is there and return
    a shorter clip without complaint.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "audio file")
    try:
        data, sr = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError, OSError) as e:
        raise DataError(f"cannot read audio file {str(path)!r}: {e}") from e
    shortfall = _wav_shortfall(path)
    if shortfall:
        raise DataError(f"audio file {str(path)!r} is truncated: {shortfall}")
    if data.shape[0] == 0:
        raise DataError(f"audio file {str(path)!r} holds no samples")
    return data.mean(axis=1, dtype=np.float32), int(sr)


def _wav_shortfall(path: Path) -> str | None:
    """For a RIFF/WAVE file whose 'data' chunk declares more bytes than the file holds, what is
    missing; None otherwise (other formats, streamed wavs that declare no size)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk, n = struct.unpack("<4sI", f.read(8))
            if chunk == b"data":
                have = size - pos - 8
                if n in (0, 0xFFFFFFFF) or have >= n:
                    return None
                return f"its header declares {n} bytes of samples, the file holds {have}"
            pos += 8 + n + (n & 1)  # chunks are padded to an even size
    return None


def decode_video_audio(path: str | Path, sr: int) -> np.ndarray:
    """The audio track of a video file as mono float32 at `sr` Hz.

    FFmpeg's resampler (through PyAV) converts the rate; channels are then averaged by us, so a
    stereo track gives the same mono signal here as through read_audio. Where the container
    records the encoder delay (MP4 edit lists) FFmpeg drops the codec's priming samples; FLV
    records none, so AAC or MP3 audio from an FLV starts with about 1,000 samples of codec delay,
    as it does for every FFmpeg-based reader.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "video file")
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise DataError(f"video file {str(path)!r} has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp", rate=sr)  # planar float, layout kept
            for frame in container.decode(stream):
                chunks.extend(f.to_ndarray().mean(axis=0) for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray().mean(axis=0) for f in resampler.resample(None))  # flush
    except av.FFmpegError as e:
        raise DataError(f"cannot decode the audio of {str(path)!r}: {e}") from e
    if not chunks:
        raise DataError(f"the audio stream of {str(path)!r} decodes to no samples")
    return np.concatenate(chunks).astype(np.float32)


def decode_video_frames(path: str | Path, fps: float = 1.0, start_s: float | None = None,
                        end_s: float | None = None) -> list[np.ndarray]:
    """RGB frames (H x W x 3 uint8): the first decoded frame of every 1/fps-second interval.

    This is what OGM-GE's OpenCV extractor keeps at 1 fps (frames 0, 30, 60, ... of a 30-fps
    clip). Intervals are measured on the frames' timestamps from the stream start, where OpenCV
    counts int(video fps) frames; the two agree for constant integer frame rates, and timestamps
    do not drift on 29.97-fps video. `start_s`/`end_s` keep only frames with start_s <= t < end_s
    (an AVE event segment); DI-MML's extractor also keeps the frame at second `end` (it tests
    `<=`), so pass end_s=end + 1 to reproduce that.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "video file")
    step = 1 / Fraction(fps).limit_denominator(1_000_000)
    start = Fraction(start_s).limit_denominator(1_000_000) if start_s is not None else None
    end = Fraction(end_s).limit_denominator(1_000_000) if end_s is not None else None
    kept: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"video file {str(path)!r} has no video stream")
            stream = container.streams.video[0]
            for index, frame in enumerate(container.decode(stream)):
                t = _frame_time(frame, stream, index)
                if end is not None and t >= end:
                    break
                slot = int(t // step)
                if (start is None or t >= start) and slot not in kept:
                    kept[slot] = frame.to_ndarray(format="rgb24")
    except av.FFmpegError as e:
        raise DataError(f"cannot decode the frames of {str(path)!r}: {e}") from e
    if not kept:
        where = "" if start_s is None and end_s is None else f" in [{start_s}, {end_s}) s"
        raise DataError(f"video file {str(path)!r} has no decodable frame{where}")
    return [kept[k] for k in sorted(kept)]


def _frame_time(frame: av.VideoFrame, stream: av.video.stream.VideoStream, index: int) -> Fraction:
    """Seconds since the stream's first timestamp, plus half a timestamp tick: containers round
    times to their clock (FLV to 1 ms, so frame 1 of a 30-fps clip sits at 0.033 s), and the half
    tick puts a frame that was rounded down back into its interval. Without timestamps: the
    frame's position / the average rate."""
    if frame.pts is None or stream.time_base is None:
        return Fraction(index) / Fraction(stream.average_rate or 1)
    return (frame.pts - (stream.start_time or 0) + Fraction(1, 2)) * stream.time_base


def read_image(path: str | Path, mode: str = "RGB") -> np.ndarray:
    """An image file as uint8: H x W x 3 for mode 'RGB', H x W for 'L' (grey)."""
    if mode not in IMAGE_MODES:
        raise ConfigError(f"image mode {mode!r} is not supported; allowed: {', '.join(IMAGE_MODES)}")
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "image file")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image file {str(path)!r}: {e}") from e


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`img` (H x W or H x W x 3 uint8) resized to size=(h, w) with PIL's bilinear filter.

    That is torchvision's Resize((h, w)) on a PIL image, the reference repos' test transform
    (PIL antialiases when it shrinks). An image already of that size is returned as it is.
    """
    if img.shape[:2] == tuple(size):
        return img
    h, w = size
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR), dtype=np.uint8)


FRAME_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def natural_key(path: Path) -> list[str | int]:
    """Sort key that puts frame_2 before frame_10 (digit runs compare as numbers)."""
    # re.split with a group alternates text and digit runs, so equal positions compare equal types
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", path.name))]


def clip_frames(source: str | Path, slots: int, size: int, overflow: Literal["first", "spaced"] = "first",
                start_s: float | None = None, end_s: float | None = None) -> np.ndarray:
    """A clip's 1-fps frames (source_frames) as a (T <= slots, size, size, 3) uint8 stack,
    squashed to the square whatever their aspect."""
    return np.stack([resize_image(f, (size, size)) for f in source_frames(source, slots, overflow, start_s, end_s)])


def sized_clip_frames(source: str | Path, slots: int, stored: tuple[int, int],
                      overflow: Literal["first", "spaced"] = "first", start_s: float | None = None,
                      end_s: float | None = None) -> SizedFrames:
    """A clip's 1-fps frames resized to stored=(height, width), with the size they had, which the
    training crops are drawn on (datasets.batch_views). A clip whose frames differ in size is an
    error: one size is kept per clip."""
    frames = source_frames(source, slots, overflow, start_s, end_s)
    sizes = sorted({f.shape[:2] for f in frames})
    if len(sizes) > 1:
        raise DataError(f"the frames of {str(source)!r} differ in size ({', '.join(f'{w}x{h}' for h, w in sizes)}); "
                        f"a clip's frames must share one size")
    return SizedFrames(np.stack([resize_image(f, stored) for f in frames]), sizes[0])


def source_frames(source: str | Path, slots: int, overflow: Literal["first", "spaced"] = "first",
                  start_s: float | None = None, end_s: float | None = None) -> list[np.ndarray]:
    """A clip's 1-fps frames (H x W x 3 uint8, at their own size), at most `slots`.

    `source` is a folder of extracted frame images (read in natural name order, never in the file
    system's listing order) or a video, decoded at 1 fps within [start_s, end_s). A clip with more
    than `slots` frames keeps its first ones (`first`) or `slots` evenly spaced ones (`spaced`).
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted((p for p in source.iterdir() if p.suffix.lower() in FRAME_IMAGE_SUFFIXES), key=natural_key)
        if not paths:
            raise DataError(f"frame folder {str(source)!r} holds no jpg/png frames")
        return [read_image(p) for p in _keep(paths, slots, overflow)]
    return _keep(decode_video_frames(source, fps=1.0, start_s=start_s, end_s=end_s), slots, overflow)


def _keep(items: list, slots: int, overflow: Literal["first", "spaced"]) -> list:
    if len(items) <= slots:
        return items
    if overflow == "first":
        return items[:slots]
    return [items[i] for i in np.linspace(0, len(items) - 1, slots).round().astype(int)]
