"""Deterministic generator and loader for the embedded AV-Digits dataset.

AV-Digits pairs each of the 1,797 images of ``sklearn.datasets.load_digits()``
with one espeak-ng utterance of that digit's English name (and, for its text
modality, a caption drawn from the labels: ``avdigits_captions``). Splits are
stratified and fixed; speakers (espeak voice + variant) are disjoint between
splits, and so are the accents and the variants on their own.

Run ``python -m mmbalance.datasets.prepare.avdigits_generate`` to rebuild the shipped
cache ``datasets/data/avdigits_v1.npz`` and manifest
``datasets/manifests/avdigits_v1.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mmbalance.datasets.prepare.avdigits_captions import VOCAB, captions_sha256, draw_captions

VERSION = 1
N_SAMPLES = 1797
SAMPLE_RATE = 8000
N_WAVE = SAMPLE_RATE  # exactly 1 s per utterance
ESPEAK_RATE = 22050
SPEED_RANGE = (130, 200)  # words per minute, inclusive
PITCH_RANGE = (25, 75)  # espeak pitch 0..99, inclusive
SPLIT_SIZES = {"train": 1197, "val": 200, "test": 400}
SPLIT_SEED = 0
PARAM_SEED = 0
# Samples with |x| <= this (int16 units) at either end count as silence; trimming
# them before centring keeps the word centred however much padding espeak adds.
SILENCE_THRESHOLD = 64

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Accents and variants are each disjoint between splits, so a model cannot
# shortcut through either accent or voice quality when generalising.
SPEAKER_SETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "train": (
        ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp"),
        ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "klatt", "croak"),
    ),
    "val": (
        ("en-gb-x-gbclan", "en-us-nyc"),
        ("m8", "klatt3", "klatt4", "linda", "belinda"),
    ),
    "test": (
        ("en-029", "en-gb-x-gbcwmd"),
        ("m6", "m7", "f4", "f5", "klatt2"),
    ),
}

PACKAGE_DIR = Path(str(resources.files("mmbalance.datasets")))  # the shipped cache is package data
DEFAULT_CACHE = PACKAGE_DIR / "data" / f"avdigits_v{VERSION}.npz"
DEFAULT_MANIFEST = PACKAGE_DIR / "manifests" / f"avdigits_v{VERSION}.json"

ARRAY_KEYS = (
    "images", "labels", "waveforms", "speaker", "speed", "pitch",
    "train_idx", "val_idx", "test_idx",
)


def speakers_for_split(split: str) -> list[str]:
    """Speaker ids ("voice+variant") of one split, in a fixed order."""
    voices, variants = SPEAKER_SETS[split]
    return [f"{v}+{var}" for v in voices for var in variants]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as (images uint8 (N,8,8) with values 0..16, labels int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.asarray(d.images).astype(np.uint8)
    labels = np.asarray(d.target).astype(np.int64)
    return images, labels


def assign_splits(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Fixed stratified train/val/test split of all indices (sorted int64)."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    idx = np.arange(len(labels))
    rest, test = train_test_split(
        idx, test_size=SPLIT_SIZES["test"], stratify=labels, random_state=SPLIT_SEED
    )
    train, val = train_test_split(
        rest, test_size=SPLIT_SIZES["val"], stratify=labels[rest], random_state=SPLIT_SEED
    )
    return {
        "train": np.sort(train).astype(np.int64),
        "val": np.sort(val).astype(np.int64),
        "test": np.sort(test).astype(np.int64),
    }


def draw_utterance_params(
    splits: dict[str, np.ndarray], labels: np.ndarray, seed: int = PARAM_SEED
) -> list[dict[str, Any]]:
    """Per-sample speaker/speed/pitch, drawn up front from one seeded RNG.

    Drawing everything in index order before synthesis makes the parameters
    independent of thread scheduling during (parallel) synthesis.
    """
    labels = np.asarray(labels)
    split_of = np.empty(len(labels), dtype=object)
    for name, idx in splits.items():
        split_of[idx] = name
    if any(s is None for s in split_of):
        raise ValueError("splits do not cover every index")
    speaker_lists = {name: speakers_for_split(name) for name in splits}
    rng = np.random.default_rng(seed)
    params: list[dict[str, Any]] = []
    for i in range(len(labels)):
        spk = speaker_lists[split_of[i]]
        params.append(
            {
                "index": i,
                "split": split_of[i],
                "word": WORDS[int(labels[i])],
                "speaker": spk[int(rng.integers(len(spk)))],
                "speed": int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1)),
                "pitch": int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
            }
        )
    return params


def espeak_version() -> str:
    """Version string reported by ``espeak-ng --version`` (e.g. "1.51")."""
    out = subprocess.run(
        ["espeak-ng", "--version"], capture_output=True, text=True, check=True
    ).stdout
    # "eSpeak NG text-to-speech: 1.51  Data at: ..." -> "1.51"
    after = out.split(":", 1)[1] if ":" in out else out
    return after.split()[0]


def fit_length(x: np.ndarray, n: int = N_WAVE) -> np.ndarray:
    """Trim edge silence, then centre-pad or centre-crop to exactly ``n`` samples."""
    loud = np.flatnonzero(np.abs(x) > SILENCE_THRESHOLD)
    if loud.size:
        x = x[loud[0] : loud[-1] + 1]
    out = np.zeros(n, dtype=x.dtype)
    if len(x) >= n:
        start = (len(x) - n) // 2
        out[:] = x[start : start + n]
    else:
        start = (n - len(x)) // 2
        out[start : start + len(x)] = x
    return out


def synthesize(params: dict[str, Any]) -> np.ndarray:
    """One utterance as int16 (8000,) at 8 kHz; deterministic for a fixed espeak-ng."""
    import soundfile as sf
    from scipy.signal import resample_poly

    cmd = [
        "espeak-ng",
        "-v", params["speaker"],
        "-s", str(params["speed"]),
        "-p", str(params["pitch"]),
        "--stdout",
        params["word"],
    ]
    wav = subprocess.run(cmd, capture_output=True, check=True).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype="int16")
    if sr != ESPEAK_RATE:
        raise RuntimeError(f"espeak-ng produced {sr} Hz, expected {ESPEAK_RATE}")
    if x.ndim != 1 or x.size == 0:
        raise RuntimeError(f"espeak-ng produced no mono audio for {params}")
    # 22050 * 160 / 441 = 8000; polyphase FIR is exact integer-ratio and deterministic.
    y = resample_poly(x.astype(np.float64), 160, 441)
    y = np.clip(np.rint(y), -32768, 32767).astype(np.int16)
    return fit_length(y)


def synthesize_all(params: Sequence[dict[str, Any]], workers: int | None = None) -> np.ndarray:
    """Synthesize every utterance in parallel; results placed by index."""
    if workers is None:
        workers = max(4, os.cpu_count() or 1)
    out = np.zeros((len(params), N_WAVE), dtype=np.int16)

    def job(i: int) -> None:
        out[i] = synthesize(params[i])

    with ThreadPoolExecutor(max_workers=workers) as ex:
        # list() re-raises any worker exception here.
        list(ex.map(job, range(len(params))))
    return out


def waveform_sha256(waveforms: np.ndarray) -> str:
    """sha256 of the little-endian int16 bytes of the waveform matrix."""
    return hashlib.sha256(np.ascontiguousarray(waveforms, dtype="<i2").tobytes()).hexdigest()


def images_sha256(images: np.ndarray) -> str:
    """sha256 of the uint8 image bytes."""
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).hexdigest()


def split_sha256(idx: np.ndarray) -> str:
    """sha256 of the comma-joined decimal indices."""
    return hashlib.sha256(",".join(str(int(i)) for i in idx).encode("ascii")).hexdigest()


# --- storage -----------------------------------------------------------------
# Waveforms are stored losslessly as xz (LZMA) bytes of their first differences,
# split into low/high byte planes: ~8.0 MB versus ~10.8 MB for savez_compressed on
# raw int16 and ~9.6 MB for FLAC (measured on v1). It needs only the stdlib to
# decode; load_cache() hides it and returns the plain int16 (N, 8000) matrix.


def encode_waveforms(waveforms: np.ndarray) -> np.ndarray:
    """Lossless compact encoding of an int16 (N, L) matrix as a uint8 byte array."""
    w = np.ascontiguousarray(waveforms, dtype=np.int16)
    # Row-wise first difference; int16 wrap-around is undone exactly by the
    # wrapping int16 cumsum in decode_waveforms.
    d = w.copy()
    d[:, 1:] = w[:, 1:] - w[:, :-1]
    u = d.astype("<i2").view("<u2")
    # Byte planes: the high bytes of small deltas are mostly 0x00/0xff and
    # compress far better on their own than interleaved with the low bytes.
    planes = np.concatenate([(u & 0xFF).astype(np.uint8).ravel(), (u >> 8).astype(np.uint8).ravel()])
    return np.frombuffer(lzma.compress(planes.tobytes(), preset=9), dtype=np.uint8).copy()


def decode_waveforms(blob: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`encode_waveforms`."""
    shape = tuple(int(s) for s in shape)
    raw = np.frombuffer(lzma.decompress(np.asarray(blob, dtype=np.uint8).tobytes()), dtype=np.uint8)
    half = raw.size // 2
    u = raw[:half].astype(np.uint16) | (raw[half:].astype(np.uint16) << 8)
    d = u.view(np.int16).reshape(shape)
    return np.cumsum(d, axis=1, dtype=np.int16)


def save_cache(path: Path | str, arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays (as returned by load_cache) to a compressed npz."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = {k: v for k, v in arrays.items() if k != "waveforms"}
    stored["waveforms_xz"] = encode_waveforms(arrays["waveforms"])
    stored["waveforms_shape"] = np.asarray(arrays["waveforms"].shape, dtype=np.int64)
    # Write via a temp name so an interrupted build never leaves a truncated cache.
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **stored)
    os.replace(tmp, path)


def load_cache(path: Path | str = DEFAULT_CACHE) -> dict[str, np.ndarray]:
    """Load the cache as plain arrays (waveforms decoded to int16 (N, 8000))."""
    with np.load(path, allow_pickle=False) as z:
        files = set(z.files)
        out = {k: z[k] for k in ARRAY_KEYS if k in files}
        if "waveforms" not in out:
            out["waveforms"] = decode_waveforms(z["waveforms_xz"], z["waveforms_shape"])
    missing = [k for k in ARRAY_KEYS if k not in out]
    if missing:
        raise KeyError(f"{path}: missing arrays {missing}")
    return out


# --- build -------------------------------------------------------------------


def build_arrays(workers: int | None = None) -> dict[str, np.ndarray]:
    """Generate every array of the dataset in memory."""
    images, labels = load_digits_arrays()
    splits = assign_splits(labels)
    params = draw_utterance_params(splits, labels, seed=PARAM_SEED)
    waveforms = synthesize_all(params, workers=workers)
    return {
        "images": images,
        "labels": labels,
        "waveforms": waveforms,
        "speaker": np.array([p["speaker"] for p in params], dtype=str),
        "speed": np.array([p["speed"] for p in params], dtype=np.int16),
        "pitch": np.array([p["pitch"] for p in params], dtype=np.int16),
        "train_idx": splits["train"],
        "val_idx": splits["val"],
        "test_idx": splits["test"],
    }


def make_manifest(arrays: dict[str, np.ndarray], espeak: str) -> dict[str, Any]:
    """Manifest (version, checksums, speakers) describing a built cache."""
    return {
        "version": VERSION,
        "espeak_ng": espeak,
        "n": int(len(arrays["labels"])),
        "sample_rate": SAMPLE_RATE,
        "waveform_sha256": waveform_sha256(arrays["waveforms"]),
        "images_sha256": images_sha256(arrays["images"]),
        # the text modality is computed from the labels when the dataset loads; this pins it
        "captions_sha256": captions_sha256(draw_captions(arrays["labels"])),
        "vocab": list(VOCAB),
        "splits": {
            s: {"n": int(len(arrays[f"{s}_idx"])), "sha256": split_sha256(arrays[f"{s}_idx"])}
            for s in ("train", "val", "test")
        },
        "speakers": {s: speakers_for_split(s) for s in ("train", "val", "test")},
    }


def build(
    out_path: Path | str = DEFAULT_CACHE,
    manifest_path: Path | str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Generate the cache at ``out_path``; optionally write the manifest. Returns the manifest."""
    arrays = build_arrays(workers=workers)
    save_cache(out_path, arrays)
    manifest = make_manifest(arrays, espeak_version())
    if manifest_path is not None:
        manifest_path = Path(manifest_path)
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build the cache (and manifest) and print the waveform checksum."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help=f"cache path (default {DEFAULT_CACHE})")
    p.add_argument("--manifest", type=Path, default=None,
                   help=f"manifest path (default {DEFAULT_MANIFEST} when --out is not given)")
    p.add_argument("--workers", type=int, default=None, help="synthesis threads")
    args = p.parse_args(argv)
    out = args.out if args.out is not None else DEFAULT_CACHE
    # The default invocation refreshes both shipped files; a custom --out only
    # writes a manifest when asked, so ad-hoc builds never clobber the shipped one.
    manifest_path = args.manifest
    if manifest_path is None and args.out is None:
        manifest_path = DEFAULT_MANIFEST
    t0 = time.perf_counter()
    manifest = build(out, manifest_path, workers=args.workers)
    dt = time.perf_counter() - t0
    size_mb = Path(out).stat().st_size / 1e6
    print(f"wrote {out} ({size_mb:.2f} MB) in {dt:.1f} s")
    if manifest_path is not None:
        print(f"wrote {manifest_path}")
    print(f"waveform_sha256 {manifest['waveform_sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
