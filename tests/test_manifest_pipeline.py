"""`manifest` pipeline options: a preset + a YAML file + --set, recorded in the cache, read by runs;
features, crop/pad, augmentation switches and train-split normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch
import yaml

from mmbalance.bench.cli import main as cli
from mmbalance.bench.config import load_config
from mmbalance.core.errors import ConfigError, DataError
from mmbalance.core.overrides import flat
from mmbalance.datasets.cache import Cache
from mmbalance.datasets.manifest import Manifest, ManifestParams
from mmbalance.datasets.manifest_pipeline import AudioOptions, PipelineOptions, audio_features
from mmbalance.datasets.prepare.runner import prepare
from tests.fixtures.manifest import CLIP_SECONDS, LOW_SR, write_short_clips
from tests.fixtures.media import tone
from tests.fixtures.spectra import numpy_log_mel

PER_CLASS = 5  # per class: 3 train clips (0.3, 0.6, 1.2 s), 1 val, 1 test
OPTIONS_FILE = {"audio": {"sample_rate": LOW_SR, "feature": "logmel", "bins": 40, "seconds": 0.5},
                "image": {"size": 16}}
# everything the cache must record: the small preset, the file's options, then the --set ones
EXPECTED = {
    "audio": {"sample_rate": 8000, "seconds": 0.5, "crop": "start", "max_seconds": 10.0, "pad": "silence",
              "feature": "logmel", "bins": 40, "frames": None, "window_ms": 25.0, "hop_ms": 10.0},
    "image": {"size": 16}, "video": {"slots": 10, "frames": 2}, "augment": ["crop"], "normalize": True,
}
FRAMES = 1 + (4000 - 200) // 80  # 0.5 s at 8 kHz, 200-sample windows every 80 samples
LOG_FLOOR = float(np.float16(np.log(1e-7)))  # log(power + 1e-7) of silence, as stored


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """(raw folder, cache) prepared through the CLI from the small preset, a YAML file and --set."""
    root = tmp_path_factory.mktemp("own")
    csv_path = write_short_clips(root / "raw", per_class=PER_CLASS)
    opts = root / "opts.yaml"
    opts.write_text(yaml.safe_dump(OPTIONS_FILE))
    out = root / "cache"
    code = cli(["prepare", "manifest", "--raw", str(csv_path), "--out", str(out), "--pipeline", "small",
                "--pipeline-file", str(opts), "--set", "video.frames=2", "--set", "normalize=true", "--workers", "1"])
    assert code == 0
    return root / "raw", out


def train_rows(cache: Cache) -> list[int]:
    return cache.meta.splits["train"]


# ---- the cache records every option -------------------------------------------------------------


def test_the_cache_records_every_option(own):
    meta = Cache(own[1]).meta
    assert meta.pipeline == "small"
    assert meta.pipeline_params["options"] == EXPECTED
    assert set(flat(EXPECTED)) == set(flat(PipelineOptions().model_dump()))  # every option, no other


def test_logmel_cache_shapes_values_and_padding(own):
    raw, out = own
    cache = Cache(out)
    audio, image = cache.arrays["audio"], cache.arrays["image"]
    assert audio.shape == (3 * PER_CLASS, FRAMES, 40) and image.shape == (3 * PER_CLASS, 1, 16, 16, 3)
    for sid, seconds in (("dog0", 0.3), ("dog2", 1.2)):
        row = cache.meta.ids.index(sid)
        wave, _ = soundfile.read(raw / "wav" / f"{sid}.wav", dtype="float64")
        wave = np.pad(wave, (0, max(4000 - len(wave), 0)))[:4000]  # start crop, silence pad to 0.5 s
        expected = numpy_log_mel(wave, LOW_SR, 40, 200, 80)
        loud = expected > -8  # float32 rounding dominates the near-silent bins
        np.testing.assert_allclose(audio[row].astype(np.float64)[loud], expected[loud], atol=0.03)
        if seconds < 0.5:  # frames wholly in the appended silence (from sample 2,400 on): the log floor
            assert np.all(audio[row, 2400 // 80:] == LOG_FLOOR)


# ---- normalisation -------------------------------------------------------------------------------


def test_train_statistics_are_stored_and_applied(own):
    raw, out = own
    cache = Cache(out)
    stored = cache.arrays["audio"][train_rows(cache)].astype(np.float64)
    stats = cache.meta.stats["audio"]
    assert stats == pytest.approx({"mean": stored.mean(), "std": stored.std(), "values": stored.size}, rel=1e-12)
    assert "image" not in cache.meta.stats  # images keep ImageNet normalisation
    # independently: numpy log-mels of the train wavs (as float16, as cached)
    ids = [cache.meta.ids[r] for r in train_rows(cache)]
    waves = [soundfile.read(raw / "wav" / f"{i}.wav", dtype="float64")[0] for i in ids]
    feats = np.stack([numpy_log_mel(np.pad(w, (0, max(4000 - len(w), 0)))[:4000], LOW_SR, 40, 200, 80)
                      for w in waves]).astype(np.float16).astype(np.float64)
    assert stats["mean"] == pytest.approx(feats.mean(), rel=2e-3)
    assert stats["std"] == pytest.approx(feats.std(), rel=2e-3)
    # the training tensors: z-scored, so over the train split mean 0 and std 1
    ds = Manifest(ManifestParams(root=str(out)))
    x = torch.stack([ds.split("train")[i][0]["audio"] for i in range(len(ds.split("train")))]).double()
    assert x.shape == (len(ids), 1, FRAMES, 40)
    assert abs(float(x.mean())) < 1e-5 and float(x.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(x.numpy()[:, 0], (stored - stats["mean"]) / stats["std"], rtol=1e-5, atol=1e-5)


def test_the_device_path_normalises_the_same(own):
    ds = Manifest(ManifestParams(root=str(own[1])))
    cpu = ds.split("test")
    split, batch_views = ds.loader_split("test", augment=False, on_device=True)
    halves = torch.stack([split[i][0]["audio"] for i in range(len(split))])
    assert halves.dtype == torch.float16
    whole = torch.stack([cpu[i][0]["audio"] for i in range(len(cpu))])
    assert torch.equal(batch_views["audio"](halves), whole)


def test_normalize_off_gives_the_stored_values(own):
    cache = Cache(own[1])
    ds = Manifest(ManifestParams(root=str(own[1]), options={"normalize": False}))
    x, _ = ds.split("train")[0]
    assert torch.equal(x["audio"][0], torch.from_numpy(cache.arrays["audio"][train_rows(cache)[0]].astype(np.float32)))


# ---- runs read the pipeline from the cache ------------------------------------------------------


def test_show_config_shows_the_cache_options(own, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"dataset: {{name: manifest, root: {own[1]}}}\n")  # no pipeline: the cache's
    assert cli(["show-config", str(config)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out.split("# run id")[0])["dataset"]
    assert shown["pipeline"] == "small" and shown["options"] == EXPECTED


def test_a_run_may_change_only_the_load_time_options(own):
    root = f"dataset.root={own[1]}"
    base = load_config(None, ["dataset.name=manifest", root])
    flipped = load_config(None, ["dataset.name=manifest", root, "dataset.options.augment=[crop,flip]"])
    assert flipped.dataset["options"]["augment"] == ["crop", "flip"] and flipped.run_id() != base.run_id()
    same = load_config(None, ["dataset.name=manifest", root, "dataset.options.audio.bins=40", "dataset.pipeline=small"])
    assert same.run_id() == base.run_id()
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dataset.name=manifest", root, "dataset.options.audio.bins=64"])
    for text in ("dataset.options.audio.bins=64", "override 'dataset.options.audio.bins=64'", "cache's 40",
                 "--set audio.bins=64"):
        assert text in str(err.value)
    with pytest.raises(ConfigError, match=r"dataset.pipeline='default' .* was prepared from, 'small'"):
        load_config(None, ["dataset.name=manifest", root, "dataset.pipeline=default"])
    with pytest.raises(ConfigError, match=r"unknown key 'dataset.options.audio.binz'.*did you mean 'bins'"):
        load_config(None, ["dataset.name=manifest", root, "dataset.options.audio.binz=3"])
    with pytest.raises(ConfigError, match=r"dataset.options.audio.feature.*'fbank', 'logmel' or 'stft'"):
        _ = Manifest(ManifestParams(root=str(own[1]), options={"audio": {"feature": "mfcc"}})).cache


def test_flip_is_off_by_default_and_switchable(own):
    ds = Manifest(ManifestParams(root=str(own[1])))
    view = ds.views(train=True)["image"]
    assert view.flip is False and view.crop == "random_resized"

    original = ds.split("test")[0][0]["image"]  # no augmentation at test

    def seen(augment: list[str]) -> set[str]:
        split = Manifest(ManifestParams(root=str(own[1]), options={"augment": augment}))
        train_views_on_test = split.loader_split("test", augment=True, on_device=False)[0]
        torch.manual_seed(0)
        images = [train_views_on_test[0][0]["image"] for _ in range(20)]
        return {"as is" if torch.equal(x, original) else "mirrored" if torch.equal(x, original.flip(-1)) else "other"
                for x in images}

    assert not torch.equal(original, original.flip(-1))  # dark left half, coloured right half
    assert seen([]) == {"as is"}
    assert seen(["flip"]) == {"as is", "mirrored"}


# ---- features, crop and pad ---------------------------------------------------------------------


@pytest.mark.parametrize("sample_rate, feature, bins", [
    (8000, "fbank", 40), (8000, "logmel", 40), (8000, "stft", 101), (16000, "logmel", 64), (16000, "stft", 257)])
def test_feature_shapes(sample_rate, feature, bins):
    wave = tone(440.0, 0.7, LOW_SR)
    timed = AudioOptions(sample_rate=sample_rate, seconds=0.5, frames=None, feature=feature, bins=bins)
    assert audio_features(wave, LOW_SR, timed).shape == (FRAMES, bins)  # 48 frames at either rate
    counted = AudioOptions(sample_rate=sample_rate, frames=30, feature=feature, bins=bins)
    spec = audio_features(wave, LOW_SR, counted)
    assert spec.shape == (30, bins) and spec.dtype == np.float16


def three_tones() -> np.ndarray:
    """0.5 s each of 500, 1500 and 3000 Hz at 8 kHz."""
    return np.concatenate([tone(f, 0.5, LOW_SR) for f in (500.0, 1500.0, 3000.0)])


def loudest_hz(spec: np.ndarray) -> float:
    """The frequency of the loudest stft bin (4000 Hz / (bins - 1) apart)."""
    return float(spec.astype(np.float32).mean(axis=0).argmax()) * 4000 / (spec.shape[1] - 1)


def test_crop_keeps_the_start_or_the_centre():
    stft = dict(sample_rate=LOW_SR, seconds=0.5, frames=None, feature="stft", bins=201)  # bins 20 Hz apart
    assert loudest_hz(audio_features(three_tones(), LOW_SR, AudioOptions(**stft))) == 500
    assert loudest_hz(audio_features(three_tones(), LOW_SR, AudioOptions(**stft, crop="center"))) == 1500
    kept = audio_features(three_tones(), LOW_SR, AudioOptions(**stft, crop="random-at-train", max_seconds=1.0))
    assert kept.shape == (1 + (8000 - 200) // 80, 201)  # the first second, for the window drawn at load


def test_pad_with_silence_or_by_repeating():
    short = tone(500.0, 0.2, LOW_SR)  # 1,600 samples = 20 hops
    logmel = dict(sample_rate=LOW_SR, seconds=0.5, frames=None, feature="logmel", bins=40)
    silent = audio_features(short, LOW_SR, AudioOptions(**logmel, pad="silence")).astype(np.float32)
    assert np.all(silent[1600 // 80:] == LOG_FLOOR) and np.all(silent[:18].mean(axis=1) > LOG_FLOOR + 1)
    repeated = audio_features(short, LOW_SR, AudioOptions(**logmel, pad="repeat")).astype(np.float32)
    np.testing.assert_allclose(repeated[20:], repeated[:FRAMES - 20], atol=1e-2)


def test_random_at_train_keeps_frame_counts_and_draws_windows(tmp_path):
    csv_path = write_short_clips(tmp_path / "raw", per_class=PER_CLASS)
    options = ["audio.sample_rate=8000", "audio.feature=stft", "audio.bins=101", "audio.seconds=0.3",
               "audio.crop=random-at-train", "audio.max_seconds=1.0", "normalize=false"]
    prepare("manifest", csv_path, tmp_path / "c", "small", workers=1, progress=False, options=options)
    cache = Cache(tmp_path / "c")
    stored, counts = cache.arrays["audio"], cache.counts["audio"]
    assert stored.shape[1:] == (98, 101)  # 1.0 s kept
    frames_of = {0.3: 28, 0.6: 58, 1.2: 98}  # 1 + (samples - 200) // 80, 1.2 s cut to 1.0 s
    assert [int(c) for c in counts] == [frames_of[CLIP_SECONDS[int(sid[-1]) % 3]] for sid in cache.meta.ids]
    # statistics over the real frames of the train clips only
    real = np.concatenate([stored[r, : counts[r]] for r in train_rows(cache)]).astype(np.float64)
    assert cache.meta.stats["audio"]["mean"] == pytest.approx(real.mean(), rel=1e-12)
    ds = Manifest(ManifestParams(root=str(tmp_path / "c")))
    assert ds.modalities[0].shape == (1, 28, 101)
    train = ds.split("train")
    at_test = ds.loader_split("train", augment=False, on_device=False)[0]
    position = {cache.meta.ids[r]: i for i, r in enumerate(train.rows.tolist())}
    long_clip = stored[cache.meta.ids.index("cat2")].astype(np.float32)  # 1.2 s: 98 real frames
    assert np.array_equal(at_test[position["cat2"]][0]["audio"][0].numpy(), long_clip[35:63])  # centred
    clip = stored[cache.meta.ids.index("cat1")].astype(np.float32)  # 0.6 s: 58 real frames
    torch.manual_seed(0)
    starts = set()
    for _ in range(30):
        window = train[position["cat1"]][0]["audio"][0].numpy()
        starts.add(next(s for s in range(98 - 28 + 1) if np.array_equal(window, clip[s : s + 28])))
    assert len(starts) > 5 and max(starts) <= 58 - 28  # within the real frames


# ---- workers and mistakes ------------------------------------------------------------------------


def test_workers_do_not_change_the_cache(own, tmp_path):
    raw, out = own
    opts = tmp_path / "opts.yaml"
    opts.write_text(yaml.safe_dump(OPTIONS_FILE))
    prepare("manifest", raw / "manifest.csv", tmp_path / "two", "small", workers=2, progress=False,
            options=["video.frames=2"], pipeline_file=opts)
    one, two = Cache(out), Cache(tmp_path / "two")
    assert two.meta.pipeline_params == one.meta.pipeline_params and two.meta.stats == one.meta.stats
    for m in ("audio", "image"):
        assert np.array_equal(one.arrays[m], two.arrays[m])


@pytest.mark.parametrize("args, expected", [
    (["--set", "audio.feature=mfcc"], ["audio.feature", "'fbank', 'logmel' or 'stft'", "--set 'audio.feature=mfcc'"]),
    (["--set", "audio.binz=3"], ["unknown key 'audio.binz'", "did you mean 'bins'", "--set 'audio.binz=3'"]),
    (["--set", "audio.seconds=1", "--set", "audio.frames=100"], ["set exactly one of seconds and frames"]),
    (["--set", "audio.crop=center"], ["crop='center' cuts a clip to `seconds`, which is null"]),
    (["--set", "augment=[flip,flip]"], ["names an augmentation twice"]),
    (["--set", "audio.sample_rate=8000", "--set", "audio.bins=200"], ["only 128 FFT bins"]),
    (["--set", "audio.feature=logmel", "--set", "audio.bins=1000"], ["logmel with bins=1000", "stay empty"]),
    (["--pipeline-file", "nowhere.yaml"], ["pipeline file 'nowhere.yaml' does not exist"]),
])
def test_bad_options_are_refused_naming_key_source_and_allowed(own, tmp_path, capsys, args, expected):
    raw, _ = own
    code = cli(["prepare", "manifest", "--raw", str(raw / "manifest.csv"), "--out", str(tmp_path / "never"), *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "never").exists()


def test_list_documents_every_option(capsys):
    assert cli(["list"]) == 0
    shown = capsys.readouterr().out
    for key, value in flat(PipelineOptions().model_dump(mode="json")).items():
        assert f"{key}={value!r}" in shown


def test_options_are_for_manifest_only_and_a_changed_option_needs_a_new_cache(own, tmp_path):
    with pytest.raises(ConfigError, match="dataset 'cremad' takes no pipeline options"):
        prepare("cremad", tmp_path, tmp_path / "c", options=["audio.bins=3"])
    raw, out = own
    with pytest.raises(DataError, match="already holds a different cache"):
        prepare("manifest", raw / "manifest.csv", out, "small", workers=1, progress=False, options=["image.size=32"])
