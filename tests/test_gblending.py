"""Gradient-Blending: the weights by hand; BalanceBenchmark's trainer (GeWu-Lab/BalanceBenchmark)
transcribed and the paper's online G-Blend written independently, each run beside the method; the
switches; joint training with blending off; three modalities; the harness's held-out part of train
(the same rows for a seed with any number of workers, never trained on, exact resume) and
`ctx.trial`."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbalance.bench.data import SplitLoader, epoch_generator, holdout_rows
from mmbalance.bench.perf.steps import variants_named
from mmbalance.bench.report.figures import diagnostic_keys
from mmbalance.bench.store import RunDir
from mmbalance.bench.train import Trainer, holdout_of, run
from mmbalance.core.errors import ConfigError
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch
from mmbalance.methods.base import MethodSetup, StepContext
from mmbalance.methods.gblending import (
    FUSED,
    GBlending,
    GBlendingParams,
    balancebenchmark_weights,
    blended_loss,
    loss_deltas,
    paper_weights,
)
from mmbalance.methods.joint import Joint, JointParams
from tests.conftest import assert_resumes_exactly, mlp_setup
from tests.test_data import BatchingSplit, FileLikeSplit

C = 4
BATCH = 8
LR, MOMENTUM, WD = 0.05, 0.9, 1e-4
AV = ("audio", "visual")
AVT = ("audio", "visual", "text")
CPU = torch.device("cpu")


def sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)


def setup(names=AV, fusion="concat", seed=0) -> MethodSetup:
    return mlp_setup(names, C, in_dims={m: 5 + i for i, m in enumerate(names)}, hidden=7, fusion=fusion, seed=seed)


def batches(names=AV, count=3, seed=1) -> list[Batch]:
    """Class-conditional inputs, every modality informative (the first less noisy than the
    others), so that held-out losses fall and the estimates weigh every branch."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        labels = torch.randint(0, C, (BATCH,), generator=gen)
        inputs = {m: torch.randn(BATCH, 5 + i, generator=gen)
                  + F.pad(F.one_hot(labels, C) * (2.0 - 0.6 * i), (0, 1 + i)) for i, m in enumerate(names)}
        out.append(Batch(inputs, labels))
    return out


def attach(method, train: list[Batch], holdout: list[Batch]) -> StepContext:
    """The harness's context over fixed batches: every pass over train, shuffled or not, is `train`
    (the references below read the same list)."""
    ctx = StepContext(lambda: (sgd(method.parameters()), None), lambda generator=None: iter(train),
                      holdout_batches=lambda: iter(holdout))
    method.attach(ctx)
    method.train()
    return ctx


def run_method(method, train, holdout, epochs) -> tuple[list[dict], list[torch.Tensor]]:
    """The harness's loop: the epoch hook, then every batch; the step outputs and the weights
    each epoch trained with."""
    ctx = attach(method, train, holdout)
    outs, weights = [], []
    for epoch in range(epochs):
        ctx.epoch = epoch
        method.on_epoch_start(epoch)
        weights.append(method.weights.clone())
        for index, batch in enumerate(train):
            ctx.batch_index = index
            outs.append(method.training_step(batch))
    return outs, weights


# ------------------------------------------------------------------------------------- by hand


def test_weights_by_hand():
    # branch a: V 2.0 -> 1.5 (dG 0.5), T 1.8 -> 1.0: O 0.2 -> 0.5, dO 0.3: w* = 0.5 / 0.09
    # branch b: V 2.0 -> 1.9 (dG 0.1), T 1.9 -> 1.7: O 0.1 -> 0.2, dO 0.1: w* = 0.1 / 0.01 = 10
    pre, now = {"a": (1.8, 2.0), "b": (1.9, 2.0)}, {"a": (1.0, 1.5), "b": (1.7, 1.9)}
    deltas = loss_deltas(pre, now)
    assert deltas["a"] == pytest.approx((0.5, 0.3)) and deltas["b"] == pytest.approx((0.1, 0.1))
    wa, wb = 0.5 / 0.09, 10.0
    assert paper_weights(deltas) == pytest.approx({"a": wa / (wa + wb), "b": wb / (wa + wb)})
    assert balancebenchmark_weights(deltas) == pytest.approx({"a": wa / (wa + wb), "b": wb / (wa + wb)})
    # a held-out loss that rose: 0 in the paper's formula, |.| in BalanceBenchmark's
    rose = {"a": (-0.5, 0.3), "b": (0.1, 0.1)}
    assert paper_weights(rose) == pytest.approx({"a": 0.0, "b": 1.0})
    assert balancebenchmark_weights(rose) == pytest.approx({"a": wa / (wa + wb), "b": wb / (wa + wb)})
    assert paper_weights({"a": (-0.5, 0.3), "b": (0.0, 0.1)}) is None  # nothing generalised: keep the weights
    # an unchanged gap: dO^2 floored, not a division by zero
    assert paper_weights({"a": (0.5, 0.0), "b": (0.1, 0.1)}) == pytest.approx({"a": 1.0, "b": 0.0}, abs=1e-9)


def test_blended_loss_sums_in_order():
    losses = {"audio": torch.tensor(2.0), "visual": torch.tensor(3.0), FUSED: torch.tensor(5.0)}
    weights = {"audio": torch.tensor(0.5), "visual": torch.tensor(0.25), FUSED: torch.tensor(0.25)}
    assert blended_loss(losses, weights).item() == pytest.approx(1 + 0.75 + 1.25)


# --------------------------------------------- BalanceBenchmark's GBlendingTrainer, transcribed
# GeWu-Lab/BalanceBenchmark @ 4c1482fca5aa: balancemm/trainer/GBlending_trainer.py (fit l.83-106,
# train_loop l.248-287 with grad_accum_steps 1, training_step l.292-303, super_epoch_origin
# l.306-376), balancemm/train.py l.82-88 (temp model and temp_optimizer_origin),
# balancemm/models/avclassify_model.py BaseClassifierModel.forward l.256-275 and
# unimodality_calculate l.277-301 (concat), balancemm/models/fusion_arch.py ConcatFusion_N l.31-39;
# written as there, loggers, progress bars and prints taken out; the loaders are lists of batches;
# its `val_loader` is given the held-out batches (the suite's protocol: see the method's docstring).


class ConcatFusion_N(nn.Module):
    def __init__(self, fc_out):
        super().__init__()
        self.fc_out = fc_out

    def forward(self, encoder_res):
        output = torch.cat(list(encoder_res.values()), dim=1)
        output = self.fc_out(output)
        return output


class BaseClassifierModel(nn.Module):
    def __init__(self, encoders, fc_out):
        super().__init__()
        self.modalitys = list(encoders.keys())
        self.modality_encoder = encoders
        self.fusion_module = ConcatFusion_N(fc_out)
        self.fusion = "concat"
        self.modality_size = {m: e.out_dim for m, e in encoders.items()}
        self.device = "cpu"

    def forward(self, batch, padding=[], mask=None):  # noqa: B006 (as written there)
        self.encoder_result = {}
        for modality in self.modalitys:
            modality_data = batch[modality]
            if modality in padding:
                if mask is None:
                    modality_data = torch.zeros_like(modality_data, device=modality_data.device)
            modality_res = self.modality_encoder[modality](modality_data)
            self.encoder_result[modality] = modality_res
        self.encoder_result['output'] = self.fusion_module(self.encoder_result)
        self.unimodality_calculate()
        return self.encoder_result, self.unimodal_result, self.prediction

    def unimodality_calculate(self):
        modality_nums = 0
        all_nums = len(self.encoder_result.keys()) - 1
        self.unimodal_result = {}
        self.prediction = {}
        now_size = 0
        for modality in self.encoder_result.keys():
            if modality == 'output':
                self.unimodal_result[modality] = self.encoder_result[modality]
                continue
            if self.fusion == 'concat':
                self.unimodal_result[modality] = (torch.mm(self.encoder_result[modality],
                                                           torch.transpose(self.fusion_module.fc_out.weight[
                                                               :, now_size:now_size + self.modality_size[modality]],
                                                               0, 1))
                                                  + self.fusion_module.fc_out.bias / all_nums)
                now_size += self.modality_size[modality]
            modality_nums += 1
        softmax = nn.Softmax(dim=1)
        for modality in self.unimodal_result.keys():
            softmax_res = softmax(self.unimodal_result[modality])
            self.prediction[modality] = torch.argmax(softmax_res, dim=1)
        return self.encoder_result, self.unimodal_result, self.prediction


def bb_training_step(model, batch, weights):
    criterion = nn.CrossEntropyLoss()
    model(batch)
    label = batch['label']
    loss = 0
    for modality in model.unimodal_result.keys():
        loss += weights[modality] * criterion(model.unimodal_result[modality], label)
    loss.backward()
    return loss


def bb_super_epoch_origin(super_epoch, model, temp_model, train_loader, test_loader, optimizer, optimizer_origin):
    temp_model.load_state_dict(model.state_dict(), strict=True)
    criterion = nn.CrossEntropyLoss()
    weights = {}
    gs, os_ = {}, {}  # recorded for the comparison (the trainer logs only the weights)
    modalitys = list(temp_model.modalitys)
    modalitys.append('output')
    for modality in modalitys:
        temp_model.load_state_dict(model.state_dict(), strict=True)
        optimizer.load_state_dict(optimizer_origin)
        padding = []
        pre_train_loss = 0
        now_train_loss = 0
        pre_validation_loss = 0
        now_validation_loss = 0
        for other_modality in temp_model.modalitys:
            if other_modality != modality and modality != 'output':
                padding.append(other_modality)
        for epoch in range(super_epoch):
            temp_model.train()
            _loss = 0.0
            for batch_idx, batch in enumerate(train_loader):  # noqa: B007
                optimizer.zero_grad()
                temp_model(batch, padding=padding)
                out = temp_model.unimodal_result['output']
                loss = criterion(out, batch['label'])
                loss.backward()
                optimizer.step()
                _loss += loss.item()
            if epoch == 0 or epoch == super_epoch - 1:
                temp_model.eval()
                with torch.no_grad():
                    _loss_v = 0
                    for batch_idx, batch in enumerate(test_loader):  # noqa: B007
                        temp_model(batch, padding=padding)
                        out = temp_model.unimodal_result['output']
                        loss = criterion(out, batch['label'])
                        _loss_v += loss.item()
                    if epoch == 0:
                        pre_train_loss = _loss
                        pre_validation_loss = _loss_v
                    else:
                        now_train_loss = _loss
                        now_validation_loss = _loss_v
        g = now_validation_loss - pre_validation_loss
        o_pre = pre_validation_loss - pre_train_loss
        o_now = now_validation_loss - now_train_loss
        o = o_now - o_pre
        weights[modality] = abs((g) / (o**2))
        gs[modality], os_[modality] = g, o
    sums = sum(weights.values())
    for modality in weights.keys():
        weights[modality] /= sums
    return weights, gs, os_


def bb_fit(model, train, val, epochs, super_epoch):
    """fit's loop (l.89-106) with its train_loop; the weights, g and o of every estimate."""
    optimizer = sgd(model.parameters())
    temp_model = copy.deepcopy(model)
    temp_optimizer = sgd(temp_model.parameters())
    temp_optimizer_origin = copy.deepcopy(temp_optimizer.state_dict())
    estimates = []
    weights = {}
    for current_epoch in range(epochs):
        if current_epoch % super_epoch == 0:
            model.train()
            weights, gs, os_ = bb_super_epoch_origin(super_epoch, model, temp_model, train, val, temp_optimizer,
                                                     temp_optimizer_origin)
            estimates.append((weights, gs, os_))
        model.train()
        for batch in train:
            bb_training_step(model, batch, weights)
            optimizer.step()
            optimizer.zero_grad()
    return estimates


def as_dicts(batch_list: list[Batch]) -> list[dict]:
    return [{**b.inputs, "label": b.labels} for b in batch_list]


def bb_beside_method(names, super_epoch, epochs, **params):
    method = GBlending(GBlendingParams(variant="balancebenchmark", interval=super_epoch, **params), setup(names))
    model = BaseClassifierModel(copy.deepcopy(method.encoders), copy.deepcopy(method.fusion.fc_out))
    train, holdout = batches(names, 3), batches(names, 2, seed=2)
    outs, weights = run_method(method, train, holdout, epochs)
    estimates = bb_fit(model, as_dicts(train), as_dicts(holdout), epochs, super_epoch)
    return method, model, outs, weights, estimates


def largest_parameter_gap(method, model) -> float:
    pairs = [(method.fusion.fc_out.weight, model.fusion_module.fc_out.weight),
             (method.fusion.fc_out.bias, model.fusion_module.fc_out.bias)]
    for m in method.modality_names:
        pairs += list(zip(method.encoders[m].parameters(), model.modality_encoder[m].parameters()))
    return max((a - b).abs().max().item() for a, b in pairs)


@pytest.mark.parametrize("names", [AV, AVT], ids=["M2", "M3"])
def test_balancebenchmark_equals_its_trainer(names):
    """Two estimates (epochs 0 and 2 of 4, super_epoch 2), the blended steps between them."""
    method, model, outs, weights, estimates = bb_beside_method(names, super_epoch=2, epochs=4)
    assert largest_parameter_gap(method, model) < 1e-5
    branches = (*names, FUSED)
    for epoch, (w, _, _) in [(0, estimates[0]), (2, estimates[1])]:
        expected = [w[k if k != FUSED else "output"] for k in branches]
        assert torch.allclose(weights[epoch], torch.tensor(expected), atol=1e-6), epoch
        step = outs[epoch * 3]
        assert all(abs(float(step[f"weight.{k}"]) - e) < 1e-6 for k, e in zip(branches, expected))
    # the last estimate's diagnostics: dG = -g, dO = o
    log = method.epoch_log()
    _, g, o = estimates[1]
    for k in branches:
        key = k if k != FUSED else "output"
        assert log[f"delta_g.{k}"] == pytest.approx(-g[key], rel=1e-5, abs=1e-6)
        assert log[f"delta_o.{k}"] == pytest.approx(o[key], rel=1e-5, abs=1e-6)
        assert log[f"ogr.{k}"] == pytest.approx(abs(o[key] / g[key]), rel=1e-4)


def test_balancebenchmark_estimate_length_is_its_own_switch():
    """estimate_epochs=3 with interval 2: the temp model trains 3 epochs (super_epoch 3 in the
    trainer's estimate), re-estimated every 2 epochs."""
    method = GBlending(GBlendingParams(variant="balancebenchmark", interval=2, estimate_epochs=3), setup())
    model = BaseClassifierModel(copy.deepcopy(method.encoders), copy.deepcopy(method.fusion.fc_out))
    train, holdout = batches(count=3), batches(count=2, seed=2)
    run_method(method, train, holdout, 1)
    temp = copy.deepcopy(model)
    temp_optimizer = sgd(temp.parameters())
    w, _, _ = bb_super_epoch_origin(3, model, temp, as_dicts(train), as_dicts(holdout), temp_optimizer,
                                    copy.deepcopy(temp_optimizer.state_dict()))
    assert torch.allclose(method.weights, torch.tensor([w["audio"], w["visual"], w["output"]]), atol=1e-6)
    w2, _, _ = bb_super_epoch_origin(2, model, temp, as_dicts(train), as_dicts(holdout), temp_optimizer,
                                     copy.deepcopy(temp_optimizer.state_dict()))
    assert not torch.allclose(method.weights, torch.tensor([w2["audio"], w2["visual"], w2["output"]]), atol=1e-4)


def test_the_estimate_is_the_key_line():
    """Weights taken without the square of o (a changed key line) no longer agree: the test can fail."""
    import mmbalance.methods.gblending as gb

    original = gb.balancebenchmark_weights
    try:
        gb.balancebenchmark_weights = lambda d: original({k: (dg, abs(do) ** 0.5) for k, (dg, do) in d.items()})
        method, model, _, weights, estimates = bb_beside_method(AV, super_epoch=2, epochs=2)
    finally:
        gb.balancebenchmark_weights = original
    expected = torch.tensor([estimates[0][0][k] for k in ("audio", "visual", "output")])
    assert not torch.allclose(weights[0], expected, atol=1e-4)
    assert largest_parameter_gap(method, model) > 1e-5


# ------------------------------------------------------------- the paper's online G-Blend, written here
# Wang, Tran & Feiszli (CVPR 2020), online G-Blend as the method's docstring states it: per
# super-epoch and branch, a copy of the model trained n epochs on T alone with a fresh optimizer;
# per-sample mean losses on T and V before and after; w = max(dG, 0) / dO^2, normalised.


class PaperNet(nn.Module):
    def __init__(self, method: GBlending):
        super().__init__()
        self.names = method.modality_names
        self.enc = copy.deepcopy(method.encoders)
        self.heads = copy.deepcopy(method.heads)
        self.fc = copy.deepcopy(method.fusion.fc_out)

    def logits(self, x, branch):
        if branch == FUSED:
            return self.fc(torch.cat([self.enc[m](x[m]) for m in self.names], dim=1))
        return self.heads[branch](self.enc[branch](x[branch]))


def mean_ce(net, data, branch):
    with torch.no_grad():
        total = sum(F.cross_entropy(net.logits(b.inputs, branch), b.labels, reduction="sum").item() for b in data)
    return total / sum(len(b) for b in data)


def paper_online_gblend(net: PaperNet, train, held, epochs, interval, n, previous):
    weights_per_epoch = []
    optimizer = sgd(net.parameters())
    branches = (*net.names, FUSED)
    weights = previous
    for epoch in range(epochs):
        if epoch % interval == 0:
            raw = {}
            for k in branches:
                trial = copy.deepcopy(net)
                opt = sgd(trial.parameters())
                t0, v0 = mean_ce(trial, train, k), mean_ce(trial, held, k)
                for _ in range(n):
                    for b in train:
                        opt.zero_grad()
                        F.cross_entropy(trial.logits(b.inputs, k), b.labels).backward()
                        opt.step()
                t1, v1 = mean_ce(trial, train, k), mean_ce(trial, held, k)
                gain, over = v0 - v1, (v1 - t1) - (v0 - t0)
                raw[k] = max(gain, 0.0) / max(over**2, 1e-12)
            if sum(raw.values()) > 0:
                weights = {k: raw[k] / sum(raw.values()) for k in branches}
        weights_per_epoch.append(weights)
        for b in train:
            optimizer.zero_grad()
            loss = sum(weights[k] * F.cross_entropy(net.logits(b.inputs, k), b.labels) for k in branches)
            loss.backward()
            optimizer.step()
    return weights_per_epoch


@pytest.mark.parametrize("names,fusion", [(AV, "concat"), (AVT, "concat"), (AV, "film")], ids=["M2", "M3", "film"])
def test_paper_equals_its_online_gblend(names, fusion):
    method = GBlending(GBlendingParams(interval=2, estimate_epochs=2), setup(names, fusion))
    if fusion == "film":  # no split of the fused head: compare the weights of the estimate only
        train, held = batches(names, 3), batches(names, 2, seed=2)
        _, weights = run_method(method, train, held, 1)
        assert method.heads is not None and weights[0].sum().item() == pytest.approx(1.0)
        return
    net = PaperNet(method)
    train, held = batches(names, 3), batches(names, 2, seed=2)
    _, weights = run_method(method, train, held, 4)
    joint_start = {**dict.fromkeys(names, 0.0), FUSED: 1.0}
    expected = paper_online_gblend(net, train, held, 4, 2, 2, joint_start)
    for epoch in range(4):
        assert torch.allclose(weights[epoch], torch.tensor([expected[epoch][k] for k in (*names, FUSED)]),
                              atol=1e-5), epoch
    pairs = list(zip(method.encoders.parameters(), net.enc.parameters())) + \
        list(zip(method.heads.parameters(), net.heads.parameters())) + \
        list(zip(method.fusion.fc_out.parameters(), net.fc.parameters()))
    assert max((a - b).abs().max().item() for a, b in pairs) < 1e-5


def test_paper_keeps_the_weights_when_no_held_out_loss_falls(monkeypatch):
    import mmbalance.methods.gblending as gb

    method = GBlending(GBlendingParams(interval=1, estimate_epochs=1), setup())
    monkeypatch.setattr(gb, "loss_deltas", lambda pre, now: dict.fromkeys(pre, (-1.0, 0.5)))
    _, weights = run_method(method, batches(count=2), batches(count=1, seed=2), 2)
    assert weights[0].tolist() == weights[1].tolist() == [0.0, 0.0, 1.0]


# -------------------------------------------------------------------------- switches and refusals


def test_blending_off_is_joint_training():
    """blend=False: fixed weights fused 1, unimodal 0, no estimate: joint's parameters to 1e-6."""
    train = batches(count=3)
    for variant in ("paper", "balancebenchmark"):
        method = GBlending(GBlendingParams(variant=variant, blend=False), setup())
        joint = Joint(JointParams(), setup())
        assert method.holdout_fraction() == 0.0 and method.epoch_log() == {}
        run_method(method, train, [], 3)  # an empty held-out part: it is never asked for
        ctx = attach(joint, train, [])
        for _ in range(3):
            for b in train:
                joint.training_step(b)
        gap = max((a - b).abs().max().item() for a, b in
                  zip([*method.encoders.parameters(), *method.fusion.parameters()],
                      [*joint.encoders.parameters(), *joint.fusion.parameters()]))
        assert gap < 1e-6, variant
        assert ctx.epoch == 0


def test_blending_on_differs_from_joint():
    train, held = batches(count=3), batches(count=2, seed=2)
    method = GBlending(GBlendingParams(interval=1, estimate_epochs=1), setup())
    joint = Joint(JointParams(), setup())
    run_method(method, train, held, 1)
    attach(joint, train, [])
    for b in train:
        joint.training_step(b)
    assert not torch.allclose(method.fusion.fc_out.weight, joint.fusion.fc_out.weight, atol=1e-4)


def test_interval_sets_when_the_estimates_run(monkeypatch):
    calls = []
    monkeypatch.setattr(GBlending, "estimate", lambda self: calls.append(self.step_context.epoch))
    run_method(GBlending(GBlendingParams(interval=3), setup()), batches(count=1), [], 7)
    assert calls == [0, 3, 6]


def test_refusals_are_clear():
    with pytest.raises(ValueError, match="variant=balancebenchmark needs estimate_epochs >= 2"):
        GBlendingParams(variant="balancebenchmark", interval=1)
    with pytest.raises(ValueError, match="holdout"):
        GBlendingParams(holdout=1.0)
    with pytest.raises(ConfigError, match="model.fusion='film' does not have"):
        GBlending(GBlendingParams(variant="balancebenchmark"), setup(fusion="film"))
    method = Joint(JointParams(), setup())
    ctx = attach(method, batches(count=1), [])
    ctx.holdout_batches = StepContext(lambda: (None, None), lambda: iter(())).holdout_batches
    with pytest.raises(RuntimeError, match=r"holds out no part of train for this method.*holdout_fraction"):
        ctx.holdout_batches()


# ------------------------------------------------------------------------ the harness's held-out part


def test_holdout_rows_are_the_seeds_alone_disjoint_and_nested():
    trained, held = holdout_rows(50, 0.1, seed=3)
    assert len(held) == 5 and sorted(trained + held) == list(range(50)) and not set(trained) & set(held)
    assert (trained, held) == holdout_rows(50, 0.1, seed=3)
    assert held != holdout_rows(50, 0.1, seed=4)[1]
    assert set(held) < set(holdout_rows(50, 0.3, seed=3)[1])
    assert len(holdout_rows(3, 0.01, 0)[1]) == 1 and len(holdout_rows(3, 0.99, 0)[1]) == 2
    with pytest.raises(ConfigError, match="too few"):
        holdout_rows(1, 0.5, 0)


@pytest.mark.parametrize("split", [FileLikeSplit, BatchingSplit], ids=["items", "batches"])
def test_a_loader_over_rows_gives_the_same_batches_with_any_workers(split):
    rows = [1, 4, 5, 8, 11]
    inline = SplitLoader(split(12), 2, CPU, rows=rows)
    assert len(inline) == 3
    pooled = SplitLoader(split(12), 2, CPU, rows=rows, workers=2)
    for gen in (None, 0):
        ours = [b.inputs["audio"][:, 0].tolist() for b in inline(None if gen is None else epoch_generator(2, gen))]
        theirs = [b.inputs["audio"][:, 0].tolist() for b in pooled(None if gen is None else epoch_generator(2, gen))]
        assert ours == theirs
        assert sorted(sum(ours, [])) == [float(r) for r in rows]


def test_the_method_never_trains_on_the_held_out_rows(fast_config, tmp_path):
    cfg = fast_config("method.name=gblending", "method.holdout=0.25")
    trainer = Trainer(cfg, RunDir(tmp_path / "run"))
    loaders = trainer.loaders
    n = loaders["train_plain"].n
    assert loaders["holdout"].n == round(0.25 * n) and loaders["train"].n == n - loaders["holdout"].n
    seen = lambda passes: {tuple(x.tolist()) for b in passes for x in b.inputs["audio"]}  # noqa: E731
    trained = seen(trainer.context.train_batches())
    held = seen(trainer.context.holdout_batches())
    assert trained | held == seen(loaders["train_plain"]()) and not trained & held
    assert trained == seen(trainer.context.train_batches(epoch_generator(0, 1)))  # shuffled: the same rows
    # a method that holds nothing out trains on all of train, and is lent nothing
    joint = Trainer(fast_config(), RunDir(tmp_path / "joint"))
    assert "holdout" not in joint.loaders and joint.loaders["train"].n == n


def test_a_bad_holdout_fraction_is_refused():
    class Odd:
        registry_name = "odd"

        def holdout_fraction(self):
            return 1.5

    with pytest.raises(ConfigError, match=r"method 'odd' holds out 1.5 .* must be in \[0, 1\)"):
        holdout_of(Odd())  # type: ignore[arg-type]


def test_trial_leaves_everything_as_it_was():
    method = Joint(JointParams(), setup())
    train = batches(count=2)
    ctx = attach(method, train, [])
    method.training_step(train[0])  # momentum in the optimizer, gradients on the parameters
    before = copy.deepcopy(method.state_dict())
    grads = [p.grad.clone() for p in method.parameters()]
    optimizer, momentum = ctx.optimizer, copy.deepcopy(ctx.optimizer.state_dict())
    passes = ctx.backward_passes
    with ctx.trial(method):
        assert ctx.optimizer is not optimizer and not ctx.optimizer.state
        for b in train:
            method.training_step(b)
    assert ctx.optimizer is optimizer and ctx.backward_passes == passes + 2
    assert all(torch.equal(v, before[k]) for k, v in method.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(method.parameters(), grads))
    after = ctx.optimizer.state_dict()["state"]
    assert all(torch.equal(after[i]["momentum_buffer"], s["momentum_buffer"]) for i, s in momentum["state"].items())


# --------------------------------------------------------------------------------- through the harness


HARNESS = ["method.name=gblending", "method.interval=2", "method.estimate_epochs=2"]


@pytest.mark.parametrize("variant", ["paper", "balancebenchmark"])
def test_three_modalities_through_the_harness(fast_config, store, variant):
    cfg = fast_config(*HARNESS, "dataset.name=gaussian3", f"method.variant={variant}")
    result = run(cfg, store)
    history = RunDir(result.path).read_metrics()
    branches = ("audio", "visual", "text", FUSED)
    for record in history:
        weights = [record["train"][f"weight.{k}"] for k in branches]
        assert sum(weights) == pytest.approx(1.0, abs=1e-6) and min(weights) >= 0
        assert {f"delta_g.{k}" for k in branches} <= set(record["method"])
    assert set(result.summary["probes"]) == {"audio", "visual", "text"}
    keys = {k for _, k in diagnostic_keys(history)}
    assert {"weight.audio", "loss.fused", "delta_o.text"} <= keys


def test_passes_per_step_are_counted(fast_config, store):
    """4 epochs, estimates at 0 and 2, each 2 trial epochs per branch: the paper's modality
    branches run their own encoder only (1 of 2), the fused branch both; the loss passes are in
    evaluation mode (not counted). Backward: one per step, trial steps included."""
    result = run(fast_config(*HARNESS), store)
    trainer_steps = result.summary["cost"]
    estimates, trial_epochs = 2, 2
    # per training epoch of S steps, 2 encoders: 2 S calls; per estimate: (1 + 1 + 2) S calls per trial epoch
    expected_forward = (4 * 2 + estimates * trial_epochs * 4) / (4 * 2)
    expected_backward = (4 + estimates * trial_epochs * 3) / 4
    assert trainer_steps["forward_passes_per_step"] == pytest.approx(expected_forward)
    assert trainer_steps["backward_passes_per_step"] == pytest.approx(expected_backward)


@pytest.mark.parametrize("at_epoch", [1, 2])
def test_resume_is_exact(fast_config, store, tmp_path, monkeypatch, at_epoch):
    """Resumed between estimates (the weights from the checkpoint) and at one (the trials' shuffles
    from the restored RNG)."""
    cfg = fast_config(*HARNESS, "method.variant=balancebenchmark")
    assert_resumes_exactly(cfg, store, tmp_path, monkeypatch, at_epoch=at_epoch)


def test_registered_and_benched():
    assert METHODS.get("gblending", "method.name") is GBlending
    assert GBlending.family == "objective"
    assert [v.label for v in variants_named(["gblending"])] == ["joint", "gblending (step)"]


def test_an_epochs_seconds_include_its_estimate(fast_config, store, monkeypatch):
    """The estimate runs in the epoch's start hook: the epoch's hook seconds, and so the cost
    report's seconds per epoch, include it."""
    import time

    monkeypatch.setattr(GBlending, "estimate", lambda self: time.sleep(0.3))
    result = run(fast_config(*HARNESS, "train.epochs=1"), store)
    assert RunDir(result.path).read_metrics()[0]["train"]["hook_seconds"] >= 0.3
    assert result.summary["cost"]["seconds_per_epoch"] >= 0.3
