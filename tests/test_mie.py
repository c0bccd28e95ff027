"""MIE: flat projection, both SAM variants, the stage schedule, restarts on validation, resume."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.config import load_config
from bench.errors import ConfigError
from bench.store import RunDir, Store
from bench.train import Trainer, run
from datasets.base import Modality
from methods.base import Batch, MethodSetup, StepHelpers
from methods.mie import MIE, MIEParams, flat_projection
from tests.conftest import FAST, run_interrupted, without_timing

C = 4
MODS = (Modality("audio", "vector", (5,)), Modality("visual", "vector", (3,)))


class Enc(nn.Module):
    """Linear (-> BatchNorm) -> ReLU, or the identity (hand-computable head inputs)."""

    def __init__(self, d_in: int, d_out: int, bn: bool = False, identity: bool = False) -> None:
        super().__init__()
        self.out_dim = d_in if identity else d_out
        layers = [] if identity else [nn.Linear(d_in, d_out), *([nn.BatchNorm1d(d_out)] if bn else []), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make(epochs: int = 2, out=(6, 6), bn: bool = False, identity: bool = False, lr: float = 0.1,
         momentum: float = 0.0, mods=MODS, **params) -> MIE:
    torch.manual_seed(0)
    encs = nn.ModuleDict({m.name: Enc(m.shape[0], d, bn, identity) for m, d in zip(mods, out)})
    params = {"epoch_list": [1] * epochs, "head_hidden": (7, 5), **params}
    method = MIE(MIEParams(**params), MethodSetup(encs, C, mods, epochs=epochs))
    method.attach(StepHelpers(torch.optim.SGD(method.parameters(), lr=lr, momentum=momentum), torch.device("cpu")))
    return method


def batch(seed: int = 1, n: int = 6) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return Batch({"audio": torch.randn(n, 5, generator=gen), "visual": torch.randn(n, 3, generator=gen)},
                 torch.tensor([0, 1, 2, 3, 2, 1][:n]))


def path_params(model: MIE, m: str) -> list[nn.Parameter]:
    return [*model.encoders[m].parameters(), *model.heads[m].parameters()]


def plain_ce(model: MIE, m: str, b: Batch) -> torch.Tensor:
    return F.cross_entropy(model.heads[m](model.encoders[m](b.inputs[m])), b.labels)


# ------------------------------------------------------------------------------ flat projection


def test_flat_projection_diagonal_by_hand():
    # singular values 2, 0, 1: scaled to 1, 0, 0.5 of the range, so P = diag(e^-0.4, 1, e^-0.2)
    P = flat_projection(torch.diag(torch.tensor([2.0, 0.0, 1.0])), 0.4)
    assert torch.allclose(P, torch.diag(torch.tensor([math.exp(-0.4), 1.0, math.exp(-0.2)])), atol=1e-6)
    # every direction used equally: nothing to damp
    assert torch.equal(flat_projection(3 * torch.eye(3), 0.4), torch.eye(3))
    assert torch.equal(flat_projection(torch.zeros(2, 2), 0.4), torch.eye(2))


def test_flat_projection_matches_numpy_eigendecomposition():
    B = np.array([[2, 1, 0, 1], [0, 3, 1, 0], [1, 0, 1, 2], [0, 1, 0, 1]], dtype=np.float64)
    A = B @ B.T  # symmetric PSD: singular values = eigenvalues, singular vectors = eigenvectors
    w, Q = np.linalg.eigh(A)
    expected = Q @ np.diag(np.exp(-0.4 * (w - w.min()) / (w.max() - w.min()))) @ Q.T
    P = flat_projection(torch.tensor(A, dtype=torch.float32), 0.4).double().numpy()
    np.testing.assert_allclose(P, expected, atol=1e-5)
    # endpoints: the most-used direction is damped by e^-0.4, the least-used kept
    np.testing.assert_allclose(P @ Q[:, -1], math.exp(-0.4) * Q[:, -1], atol=1e-5)
    np.testing.assert_allclose(P @ Q[:, 0], Q[:, 0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.eigvalsh(P)[[0, -1]], [math.exp(-0.4), 1.0], atol=1e-5)


def set_layer(layer: nn.Linear, w, b) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(w, dtype=torch.float32))
        layer.bias.copy_(torch.tensor(b, dtype=torch.float32))


@pytest.mark.parametrize("chunk, expected0", [
    (12, [[8, 6], [6, 9]]),     # batch means [2, 3] and [2, 0]
    (1, [[14, 14], [14, 20]]),  # rows [1, 2], [3, 4] and [2, 0] each their own chunk
])
def test_accumulation_of_batch_mean_inputs_by_hand(chunk, expected0):
    mods = (Modality("audio", "vector", (2,)), Modality("visual", "vector", (2,)))
    model = make(identity=True, mods=mods, head_hidden=(3, 2), flat_batch_size=chunk)
    head = model.heads["visual"]
    set_layer(head[0], [[1, 0], [0, 1], [1, 1]], [0, 0, 0])  # h = [x1, x2, x1 + x2] (x >= 0)
    set_layer(head[2], [[1, 0, 0], [0, 1, 1]], [0, 1])      # z = [x1, x1 + 2 x2 + 1]
    xs = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[2.0, 0.0]])]
    model.helpers.train_batches = lambda: iter(
        Batch({"visual": x, "audio": torch.zeros(len(x), 2)}, torch.zeros(len(x), dtype=torch.long)) for x in xs)
    model.train()
    acc = model.accumulate_inputs("visual")
    assert sorted(acc) == [0, 2, 3]  # the three Linear layers; the ReLU has none
    assert acc[0].tolist() == expected0
    if chunk == 12:
        # layer 2 input means [2, 3, 5] and [2, 0, 2]; layer 3 input means [2, 9] and [2, 3]
        assert acc[2].tolist() == [[8, 6, 14], [6, 9, 15], [14, 15, 29]]
        assert acc[3].tolist() == [[8, 24], [24, 90]]
    assert model.training and not head[0]._forward_hooks  # mode restored, hooks removed


def test_head_weight_gradients_are_multiplied_by_P():
    # stage 2 trains visual; audio's first-layer P (6 x 6 here vs visual's 4 inputs) has no match
    model = make(out=(6, 4), sam="code", rho=0.0, mixup_alpha=0, flat_ratio=0.0)
    model.helpers.epoch = 1
    gen = torch.Generator().manual_seed(3)
    sym = lambda d: (lambda a: a @ a.T / d)(torch.randn(d, d, generator=gen))  # noqa: E731
    model.proj = {0: sym(6), 2: sym(7), 3: sym(5)}
    ref, b, lr = copy.deepcopy(model), batch(), 0.1
    plain_ce(ref, "visual", b).backward()
    model.training_step(b)
    head, rhead = model.heads["visual"], ref.heads["visual"]
    for i in (2, 3):
        expected = rhead[i].weight - lr * rhead[i].weight.grad @ model.proj[i]
        assert torch.allclose(head[i].weight, expected, atol=1e-6), i
        assert torch.allclose(head[i].bias, rhead[i].bias - lr * rhead[i].bias.grad, atol=1e-7)
    assert torch.allclose(head[0].weight, rhead[0].weight - lr * rhead[0].weight.grad, atol=1e-7)
    for n, p in model.heads["audio"].named_parameters():  # inactive: untouched
        assert torch.equal(p, ref.heads["audio"].get_parameter(n))


# ------------------------------------------------------------------------------------ SAM steps


def test_paper_sam_steps_with_the_gradient_at_the_perturbed_point_and_restores_theta():
    rho, lr = 0.5, 0.1
    model = make(bn=True, sam="paper", rho=rho, mixup_alpha=0)  # flat_ratio 0.3: 0.7 CE + 0.3 CE = CE
    b = batch()
    # by hand on a copy: g at theta, eps = rho g / ||g|| (global), g' at theta + eps
    ref = copy.deepcopy(model)
    params = path_params(ref, "audio")
    g = torch.autograd.grad(plain_ce(ref, "audio", b), params)
    stats_after_one_forward = ref.encoders["audio"].net[1].running_mean.clone()
    norm = torch.sqrt(sum((x**2).sum() for x in g))
    theta = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, x in zip(params, g):
            p.add_(rho * x / norm)
    g_pert = torch.autograd.grad(plain_ce(ref, "audio", b), params)

    out = model.training_step(b)
    assert model.helpers.backward_passes == 2
    assert out["loss_sam"] > out["loss"]  # the ascent step went uphill
    gap = 0.0
    for p, t, x, e in zip(path_params(model, "audio"), theta, g_pert, g):
        assert torch.allclose(p, t - lr * x, atol=1e-6)
        gap = max(gap, (p - (t + rho * e / norm - lr * x)).abs().max().item())
    assert gap > 0.05  # not left perturbed (the perturbation moves some weight by more than that)
    # BatchNorm statistics: those of the forward at theta only
    assert torch.equal(model.encoders["audio"].net[1].running_mean, stats_after_one_forward)
    for p, q in zip(path_params(model, "visual"), path_params(ref, "visual")):
        assert torch.equal(p, q)


def test_code_sam_moves_each_tensor_by_rho_over_its_own_norm_and_never_back():
    rho = 0.5
    model = make(sam="code", rho=rho, mixup_alpha=0, lr=0.0)  # lr 0: only the perturbation moves
    ref, b = copy.deepcopy(model), batch()
    g = torch.autograd.grad(plain_ce(ref, "audio", b), path_params(ref, "audio"))
    model.training_step(b)
    for p, q, x in zip(path_params(model, "audio"), path_params(ref, "audio"), g):
        assert torch.allclose(p, q + rho * x / x.norm(), atol=1e-6)


@pytest.mark.parametrize("sam", ["paper", "code"])
def test_mechanism_off_is_plain_cross_entropy_training(sam):
    model = make(sam=sam, rho=0.0, mixup_alpha=0, flat_ratio=0.0, momentum=0.9)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for seed in range(3):
        b = batch(seed)
        opt.zero_grad()
        plain_ce(ref, "audio", b).backward()
        opt.step()
        model.training_step(b)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n


def test_code_sam_with_its_rho_is_plain_cross_entropy_up_to_rounding():
    model = make(sam="code", mixup_alpha=0)  # rho 1e-10, flat_ratio 0.3
    assert model.rho == 1e-10
    ref, b = copy.deepcopy(model), batch()
    plain_ce(ref, "audio", b).backward()
    out = model.training_step(b)
    assert out["loss_ori"].item() == pytest.approx(out["loss_flat"].item(), rel=1e-6)
    for p, q in zip(path_params(model, "audio"), path_params(ref, "audio")):
        assert torch.allclose(p, q - 0.1 * q.grad, atol=1e-7)


def test_predict_is_log_of_mean_softmax():
    model = make(epochs=2)
    pred = model.predict(batch())
    pa, pv = (F.softmax(pred.per_modality[m], dim=1) for m in ("audio", "visual"))
    assert torch.allclose(pred.fused.exp(), (pa + pv) / 2, atol=1e-6)


def test_config_errors():
    with pytest.raises(ConfigError, match=r"sums to 7 .* train\.epochs is 6"):
        make(epochs=6, epoch_list=[3, 4])
    with pytest.raises(ConfigError, match="1 stages for 2 modalities"):
        make(epochs=2, epoch_list=[2])
    with pytest.raises(ConfigError, match="allowed: audio, visual"):
        make(modality_order=["audio", "audio"])
    with pytest.raises(ValueError, match="flat_ratio"):
        MIEParams(epoch_list=[1], flat_ratio=1.5)


# ------------------------------------------------------------------------- through the harness

CFG = ["method.name=mie", "method.head_hidden=[16,8]", "method.flat_batch_size=16", "eval.probe=false"]


def snapshot(model: MIE) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part in ("encoders", "heads")
            for k, v in getattr(model, part).state_dict().items()}


@pytest.fixture
def spy(monkeypatch):
    """Weights after each on_epoch_start (after a restart) and at each epoch's end."""
    seen = {"start": {}, "end": {}}
    start, end = MIE.on_epoch_start, MIE.on_epoch_end

    def on_start(self, epoch):
        start(self, epoch)
        seen["start"][epoch] = snapshot(self)

    def on_end(self, epoch):
        end(self, epoch)
        seen["end"][epoch] = snapshot(self)

    monkeypatch.setattr(MIE, "on_epoch_start", on_start)
    monkeypatch.setattr(MIE, "on_epoch_end", on_end)
    return seen


@pytest.mark.parametrize("dataset, stages, expected", [
    ("gaussian", [2, 3, 1], ["audio", "audio", "visual", "visual", "visual", "audio"]),
    ("gaussian3", [1, 1, 1], ["audio", "visual", "text"]),
])
def test_stages_train_only_the_active_modality(fast_config, store, spy, dataset, stages, expected):
    cfg = fast_config(*CFG, f"dataset.name={dataset}", f"train.epochs={len(expected)}",
                      f"method.epoch_list={stages}".replace(" ", ""))
    history = RunDir(run(cfg, store).path).read_metrics()
    assert [r["method"]["modality"] for r in history] == expected
    for epoch, m in enumerate(expected):
        before, after = spy["start"][epoch], spy["end"][epoch]
        changed = {k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
        assert changed == {m}, epoch
    starts = np.cumsum([0, *stages[:-1]])
    for s in starts[1:]:  # each restart: the best validation macro-F1 so far (first maximum)
        val = [r["val"]["macro_f1"] for r in history[:s]]
        assert history[s]["method"]["restored_from_epoch"] == int(np.argmax(val))
        assert history[s]["lr"] == 0.05  # a fresh scheduler (StepLR(2) had decayed the old one)


def test_restart_uses_best_validation_epoch_never_test(fast_config, store, spy, monkeypatch):
    original = Trainer.evaluate
    rigged = {"val": [0.9, 0.1, 0.5, 0.5], "test": [0.1, 0.9, 0.5, 0.5]}  # test would pick epoch 1

    def evaluate(self, split):
        return {**original(self, split), "macro_f1": rigged[split][self.helpers.epoch]}

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    cfg = fast_config(*CFG, "method.epoch_list=[2,2]")
    history = RunDir(run(cfg, store).path).read_metrics()
    assert history[2]["method"]["restored_from_epoch"] == 0
    restored, end0, end1 = spy["start"][2], spy["end"][0], spy["end"][1]
    assert all(torch.equal(restored[k], end0[k]) for k in restored)
    assert not all(torch.equal(restored[k], end1[k]) for k in restored)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted two-stage run, shared by the resume tests."""
    cfg = load_config(None, [*FAST, *CFG, "method.epoch_list=[2,2]"])
    return cfg, run(cfg, Store(tmp_path_factory.mktemp("ref")))


@pytest.mark.parametrize("stop", [2, 3])  # at the stage boundary; mid-stage (P from the checkpoint)
def test_interrupted_run_resumes_to_identical_metrics(reference, store, monkeypatch, stop):
    cfg, ref = reference
    run_interrupted(cfg, store, monkeypatch, at_epoch=stop)
    resumed = run(cfg, store)
    rd, ref_rd = store.run_dir(cfg.group, cfg.run_id()), RunDir(ref.path)
    assert without_timing(rd.read_metrics()) == without_timing(ref_rd.read_metrics())
    assert resumed.summary["best_val"] == ref.summary["best_val"]
    final, ref_final = rd.load(rd.checkpoint)["model"], ref_rd.load(ref_rd.checkpoint)["model"]
    for name, tensor in ref_final.items():
        if name != "_extra_state":
            assert torch.equal(final[name], tensor), name
    ref_proj = ref_final["_extra_state"]["proj"]
    assert sorted(ref_proj) == [0, 2, 3]
    assert all(torch.equal(final["_extra_state"]["proj"][i], ref_proj[i]) for i in ref_proj)
