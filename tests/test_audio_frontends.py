"""The audio front-ends against independent numpy/scipy computations and hand-checked facts."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import torch
import torchaudio.functional as AF
import torchaudio.transforms as T

from mmbalance.core.errors import DataError
from mmbalance.datasets import audio as fe
from tests.fixtures.spectra import numpy_log_mel, numpy_log_stft


def noise(n: int, seed: int = 0, scale: float = 0.3) -> torch.Tensor:
    return torch.from_numpy((scale * np.random.default_rng(seed).standard_normal(n)).astype(np.float32))


def sine(freq: float, seconds: float, sr: int) -> torch.Tensor:
    t = np.arange(int(seconds * sr)) / sr
    return torch.from_numpy((0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32))


# --- tile_to, clip_unit, resample -------------------------------------------------------------

def test_tile_to_repeats_then_crops():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert fe.tile_to(x, 7).tolist() == [1, 2, 3, 1, 2, 3, 1]
    assert fe.tile_to(x, 2).tolist() == [1, 2]
    # a clip shorter than n/3 still fills n (OGM-GE's fixed x3 would stop at 6 samples)
    assert fe.tile_to(torch.tensor([1.0, 2.0]), 9).tolist() == [1, 2, 1, 2, 1, 2, 1, 2, 1]
    with pytest.raises(DataError, match="empty"):
        fe.tile_to(torch.zeros(0), 5)


def test_clip_unit():
    assert fe.clip_unit(torch.tensor([-2.0, -0.5, 0.5, 1.0, 3.0])).tolist() == [-1, -0.5, 0.5, 1, 1]


def test_resample_identity_lengths_and_content():
    x = sine(1000, 0.5, 16000)
    assert fe.resample(x, 16000, 16000) is x
    down = fe.resample(x, 16000, 8000)
    assert down.shape == (4000,)
    assert fe.resample(x, 16000, 22050).shape == (11025,)
    # a 1 kHz tone stays the same tone (away from the edges)
    assert torch.allclose(down[200:-200], sine(1000, 0.5, 8000)[200:-200], atol=1e-4)
    # a 6 kHz tone is above the new Nyquist (4 kHz) and is filtered out
    assert fe.resample(sine(6000, 0.5, 16000), 16000, 8000)[200:-200].abs().max() < 1e-4


def test_resample_builds_its_kernel_once_per_rate_pair():
    x = sine(440, 0.3, 8000)
    fe.resample(x, 8000, 11025)
    built = fe._resampler.cache_info().misses
    for _ in range(3):
        again = fe.resample(x, 8000, 11025)
    assert fe._resampler.cache_info().misses == built
    reference = AF.resample(x, 8000, 11025, **fe._KAISER_BEST)  # the kernel rebuilt for this call
    assert torch.equal(again, reference)
    assert torch.equal(fe.resample(x.double(), 8000, 11025), AF.resample(x.double(), 8000, 11025, **fe._KAISER_BEST))


# --- log_mel, log_stft (the manifest's features) ----------------------------------------------

@pytest.mark.parametrize("sr, bins, window, hop", [(16000, 64, 400, 160), (8000, 40, 200, 80), (16000, 80, 512, 160)])
def test_log_mel_matches_numpy(sr, bins, window, hop):
    x = noise(sr // 2, seed=3).double()
    ours = fe.log_mel(x, sr, bins, window, hop).numpy()
    assert ours.shape == (fe.frame_count(len(x), window, hop), bins)
    # torchaudio builds the mel filters in float32: ~1e-6 apart from numpy's float64 ones
    np.testing.assert_allclose(ours, numpy_log_mel(x.numpy(), sr, bins, window, hop), atol=1e-4)
    assert fe.mel_fft_size(sr, bins, window) == fe.fft_size(window)
    assert fe.empty_mel_filters(sr, bins, fe.fft_size(window)) == 0


def test_log_mel_pads_the_fft_until_no_mel_filter_is_empty():
    assert fe.empty_mel_filters(16000, 128, 512) > 0  # 257 FFT bins cannot feed 128 low mel filters
    n_fft = fe.mel_fft_size(16000, 128, 400)
    assert n_fft == 1024 and fe.empty_mel_filters(16000, 128, n_fft) == 0
    x = noise(8000, seed=9).double()
    ours = fe.log_mel(x, 16000, 128, 400, 160).numpy()
    assert np.all(ours.std(axis=0) > 0.1)  # no constant (empty) band
    np.testing.assert_allclose(ours, numpy_log_mel(x.numpy(), 16000, 128, 400, 160, n_fft=1024), atol=1e-4)


def test_log_mel_with_a_power_of_two_window_is_torchaudios_mel_spectrogram():
    x = noise(16000, seed=4)
    mel = T.MelSpectrogram(16000, n_fft=512, win_length=512, hop_length=160, n_mels=64, center=False,
                           power=2.0, mel_scale="htk", norm=None)
    assert torch.allclose(fe.log_mel(x, 16000, 64, 512, 160), torch.log(mel(x) + 1e-7).T, atol=1e-4)


@pytest.mark.parametrize("bins, window", [(101, 200), (257, 400)])
def test_log_stft_matches_numpy(bins, window):
    x = noise(8000, seed=7).double()
    ours = fe.log_stft(x, bins, window, window // 2)
    assert ours.shape == (fe.frame_count(8000, window, window // 2), bins)
    np.testing.assert_allclose(ours.numpy(), numpy_log_stft(x.numpy(), bins, window, window // 2), atol=1e-9)


def test_frames_follow_kaldi_framing():
    assert fe.window_samples(16000, 25) == 400 and fe.window_samples(8000, 10) == 80
    assert fe.frame_count(16000, 400, 160) == 98 and fe.frame_count(399, 400, 160) == 0
    assert fe.fft_size(400) == 512 and fe.fft_size(512) == 512
    x = noise(16000, seed=8)
    assert fe.kaldi_fbank(x, 16000, 40, None, window_ms=50, hop_ms=20).shape == (fe.frame_count(16000, 800, 320), 40)
    with pytest.raises(DataError, match="log-mel frame is 400 samples; the clip has 300"):
        fe.log_mel(x[:300], 16000, 40, 400, 160)


# --- stft_log ---------------------------------------------------------------------------------

def numpy_stft_log(x: np.ndarray, n_fft: int, hop: int, pad_mode: str) -> np.ndarray:
    """librosa.stft semantics written out: centre-pad, frame, periodic Hann, rfft."""
    x = np.pad(x.astype(np.float64), n_fft // 2, mode=pad_mode)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    n_frames = 1 + (len(x) - n_fft) // hop
    frames = np.stack([x[i * hop:i * hop + n_fft] * window for i in range(n_frames)], axis=1)
    return np.log(np.abs(np.fft.rfft(frames, axis=0)) + 1e-7)


def test_stft_log_ogmge_shape():
    assert fe.stft_log(noise(66150), 512, 353).shape == (257, 188)  # 3 s at 22,050 Hz


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_stft_log_matches_numpy(pad_mode):
    x = noise(22050, seed=1)
    ours = fe.stft_log(x, 512, 353, pad_mode).numpy()
    ref = numpy_stft_log(x.numpy(), 512, 353, pad_mode)
    assert ours.shape == ref.shape == (257, 63)
    assert np.abs(ours - ref).max() < 1e-4


def test_stft_pad_mode_changes_only_edge_frames():
    x = noise(66150, seed=2)
    differs = (fe.stft_log(x, 512, 353, "reflect") != fe.stft_log(x, 512, 353, "constant")).any(dim=0)
    assert differs.nonzero().flatten().tolist() == [0, 187]


# --- scipy_spectrogram_log --------------------------------------------------------------------

@pytest.mark.parametrize("n, fs, nperseg, noverlap, frames", [
    (160000, 22050, 512, 353, 1004),  # DI-MML CREMA-D Audio-1004
    (160000, 16000, 512, 353, 1004),  # DI-MML AVE: 10 s at 16 kHz
    (48000, 16000, 512, 353, 299),    # DI-MML Audio-299: 3 s at 16 kHz
    (8000, 8000, 255, 100, 50),       # odd segment: no Nyquist bin to leave undoubled
])
def test_scipy_spectrogram_log_matches_scipy(n, fs, nperseg, noverlap, frames):
    x = noise(n, seed=3) + 0.2  # a DC offset, removed per segment by detrend='constant'
    ours = fe.scipy_spectrogram_log(x, fs, nperseg, noverlap)
    _, _, psd = scipy.signal.spectrogram(x.numpy().astype(np.float64), fs, nperseg=nperseg, noverlap=noverlap)
    ref = np.log(psd + 1e-7)
    assert ours.shape == ref.shape == (nperseg // 2 + 1, frames)
    assert np.abs(ours.numpy() - ref).max() < 1e-4


def test_scipy_spectrogram_zscore_is_di_mml_normalisation():
    x = noise(160000, seed=4)
    raw = fe.scipy_spectrogram_log(x.double(), 22050).numpy()
    z = fe.scipy_spectrogram_log(x.double(), 22050, zscore=True).numpy()
    assert np.allclose(z, (raw - raw.mean()) / (raw.std() + 1e-9), atol=1e-10)
    assert abs(z.mean()) < 1e-9 and abs(z.std() - 1) < 1e-6


# --- kaldi_fbank ------------------------------------------------------------------------------

def htk_mel(f):
    return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)


def mel_edges(sr: int, n_mels: int) -> np.ndarray:
    """Mel-scale edges of the triangular bins from 20 Hz to Nyquist: bin b spans edges[b:b+3]."""
    lo, hi = htk_mel(20.0), htk_mel(sr / 2)
    return lo + (hi - lo) / (n_mels + 1) * np.arange(n_mels + 2)


def numpy_kaldi_fbank(x: np.ndarray, sr: int, n_mels: int = 128) -> np.ndarray:
    """Kaldi's fbank written out: 25 ms frames every 10 ms, per-frame DC removal, pre-emphasis
    0.97, symmetric Hann ('hanning'), power spectrum zero-padded to a power of two, HTK mel
    triangles from 20 Hz to Nyquist, log floored at float32 epsilon."""
    x = x.astype(np.float64) - x.mean()
    length, shift = int(0.025 * sr), int(0.010 * sr)
    n_fft = 1 << (length - 1).bit_length()
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1))
    edges = mel_edges(sr, n_mels)
    bin_mel = htk_mel(np.arange(n_fft // 2 + 1) * sr / n_fft)
    banks = np.stack([np.clip(np.minimum((bin_mel - left) / (mid - left), (right - bin_mel) / (right - mid)), 0, None)
                      for left, mid, right in zip(edges, edges[1:], edges[2:])])
    rows = []
    for i in range(1 + (len(x) - length) // shift):
        frame = x[i * shift:i * shift + length]
        frame = frame - frame.mean()
        frame = np.concatenate([[frame[0] * (1 - 0.97)], frame[1:] - 0.97 * frame[:-1]]) * window
        power = np.abs(np.fft.rfft(frame, n_fft)) ** 2
        rows.append(np.log(np.maximum(banks @ power, np.finfo(np.float32).eps)))
    return np.array(rows)


def test_kaldi_fbank_matches_numpy_for_three_frames():
    x = noise(400 + 2 * 160, seed=5) + 0.1  # exactly 3 frames at 16 kHz
    ours = fe.kaldi_fbank(x, 16000, target_frames=3).numpy()
    ref = numpy_kaldi_fbank(x.numpy(), 16000)
    assert ours.shape == ref.shape == (3, 128)
    assert np.abs(ours - ref).max() < 5e-4


def test_kaldi_fbank_pads_crops_and_normalises():
    x = noise(48000, seed=6)  # 3 s at 16 kHz: 1 + (48000 - 400) // 160 = 298 frames
    fbank = fe.kaldi_fbank(x, 16000)
    assert fbank.shape == (1024, 128)
    assert (fbank[298:] == 0).all() and (fbank[:298] != 0).any(dim=1).all()
    assert torch.equal(fe.kaldi_fbank(x, 16000, target_frames=100), fbank[:100])
    normed = fe.kaldi_fbank(x, 16000, norm=(fe.KS_FBANK_MEAN, fe.KS_FBANK_STD))
    assert torch.allclose(normed, (fbank + 4.503877) / (2 * 5.141276))
    assert torch.allclose(normed[-1], torch.full((128,), 4.503877 / 10.282552))


@pytest.mark.parametrize("freq", [440.0, 1000.0, 3000.0])
def test_kaldi_fbank_tone_peaks_in_its_mel_bin(freq):
    # the bin whose triangle peaks nearest the tone's mel value holds the most energy
    centres = mel_edges(16000, 128)[1:-1]
    expected = int(np.abs(centres - htk_mel(freq)).argmin())
    energy = fe.kaldi_fbank(sine(freq, 1.0, 16000), 16000, target_frames=98).mean(dim=0)
    assert int(energy.argmax()) == expected
    assert energy[expected] - torch.cat([energy[:expected - 2], energy[expected + 3:]]).max() > 3.0


def test_too_short_inputs_are_data_errors():
    with pytest.raises(DataError, match="25 ms"):
        fe.kaldi_fbank(torch.zeros(100), 16000)
    with pytest.raises(DataError, match="nperseg=512"):
        fe.scipy_spectrogram_log(torch.zeros(300), 16000)
