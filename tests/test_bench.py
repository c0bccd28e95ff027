"""`mmbalance bench --quick`: every method and every measurement reported, every number positive
and finite. No timing assertions: the ratios themselves are what the command is for. The loader's
baseline is checked for what it computes: the suite's decode path against the reference loader's
copy, and the resampler's kernel built once, not per clip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torchaudio
from PIL import Image

from mmbalance.bench.cli import main as cli
from mmbalance.bench.perf import reference
from mmbalance.bench.perf.bench import SHAPE_NAMES
from mmbalance.bench.perf.loader import LOADER_PATHS, REFERENCE_MISSING, DecodeSplit, reference_split, write_clips
from mmbalance.bench.perf.steps import SHAPES, VARIANTS
from mmbalance.datasets import audio as fe

# the bench sets torch's threads by the runs' policy; the fixture puts them back afterwards
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_bench_reports_every_method_loader_and_the_data_path(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli(["bench", "--quick", "--device", "cpu", "--data-path", "on", "--workers", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    rows = results["steps"]
    assert [r["method"] for r in rows] == [v.label for v in VARIANTS]
    for r in rows:
        for key in ("step_s", "ratio_to_joint", "samples_per_s", "peak_mb", "forward_passes_per_step",
                    "backward_passes_per_step"):
            assert positive_finite(r[key]), (r["method"], key, r[key])
        assert r["method"] in printed
    assert rows[0]["ratio_to_joint"] == 1.0
    by_method = {r["method"]: r for r in rows}
    # pass counts are exact: MIE trains one of two encoders, paper SAM twice per step, code SAM once
    # with two backward passes; MLA one backward per modality; the rest one of each
    assert by_method["mie (paper SAM, stage 2)"]["forward_passes_per_step"] == 1.0
    assert by_method["mie (code SAM, stage 2)"]["forward_passes_per_step"] == 0.5
    assert by_method["mla"]["backward_passes_per_step"] == 2.0
    assert by_method["ogm_ge"]["backward_passes_per_step"] == 1.0
    loaders = results["loaders"]
    assert [r["key"] for r in loaders] == list(LOADER_PATHS)  # the reference first
    assert all(positive_finite(r["samples_per_s_per_core"]) for r in loaders[1:])
    assert loaders[1]["vs_decode"] == 1.0
    first = loaders[0]
    assert first["path"] in printed
    if reference.librosa is None:
        assert first["samples_per_s_per_core"] is None and REFERENCE_MISSING in printed
    else:
        assert positive_finite(first["samples_per_s_per_core"]) and first["vs_reference"] == 1.0
        assert all(positive_finite(r["vs_reference"]) for r in loaders)
    assert printed.count(" the reference per core: ") == 2  # the two targets' verdicts
    check = results["data_path"]
    assert all(positive_finite(check[k]) for k in ("resident_step_s", "loaded_step_s", "loaded_vs_resident"))
    for heading in ("Training step", "Loader", "Data path"):
        assert heading in printed
    # the steps were timed under the runs' thread policy, and the bench says which
    assert results["threads"]["per_run"] == 1
    assert "thread policy: 1 intra-op thread(s) per run (auto: 1 per run" in printed


def test_threads_other_than_the_policy_are_given_explicitly(capsys):
    assert cli(["bench", "--quick", "--only", "steps", "--methods", "ogm_ge", "--threads", "2", "--device", "cpu"]) == 0
    assert "thread policy: 2 intra-op thread(s) per run (train.threads)" in capsys.readouterr().out
    assert cli(["bench", "--quick", "--threads", "0"]) == 2
    assert "--threads must be 'auto' or a whole number >= 1, got '0'" in capsys.readouterr().err


def test_shape_choices_match_the_presets():
    assert sorted(SHAPE_NAMES) == sorted(SHAPES)


def test_unknown_method_is_refused_with_the_allowed_ones(capsys):
    assert cli(["bench", "--quick", "--methods", "ogm_ge,nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "ogm_ge" in err


def test_methods_select_built_in_variants_and_any_registered_method():
    from mmbalance.bench.perf.steps import variants_named

    chosen = variants_named(["mie", "unimodal"])
    assert [v.label for v in chosen] == ["joint", "mie (paper SAM, stage 2)", "mie (code SAM, stage 2)", "unimodal"]
    assert chosen[-1].method == {"name": "unimodal"} and chosen[-1].target is None


def test_a_method_without_default_parameters_is_refused_by_name(capsys):
    assert cli(["bench", "--quick", "--methods", "unimodal"]) == 2
    err = capsys.readouterr().err
    assert "'unimodal'" in err and "modality" in err and "default parameters" in err


def test_without_librosa_the_loader_table_says_how_to_install_the_reference(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reference, "librosa", None)  # what the module holds when librosa is not installed
    out = tmp_path / "bench.json"
    assert cli(["bench", "--quick", "--only", "loader", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert REFERENCE_MISSING in printed and "Training step" not in printed
    assert "not checked, no reference (librosa not installed)" in printed
    rows = json.loads(out.read_text())["loaders"]
    assert rows[0]["samples_per_s_per_core"] is None and rows[0]["note"] == REFERENCE_MISSING
    assert all(r["vs_reference"] is None for r in rows) and positive_finite(rows[2]["vs_decode"])


def test_only_refuses_an_unknown_section_with_the_allowed_ones(capsys):
    assert cli(["bench", "--quick", "--only", "loader,nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "steps, loader, packing" in err


def test_the_decode_path_computes_what_the_reference_loader_computes(tmp_path):
    """The suite's decode path against the copy of OGM-GE's __getitem__, clip by clip.

    Spectrogram magnitudes |X| = exp(log value), compared relative to the clip's peak |X|, on the
    frames whose STFT window lies inside the clip (the two edge frames differ by design: the
    suite pads as librosa < 0.9 did, 'reflect', datasets.audio.stft_log; librosa >= 0.9 pads
    zeros). Two bands, because the resamplers differ (the suite: torchaudio's sinc filter set to
    resampy's kaiser_best, what librosa < 0.10 used; librosa >= 0.10: soxr_hq):
    - below 0.9 x the source's Nyquist frequency (7.2 kHz for 16 kHz audio), inside both
      filters' passbands: within 2e-3 of the peak. The cache's float16 rounds a log value near
      the peak's (~3.6) by up to 2^-10, i.e. |X| by up to 1e-3 of the peak; the passbands
      themselves agree to 2.4e-4 of the peak (measured on these clips).
    - above, where the two filters' transition bands differ: within 3e-2 (measured: 1.7e-2).
    Above 8 kHz both leave only float32 rounding noise, orders of magnitude under the peak but
    up to a few units apart as logs, so logs are not compared there.
    Frames: a flat colour, so any crop and flip gives the same image; this checks the layout
    (C, T, H, W), channel order, scaling and normalisation, not the crop's geometry.
    """
    pytest.importorskip("librosa")
    sources = write_clips(tmp_path, 2)
    for source in sources:
        for frame in source.files["visual"].glob("*.jpg"):
            Image.new("RGB", (480, 360), (200, 120, 40)).save(frame)
    ours, reference = DecodeSplit(sources), reference_split(sources)
    for i, source in enumerate(sources):
        (mine, label), (theirs, their_label) = ours[i], reference[i]
        assert label == their_label == source.label
        assert mine["audio"].shape == theirs["audio"].shape == (1, 257, 188)
        a, b = np.exp(mine["audio"][0, :, 1:-1].numpy()), np.exp(theirs["audio"][0, :, 1:-1].numpy())
        passband = int(0.9 * 8000 / (22050 / 512)) + 1  # bins below 7.2 kHz
        error = np.abs(a - b) / b.max()
        assert error[:passband].max() < 2e-3
        assert error[passband:].max() < 3e-2
        assert mine["visual"].shape == theirs["visual"].shape == (3, 1, 224, 224)
        assert np.allclose(mine["visual"].numpy(), theirs["visual"].numpy(), atol=1e-6)


def test_the_decode_path_builds_the_resampler_kernel_once_for_many_clips(tmp_path, monkeypatch):
    """Every sinc kernel torchaudio builds is counted: one per Resample module made, one per
    call of torchaudio.functional.resample (which builds it anew each time)."""
    built = []
    make, resample = torchaudio.transforms.Resample.__init__, torchaudio.functional.resample

    def counted_make(self, *args, **kwargs):
        built.append("Resample")
        make(self, *args, **kwargs)

    def counted_resample(*args, **kwargs):
        built.append("functional.resample")
        return resample(*args, **kwargs)

    monkeypatch.setattr(torchaudio.transforms.Resample, "__init__", counted_make)
    monkeypatch.setattr(torchaudio.functional, "resample", counted_resample)
    fe._resampler.cache_clear()  # the one construction this process may already have made
    decode = DecodeSplit(write_clips(tmp_path, 6))
    for i in range(len(decode)):
        decode[i]
    assert built == ["Resample"]
