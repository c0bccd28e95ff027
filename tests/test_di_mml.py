"""DI-MML: dimension selection, DUC, certainty weighting by hand; the switched-off method equals two
unimodal models; stage 2 freezes everything but h_av; selection and resume across the stages."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from mmbalance.bench.store import RunDir, Store
from mmbalance.bench.train import Trainer, run
from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Batch, Modality
from mmbalance.methods.base import MethodSetup, StepContext
from mmbalance.methods.di_mml import DIMML, DIMMLParams, certainty_weights, dimension_accuracy, duc_term, top_dimensions
from mmbalance.methods.unimodal import Unimodal, UnimodalParams
from mmbalance.models.small import MLPEncoder, MLPParams
from tests.conftest import step_context, without_timing

Y6 = torch.tensor([0, 0, 0, 1, 1, 1])
# columns = dimensions; per-dimension nearest-prototype accuracy worked out below
AUDIO6 = torch.tensor([[0.0, 0, 0], [0, 0, 0], [0, 0, 6], [3, 3, 2], [3, 3, 2], [3, 3, 8]])
VISUAL6 = torch.tensor([[0.0, 0, 0], [0, 0, 0], [6, 0, 0], [2, 3, 3], [2, 3, 3], [8, 3, 3]])


class Identity(nn.Module):
    """An 'encoder' that passes its input through, so hand-made features reach the method."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def make(encoders: dict[str, nn.Module], classes: int = 2, epochs: int = 4, **params) -> DIMML:
    mods = tuple(Modality(m, "vector", (e.out_dim,)) for m, e in encoders.items())
    setup = MethodSetup(nn.ModuleDict(encoders), classes, mods, epochs=epochs)
    params = {"stage1_epochs": 2, "stage2_epochs": 2, "duc_start_epoch": 1, **params}
    return DIMML(DIMMLParams(**params), setup)


def attach(method: nn.Module, lr: float = 0.1, batches=()) -> StepContext:
    context = step_context(lambda: torch.optim.SGD(method.param_groups(), lr=lr, momentum=0.9, weight_decay=1e-4),
                           batches)
    method.attach(context)
    return context


# ----------------------------------------------------------------------------- dimension selection


def test_dimension_accuracy_and_sets_by_hand():
    # audio dim 0: prototypes 0 | 3, all 6 nearest to their own: 1. dim 1: same, 1.
    # dim 2: prototypes 2 | 4: 0,0 -> class 0 right; 6 -> class 1 wrong; 2,2 -> class 0 wrong; 8 right: 3/6
    acc_a = dimension_accuracy(AUDIO6, Y6, 2)
    assert acc_a.tolist() == pytest.approx([1, 1, 0.5])
    acc_v = dimension_accuracy(VISUAL6, Y6, 2)  # visual: the same columns in another order
    assert acc_v.tolist() == pytest.approx([0.5, 1, 1])
    # a class absent from the pass is never the nearest prototype
    assert dimension_accuracy(AUDIO6, Y6, 3).tolist() == pytest.approx([1, 1, 0.5])
    # mean 5/6: T_audio = {0, 1}, T_visual = {1, 2}
    assert top_dimensions(acc_a).tolist() == [True, True, False]
    assert top_dimensions(acc_v).tolist() == [False, True, True]
    assert top_dimensions(torch.tensor([4 / 6, 4 / 6, 4 / 6])).tolist() == [False] * 3  # strictly above


def test_select_dimensions_through_the_method_gives_a_and_v():
    batches = [Batch({"audio": AUDIO6[:4], "visual": VISUAL6[:4]}, Y6[:4]),
               Batch({"audio": AUDIO6[4:], "visual": VISUAL6[4:]}, Y6[4:])]
    method = make({"audio": Identity(3), "visual": Identity(3)})
    attach(method, batches=batches)
    method.train()
    method.on_epoch_start(0)
    assert not method.selected
    method.on_epoch_start(1)  # duc_start_epoch
    assert method.selected and method.training
    pairs = {(t, s): dims.tolist() for t, s, dims in method.duc_pairs()}
    assert pairs == {("audio", "visual"): [0], ("visual", "audio"): [2]}  # A = {0}, V = {2}
    assert method.epoch_log() == {"stage": 1, "dims.audio": 2, "dims.visual": 2,
                                  "dims.audio->visual": 1, "dims.visual->audio": 1}
    # the chosen sets live in the state dict, so best.pt and resume carry them
    other = make({"audio": Identity(3), "visual": Identity(3)})
    other.load_state_dict(method.state_dict())
    assert other.selected and torch.equal(other.top, method.top)
    # and the host copies follow the loaded buffers (a load_state_dict post-hook)
    assert other.has_dimensions and {(t, s): d.tolist() for t, s, d in other.duc_pairs()} == pairs
    assert other.epoch_log() == method.epoch_log()


# ------------------------------------------------------------------------------------------- DUC


def code_loop_duc(a: torch.Tensor, v: torch.Tensor, a_only: list[int], v_only: list[int], tau: float):
    """The released SupConLoss, sample by sample (an empty set gives log B there; 0 here)."""
    b = len(a)
    a_loss = v_loss = 0.0
    for i in range(b):
        if a_only:
            s, t = v[:, a_only], a[:, a_only].detach()
            v_loss += -torch.log(torch.exp(s[i] @ t[i] / tau) / torch.exp(s[i] @ t.T / tau).sum())
        if v_only:
            s, t = a[:, v_only], v[:, v_only].detach()
            a_loss += -torch.log(torch.exp(s[i] @ t[i] / tau) / torch.exp(s[i] @ t.T / tau).sum())
    return v_loss / b + a_loss / b


def test_duc_loss_matches_the_code_loop():
    gen = torch.Generator().manual_seed(0)
    a, v = torch.randn(5, 3, generator=gen) * 2, torch.randn(5, 3, generator=gen) * 2
    method = make({"audio": Identity(3), "visual": Identity(3)}, tau=0.7)
    method.set_dimensions(torch.tensor([[True, True, False], [False, True, True]]))
    got = method.duc_loss({"audio": a, "visual": v})
    expected = code_loop_duc(a, v, [0], [2], 0.7)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() > 0.1
    # un-normalised: scaling the features changes the loss
    assert method.duc_loss({"audio": 2 * a, "visual": 2 * v}).item() != pytest.approx(got.item(), rel=1e-3)


def test_duc_gradient_reaches_the_student_only():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(4, 2, generator=gen).requires_grad_()
    teacher = torch.randn(4, 2, generator=gen).requires_grad_()
    duc_term(student, teacher, 1.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    # in the method: A = {0} only (V empty): visual learns on dim 0, audio gets nothing
    a = torch.randn(4, 3, generator=gen).requires_grad_()
    v = torch.randn(4, 3, generator=gen).requires_grad_()
    method = make({"audio": Identity(3), "visual": Identity(3)})
    method.set_dimensions(torch.tensor([[True, False, False], [False, False, False]]))
    loss = method.duc_loss({"audio": a, "visual": v})
    assert loss.item() == pytest.approx(code_loop_duc(a, v, [0], [], 50.0).item(), rel=1e-5)
    loss.backward()
    assert a.grad is None
    assert v.grad[:, 0].abs().sum() > 0 and torch.equal(v.grad[:, 1:], torch.zeros(4, 2))


def test_three_modalities_duc_over_ordered_pairs():
    gen = torch.Generator().manual_seed(2)
    f = {m: torch.randn(6, 4, generator=gen) for m in ("audio", "visual", "text")}
    method = make({m: Identity(4) for m in f}, classes=3)
    method.set_dimensions(torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool))
    # T_t \ T_s by hand, (teacher, student) -> dims
    hand = {("audio", "visual"): [0], ("audio", "text"): [0, 1], ("visual", "audio"): [2],
            ("visual", "text"): [1, 2], ("text", "audio"): [3], ("text", "visual"): [3]}
    assert {(t, s): d.tolist() for t, s, d in method.duc_pairs()} == hand
    expected = sum(code_loop_duc(f[t], f[s], dims, [], 50.0) for (t, s), dims in hand.items())
    assert method.duc_loss(f).item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------------------------- certainty


def test_certainty_weights_by_hand():
    z1 = torch.tensor([[0.0, 0.0]])  # max prob 1/2
    z2 = torch.tensor([[math.log(3.0), 0.0]])  # max prob 3/4
    for t in (1.0, 0.5):
        e1, e2 = math.exp(0.5 / t), math.exp(0.75 / t)
        assert certainty_weights([z1, z2], t).tolist()[0] == pytest.approx([e1 / (e1 + e2), e2 / (e1 + e2)])
    # in stage 2 the fused logits weight the private heads and h_av
    method = make({"audio": Identity(2), "visual": Identity(2)}, certainty_temperature=0.5)
    for head, (w, b) in zip([*method.private.values(), method.fusion],
                            [(torch.eye(2), [0.0, 0]), (torch.zeros(2, 2), [math.log(3.0), 0]),
                             (torch.zeros(2, 4), [0.0, 0])]):
        head.weight.data.copy_(w)
        head.bias.data.copy_(torch.tensor(b))
    method.start_stage2()
    pred = method.predict(Batch({"audio": torch.tensor([[1.0, 1.0]]), "visual": torch.ones(1, 2)}, Y6[:1]))
    # sources: audio [1, 1] (c 1/2), visual [log 3, 0] (c 3/4), h_av [0, 0] (c 1/2); T = 0.5
    e = [math.exp(1.0), math.exp(1.5), math.exp(1.0)]
    w = [x / sum(e) for x in e]
    assert pred.fused.tolist()[0] == pytest.approx([w[0] + w[1] * math.log(3.0), w[0]], rel=1e-6)
    assert pred.per_modality["visual"].tolist()[0] == pytest.approx([math.log(3.0), 0.0])


# ------------------------------------------------------------------------- switched-off equivalence


def mlp_encoders(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    mods = (Modality("audio", "vector", (5,)), Modality("visual", "vector", (3,)))
    return {m.name: MLPEncoder(MLPParams(hidden=8, out_dim=6), m) for m in mods}


def test_without_shared_head_and_duc_equals_two_unimodal_models():
    method = make(mlp_encoders(), classes=4, shared_head=False, duc=False)
    attach(method, lr=0.2)
    mods = tuple(Modality(m, "vector", (e.net[1].in_features,)) for m, e in method.encoders.items())
    uni = {}
    for m in ("audio", "visual"):
        enc = nn.ModuleDict({k: copy.deepcopy(e) for k, e in method.encoders.items()})
        uni[m] = Unimodal(UnimodalParams(modality=m), MethodSetup(enc, 4, mods))
        uni[m].head.load_state_dict(method.private[m].state_dict())  # the same (PyTorch default) init
        attach(uni[m], lr=0.2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        batch = Batch({"audio": torch.randn(8, 5, generator=gen), "visual": torch.randn(8, 3, generator=gen)},
                      torch.randint(0, 4, (8,), generator=gen))
        out = method.training_step(batch)
        losses = [uni[m].training_step(batch)["loss"] for m in ("audio", "visual")]
        assert out["loss.private"].item() == pytest.approx(sum(losses).item(), rel=1e-6)
    for m in ("audio", "visual"):
        for name, p in uni[m].encoders[m].state_dict().items():
            assert torch.equal(p, method.encoders[m].state_dict()[name]), (m, name)
        assert torch.equal(uni[m].head.weight, method.private[m].weight)
        assert torch.equal(uni[m].head.bias, method.private[m].bias)
    assert method.fusion.weight.grad is None  # h_av gets no gradient in stage 1


def code_stage1_step(model1, model2, hs, optimizer, x1, x2, y, w, A, V, tau, duc_on):
    """main_CFT.py's stage-1 step: two classifiers (encoder + private head), the shared head."""
    f1, f2 = model1[0](x1), model2[0](x2)
    z1, z2 = model1[1](f1), model2[1](f2)
    ce = nn.CrossEntropyLoss()
    loss = ce(z1, y) + ce(z2, y) + w * (ce(hs(f1), y) + ce(hs(f2), y))
    if duc_on:
        loss = loss + code_loop_duc(f1, f2, A, V, tau)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.mark.parametrize("shared_weight", [1.0, 0.4])
def test_stage1_step_with_shared_head_and_duc_equals_the_code(shared_weight):
    method = make(mlp_encoders(), classes=4, shared_weight=shared_weight, tau=2.0)
    attach(method, lr=0.2)
    enc, priv = copy.deepcopy(method.encoders), copy.deepcopy(method.private)
    model1, model2 = nn.Sequential(enc["audio"], priv["audio"]), nn.Sequential(enc["visual"], priv["visual"])
    hs = copy.deepcopy(method.shared)
    params = [*model1.parameters(), *model2.parameters(), *hs.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.2, momentum=0.9, weight_decay=1e-4)
    A, V = [0, 3], [1, 5]  # T_audio \ T_visual and T_visual \ T_audio
    gen = torch.Generator().manual_seed(4)
    for step in range(4):  # DUC from the third step, as from duc_start_epoch
        duc_on = step >= 2
        if duc_on:
            method.set_dimensions(torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 1]], dtype=torch.bool))
        batch = Batch({"audio": torch.randn(8, 5, generator=gen), "visual": torch.randn(8, 3, generator=gen)},
                      torch.randint(0, 4, (8,), generator=gen))
        out = method.training_step(batch)
        loss = code_stage1_step(model1, model2, hs, optimizer, batch.inputs["audio"], batch.inputs["visual"],
                                batch.labels, shared_weight, A, V, 2.0, duc_on)
        assert out["loss"].item() == pytest.approx(loss, abs=1e-5), step
        assert (out["loss.duc"].item() > 0) == duc_on
    ours = [*method.encoders["audio"].parameters(), *method.private["audio"].parameters(),
            *method.encoders["visual"].parameters(), *method.private["visual"].parameters(),
            *method.shared.parameters()]
    for p, q in zip(ours, params, strict=True):
        assert torch.allclose(p, q, atol=1e-5)


# ------------------------------------------------------------------------------------- stage 2


class BNEncoder(nn.Module):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.out_dim = 4
        self.net = nn.Sequential(nn.Linear(in_dim, 4), nn.BatchNorm1d(4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_stage2_trains_only_the_fusion_head_with_frozen_bn():
    torch.manual_seed(0)
    method = make({"audio": BNEncoder(5), "visual": BNEncoder(3)}, classes=3, duc=False)
    context = attach(method, lr=0.5)
    gen = torch.Generator().manual_seed(4)
    batches = [Batch({"audio": torch.randn(8, 5, generator=gen), "visual": torch.randn(8, 3, generator=gen)},
                     torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
    method.train()
    method.training_step(batches[0])  # stage 1: momentum everywhere
    first_optimizer = context.optimizer
    method.train()
    method.on_epoch_start(2)  # stage 2 starts
    assert method.stage2 and context.optimizer is not first_optimizer
    assert not method.encoders.training and method.fusion.training
    before = copy.deepcopy(method.state_dict())
    for batch in batches:
        out = method.training_step(batch)
    assert set(out) == {"loss", "loss.fusion"}
    after = method.state_dict()
    for name, value in before.items():
        if name.startswith("fusion."):
            assert not torch.equal(value, after[name]), name
        else:  # encoders, BN running statistics, private and shared heads
            assert torch.equal(value, after[name]), name
    assert all(p.grad is None for n, p in method.named_parameters() if not n.startswith("fusion."))
    method.train()  # the harness's train() at the next epoch keeps the encoders frozen
    assert not method.encoders.training
    assert method.epoch_log()["stage"] == 2 and method.selectable(2) and not method.selectable(1)


def test_config_errors_name_the_numbers():
    numbers = r"stage1_epochs \(2\) \+ method.stage2_epochs \(2\) = 4 must equal train.epochs \(5\)"
    with pytest.raises(ConfigError, match=numbers):
        make(mlp_encoders(), epochs=5)
    with pytest.raises(ConfigError, match="duc_start_epoch \\(2\\)"):
        make(mlp_encoders(), duc_start_epoch=2)
    uneven = {"audio": Identity(3), "visual": Identity(4)}
    with pytest.raises(ConfigError, match="shared_head=true .* audio=3, visual=4"):
        make(uneven, duc=False)
    make(uneven, duc=False, shared_head=False)  # fine without both


# ------------------------------------------------------------------------------ through the harness


DI = ["method.name=di_mml", "method.stage1_epochs=2", "method.stage2_epochs=2", "method.duc_start_epoch=1",
      "method.tau=1.0", "eval.probe=false"]  # probes and their resume are test_train's concern


def test_harness_selects_stage2_and_resumes_across_the_boundary(fast_config, store, tmp_path, monkeypatch):
    cfg = fast_config(*DI)
    reference = run(cfg, Store(tmp_path / "ref"))
    history = RunDir(reference.path).read_metrics()
    assert [r["selectable"] for r in history] == [False, False, True, True]
    assert [r["method"]["stage"] for r in history] == [1, 1, 2, 2]
    assert "dims.audio->visual" not in history[0]["method"] and "dims.audio->visual" in history[1]["method"]
    assert history[0]["train"]["loss.duc"] == 0 and history[1]["train"]["loss.duc"] > 0
    assert set(history[2]["method"]) >= {"certainty_weight.audio", "certainty_weight.visual", "certainty_weight.fusion"}
    assert reference.summary["best_val"]["epoch"] >= 2
    # the fresh stage-2 optimizer restarts the schedule (StepLR(2) had decayed it to 0.005)
    assert [r["lr"] for r in history] == pytest.approx([0.05, 0.05, 0.05, 0.05])

    original, pending = Trainer.train_epoch, {1, 2, 3}  # at DUC start, at the stage boundary, in stage 2

    def interrupt_once(self, epoch):
        if epoch in pending:
            pending.remove(epoch)
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", interrupt_once)
    for _ in range(3):
        with pytest.raises(KeyboardInterrupt):
            run(cfg, store)
    resumed = run(cfg, store)
    assert resumed.state == "finished"
    rd = store.run_dir(cfg.group, cfg.run_id())
    assert without_timing(rd.read_metrics()) == without_timing(history)
    for key in ("best_val", "best_test", "last"):
        assert resumed.summary[key] == reference.summary[key]


def test_three_modalities_run(fast_config, store):
    cfg = fast_config(*DI, "dataset.name=gaussian3", "train.epochs=3", "method.stage2_epochs=1")
    result = run(cfg, store)
    last = RunDir(result.path).read_metrics()[-1]
    assert len([k for k in last["method"] if "->" in k]) == 6
    weights = [last["method"][f"certainty_weight.{m}"] for m in ("audio", "visual", "text", "fusion")]
    assert sum(weights) == pytest.approx(1.0, rel=1e-5)
    assert set(result.summary["best_val"]["test"]["modality_acc"]) == {"audio", "visual", "text"}
    assert result.summary["best_val"]["epoch"] == 2
