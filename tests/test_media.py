"""Decoding real files written by the fixture writers: wav, mp4/flv/avi containers, images."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import soundfile

from mmbalance.core.errors import ConfigError, DataError
from mmbalance.datasets.media import (
    decode_video_audio,
    decode_video_frames,
    read_audio,
    read_image,
    resize_image,
    sized_clip_frames,
)
from tests.fixtures.media import (
    frames_with_marks,
    read_mark,
    tone,
    write_jpg,
    write_png,
    write_video,
    write_wav,
)

FPS = 30
N_FRAMES = 96  # 3.2 s at 30 fps


@pytest.fixture(scope="module")
def marked_frames() -> list[np.ndarray]:
    return frames_with_marks(N_FRAMES, 48, 64)


def best_correlation(x: np.ndarray, ref: np.ndarray, max_lag: int, n: int = 16000) -> tuple[int, float]:
    """(lag, Pearson correlation) of x[lag:lag+n] with ref[:n], best over 0 <= lag <= max_lag."""
    scores = [np.corrcoef(x[lag:lag + n], ref[:n])[0, 1] for lag in range(max_lag + 1)]
    return int(np.argmax(scores)), float(np.max(scores))


# --- wav --------------------------------------------------------------------------------------

def test_wav_round_trip(tmp_path):
    wave = tone(440, 1.0, 16000)
    x, sr = read_audio(write_wav(tmp_path / "sub" / "a.wav", wave, 16000))
    assert sr == 16000 and x.dtype == np.float32 and x.shape == (16000,)
    assert np.abs(x - wave).max() <= 1 / 32767  # 16-bit quantisation


def test_stereo_wav_is_averaged(tmp_path):
    left, right = tone(440, 0.5, 8000), np.full(4000, 0.25, np.float32)
    soundfile.write(tmp_path / "s.wav", np.stack([left, right], axis=1), 8000, subtype="FLOAT")
    x, sr = read_audio(tmp_path / "s.wav")
    assert sr == 8000 and np.allclose(x, (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("cut, why", [(20, "Malformed"), (44, "truncated"), (20000, "truncated")])
def test_cut_wav_is_a_data_error_naming_the_file(tmp_path, cut, why):
    full = write_wav(tmp_path / "full.wav", tone(440, 1.0, 16000), 16000).read_bytes()
    bad = tmp_path / f"cut{cut}.wav"
    bad.write_bytes(full[:cut])
    with pytest.raises(DataError, match=why) as err:
        read_audio(bad)
    assert str(bad) in str(err.value)


def test_garbage_empty_and_missing_wav(tmp_path):
    bad = tmp_path / "junk.wav"
    bad.write_bytes(b"RIFF" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match="cannot read audio file") as err:
        read_audio(bad)
    assert str(bad) in str(err.value)
    empty = write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(DataError, match="holds no samples"):
        read_audio(empty)
    with pytest.raises(DataError, match="does not exist"):
        read_audio(tmp_path / "nope.wav")


# --- video audio ------------------------------------------------------------------------------

# (suffix, rate, most extra samples): MP4 trims AAC's priming through its edit list, so only the
# last frame's padding (< 1,024) remains; FLV keeps MP3's encoder delay (~1,105) plus padding to
# a 576-sample frame; PCM in AVI comes back sample for sample
AUDIO_CASES = [(".mp4", 16000, 1024), (".flv", 22050, 1105 + 576), (".avi", 16000, 0)]


@pytest.mark.parametrize("suffix, sr, max_extra", AUDIO_CASES)
def test_video_audio_round_trip(tmp_path, marked_frames, suffix, sr, max_extra):
    wave = tone(440, N_FRAMES / FPS, sr)
    path = write_video(tmp_path / f"clip{suffix}", marked_frames, FPS, audio=wave, sr=sr)
    x = decode_video_audio(path, sr)
    assert x.dtype == np.float32 and x.ndim == 1
    assert 0 <= len(x) - len(wave) <= max_extra
    assert best_correlation(x, wave, max_extra)[1] > 0.99
    # a tone of another pitch does not correlate at any of those lags
    assert best_correlation(x, tone(660, N_FRAMES / FPS, sr), max_extra)[1] < 0.2


@pytest.mark.parametrize("suffix, sr, delay", [(".mp4", 16000, 0), (".avi", 16000, 0),
                                                (".flv", 22050, 576 + 529)])  # LAME's encoder delay
def test_video_audio_alignment(tmp_path, marked_frames, suffix, sr, delay):
    # a sweep matches itself at one lag only (a pure tone matches at every period)
    t = np.arange(int(N_FRAMES / FPS * sr)) / sr
    sweep = (0.5 * scipy.signal.chirp(t, 300, t[-1], 3000)).astype(np.float32)
    path = write_video(tmp_path / f"clip{suffix}", marked_frames, FPS, audio=sweep, sr=sr)
    assert best_correlation(decode_video_audio(path, sr), sweep, 1105 + 576) == (delay, pytest.approx(1, abs=1e-3))


def test_video_audio_is_resampled(tmp_path, marked_frames):
    wave = tone(440, N_FRAMES / FPS, 16000)
    path = write_video(tmp_path / "clip.mp4", marked_frames, FPS, audio=wave, sr=16000)
    x = decode_video_audio(path, 8000)
    assert abs(len(x) - len(wave) // 2) <= 512
    assert best_correlation(x, tone(440, N_FRAMES / FPS, 8000), 0, n=8000)[1] > 0.99


def test_video_without_audio_stream(tmp_path, marked_frames):
    path = write_video(tmp_path / "mute.mp4", marked_frames[:10], FPS)
    with pytest.raises(DataError, match="no audio stream") as err:
        decode_video_audio(path, 16000)
    assert str(path) in str(err.value)


# --- video frames -----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".mp4", ".flv", ".avi"])
def test_one_frame_per_second_keeps_each_seconds_first_frame(tmp_path, marked_frames, suffix):
    path = write_video(tmp_path / f"clip{suffix}", marked_frames, FPS)
    frames = decode_video_frames(path)
    assert [f.shape for f in frames] == [(48, 64, 3)] * 4 and frames[0].dtype == np.uint8
    assert [read_mark(f) for f in frames] == [0, 30, 60, 90]
    assert [read_mark(f) for f in decode_video_frames(path, fps=2)] == list(range(0, 96, 15))
    # at the video's own rate every frame is kept once, in order (FLV's 1 ms clock rounds times)
    assert [read_mark(f) for f in decode_video_frames(path, fps=30)] == list(range(96))


def test_frames_restricted_to_a_segment(tmp_path, marked_frames):
    path = write_video(tmp_path / "clip.mp4", marked_frames, FPS)
    assert [read_mark(f) for f in decode_video_frames(path, start_s=1, end_s=3)] == [30, 60]
    assert [read_mark(f) for f in decode_video_frames(path, start_s=2)] == [60, 90]
    assert [read_mark(f) for f in decode_video_frames(path, end_s=1)] == [0]
    with pytest.raises(DataError, match=r"no decodable frame in \[5, 6\) s"):
        decode_video_frames(path, start_s=5, end_s=6)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_mp4_is_a_data_error_naming_the_file(tmp_path, marked_frames, how):
    good = write_video(tmp_path / "good.mp4", marked_frames, FPS, audio=tone(440, 3.2, 16000)).read_bytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(good[: len(good) // 2] if how == "truncated"
                    else np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    for decode in (lambda: decode_video_frames(bad), lambda: decode_video_audio(bad, 16000)):
        with pytest.raises(DataError, match="cannot decode") as err:
            decode()
        assert str(bad) in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        decode_video_frames(tmp_path / "nope.mp4")


# --- images -----------------------------------------------------------------------------------

def test_png_and_jpg_round_trip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    assert np.array_equal(read_image(write_png(tmp_path / "a" / "x.png", img)), img)
    grey = read_image(tmp_path / "a" / "x.png", mode="L")
    assert grey.shape == (12, 20) and grey.dtype == np.uint8
    flat = np.full((16, 16, 3), (200, 40, 90), dtype=np.uint8)
    back = read_image(write_jpg(tmp_path / "b" / "x.jpg", flat)).astype(int)
    assert back.shape == (16, 16, 3) and np.abs(back - flat).max() <= 3


def test_bad_images(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="cannot read image file") as err:
        read_image(bad)
    assert str(bad) in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ConfigError, match="allowed: RGB, L"):
        read_image(bad, mode="CMYK")


def test_resize_image_bilinear():
    # PIL samples at pixel centres: outputs 0..3 sit at input x = -0.25, 0.25, 0.75, 1.25
    row = np.array([[0, 255]], dtype=np.uint8)
    assert resize_image(row, (1, 4)).tolist() == [[0, 64, 191, 255]]
    rgb = np.zeros((10, 20, 3), dtype=np.uint8) + np.array([10, 120, 250], dtype=np.uint8)
    out = resize_image(rgb, (7, 5))
    assert out.shape == (7, 5, 3) and out.dtype == np.uint8 and (out == rgb[0, 0]).all()


def test_sized_clip_frames_keeps_the_size_the_frames_had(tmp_path, marked_frames):
    folder = tmp_path / "clip"
    for i, frame in enumerate(marked_frames[:3]):
        write_png(folder / f"frame_{i + 1}.png", frame)
    sized = sized_clip_frames(folder, 6, (24, 32))
    assert sized.source == (48, 64) and sized.frames.shape == (3, 24, 32, 3)
    assert [read_mark(f) for f in sized.frames] == [0, 1, 2]
    video = write_video(tmp_path / "v.mp4", marked_frames, fps=FPS)
    from_video = sized_clip_frames(video, 2, (48, 64), overflow="spaced")
    assert from_video.source == (48, 64) and from_video.frames.shape == (2, 48, 64, 3)
    write_png(folder / "frame_4.png", np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(DataError, match=r"differ in size \(30x20, 64x48\)") as err:
        sized_clip_frames(folder, 6, (24, 32))
    assert str(folder) in str(err.value)
