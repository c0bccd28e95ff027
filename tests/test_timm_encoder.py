"""The `timm` encoder: any timm backbone on images, frame stacks and spectrograms."""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import torch

from mmbalance.bench.cli import main
from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Modality
from mmbalance.models import build_encoder
from mmbalance.models.timm_backbone import TimmEncoder, TimmParams

# the fastest small timm model here on 2 CPU cores at 32x32, batch 64 (forward + backward):
# resnet10t 0.074 s, mobilenetv3_small_050 0.085 s
SMALL = "resnet10t"


@pytest.mark.parametrize("modality", ["visual", "audio"])  # an 8x8 image; a 24x32 log-mel spectrogram
def test_one_epoch_on_avdigits(modality, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("dataset: {name: avdigits}\n"
                      f"model: {{encoders: {{{modality}: {{name: timm, model: {SMALL}}}}}}}\n")
    args = ["--results", str(tmp_path), "run", str(config), "method.name=joint", "train.epochs=1",
            "train.progress=false", "eval.probe_c_grid=[1.0]"]
    assert main(args) == 0
    (run_dir,) = tmp_path.glob("default/*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 1 and set(summary["probes"]) == {"audio", "visual"}
    weights = torch.load(run_dir / "best.pt", weights_only=True)["model"]
    assert f"encoders.{modality}.net.conv1.0.weight" in weights  # resnet10t's deep stem, 1 input channel
    assert weights[f"encoders.{modality}.net.conv1.0.weight"].shape[1] == 1


def test_listed_with_its_parameters(capsys):
    assert main(["list"]) == 0
    assert "timm             params: model=required, pretrained=False, in_chans=None" in capsys.readouterr().out


def test_frame_stack_is_mean_of_frame_features():
    torch.manual_seed(0)
    enc = build_encoder({"name": "timm", "model": SMALL}, Modality("clip", "video", (3, 2, 16, 16))).eval()
    assert enc.out_dim == enc.net.num_features == 512
    x = torch.randn(2, 3, 2, 16, 16)
    with torch.no_grad():
        out = enc(x)
        per_frame = torch.stack([enc.net(x[:, :, t]) for t in range(2)])
    assert out.shape == (2, 512)
    assert torch.allclose(out, per_frame.mean(dim=0), atol=1e-5)
    assert not torch.allclose(per_frame[0], per_frame[1], atol=1e-3)  # both frames count


def test_spectrogram_without_channel_axis_gets_one():
    enc = TimmEncoder(TimmParams(model=SMALL), Modality("audio", "audio", (24, 32))).eval()
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        assert torch.equal(enc(x), enc.net(x.unsqueeze(1)))


def test_out_dim_is_the_pooled_width_where_a_head_conv_follows():
    # MobileNetV3 pools, then a 1x1 conv: its pooled output is wider than num_features
    enc = TimmEncoder(TimmParams(model="mobilenetv3_small_050"), Modality("visual", "image", (1, 8, 8)))
    assert enc.net.num_features == 288
    assert enc(torch.randn(2, 1, 8, 8)).shape == (2, enc.out_dim) == (2, 1024)


def test_in_chans_defaults_from_the_modality_and_must_agree():
    enc = build_encoder({"name": "timm", "model": SMALL, "in_chans": 2}, Modality("flow", "video", (2, 3, 16, 16)))
    assert enc.net.conv1[0].in_channels == 2
    with pytest.raises(ConfigError, match=r"model\.encoders\.audio\.in_chans=3, but modality 'audio' has 1 channel"):
        build_encoder({"name": "timm", "model": SMALL, "in_chans": 3}, Modality("audio", "audio", (1, 24, 32)))


def test_bad_model_and_shape_are_config_errors():
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnet10tt' \(model\.encoders\.visual\.model\) "
                                          r"\(did you mean 'resnet10t'\?\)"):
        build_encoder({"name": "timm", "model": "resnet10tt"}, Modality("visual", "image", (1, 8, 8)))
    with pytest.raises(ConfigError, match=r"encoder timm needs .* modality 'x' has shape \(8,\)"):
        build_encoder({"name": "timm", "model": SMALL}, Modality("x", "vector", (8,)))


def test_pretrained_without_cached_weights_names_model_and_cache(tmp_path, monkeypatch):
    # offline, as this machine is for the Hub (fails at once instead of retrying), with an
    # empty cache; huggingface_hub reads both settings when imported, so they are set there too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError) as info:
        build_encoder({"name": "timm", "model": SMALL, "pretrained": True}, Modality("visual", "image", (3, 8, 8)))
    msg = str(info.value)
    assert "\n" not in msg
    assert f"timm model {SMALL!r} (model.encoders.visual.pretrained=true)" in msg
    assert (f"timm looks in {tmp_path / 'hf'} (set by HF_HOME / HF_HUB_CACHE) or "
            f"{tmp_path / 'torch' / 'hub' / 'checkpoints'}") in msg
