"""MLA: P updates and head-gradient modification by hand, fusion weights by hand, the alternating
step against a hand computation, the legacy zero_grad quirk, unimodal equivalence, the harness."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbalance.bench.config import load_config
from mmbalance.bench.store import RunDir, Store
from mmbalance.bench.train import run
from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Batch, Modality
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.mla import MLA, MLAParams
from mmbalance.methods.unimodal import Unimodal, UnimodalParams
from mmbalance.models.small import MLPEncoder, MLPParams
from tests.conftest import run_interrupted, step_context, without_timing

C = 3


class Identity(nn.Module):
    """An encoder that returns its input, so that features (and, with head = I, logits) are explicit."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def ident_method(names=("audio", "visual"), d: int = 3, lr: float = 0.1, **params) -> MLA:
    mods = tuple(Modality(m, "vector", (d,)) for m in names)
    method = MLA(MLAParams(**params), MethodSetup(nn.ModuleDict({m: Identity(d) for m in names}), C, mods))
    with torch.no_grad():
        method.head.weight.copy_(torch.eye(C, d))
        method.head.bias.zero_()
    method.attach(step_context(lambda: torch.optim.SGD(method.parameters(), lr=lr), num_batches=4))
    return method


def call_hgm(method: MLA, feats, grad, batch_index: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """One head-gradient modification on an explicit weight gradient and features."""
    method.step_context.batch_index = batch_index
    method.head.weight.grad = torch.tensor(grad, dtype=torch.float32)
    method.head.bias.grad = torch.tensor([1.0, -2.0, 3.0])
    method.modify_head_grad(torch.tensor(feats, dtype=torch.float32))
    return method.head.weight.grad.double().numpy(), method.head.bias.grad


def code_P(P: np.ndarray, r: np.ndarray, alpha: float) -> np.ndarray:
    k = P @ r[:, None]
    P = P - k @ k.T / (alpha + k @ r[None, :])  # the code's torch.mm(k, r): a d x d outer product
    return P / np.sqrt((P**2).sum())


def paper_P(P: np.ndarray, h: np.ndarray, alpha: float) -> np.ndarray:
    h = h[:, None]
    return P - P @ h @ h.T @ P / (alpha + (h.T @ P @ h).item())


G2 = [[1.0, 3.0], [2.0, 0.0], [-1.0, 1.0]]  # a 3 x 2 head-weight gradient


# ---------------------------------------------------------------------------- HGM by hand


def test_owm_code_and_additive_tiny_case_by_hand():
    """d = 2, alpha = 1, r = [1, 1]: k = r, the outer product k r is all ones, so
    P = (I - ones/2) / ||.||_F = [[.5, -.5], [-.5, .5]] (OWM's scalar r k = 2 would give I - ones/3)."""
    for hgm, expected in [("owm_code", [[-1, 1], [1, -1], [-1, 1]]), ("additive", [[0, 4], [3, -1], [-2, 2]])]:
        method = ident_method(d=2, hgm=hgm, owm_alpha=1.0)
        grad, bias = call_hgm(method, [[0.0, 3.0], [2.0, -1.0]], G2)  # first call of training: skipped
        assert grad.tolist() == G2 and torch.equal(method.P, torch.eye(2))
        grad, bias = call_hgm(method, [[1.0, 1.0], [1.0, 1.0]], G2)
        assert method.P.tolist() == [[0.5, -0.5], [-0.5, 0.5]]
        assert np.allclose(grad, expected) and bias.tolist() == [1.0, -2.0, 3.0]


def test_owm_code_two_updates_with_the_alpha_schedule():
    method = ident_method(d=3, hgm="owm_code")
    G = np.array([[1.0, 2.0, -1.0], [0.0, 1.0, 3.0], [2.0, -1.0, 1.0]])
    f1, f2, f3 = [[1, 1, 0], [0, 2, 2]], [[1, 0, 2], [3, 2, 0]], [[0, 1, 1], [2, -1, 3]]
    grad, _ = call_hgm(method, f1, G, batch_index=0)
    assert np.array_equal(grad, G) and torch.equal(method.P, torch.eye(3)) and method.hgm_calls == 1
    # i = 1 of N = 4 batches: alpha = 0.1 ** 1.25; r = [2, 1, 1]
    P1 = code_P(np.eye(3), np.array([2.0, 1.0, 1.0]), 0.1**1.25)
    grad, bias = call_hgm(method, f2, G, batch_index=1)
    assert np.allclose(method.P.numpy(), P1, atol=1e-6) and np.allclose(grad, G @ P1.T, atol=1e-5)
    assert bias.tolist() == [1.0, -2.0, 3.0]
    scalar_owm = np.eye(3) - np.outer([2, 1, 1], [2, 1, 1]) / (0.1**1.25 + 6)
    assert not np.allclose(P1, scalar_owm / np.linalg.norm(scalar_owm), atol=1e-3)  # the outer product matters
    # i = 3 of 4: alpha = 0.1 ** 1.75; r = [1, 0, 2]
    P2 = code_P(P1, np.array([1.0, 0.0, 2.0]), 0.1**1.75)
    grad, _ = call_hgm(method, f3, G, batch_index=3)
    assert np.allclose(method.P.numpy(), P2, atol=1e-6) and np.allclose(grad, G @ P2.T, atol=1e-5)
    assert float(torch.linalg.matrix_norm(method.P)) == pytest.approx(1.0, abs=1e-6)


def test_owm_paper_eq3_two_updates_by_hand():
    """Projection with P of the previous steps, then Eq. 3 with this step's mean (no normalisation).
    h1 = [1, 1]: P1 = I - ones/3; h2 = [1, 0]: P2 = (I + h1 h1^T + h2 h2^T)^-1 = [[.4, -.2], [-.2, .6]]."""
    method = ident_method(d=2, hgm="owm_paper", owm_alpha=1.0)
    grad, _ = call_hgm(method, [[2.0, 0.0], [0.0, 2.0]], G2)  # nothing was trained before: P = I
    assert grad.tolist() == G2
    P1 = np.array([[2, -1], [-1, 2]]) / 3
    assert np.allclose(method.P.numpy(), P1, atol=1e-7)
    grad, bias = call_hgm(method, [[1.0, 1.0], [1.0, -1.0]], G2)
    assert np.allclose(grad, np.array(G2) @ P1.T, atol=1e-6) and bias.tolist() == [1.0, -2.0, 3.0]
    assert np.allclose(method.P.numpy(), [[0.4, -0.2], [-0.2, 0.6]], atol=1e-7)
    assert np.allclose(paper_P(P1, np.array([1.0, 0.0]), 1.0), [[0.4, -0.2], [-0.2, 0.6]])


@pytest.mark.parametrize("hgm", ["off", "owm_code", "owm_paper", "additive"])
def test_one_batch_alternates_through_the_head_by_hand(hgm):
    """Audio step, then visual step with the head after the audio step; HGM on the right features."""
    lr, alpha = 0.5, 0.1  # batch 0: alpha = 0.1 ** (0/4 + 1)
    method = ident_method(lr=lr, hgm=hgm)
    x = {"audio": torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]),
         "visual": torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])}
    y = torch.tensor([2, 1])
    W, b, P = torch.eye(C, 3).double(), torch.zeros(C).double(), np.eye(3)
    losses = []
    for j, m in enumerate(("audio", "visual")):
        Wg, bg = W.clone().requires_grad_(), b.clone().requires_grad_()
        loss = F.cross_entropy(x[m].double() @ Wg.t() + bg, y)
        loss.backward()
        G, r = Wg.grad.numpy(), x[m].double().mean(0).numpy()
        if hgm == "owm_paper":
            G, P = G @ P.T, paper_P(P, r, alpha)
        elif hgm != "off" and j > 0:
            P = code_P(P, r, alpha)
            G = G @ P.T if hgm == "owm_code" else G + G @ P.T
        W, b = W - lr * torch.from_numpy(G), b - lr * bg.grad
        losses.append(loss.item())
    out = method.training_step(Batch(x, y))
    assert method.step_context.backward_passes == 2
    assert torch.allclose(method.head.weight.double(), W, atol=1e-6)
    assert torch.allclose(method.head.bias.double(), b, atol=1e-6)
    assert np.allclose(method.P.numpy(), P, atol=1e-6)
    assert out["loss.audio"].item() == pytest.approx(losses[0], rel=1e-6)
    assert out["loss.visual"].item() == pytest.approx(losses[1], rel=1e-6)
    assert out["loss"].item() == pytest.approx(sum(losses) / 2, rel=1e-6)


# -------------------------------------------------------------------------- fusion by hand

LN2, LN3 = math.log(2), math.log(3)
# audio entropies per sample: ln 3 (uniform), 1.5 ln 2 (p = .5, .25, .25); visual: 1.5 ln 2 twice
LOGITS = {"audio": torch.tensor([[0.0, 0.0, 0.0], [LN2, 0.0, 0.0]]),
          "visual": torch.tensor([[LN2, 0.0, 0.0], [LN2, 0.0, 0.0]])}


def fused_and_weights(**params) -> tuple[torch.Tensor, dict]:
    method = ident_method(**params)
    pred = method.predict(Batch(LOGITS, torch.tensor([0, 1])))
    assert all(torch.allclose(pred.per_modality[m], LOGITS[m]) for m in LOGITS)
    return pred.fused, {**method.epoch_log(), **{k: float(v) for k, v in pred.logs.items()}}


def test_entropy_fusion_per_sample_by_hand():
    lam0 = (1 / 3) / (1 / 3 + 2**-1.5)  # sample 0: softmax(-[ln 3, 1.5 ln 2]); sample 1: equal entropies
    lam_a = torch.tensor([[lam0], [0.5]])
    fused, log = fused_and_weights(fusion_mode="entropy")
    assert torch.allclose(fused, lam_a * LOGITS["audio"] + (1 - lam_a) * LOGITS["visual"], atol=1e-6)
    assert log["fusion_weight.audio"] == pytest.approx((lam0 + 0.5) / 2, abs=1e-6)
    assert log["fusion_weight.visual"] == pytest.approx(1 - (lam0 + 0.5) / 2, abs=1e-6)


def test_entropy_batch_fusion_by_hand():
    """Softmax over the batch: audio column 0 -> (1/3, 2/3), the others (1/2, 1/2): entropy
    ln 3 - (2/3) ln 2 + 2 ln 2; visual columns are all (1/2, 1/2): 3 ln 2. One weight per batch."""
    e_a, e_v = LN3 + (4 / 3) * LN2, 3 * LN2
    lam = math.exp(-e_a) / (math.exp(-e_a) + math.exp(-e_v))
    fused, log = fused_and_weights(fusion_mode="entropy_batch")
    assert torch.allclose(fused, lam * LOGITS["audio"] + (1 - lam) * LOGITS["visual"], atol=1e-6)
    assert log["fusion_weight.audio"] == pytest.approx(lam, abs=1e-6)


def test_fixed_fusion_defaults_and_validation():
    fused, log = fused_and_weights(fusion_mode="fixed")
    assert torch.allclose(fused, 0.55 * LOGITS["audio"] + 0.45 * LOGITS["visual"])
    assert log == {"fusion_weight.audio": pytest.approx(0.55), "fusion_weight.visual": pytest.approx(0.45),
                   "p_fro": pytest.approx(math.sqrt(3))}
    three = ident_method(("audio", "visual", "text"), fusion_mode="fixed")
    assert three.fixed == {"audio": 0.35, "visual": 0.25, "text": 0.4}
    fused, _ = fused_and_weights(fusion_mode="fixed", fixed_weights={"visual": 0.7, "audio": 0.3})
    assert torch.allclose(fused, 0.3 * LOGITS["audio"] + 0.7 * LOGITS["visual"])
    for bad, match in [({"audio": 0.6, "visual": 0.6}, "sum to 1"), ({"audio": 1.0}, "each modality"),
                       ({"audio": 0.5, "vidual": 0.5}, "audio, visual")]:
        with pytest.raises(ConfigError, match=match):
            ident_method(fusion_mode="fixed", fixed_weights=bad)
    with pytest.raises(ConfigError, match="fusion_mode=fixed"):
        ident_method(fixed_weights={"audio": 0.5, "visual": 0.5})
    with pytest.raises(ConfigError, match="owm_alpha"):
        ident_method(hgm="off", owm_alpha=0.5)


def test_yaml_off_is_hgm_off():
    assert load_config(None, ["method.name=mla", "method.hgm=off"]).method["hgm"] == "off"  # YAML: off -> false
    with pytest.raises(ConfigError, match="owm_paper"):
        load_config(None, ["method.name=mla", "method.hgm=true"])


def test_encoders_must_share_out_dim():
    mods = (Modality("audio", "vector", (3,)), Modality("visual", "vector", (4,)))
    with pytest.raises(ConfigError, match="audio=3, visual=4"):
        MLA(MLAParams(), MethodSetup(nn.ModuleDict({"audio": Identity(3), "visual": Identity(4)}), C, mods))


# ------------------------------------------------------------------------ training quirks


def mlp_mla(names=("audio", "visual"), seed: int = 0, **params) -> MLA:
    torch.manual_seed(seed)
    mods = tuple(Modality(m, "vector", (5,)) for m in names)
    encoders = nn.ModuleDict({m.name: MLPEncoder(MLPParams(hidden=8, out_dim=6), m) for m in mods})
    return MLA(MLAParams(**params), MethodSetup(encoders, C, mods))


def batches(n: int, names=("audio", "visual")) -> list[Batch]:
    gen = torch.Generator().manual_seed(7)
    return [Batch({m: torch.randn(6, 5, generator=gen) for m in names}, torch.randint(0, C, (6,), generator=gen))
            for _ in range(n)]


def sgd(method, lr=0.1, momentum=0.9, wd=1e-4, num_batches=5) -> MLA:
    def opt() -> torch.optim.Optimizer:
        return torch.optim.SGD(method.parameters(), lr=lr, momentum=momentum, weight_decay=wd)

    method.attach(step_context(opt, num_batches=num_batches))
    return method


def test_one_modality_with_hgm_off_equals_unimodal():
    mla = mlp_mla(("visual",), hgm="off")
    visual = (Modality("visual", "vector", (5,)),)
    uni = Unimodal(UnimodalParams(modality="visual"), MethodSetup(copy.deepcopy(mla.encoders), C, visual))
    uni.head.load_state_dict(mla.head.state_dict())
    projected = sgd(copy.deepcopy(mla))
    projected.params = MLAParams(hgm="owm_paper")
    sgd(mla), sgd(uni)
    for i, batch in enumerate(batches(5, ("visual",))):
        for method in (mla, uni, projected):
            method.step_context.batch_index = i
            method.training_step(batch)
    uni_params = dict(uni.named_parameters())
    assert set(uni_params) == {n for n, _ in mla.named_parameters()}
    assert all(torch.equal(p, uni_params[n]) for n, p in mla.named_parameters())
    # OWM projects the head gradient even with one modality (the previous step's mean), so it differs
    assert not torch.equal(projected.head.weight, uni.head.weight)


def test_legacy_zero_grad_gives_the_first_modality_an_extra_momentum_step():
    lr, mom, wd = 0.1, 0.9, 0.05
    modern = sgd(mlp_mla(), lr, mom, wd)
    legacy = sgd(copy.deepcopy(modern), lr, mom, wd)
    legacy.params = MLAParams(legacy_zero_grad=True)
    batch = batches(1)[0]
    audio = list(modern.encoders["audio"].parameters())
    p0 = [p.detach().clone() for p in audio]
    # the audio loss's gradient through the initial head, by hand
    audio_loss = F.cross_entropy(modern.head(modern.encoders["audio"](batch.inputs["audio"])), batch.labels)
    g = torch.autograd.grad(audio_loss, audio)
    modern.training_step(batch)
    legacy.training_step(batch)
    for p, q, a, ga in zip(modern.encoders["audio"].parameters(), legacy.encoders["audio"].parameters(), p0, g):
        buf = ga + wd * a  # first step: momentum buffer = d_p
        p1 = a - lr * buf
        assert torch.allclose(p, p1, atol=1e-7)
        # the visual step sees a zero (not None) audio gradient: buf = mom * buf + wd * p1
        assert torch.allclose(q, p1 - lr * (mom * buf + wd * p1), atol=1e-7)
        assert not torch.allclose(p, q, atol=1e-7)
    for name in ("encoders.visual", "head"):
        for (n, p), q in zip(modern.named_parameters(), legacy.parameters()):
            if n.startswith(name):
                assert torch.equal(p, q), n
    assert all(p.grad is None for p in legacy.parameters())  # the code's `del p.grad`


# ---------------------------------------------------------------------------- the harness


def test_harness_gaussian_and_gaussian3(fast_config, store):
    result = run(fast_config("method.name=mla", "train.epochs=2", "eval.probe=false"), store)
    records = RunDir(result.path).read_metrics()
    assert result.state == "finished" and len(records) == 2
    logged = records[-1]["method"]
    assert logged["fusion_weight.audio"] + logged["fusion_weight.visual"] == pytest.approx(1.0)
    assert 0 < logged["p_fro"] < math.sqrt(16)  # OWM shrinks P from I (d = 16)
    assert {"loss", "loss.audio", "loss.visual"} <= set(records[-1]["train"])
    cost = result.summary["cost"]
    assert cost["forward_passes_per_step"] == 1.0 and cost["backward_passes_per_step"] == 2.0

    cfg3 = fast_config("method.name=mla", "dataset.name=gaussian3", "train.epochs=2", "eval.probe=false",
                       "method.hgm=owm_code", "method.fusion_mode=entropy_batch")
    result3 = run(cfg3, store)
    logged = RunDir(result3.path).read_metrics()[-1]["method"]
    assert sum(logged[f"fusion_weight.{m}"] for m in ("audio", "visual", "text")) == pytest.approx(1.0)
    assert logged["p_fro"] == pytest.approx(1.0, abs=1e-5)  # the code normalises P
    assert set(result3.summary["best_val"]["val"]["modality_acc"]) == {"audio", "visual", "text"}
    assert result3.summary["cost"]["backward_passes_per_step"] == 3.0


def test_P_survives_checkpoint_and_resume(fast_config, store, tmp_path, monkeypatch):
    cfg = fast_config("method.name=mla", "train.epochs=3", "eval.probe=false", "method.hgm=additive")
    reference = run(cfg, Store(tmp_path / "ref"))
    run_interrupted(cfg, store, monkeypatch, at_epoch=2)
    rd = store.run_dir(cfg.group, cfg.run_id())
    state = rd.load(rd.checkpoint)["model"]
    assert "P" in state and not torch.equal(state["P"], torch.eye(16)) and int(state["hgm_calls"]) > 0
    run(cfg, store)
    ref_dir = RunDir(reference.path)
    assert without_timing(rd.read_metrics()) == without_timing(ref_dir.read_metrics())
    assert torch.equal(rd.load(rd.checkpoint)["model"]["P"], ref_dir.load(ref_dir.checkpoint)["model"]["P"])
