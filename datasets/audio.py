"""Audio front-ends of the reference repositories, in torch, on 1-D float waveforms.

Each function reproduces one step of a published pipeline (OGM-GE, MIE/IGM, DI-MML, MLA) so that
a dataset can name its pipeline and build it from these parts:

- OGM-GE / MIE CREMA-D: resample to 22,050 Hz -> tile_to(3 s) -> clip_unit -> stft_log(512, 353)
  gives 257 x 188.
- DI-MML CREMA-D / AVE: tile_to(160,000) -> clip_unit -> scipy_spectrogram_log(512, 353, zscore)
  gives 257 x 1004.
- MLA CREMA-D / OGM-GE Kinetics-Sounds: kaldi_fbank(128 bins, 1024 frames[, KS normalisation])
  gives 1024 x 128.

Outputs keep the input's dtype and device; feed float32 for the repos' precision.
"""

from __future__ import annotations

import math
from typing import Literal

import scipy.signal
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF

from mmbalance.core.errors import DataError

# OGM-GE data/KineticSound/process_audio.py normalises its fbank as (x - mean) / (2 * std) with
# these (AudioSet statistics borrowed from AST)
KS_FBANK_MEAN = -4.503877
KS_FBANK_STD = 5.141276

LOG_EPS = 1e-7  # the repos' log(x + 1e-7)
ZSCORE_EPS = 1e-9  # DI-MML divides by std + 1e-9

# torchaudio's documented approximation of resampy's "kaiser_best", the resampler behind
# librosa.load(sr=...) before librosa 0.10 (the version range the reference repos ran with)
_KAISER_BEST = {"lowpass_filter_width": 64, "rolloff": 0.9475937167399596,
                "resampling_method": "sinc_interp_kaiser", "beta": 14.769656459379492}


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """`wave` resampled from `orig_sr` to `new_sr` Hz (the input itself when the rates are equal).

    Uses a Kaiser-windowed sinc filter set to approximate resampy's kaiser_best, which is what
    librosa.load used in the reference repos; values are close to, not identical with, theirs.
    """
    if orig_sr == new_sr:
        return wave
    return AF.resample(wave, int(orig_sr), int(new_sr), **_KAISER_BEST)


def tile_to(wave: torch.Tensor, n: int) -> torch.Tensor:
    """The clip repeated end to end until it has at least `n` samples, then its first `n`.

    This is the repos' `np.tile(x, k)[:n]` with k chosen from the clip length. OGM-GE uses a fixed
    k = 3, so a clip shorter than n/3 comes out shorter than n there (and its spectrogram has fewer
    frames); here every clip gives exactly `n` samples.
    """
    if wave.numel() == 0:
        raise DataError(f"cannot tile an empty audio clip to {n} samples")
    reps = math.ceil(n / wave.numel())
    return wave.repeat(reps)[:n]


def clip_unit(wave: torch.Tensor) -> torch.Tensor:
    """Samples clamped to [-1, 1] (the repos' `x[x > 1] = 1; x[x < -1] = -1`)."""
    return wave.clamp(-1.0, 1.0)


def stft_log(wave: torch.Tensor, n_fft: int, hop: int,
             pad_mode: Literal["reflect", "constant"] = "reflect") -> torch.Tensor:
    """log(|STFT| + 1e-7) with librosa.stft's defaults: (n_fft // 2 + 1, 1 + len // hop).

    Frames are centred (the signal is padded by n_fft // 2 on each side) and windowed by a
    periodic Hann window of n_fft samples. `pad_mode` defaults to 'reflect': OGM-GE pins no
    librosa version, but its environment (Python 3.7, PyTorch 1.8.1, code from 2021) predates
    librosa 0.9.0 (Feb 2022), the release that changed librosa.stft's default padding from
    'reflect' to zero ('constant'). Only frames whose window overhangs an end of the signal
    depend on the choice (with n_fft 512 and hop 353: the first and the last).
    """
    window = torch.hann_window(n_fft, periodic=True, dtype=wave.dtype, device=wave.device)
    spec = torch.stft(wave, n_fft, hop_length=hop, win_length=n_fft, window=window, center=True,
                      pad_mode=pad_mode, return_complex=True)
    return torch.log(spec.abs() + LOG_EPS)


def scipy_spectrogram_log(wave: torch.Tensor, fs: float, nperseg: int = 512, noverlap: int = 353,
                          zscore: bool = False) -> torch.Tensor:
    """log(PSD + 1e-7) of `scipy.signal.spectrogram(wave, fs, nperseg=..., noverlap=...)`.

    scipy's defaults, as DI-MML ran them: periodic Tukey(0.25) window, each segment's mean removed
    (detrend='constant'), no padding or centring, one-sided density scaling |X|^2 / (fs * sum w^2)
    with the bins other than DC and Nyquist doubled. Shape (nperseg // 2 + 1, segments); 160,000
    samples with (512, 353) give 257 x 1004 at any rate. `zscore` then standardises the whole
    matrix as DI-MML does: (x - mean) / (std + 1e-9), population std.
    """
    step = nperseg - noverlap
    if wave.numel() < nperseg:
        raise DataError(f"a spectrogram with nperseg={nperseg} needs at least that many samples; "
                        f"got {wave.numel()}")
    # the window comes from scipy itself so its edge convention is scipy's exactly
    window = torch.as_tensor(scipy.signal.get_window(("tukey", 0.25), nperseg), dtype=wave.dtype,
                             device=wave.device)
    segments = wave.unfold(0, nperseg, step)
    segments = (segments - segments.mean(dim=1, keepdim=True)) * window
    psd = torch.fft.rfft(segments, dim=1).abs().pow(2) / (fs * window.pow(2).sum())
    # one-sided: fold the negative frequencies onto the positive ones (not DC, nor an even Nyquist)
    last = psd.shape[1] - 1 if nperseg % 2 == 0 else psd.shape[1]
    psd[:, 1:last] *= 2
    spec = torch.log(psd.T + LOG_EPS)
    if zscore:
        spec = (spec - spec.mean()) / (spec.std(unbiased=False) + ZSCORE_EPS)
    return spec


def kaldi_fbank(wave: torch.Tensor, sr: int, num_mel_bins: int = 128, target_frames: int = 1024,
                norm: tuple[float, float] | None = None) -> torch.Tensor:
    """Kaldi log-mel filterbank as MLA and OGM-GE (Kinetics-Sounds) compute it: (target_frames, bins).

    The waveform's mean is removed, then torchaudio's Kaldi fbank runs with 25 ms Hanning frames
    every 10 ms, HTK-compatible output, no energy term and no dither (so the result is
    deterministic). Missing frames are zero-padded at the end and extra ones cropped, *before*
    `norm=(mean, std)` maps x to (x - mean) / (2 * std) — OGM-GE's order, so padded frames become
    -mean / (2 * std). Use norm=(KS_FBANK_MEAN, KS_FBANK_STD) for OGM-GE's KS files; MLA uses none.
    """
    if wave.numel() < int(0.025 * sr):
        raise DataError(f"a Kaldi fbank needs at least one 25 ms frame ({int(0.025 * sr)} samples "
                        f"at {sr} Hz); got {wave.numel()}")
    fbank = kaldi.fbank((wave - wave.mean())[None], htk_compat=True, sample_frequency=float(sr),
                        use_energy=False, window_type="hanning", num_mel_bins=num_mel_bins,
                        dither=0.0, frame_shift=10)
    missing = target_frames - fbank.shape[0]
    if missing > 0:
        fbank = torch.nn.functional.pad(fbank, (0, 0, 0, missing))
    fbank = fbank[:target_frames]
    if norm is not None:
        mean, std = norm
        fbank = (fbank - mean) / (2 * std)
    return fbank
