"""Config loading: error messages that name key, origin and what is allowed; overrides; run ids; CLI."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mmbalance.bench.cli import main
from mmbalance.bench.config import load_config, validate
from mmbalance.core.errors import ConfigError
from mmbalance.core.overrides import parse_override


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def config_error(path: Path | None = None, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ------------------------------------------------------------------------------------ errors


def test_unknown_key_names_key_file_and_closest(tmp_path):
    path = write(tmp_path, "train: {epochs: 3, epohcs: 5}\n")
    msg = config_error(path)
    assert "'train.epohcs'" in msg
    assert str(path) in msg
    assert "did you mean 'epochs'?" in msg
    assert "batch_size" in msg  # the allowed keys of the section are listed


def test_unknown_method_name(tmp_path):
    path = write(tmp_path, "method: {name: jiont}\n")
    msg = config_error(path)
    assert "'jiont'" in msg
    assert "joint" in msg
    assert "unimodal" in msg  # allowed list
    assert str(path) in msg


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path, 'train: {epochs: "many"}\n')
    msg = config_error(path)
    assert "train.epochs" in msg
    assert "'many'" in msg
    assert str(path) in msg


def test_unknown_method_parameter_from_override(tmp_path):
    path = write(tmp_path, "method: {name: joint}\n")
    msg = config_error(path, ("method.alhpa=1",))
    assert "unknown key 'method.alhpa'" in msg
    assert "override 'method.alhpa=1'" in msg
    assert "late_loss" in msg  # what joint does accept


def test_unknown_method_parameter_with_default_method():
    msg = config_error(None, ("method.alhpa=1",))
    assert "unknown key 'method.alhpa'" in msg
    assert "override 'method.alhpa=1'" in msg


def test_unknown_modality_in_encoders(tmp_path):
    path = write(tmp_path, "model: {encoders: {audoi: {name: mlp}}}\n")
    msg = config_error(path)
    assert "model.encoders.audoi" in msg
    assert "did you mean 'audio'?" in msg
    assert "audio, visual" in msg
    assert str(path) in msg


def test_unknown_modality_from_override_names_the_override():
    msg = config_error(None, ("model.encoders.audoi.name=mlp",))
    assert "audio, visual" in msg
    assert "override 'model.encoders.audoi.name=mlp'" in msg


def test_preset_error_from_override_names_the_override():
    msg = config_error(None, ("dataset.preset=null",))
    assert "override 'dataset.preset=null'" in msg


def test_unknown_fusion_lists_allowed():
    msg = config_error(None, ("model.fusion=cat",))
    assert "model.fusion" in msg
    assert "'cat'" in msg
    for name in ("concat", "sum", "film", "gated", "late"):
        assert f"'{name}'" in msg
    assert "override 'model.fusion=cat'" in msg


def test_unknown_conditioning_modality():
    msg = config_error(None, ("model.fusion=film", "model.conditioning=vidio"))
    assert "model.conditioning='vidio'" in msg
    assert "audio, visual" in msg


@pytest.mark.parametrize("text", ["trainepochs", "=5", "train.epochs=[1,"])
def test_bad_override_text(text):
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)
    with pytest.raises(ConfigError):
        load_config(None, [text])


def test_missing_and_non_mapping_file(tmp_path):
    assert "does not exist" in config_error(tmp_path / "nope.yaml")
    assert "must hold a mapping" in config_error(write(tmp_path, "- 1\n- 2\n"))


# --------------------------------------------------------------------------------- overrides


def test_overrides_parse_yaml_scalars(tmp_path):
    assert parse_override("train.epochs=7") == (["train", "epochs"], 7)
    assert parse_override("eval.probe_c_grid=[0.1,1]") == (["eval", "probe_c_grid"], [0.1, 1])
    path = write(tmp_path, "train: {epochs: 3, batch_size: 16}\n")
    cfg = load_config(path, ["train.epochs=7", "eval.probe_c_grid=[0.1,1]", "train.drop_last=true"])
    assert cfg.train.epochs == 7 and type(cfg.train.epochs) is int
    assert cfg.train.batch_size == 16  # the file's other keys survive an override beside them
    assert cfg.eval.probe_c_grid == [0.1, 1.0]
    assert cfg.train.drop_last is True


def test_overrides_win_over_file_and_merge_sections(tmp_path):
    path = write(tmp_path, "optim: {lr: 0.5, momentum: 0.0}\nmodel: {encoders: {audio: {hidden: 32}}}\n")
    cfg = load_config(path, ["optim.lr=0.25", "model.encoders.audio.out_dim=8"])
    assert cfg.optim.lr == 0.25 and cfg.optim.momentum == 0.0
    assert cfg.model.encoders["audio"] == {"name": "mlp", "hidden": 32, "out_dim": 8}


# ------------------------------------------------------------------------------------ run id


def test_defaults_are_filled_in():
    cfg = load_config()
    assert cfg.method == {"name": "joint", "late_loss": "unimodal"}
    assert cfg.model.encoders == {
        "audio": {"name": "mlp", "hidden": 128, "out_dim": 64},
        "visual": {"name": "mlp", "hidden": 128, "out_dim": 64},
    }
    assert cfg.dataset == {
        "name": "avdigits", "preset": "audio-dominant", "audio_snr_db": 0.0,
        "image_noise_sigma": 0.6, "noise_seed": 0, "cache": None,
    }
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (100, 64, 1e-3)


def test_gaussian_default_encoders():
    cfg = load_config(None, ["dataset.name=gaussian"])
    assert cfg.model.encoders == {m: {"name": "mlp", "hidden": 32, "out_dim": 16} for m in ("audio", "visual")}
    assert cfg.dataset["num_classes"] == 4


def test_run_id_stable_and_sensitive(tmp_path):
    path = write(tmp_path, "train: {epochs: 3}\noptim: {lr: 0.01}\n")
    base = load_config(path).run_id()
    assert base == load_config(path).run_id()
    assert base.startswith("joint-")
    assert len(base) == len("joint-") + 12 and all(c in "0123456789abcdef" for c in base[6:])
    # keys that do not change what is computed
    for same in (["group=other"], ["label=cell-a"], ["train.workers=4"], ["train.progress=false"],
                 ["group=g2", "label=x", "train.workers=2", "train.progress=false"]):
        assert load_config(path, same).run_id() == base, same
    # keys that do
    for different in (["train.seed=1"], ["optim.lr=0.02"], ["train.epochs=4"], ["model.fusion=sum"]):
        assert load_config(path, different).run_id() != base, different
    # a default spelled out explicitly is the same run
    assert load_config(path, ["method.late_loss=unimodal"]).run_id() == base
    uni = load_config(path, ["method.name=unimodal", "method.modality=audio"])
    assert uni.run_id().startswith("unimodal-")


def test_resolved_config_round_trips():
    cfg = load_config(None, ["dataset.preset=visual-dominant", "model.fusion=late", "method.late_loss=fused"])
    again = validate(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.run_id() == cfg.run_id()


# ---------------------------------------------------------------------------- AV-Digits presets


def test_preset_fills_values():
    cfg = load_config(None, ["dataset.preset=visual-dominant"])
    assert cfg.dataset["audio_snr_db"] == -6.0
    assert cfg.dataset["image_noise_sigma"] == 0.3
    cfg = load_config(None, ["dataset.preset=strong-audio-dominant"])
    assert (cfg.dataset["audio_snr_db"], cfg.dataset["image_noise_sigma"]) == (10.0, 0.6)


def test_explicit_value_beats_preset(tmp_path):
    path = write(tmp_path, "dataset: {name: avdigits, preset: visual-dominant, audio_snr_db: 3}\n")
    cfg = load_config(path)
    assert cfg.dataset["audio_snr_db"] == 3.0
    assert cfg.dataset["image_noise_sigma"] == 0.3
    cfg = load_config(None, ["dataset.preset=visual-dominant", "dataset.audio_snr_db=3"])
    assert (cfg.dataset["audio_snr_db"], cfg.dataset["image_noise_sigma"]) == (3.0, 0.3)


def test_no_preset_needs_both_values():
    assert "audio_snr_db and image_noise_sigma" in config_error(None, ("dataset.preset=null",))
    assert "audio_snr_db and image_noise_sigma" in config_error(
        None, ("dataset.preset=null", "dataset.audio_snr_db=1")
    )
    cfg = load_config(None, ["dataset.preset=null", "dataset.audio_snr_db=1", "dataset.image_noise_sigma=0.2"])
    assert (cfg.dataset["preset"], cfg.dataset["audio_snr_db"], cfg.dataset["image_noise_sigma"]) == (None, 1.0, 0.2)


def test_unknown_preset_and_negative_sigma():
    msg = config_error(None, ("dataset.preset=audio-dom",))
    assert "dataset.preset" in msg and "'visual-dominant'" in msg
    assert "dataset.image_noise_sigma" in config_error(None, ("dataset.image_noise_sigma=-1",))


# ------------------------------------------------------------------------------------------ CLI


def test_cli_show_config(tmp_path, capsys):
    path = write(tmp_path, "train: {epochs: 3}\n")
    assert main(["show-config", str(path), "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    run_id = load_config(path, ["optim.lr=0.5"]).run_id()
    assert out.rstrip().endswith(f"# run id: {run_id}")
    assert "epochs: 3" in out and "lr: 0.5" in out


def test_cli_run_bad_config_exits_2(tmp_path, capsys):
    path = write(tmp_path, "train: {epochs: 3, epohcs: 5}\n")
    assert main(["--results", str(tmp_path / "results"), "run", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error:")
    assert "train.epohcs" in captured.err
    assert str(path) in captured.err
    assert not (tmp_path / "results").exists()  # nothing ran


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("joint", "unimodal", "avdigits", "cgdigits", "gaussian", "mlp", "resnet18", "small_cnn",
                 "audio-dominant", "strong-audio-dominant", "visual-dominant", "late_loss='unimodal'"):
        assert word in out, word
