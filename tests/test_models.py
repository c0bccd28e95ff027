"""Encoders, fusion heads and the two built-in methods: shapes, gradients and hand-computed logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import NoParams
from mmbalance.core.types import Batch, Modality
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.joint import Joint, JointParams
from mmbalance.methods.unimodal import Unimodal, UnimodalParams
from mmbalance.models.fusion import (
    FUSIONS,
    ConcatFusion,
    FiLMFusion,
    GatedFusion,
    LateFusion,
    SumFusion,
    build_fusion,
)
from mmbalance.models.resnet import ResNet18Encoder
from mmbalance.models.small import MLPEncoder, MLPParams, SmallCNNEncoder, SmallCNNParams
from tests.conftest import step_context

DIMS = {"audio": 5, "visual": 3}
NUM_CLASSES = 4
BATCH = 6


def int_tensor(*shape: int, lo: int = -3, hi: int = 4, seed: int = 0) -> torch.Tensor:
    """Small integer-valued float tensors, so sums and halves below are exact in float32."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=gen).float()


def feats_for(dims: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    return {m: int_tensor(BATCH, d, seed=seed + i) for i, (m, d) in enumerate(dims.items())}


def set_linear(layer: nn.Linear, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = int_tensor(*layer.weight.shape, seed=seed)
    b = int_tensor(*layer.bias.shape, seed=seed + 100)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return w, b


# ------------------------------------------------------------------------------ fusion shapes/grads


@pytest.mark.parametrize("name", FUSIONS)
def test_fusion_shape_and_gradients_reach_both_encoders(name):
    assert set(FUSIONS) == {"concat", "sum", "film", "gated", "late"}
    torch.manual_seed(0)
    encoders = nn.ModuleDict({"audio": nn.Linear(7, 5), "visual": nn.Linear(4, 3)})
    fusion = build_fusion(name, DIMS, NUM_CLASSES)
    x = {"audio": torch.randn(BATCH, 7), "visual": torch.randn(BATCH, 4)}
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    logits = fusion({m: encoders[m](x[m]) for m in DIMS})
    assert logits.shape == (BATCH, NUM_CLASSES)
    F.cross_entropy(logits, y).backward()
    for m in DIMS:
        grad = encoders[m].weight.grad
        assert grad is not None and grad.abs().sum().item() > 0, m


@pytest.mark.parametrize("name", ["concat", "sum", "film", "gated", "late"])
def test_joint_training_step_updates_both_encoders(name):
    torch.manual_seed(0)
    mods = (Modality("audio", "vector", (7,)), Modality("visual", "image", (1, 2, 2)))
    encoders = nn.ModuleDict({m.name: MLPEncoder(MLPParams(hidden=16, out_dim=8), m) for m in mods})
    method = Joint(JointParams(), MethodSetup(encoders, NUM_CLASSES, mods, fusion=name))
    method.attach(step_context(lambda: torch.optim.SGD(method.parameters(), lr=0.5)))
    before = {k: v.clone() for k, v in method.state_dict().items()}
    batch = Batch({"audio": torch.randn(BATCH, 7), "visual": torch.randn(BATCH, 1, 2, 2)},
                  torch.tensor([0, 1, 2, 3, 0, 1]))
    out = method.training_step(batch)
    assert out["loss"].ndim == 0 and out["loss"].item() > 0
    assert method.step_context.backward_passes == 1
    after = method.state_dict()
    for m in ("audio", "visual"):
        changed = [k for k in before if k.startswith(f"encoders.{m}.") and not torch.equal(before[k], after[k])]
        # both Linear layers (weight and/or bias) of this encoder moved
        assert any(".net.1." in k for k in changed), (m, changed)
        assert any(".net.3." in k for k in changed), (m, changed)


# ----------------------------------------------------------------------------- hand-computed logits


def test_concat_per_modality_is_weight_block_plus_half_bias():
    fusion = build_fusion("concat", DIMS, NUM_CLASSES)
    assert isinstance(fusion, ConcatFusion)
    w, b = set_linear(fusion.fc_out, seed=1)
    f = feats_for(DIMS)
    a, v = f["audio"], f["visual"]
    per = fusion.per_modality(f)
    assert list(per) == ["audio", "visual"]
    assert torch.equal(per["audio"], a @ w[:, :5].t() + b / 2)
    assert torch.equal(per["visual"], v @ w[:, 5:].t() + b / 2)
    fused = fusion(f)
    assert torch.equal(fused, torch.cat([a, v], dim=1) @ w.t() + b)
    assert torch.equal(per["audio"] + per["visual"], fused)


def test_concat_tiny_case_by_hand():
    fusion = build_fusion("concat", {"audio": 1, "visual": 1}, 2)
    with torch.no_grad():
        fusion.fc_out.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
        fusion.fc_out.bias.copy_(torch.tensor([0.5, -1.0]))
    f = {"audio": torch.tensor([[2.0]]), "visual": torch.tensor([[4.0]])}
    # audio: [1*2, 3*2] + [0.25, -0.5]; visual: [2*4, -1*4] + [0.25, -0.5]
    per = fusion.per_modality(f)
    assert per["audio"].tolist() == [[2.25, 5.5]]
    assert per["visual"].tolist() == [[8.25, -4.5]]
    assert fusion(f).tolist() == [[10.5, 1.0]]


def test_sum_per_modality_uses_half_bias():
    fusion = build_fusion("sum", DIMS, NUM_CLASSES)
    assert isinstance(fusion, SumFusion)
    wa, ba = set_linear(fusion.heads["audio"], seed=2)
    wv, bv = set_linear(fusion.heads["visual"], seed=3)
    f = feats_for(DIMS, seed=10)
    per = fusion.per_modality(f)
    assert torch.equal(per["audio"], f["audio"] @ wa.t() + ba / 2)
    assert torch.equal(per["visual"], f["visual"] @ wv.t() + bv / 2)
    fused = fusion(f)
    assert torch.equal(fused, f["audio"] @ wa.t() + ba + f["visual"] @ wv.t() + bv)
    # each head's own bias counts once in the fused logits but only half in its per-modality logits
    assert torch.equal(per["audio"] + per["visual"], fused - (ba + bv) / 2)


def test_late_fusion_is_mean_of_heads():
    fusion = build_fusion("late", DIMS, NUM_CLASSES)
    assert isinstance(fusion, LateFusion)
    wa, ba = set_linear(fusion.heads["audio"], seed=4)
    wv, bv = set_linear(fusion.heads["visual"], seed=5)
    f = feats_for(DIMS, seed=20)
    la, lv = f["audio"] @ wa.t() + ba, f["visual"] @ wv.t() + bv
    per = fusion.per_modality(f)
    assert torch.equal(per["audio"], la)
    assert torch.equal(per["visual"], lv)
    assert torch.equal(fusion(f), (la + lv) / 2)


def test_film_by_hand_and_conditioning_swap():
    f = feats_for(DIMS, seed=30)
    a, v = f["audio"], f["visual"]

    fusion = build_fusion("film", DIMS, NUM_CLASSES)
    assert isinstance(fusion, FiLMFusion)
    assert (fusion.cond, fusion.other) == ("audio", "visual")
    assert fusion.fc.weight.shape == (6, 5) and fusion.fc_out.weight.shape == (NUM_CLASSES, 3)
    w, b = set_linear(fusion.fc, seed=6)
    wo, bo = set_linear(fusion.fc_out, seed=7)
    gb = a @ w.t() + b
    gamma, beta = gb[:, :3], gb[:, 3:]
    assert torch.allclose(fusion(f), (gamma * v + beta) @ wo.t() + bo)
    assert fusion.per_modality(f) is None

    swapped = build_fusion("film", DIMS, NUM_CLASSES, conditioning="visual")
    assert (swapped.cond, swapped.other) == ("visual", "audio")
    assert swapped.fc.weight.shape == (10, 3) and swapped.fc_out.weight.shape == (NUM_CLASSES, 5)
    w, b = set_linear(swapped.fc, seed=8)
    wo, bo = set_linear(swapped.fc_out, seed=9)
    gb = v @ w.t() + b
    gamma, beta = gb[:, :5], gb[:, 5:]
    assert torch.allclose(swapped(f), (gamma * a + beta) @ wo.t() + bo)


def test_gated_by_hand():
    f = feats_for(DIMS, seed=40)
    a, v = f["audio"], f["visual"]
    fusion = build_fusion("gated", DIMS, NUM_CLASSES)
    assert isinstance(fusion, GatedFusion)
    wx, bx = set_linear(fusion.fc_x, seed=11)
    wy, by = set_linear(fusion.fc_y, seed=12)
    wo, bo = set_linear(fusion.fc_out, seed=13)
    gate = 1 / (1 + torch.exp(-(a @ wx.t() + bx)))
    assert torch.allclose(fusion(f), (gate * (v @ wy.t() + by)) @ wo.t() + bo, atol=1e-5)
    assert fusion.per_modality(f) is None

    swapped = build_fusion("gated", DIMS, NUM_CLASSES, conditioning="visual")
    assert (swapped.cond, swapped.other) == ("visual", "audio")
    assert swapped.fc_x.weight.shape == (5, 3) and swapped.fc_y.weight.shape == (5, 5)


@pytest.mark.parametrize("name", ["film", "gated"])
def test_film_gated_need_exactly_two_modalities(name):
    with pytest.raises(ConfigError, match="exactly 2"):
        build_fusion(name, {"a": 2, "b": 3, "c": 4}, NUM_CLASSES)


def test_unknown_fusion_is_config_error():
    with pytest.raises(ConfigError, match="concat, sum, film, gated, late"):
        build_fusion("cat", DIMS, NUM_CLASSES)


@pytest.mark.parametrize("name", ["concat", "sum", "late"])
def test_three_modalities(name):
    dims = {"a": 2, "b": 3, "c": 4}
    fusion = build_fusion(name, dims, NUM_CLASSES)
    f = feats_for(dims, seed=50)
    fused = fusion(f)
    assert fused.shape == (BATCH, NUM_CLASSES)
    per = fusion.per_modality(f)
    assert list(per) == ["a", "b", "c"]
    assert all(p.shape == (BATCH, NUM_CLASSES) for p in per.values())
    if name == "late":
        assert torch.allclose(fused, (per["a"] + per["b"] + per["c"]) / 3)


def test_concat_three_modalities_uses_third_of_bias():
    dims = {"a": 2, "b": 3, "c": 4}
    fusion = build_fusion("concat", dims, NUM_CLASSES)
    w, b = set_linear(fusion.fc_out, seed=14)
    f = feats_for(dims, seed=60)
    per = fusion.per_modality(f)
    assert torch.allclose(per["a"], f["a"] @ w[:, 0:2].t() + b / 3)
    assert torch.allclose(per["b"], f["b"] @ w[:, 2:5].t() + b / 3)
    assert torch.allclose(per["c"], f["c"] @ w[:, 5:9].t() + b / 3)
    assert torch.allclose(per["a"] + per["b"] + per["c"], fusion(f), atol=1e-5)


# ------------------------------------------------------------------------------------- methods


def mlp_setup(fusion: str = "late", seed: int = 0) -> MethodSetup:
    torch.manual_seed(seed)
    mods = (Modality("audio", "vector", (5,)), Modality("visual", "vector", (3,)))
    encoders = nn.ModuleDict({m.name: MLPEncoder(MLPParams(hidden=8, out_dim=6), m) for m in mods})
    return MethodSetup(encoders, NUM_CLASSES, mods, fusion=fusion)


def small_batch(seed: int = 1) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return Batch({"audio": torch.randn(BATCH, 5, generator=gen), "visual": torch.randn(BATCH, 3, generator=gen)},
                 torch.tensor([0, 1, 2, 3, 2, 1]))


def hand_late_loss(method: Joint, batch: Batch, kind: str) -> torch.Tensor:
    a = method.encoders["audio"](batch.inputs["audio"])
    v = method.encoders["visual"](batch.inputs["visual"])
    la, lv = method.fusion.heads["audio"](a), method.fusion.heads["visual"](v)
    if kind == "unimodal":
        return F.cross_entropy(la, batch.labels) + F.cross_entropy(lv, batch.labels)
    return F.cross_entropy((la + lv) / 2, batch.labels)


@pytest.mark.parametrize("kind", ["unimodal", "fused"])
def test_joint_late_loss_matches_hand_computation_and_sgd_update(kind):
    lr = 0.1
    method = Joint(JointParams(late_loss=kind), mlp_setup("late"))
    reference = copy.deepcopy(method)
    batch = small_batch()
    # the expected loss and one plain-SGD update, computed by hand on an identical copy
    expected = hand_late_loss(reference, batch, kind)
    expected.backward()
    with torch.no_grad():
        expected_params = {n: p - lr * p.grad if p.grad is not None else p.clone()
                           for n, p in reference.named_parameters()}
    other_kind = hand_late_loss(reference, batch, "fused" if kind == "unimodal" else "unimodal")
    assert abs(other_kind.item() - expected.item()) > 1e-3  # the two definitions really differ here

    method.attach(step_context(lambda: torch.optim.SGD(method.parameters(), lr=lr)))
    out = method.training_step(batch)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    for n, p in method.named_parameters():
        assert torch.allclose(p, expected_params[n], atol=1e-6), n


def test_joint_late_loss_fused_needs_late_fusion():
    with pytest.raises(ConfigError, match="late_loss='fused'"):
        Joint(JointParams(late_loss="fused"), mlp_setup("concat"))


def test_joint_predict_per_modality():
    batch = small_batch()
    late = Joint(JointParams(), mlp_setup("late"))
    pred = late.predict(batch)
    assert pred.fused.shape == (BATCH, NUM_CLASSES)
    assert torch.allclose(pred.fused, (pred.per_modality["audio"] + pred.per_modality["visual"]) / 2)
    film = Joint(JointParams(), mlp_setup("film"))
    assert film.predict(batch).per_modality is None


def test_unimodal_keeps_only_its_encoder():
    setup = mlp_setup()
    visual_encoder = setup.encoders["visual"]
    method = Unimodal(UnimodalParams(modality="visual"), setup)
    assert list(method.encoders) == ["visual"]
    assert method.encoders["visual"] is visual_encoder
    assert method.modality_names == ("visual",)
    assert (method.head.in_features, method.head.out_features) == (6, NUM_CLASSES)
    # visual MLP (3*8+8 + 8*6+6) + head (6*4+4); nothing of the audio encoder
    assert sum(p.numel() for p in method.parameters()) == (3 * 8 + 8) + (8 * 6 + 6) + (6 * 4 + 4)
    batch = small_batch()
    pred = method.predict(batch)
    assert pred.fused.shape == (BATCH, NUM_CLASSES)
    assert list(pred.per_modality) == ["visual"] and torch.equal(pred.per_modality["visual"], pred.fused)
    # training touches only the visual path
    method.attach(step_context(lambda: torch.optim.SGD(method.parameters(), lr=0.1)))
    expected = F.cross_entropy(method.head(visual_encoder(batch.inputs["visual"])), batch.labels)
    assert method.training_step(batch)["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_unimodal_unknown_modality_names_allowed():
    with pytest.raises(ConfigError) as info:
        Unimodal(UnimodalParams(modality="vidual"), mlp_setup())
    msg = str(info.value)
    assert "'vidual'" in msg
    assert "audio, visual" in msg
    assert "did you mean 'visual'" in msg


# ------------------------------------------------------------------------------------- encoders


@pytest.fixture
def plain_conv():
    """oneDNN spends ~0.7 s building kernels for each new input shape on CPU; the native
    convolution gives the same numbers without that, keeping this file within a few seconds."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def test_resnet18_audio_one_channel(plain_conv):
    torch.manual_seed(0)
    enc = ResNet18Encoder(NoParams(), Modality("audio", "audio", (1, 64, 48)))
    assert enc.out_dim == 512
    assert enc.stem[0].in_channels == 1
    out = enc(torch.randn(2, 1, 64, 48))
    assert out.shape == (2, 512)
    assert (out >= 0).all()  # mean of post-ReLU maps


def test_resnet18_video_is_mean_of_frame_features(plain_conv):
    torch.manual_seed(0)
    enc = ResNet18Encoder(NoParams(), Modality("visual", "video", (3, 2, 32, 32))).eval()
    x = torch.randn(2, 3, 2, 32, 32)
    with torch.no_grad():
        out = enc(x)
        frames = torch.stack([enc(x[:, :, t]) for t in range(2)]).mean(dim=0)
    assert out.shape == (2, 512)
    assert torch.allclose(out, frames, atol=1e-5)
    assert not torch.allclose(frames, enc(x[:, :, 0]).detach(), atol=1e-3)  # both frames count


def test_resnet18_flow_two_channels(plain_conv):
    torch.manual_seed(0)
    enc = ResNet18Encoder(NoParams(), Modality("flow", "video", (2, 3, 16, 16)))
    assert enc.stem[0].in_channels == 2
    assert enc(torch.randn(2, 2, 3, 16, 16)).shape == (2, 512)


def test_resnet18_rejects_vector_modality():
    with pytest.raises(ConfigError, match="resnet18"):
        ResNet18Encoder(NoParams(), Modality("x", "vector", (8,)))


def test_resnet18_parameter_count_matches_torchvision_without_fc():
    reference = torchvision.models.resnet18(weights=None)
    total = sum(p.numel() for p in reference.parameters())
    fc = sum(p.numel() for p in reference.fc.parameters())
    assert fc == 512 * 1000 + 1000
    enc = ResNet18Encoder(NoParams(), Modality("visual", "image", (3, 32, 32)))
    count = sum(p.numel() for p in enc.parameters())
    assert count == total - fc == 11_176_512
    # 1-channel audio: conv1 has 64*1*7*7 weights instead of 64*3*7*7
    audio = ResNet18Encoder(NoParams(), Modality("audio", "audio", (1, 16, 16)))
    assert sum(p.numel() for p in audio.parameters()) == count - 64 * 2 * 7 * 7


def test_small_cnn_image_and_video(plain_conv):
    torch.manual_seed(0)
    params = SmallCNNParams(channels=(4, 8), out_dim=10)
    image = SmallCNNEncoder(params, Modality("audio", "audio", (1, 24, 32)))
    assert image.out_dim == 10
    assert image(torch.randn(3, 1, 24, 32)).shape == (3, 10)
    video = SmallCNNEncoder(params, Modality("clip", "video", (1, 3, 8, 8))).eval()
    x = torch.randn(2, 1, 3, 8, 8)
    with torch.no_grad():
        out = video(x)
        frames = torch.stack([video(x[:, :, t]) for t in range(3)]).mean(dim=0)
    assert out.shape == (2, 10)
    assert torch.allclose(out, frames, atol=1e-6)
    with pytest.raises(ConfigError, match="small_cnn"):
        SmallCNNEncoder(params, Modality("x", "vector", (8,)))


@pytest.mark.parametrize("stride", [1, 2])
def test_small_cnn_stem_stride(plain_conv, stride):
    """stem_stride=2 (the default) halves each side in the first conv, before any full-size work;
    1 is the network as it was. Parameters are the same either way."""
    enc = SmallCNNEncoder(SmallCNNParams(stem_stride=stride), Modality("image", "image", (3, 32, 32)))
    assert SmallCNNParams().stem_stride == 2
    first_block = enc.features[:4]  # conv, BN, ReLU, 2x2 max-pool
    assert first_block(torch.randn(2, 3, 32, 32)).shape == (2, 16, 16 // stride, 16 // stride)
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    other = SmallCNNEncoder(SmallCNNParams(stem_stride=3 - stride), Modality("image", "image", (3, 32, 32)))
    assert [p.shape for p in enc.parameters()] == [p.shape for p in other.parameters()]


def test_small_cnn_runs_channels_last_on_cpu_with_the_same_numbers():
    torch.manual_seed(0)
    enc = SmallCNNEncoder(SmallCNNParams(), Modality("image", "image", (3, 20, 24))).eval()
    seen = []
    enc.features[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    x = torch.randn(3, 3, 20, 24)
    with torch.no_grad():
        out, plain = enc(x), enc.features(x)  # the forward's NHWC input, and the same net on NCHW
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[1].is_contiguous(
        memory_format=torch.channels_last)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)


def test_mlp_encoder_shape_and_parameter_count():
    enc = MLPEncoder(MLPParams(hidden=7, out_dim=3), Modality("visual", "image", (1, 8, 8)))
    assert enc(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert sum(p.numel() for p in enc.parameters()) == (64 * 7 + 7) + (7 * 3 + 3)
