"""Audio front-ends of the reference repositories, in torch, on 1-D float waveforms.

Each function reproduces one step of a published pipeline (OGM-GE, MIE/IGM, DI-MML, MLA) so that
a dataset can name its pipeline and build it from these parts:

- OGM-GE / MIE CREMA-D: resample to 22,050 Hz -> tile_to(3 s) -> clip_unit -> stft_log(512, 353)
  gives 257 x 188.
- DI-MML CREMA-D / AVE: tile_to(160,000) -> clip_unit -> scipy_spectrogram_log(512, 353, zscore)
  gives 257 x 1004.
- MLA CREMA-D / OGM-GE Kinetics-Sounds: kaldi_fbank(128 bins, 1024 frames[, KS normalisation])
  gives 1024 x 128.

The `manifest` dataset's configurable front-end adds log_mel and log_stft (frames x bins, frames
cut as Kaldi cuts them: see frame_count). The resamplers and transforms these functions use are
built once per rate pair or set of sizes and reused (per process), so preparing many clips does
not rebuild a filter kernel or a mel filterbank per file.

Outputs keep the input's dtype and device; feed float32 for the repos' precision.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Literal

import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF
import torchaudio.transforms as T

from mmbalance.core.errors import DataError

# OGM-GE data/KineticSound/process_audio.py normalises its fbank as (x - mean) / (2 * std) with
# these (AudioSet statistics borrowed from AST)
KS_FBANK_MEAN = -4.503877
KS_FBANK_STD = 5.141276

LOG_EPS = 1e-7  # the repos' log(x + 1e-7)
MAX_FFT_PADDING = 8  # log_mel's FFT is at most 8 times the window's own
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
    return _resampler(int(orig_sr), int(new_sr), wave.dtype, wave.device)(wave)


@lru_cache(maxsize=16)
def _resampler(orig_sr: int, new_sr: int, dtype: torch.dtype, device: torch.device) -> T.Resample:
    # torchaudio.functional.resample computes its sinc kernel on every call (16 -> 22.05 kHz:
    # ~10 ms, against under 1 ms to apply it to a 2.5 s clip); the module computes it once.
    # Memoised per process rather than owned by an object: the callers are the datasets'
    # load_sample classmethods, which prepare's workers (and the bench's decode path) call clip
    # by clip with no dataset instance to hold it. The cached module is a pure function of the
    # key and never leaves this file, so the cache changes how fast resample runs, never what it
    # returns; 16 rate pairs bound its memory.
    return T.Resample(orig_sr, new_sr, dtype=dtype, **_KAISER_BEST).to(device)


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
    import scipy.signal  # here: its import takes ~0.8 s, and only the DI-MML pipelines need it

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


def kaldi_fbank(wave: torch.Tensor, sr: int, num_mel_bins: int = 128, target_frames: int | None = 1024,
                norm: tuple[float, float] | None = None, window_ms: float = 25.0, hop_ms: float = 10.0) -> torch.Tensor:
    """Kaldi log-mel filterbank as MLA and OGM-GE (Kinetics-Sounds) compute it: (target_frames, bins).

    The waveform's mean is removed, then torchaudio's Kaldi fbank runs with 25 ms Hanning frames
    every 10 ms (`window_ms`, `hop_ms`), HTK-compatible output, no energy term and no dither (so
    the result is deterministic). Missing frames are zero-padded at the end and extra ones
    cropped (target_frames=None keeps every frame the clip gives), *before*
    `norm=(mean, std)` maps x to (x - mean) / (2 * std) — OGM-GE's order, so padded frames become
    -mean / (2 * std). Use norm=(KS_FBANK_MEAN, KS_FBANK_STD) for OGM-GE's KS files; MLA uses none.
    """
    _check_length(wave, window_samples(sr, window_ms), f"a Kaldi fbank needs at least one {window_ms:g} ms frame")
    fbank = kaldi.fbank((wave - wave.mean())[None], htk_compat=True, sample_frequency=float(sr),
                        use_energy=False, window_type="hanning", num_mel_bins=num_mel_bins,
                        dither=0.0, frame_length=window_ms, frame_shift=hop_ms)
    if target_frames is not None:
        fbank = fit_frames(fbank, target_frames)
    if norm is not None:
        mean, std = norm
        fbank = (fbank - mean) / (2 * std)
    return fbank


def fit_frames(spec: torch.Tensor, frames: int) -> torch.Tensor:
    """A (T, F) spectrogram with exactly `frames` rows: extra ones cropped from the end, missing
    ones zero-padded at the end."""
    missing = frames - spec.shape[0]
    if missing > 0:
        spec = torch.nn.functional.pad(spec, (0, 0, 0, missing))
    return spec[:frames]


# ---- framing shared by the manifest front-ends ---------------------------------------------------


def window_samples(sr: int, ms: float) -> int:
    """Samples in `ms` milliseconds at `sr` Hz, rounded down as Kaldi rounds its frame length."""
    return int(sr * ms * 0.001)


def frame_count(samples: int, window: int, hop: int) -> int:
    """Frames of `window` samples every `hop` that fit in `samples` (no frame overhangs the end:
    Kaldi's snip_edges, used by every manifest feature)."""
    return 0 if samples < window else 1 + (samples - window) // hop


def fft_size(window: int) -> int:
    """The FFT length of a `window`-sample frame: the next power of two (Kaldi's padded window)."""
    return 1 << max(window - 1, 1).bit_length()


def log_mel(wave: torch.Tensor, sr: int, bins: int, window: int, hop: int) -> torch.Tensor:
    """log(mel power spectrum + 1e-7): (frame_count frames, bins).

    Periodic Hann frames of `window` samples every `hop`, each zero-padded to an FFT of
    mel_fft_size points, power |X|^2, then `bins` triangular HTK-mel filters from 0 Hz to sr / 2
    without area normalisation (torchaudio's melscale_fbanks, built once per sizes). Where the
    FFT is the window's own length this is torchaudio's MelSpectrogram(center=False) transposed.
    """
    n_fft = mel_fft_size(sr, bins, window)
    power = torch.fft.rfft(_frames(wave, window, hop, "a log-mel"), n=n_fft).abs().pow(2)
    return torch.log(power @ _mel_filters(sr, bins, n_fft, wave.dtype, wave.device) + LOG_EPS)


@lru_cache(maxsize=16)
def mel_fft_size(sr: int, bins: int, window: int) -> int:
    """log_mel's FFT length: the next power of two >= window, doubled (up to MAX_FFT_PADDING
    times) while any of the `bins` mel filters would fall between FFT bins and be all zero (many
    bins for a short window, as 128 bins on 25 ms at 16 kHz; the zero padding interpolates the
    spectrum for them)."""
    n_fft = fft_size(window)
    while empty_mel_filters(sr, bins, n_fft) and n_fft < MAX_FFT_PADDING * fft_size(window):
        n_fft *= 2
    return n_fft


def log_stft(wave: torch.Tensor, bins: int, window: int, hop: int) -> torch.Tensor:
    """log(|STFT| + 1e-7): (frame_count frames, bins), magnitude as OGM-GE's stft_log takes it.

    Periodic Hann frames of `window` samples every `hop`, each zero-padded to an FFT of
    2 * (bins - 1) points (at least `window`).
    """
    spec = torch.fft.rfft(_frames(wave, window, hop, "an STFT"), n=2 * (bins - 1)).abs()
    return torch.log(spec + LOG_EPS)


def _frames(wave: torch.Tensor, window: int, hop: int, what: str) -> torch.Tensor:
    """(frame_count, window): the clip's Hann-windowed frames (no frame overhangs the end)."""
    _check_length(wave, window, f"{what} frame is {window} samples")
    return wave.unfold(0, window, hop) * _hann(window, wave.dtype, wave.device)


@lru_cache(maxsize=16)
def _hann(window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.hann_window(window, periodic=True, dtype=dtype, device=device)


def empty_mel_filters(sr: int, bins: int, n_fft: int) -> int:
    """How many of log_mel's `bins` filters fall between FFT bins and are all zero (too many
    bins for the FFT length): each would be a constant log(1e-7)."""
    with warnings.catch_warnings():  # torchaudio warns about exactly what this counts
        warnings.simplefilter("ignore", UserWarning)
        filters = _mel_filters(sr, bins, n_fft, torch.float32, torch.device("cpu"))
    return int((filters.sum(dim=0) == 0).sum())


@lru_cache(maxsize=16)
def _mel_filters(sr: int, bins: int, n_fft: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    filters = AF.melscale_fbanks(n_fft // 2 + 1, 0.0, sr / 2, bins, sr, norm=None, mel_scale="htk")
    return filters.to(device=device, dtype=dtype)  # (n_fft // 2 + 1, bins)


def _check_length(wave: torch.Tensor, window: int, what: str) -> None:
    if wave.numel() < window:
        raise DataError(f"{what}; the clip has {wave.numel()} samples")
