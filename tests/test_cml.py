"""CML: BalanceBenchmark's step (GeWu-Lab/BalanceBenchmark CMLTrainer) transcribed and run beside the
method, with its regulariser and with the paper's release's (QingyangZhang/CML), both variants by
hand, the removal order, joint training when the window is closed, three modalities, sum fusion,
the harness."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbalance.bench.config import load_config
from mmbalance.bench.perf.steps import variants_named
from mmbalance.bench.report.figures import diagnostic_keys
from mmbalance.bench.store import RunDir
from mmbalance.bench.train import run
from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Batch, Modality
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.cml import CML, CMLParams, calibration_penalty, subset_chain
from mmbalance.methods.joint import Joint, JointParams
from mmbalance.models.small import MLPEncoder, MLPParams
from tests.conftest import step_context, step_recording_grads

C = 4
BATCH = 12
LR, MOMENTUM, WD = 0.05, 0.9, 1e-4
AV = ("audio", "visual")
AVT = ("audio", "visual", "text")


def encoders(names, seed):
    torch.manual_seed(seed)
    mods = tuple(Modality(m, "vector", (5 + i,)) for i, m in enumerate(names))
    return mods, nn.ModuleDict({m.name: MLPEncoder(MLPParams(hidden=7, out_dim=6), m) for m in mods})


def attach(method):
    method.attach(step_context(lambda: torch.optim.SGD(method.parameters(), lr=LR, momentum=MOMENTUM,
                                                       weight_decay=WD)))
    return method


def make(names=AV, fusion="concat", seed=0, **params) -> CML:
    mods, encs = encoders(names, seed)
    return attach(CML(CMLParams(**params), MethodSetup(encs, C, mods, fusion=fusion)))


def make_batch(names=AV, seed=1) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return Batch({m: torch.randn(BATCH, 5 + i, generator=gen) for i, m in enumerate(names)},
                 torch.randint(0, C, (BATCH,), generator=gen))


# ----------------------------------------------------------------------- the regulariser by hand


def test_both_penalties_by_hand():
    # two samples, label 0; the fuller model's confidences 0.6 and 0.5, the reduced one's 0.7 and 0.4
    more = torch.log(torch.tensor([[0.6, 0.4], [0.5 + 1e-6, 0.5 - 1e-6]]))
    fewer = torch.log(torch.tensor([[0.7, 0.3], [0.4, 0.6]]))
    labels = torch.tensor([0, 0])
    r_release, share = calibration_penalty([more, fewer], labels, "release")
    r_bb, _ = calibration_penalty([more, fewer], labels, "balancebenchmark")
    # release: per sample, relu(0.7 - 0.6) + relu(0.6 - 0.5): sample 2 rose too (its reduced
    # prediction is class 1, wrong, so the mask keeps it)
    assert r_release.item() == pytest.approx(0.1 + 0.1, abs=1e-5)
    assert share.item() == 1.0
    # balancebenchmark: the hinge of the batch sum, (0.7 - 0.6) + (0.6 - 0.5)
    assert r_bb.item() == pytest.approx(0.2, abs=1e-5)
    # the mask: a reduced model right where the fuller one is wrong may be more confident
    more = torch.log(torch.tensor([[0.4, 0.6]]))
    fewer = torch.log(torch.tensor([[0.8, 0.2]]))
    assert calibration_penalty([more, fewer], torch.tensor([0]), "release")[0].item() == 0.0
    assert calibration_penalty([more, fewer], torch.tensor([0]), "balancebenchmark")[0].item() == \
        pytest.approx(0.2, abs=1e-5)
    # a batch sum below zero: nothing for balancebenchmark, the rising sample for release
    more = torch.log(torch.tensor([[0.9, 0.1], [0.55, 0.45]]))
    fewer = torch.log(torch.tensor([[0.6, 0.4], [0.65, 0.35]]))
    assert calibration_penalty([more, fewer], labels, "balancebenchmark")[0].item() == 0.0
    assert calibration_penalty([more, fewer], labels, "release")[0].item() == pytest.approx(0.1, abs=1e-5)


def test_the_chain_removes_one_modality_at_a_time():
    method, batch = make(AVT), make_batch(AVT)
    method.order = ["visual", "text", "audio"]  # popped from the end: audio, then text
    assert method.removal() == ["audio", "text"]
    with torch.no_grad():
        feats = method.encode(batch.inputs)
        w, b = method.fusion.fc_out.weight, method.fusion.fc_out.bias
        chain = subset_chain(method.fusion(feats), {"audio": feats["audio"] @ w[:, :6].t(),
                                                    "text": feats["text"] @ w[:, 12:].t()}, method.removal())
    assert len(chain) == 3
    assert torch.allclose(chain[1], b + feats["visual"] @ w[:, 6:12].t() + feats["text"] @ w[:, 12:].t(), atol=1e-6)
    assert torch.allclose(chain[2], b + feats["visual"] @ w[:, 6:12].t(), atol=1e-6)


def test_the_order_is_drawn_at_each_epoch_in_the_window_with_python_random():
    method = make(AVT, modulation_starts=1)
    random.seed(3)
    method.on_epoch_start(0)  # outside the window: nothing drawn
    assert method.order == list(AVT) and random.random() == random.Random(3).random()
    random.seed(3)
    method.on_epoch_start(1)
    expected = list(AVT)
    random.Random(3).shuffle(expected)
    assert method.order == expected


# ---------------------------------------------------- BalanceBenchmark's step, transcribed (CMLTrainer)
# GeWu-Lab/BalanceBenchmark @ 4c1482fca5aa: balancemm/trainer/CML_trainer.py conf_loss l.19-22,
# train_loop l.62-69 (the order shuffled once per epoch; optimizer.step with the step as its closure,
# then zero_grad) and training_step l.107-210, written as there (the unused pad_* and loss_mm
# assignments and the gradient-accumulation branch left out). The model: models/avclassify_model.py
# with the concat fusion; Unimodality_Calculate as at commit 0d206ba (the trainer's name for it):
# each modality's block of fc_out times its feature plus bias / M, and 'output' the fused logits.
# `regulariser="release"` puts the release's per-sample term (QingyangZhang/CML @ 9d2496e6f37a,
# cpm/CPM_Nets.py rank_loss l.121-123, the fewer-modality input at num+1) in conf_loss's place.


def conf_loss(conf, pred, conf_x, pred_x, label):
    sign = (~((pred == label) & (pred_x != label))).long()  # trick 1
    return (max(0, torch.sub(conf_x, conf).sum())), sign.sum()


def release_rank_term(conf, pred, conf_x, pred_x, label):
    """CPM_Nets.py l.122-123 with confidence_list[num] = conf, [num+1] = conf_x (and predicts)."""
    target = label
    sign = (~((pred_x == target) & (pred != target))).long()  # trick 1
    return torch.nn.ReLU()(torch.sub(conf_x, conf) * sign - 0.00).sum(), sign.sum()


class BBModel(nn.Module):
    def __init__(self, method: CML) -> None:
        super().__init__()
        method = copy.deepcopy(method)
        self.modalitys = method.modality_names
        self.modality_encoder = method.encoders
        self.fusion_module = nn.Module()
        self.fusion_module.fc_out = method.fusion.fc_out
        self.modality_size = {m: e.out_dim for m, e in method.encoders.items()}

    def forward(self, batch):
        self.encoder_result = {m: self.modality_encoder[m](batch[m]) for m in self.modalitys}
        self.encoder_result['output'] = self.fusion_module.fc_out(
            torch.cat([self.encoder_result[m] for m in self.modalitys], dim=1))

    def Unimodality_Calculate(self):
        all_nums = len(self.encoder_result.keys()) - 1
        self.Uni_res = {}
        now_size = 0
        for modality in self.encoder_result.keys():
            if modality == 'output':
                self.Uni_res[modality] = self.encoder_result[modality]
                continue
            block = self.fusion_module.fc_out.weight[:, now_size:now_size + self.modality_size[modality]]
            self.Uni_res[modality] = (torch.mm(self.encoder_result[modality], torch.transpose(block, 0, 1))
                                      + self.fusion_module.fc_out.bias / all_nums)
            now_size += self.modality_size[modality]
        return self.Uni_res


def bb_training_step(self, model, batch, label, random_dict_, conf_loss=conf_loss):
    criterion = nn.CrossEntropyLoss()
    softmax = nn.Softmax(dim=1)
    _loss_c = 0
    modality_num = len(model.modalitys)
    modality_list = model.modalitys
    m = {}
    if modality_num == 3:
        if self.modulation_starts <= self.current_epoch <= self.modulation_ends:
            model(batch)
            for modality in modality_list:
                m[modality] = model.encoder_result[modality]
            m['out'] = model.encoder_result['output']
            unimodal_result = model.Unimodality_Calculate()
            out_s = unimodal_result['output']
            random_dict = random_dict_.copy()
            for i in range(modality_num - 1):
                removed_mm = random_dict.pop()
                out_p = out_s - unimodal_result[removed_mm] + model.fusion_module.fc_out.bias/3
                prediction_s = softmax(out_s)
                conf_s, pred_s = torch.max(prediction_s, dim=1)
                prediction_p = softmax(out_p)
                conf_p, pred_p = torch.max(prediction_p, dim=1)
                if i == 0:
                    loss = criterion(out_s, label)
                loss_p = criterion(out_p, label)
                loss_pc, _ = conf_loss(conf_s, pred_s, conf_p, pred_p, label)
                loss = loss + loss_p
                _loss_c = _loss_c + loss_pc
                out_s = out_p
            loss = (loss) / 3 + self.lam * _loss_c
        else:
            model(batch)
            for modality in modality_list:
                m[modality] = model.encoder_result[modality]
            m['out'] = model.encoder_result['output']
            loss = criterion(m['out'], label)
    else:
        if self.modulation_starts <= self.current_epoch <= self.modulation_ends:
            model(batch)
            for modality in modality_list:
                m[modality] = model.encoder_result[modality]
            m['out'] = model.encoder_result['output']
            unimodal_result = model.Unimodality_Calculate()
            out_s = unimodal_result['output']
            random_dict = random_dict_.copy()
            for i in range(modality_num - 1):
                removed_mm = random_dict.pop()
                out_p = out_s - unimodal_result[removed_mm] + model.fusion_module.fc_out.bias/2
                prediction_s = softmax(out_s)
                conf_s, pred_s = torch.max(prediction_s, dim=1)
                prediction_p = softmax(out_p)
                conf_p, pred_p = torch.max(prediction_p, dim=1)
                if i == 0:
                    loss = criterion(out_s, label)
                loss_p = criterion(out_p, label)
                loss_pc, _ = conf_loss(conf_s, pred_s, conf_p, pred_p, label)
                loss += loss_p
                _loss_c += loss_pc
                out_s = out_p
            loss = (loss) / 2 + self.lam * _loss_c
        else:
            model(batch)
            for modality in modality_list:
                m[modality] = model.encoder_result[modality]
            m['out'] = model.encoder_result['output']
            loss = criterion(m['out'], label)
    loss.backward()
    return loss


class Trainer:
    def __init__(self, lam, starts, ends):
        self.lam, self.modulation_starts, self.modulation_ends, self.current_epoch = lam, starts, ends, 0


def run_beside(method: CML, names, regulariser: str, lam: float, starts: int = 0, ends: int = 80,
               epochs: int = 3, steps: int = 3) -> tuple[float, float, set]:
    """Epochs of both on the same batches and the same Python random state at each epoch start; the
    largest difference of the losses and of the parameters, and the removal orders seen."""
    code, trainer = BBModel(method), Trainer(lam, starts, ends)
    optimizer = torch.optim.SGD(code.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    term = conf_loss if regulariser == "balancebenchmark" else release_rank_term
    gap, orders = 0.0, set()
    for epoch in range(epochs):
        method.step_context.epoch = trainer.current_epoch = epoch
        random.seed(5 + epoch)  # seeds 5-7 give both orders of two modalities
        method.on_epoch_start(epoch)
        random.seed(5 + epoch)
        random_dict = list(code.modalitys)
        random.shuffle(random_dict)  # train_loop l.62-67
        orders.add(tuple(random_dict))
        for s in range(steps):
            b = make_batch(names, seed=10 * epoch + s)
            out = method.training_step(b)
            loss = optimizer.step(lambda b=b, order=random_dict: bb_training_step(trainer, code, b.inputs, b.labels,
                                                                                   order, term))
            optimizer.zero_grad()
            gap = max(gap, abs(out["loss"].item() - loss.item()))
    pairs = [(p, q) for n in names for p, q in zip(method.encoders[n].parameters(),
                                                   code.modality_encoder[n].parameters())]
    pairs += list(zip(method.fusion.fc_out.parameters(), code.fusion_module.fc_out.parameters()))
    return gap, max((p - q).abs().max().item() for p, q in pairs), orders


@pytest.mark.parametrize("names", [AV, AVT], ids=len)
@pytest.mark.parametrize("variant", ["balancebenchmark", "release"])
def test_balancebenchmark_step_equals_the_method(variant, names):
    lam = 0.5  # large enough that the regulariser moves the parameters visibly
    method = make(names, variant=variant, lam=lam, modulation_ends=80)
    loss_gap, param_gap, orders = run_beside(method, names, variant, lam)
    assert loss_gap < 1e-5 and param_gap < 1e-5  # measured: ~1e-8
    assert len(orders) > 1  # the order changed between epochs
    moved = make(names, variant=variant, lam=0.0, modulation_ends=80)
    _, without, _ = run_beside(moved, names, variant, lam)  # lam 0 against lam 0.5: apart
    assert without > 1e-4


def test_the_variants_train_differently():
    a, b = make(lam=1.0), make(lam=1.0, variant="balancebenchmark")
    for s in range(4):
        out_a = a.training_step(make_batch(seed=s))
        b.training_step(make_batch(seed=s))
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) > 1e-5
    assert {"loss.ce", "loss.cml", "violation", "conf.drop0", "conf.drop1", "cml"} <= set(out_a)


# -------------------------------------------------------- window closed: joint training, the window


def test_window_closed_is_joint_training_and_the_window_matches_balancebenchmark():
    method = make(modulation_starts=5)
    mods, encs = encoders(AV, 0)
    joint = attach(Joint(JointParams(), MethodSetup(encs, C, mods)))
    random.seed(0)
    state = random.getstate()
    for s in range(4):
        method.on_epoch_start(0)
        b = make_batch(seed=s)
        out, ref = method.training_step(b), joint.training_step(b)
        assert out["loss"].item() == pytest.approx(ref["loss"].item(), abs=1e-6) and out["cml"].item() == 0.0
    assert random.getstate() == state  # no draw outside the window
    assert max((p - q).abs().max().item() for p, q in zip(method.parameters(), joint.parameters())) < 1e-6
    # BalanceBenchmark's else branch, epochs 0-1 outside and 2 inside its window
    loss_gap, param_gap, _ = run_beside(make(modulation_starts=2, modulation_ends=2), AV, "release", 0.1,
                                        starts=2, ends=2, epochs=4)
    assert loss_gap < 1e-5 and param_gap < 1e-5


# ----------------------------------------------------------------- sum fusion, by autograd


def test_sum_fusion_removes_each_head_with_its_bias():
    method, batch = make(fusion="sum", lam=1.0), make_batch()
    method.order = ["audio", "visual"]  # visual leaves first
    ref = copy.deepcopy(method)
    feats = ref.encode(batch.inputs)
    z0 = ref.fusion.heads["audio"](feats["audio"]) + ref.fusion.heads["visual"](feats["visual"])
    z1 = ref.fusion.heads["audio"](feats["audio"])
    c0, c1 = F.softmax(z0, 1).max(1), F.softmax(z1, 1).max(1)
    keep = ~((c1.indices == batch.labels) & (c0.indices != batch.labels))
    loss = (F.cross_entropy(z0, batch.labels) + F.cross_entropy(z1, batch.labels)) / 2 + \
        F.relu((c1.values - c0.values) * keep).sum()
    loss.backward()
    out, seen = step_recording_grads(method, batch)
    assert out["loss"].item() == pytest.approx(loss.item(), abs=1e-6)
    for name, p in ref.named_parameters():
        assert torch.allclose(seen[name], p.grad, atol=1e-7, rtol=1e-5), name


# ------------------------------------------------------------------- harness, cost, diagnostics


def test_three_modalities_through_the_harness(fast_config, store):
    result = run(fast_config("dataset.name=gaussian3", "method.name=cml", "train.epochs=2"), store)
    assert result.state == "finished"
    for record in RunDir(result.path).read_metrics():
        train = record["train"]
        assert train["cml"] == 1.0 and 0 <= train["violation"] <= 1 and train["loss.cml"] >= 0
        assert all(0 < train[f"conf.drop{k}"] <= 1 for k in range(3))
        assert set(record["val"]["modality_acc"]) == set(AVT)
    assert set(result.summary["probes"]) == set(AVT)


def test_resume_is_exact(fast_config, store, tmp_path, monkeypatch):
    from tests.conftest import assert_resumes_exactly

    assert_resumes_exactly(fast_config("method.name=cml", "dataset.name=gaussian3"), store, tmp_path, monkeypatch)


def test_cost_diagnostics_and_bench_listing(fast_config, store):
    result = run(fast_config("method.name=cml", "train.epochs=1"), store)
    cost = result.summary["cost"]
    assert cost["forward_passes_per_step"] == 1.0 and cost["backward_passes_per_step"] == 1.0
    panels = {k.partition(".")[0] for _, k in diagnostic_keys(RunDir(result.path).read_metrics())}
    assert {"loss", "conf", "violation", "cml"} <= panels
    assert [v.label for v in variants_named(["cml"])] == ["joint", "cml"]


def test_params_are_validated():
    with pytest.raises(ConfigError, match="method.lam"):
        load_config(None, ["dataset.name=gaussian", "method.name=cml", "method.lam=-1"])
    with pytest.raises(ConfigError, match="method.variant"):
        load_config(None, ["dataset.name=gaussian", "method.name=cml", "method.variant=paper"])
    with pytest.raises(ConfigError, match="modulation_ends=1 is before modulation_starts=2"):
        load_config(None, ["dataset.name=gaussian", "method.name=cml", "method.modulation_starts=2",
                           "method.modulation_ends=1"])
    with pytest.raises(ConfigError, match=r"cml removes .* model.fusion='late' .* concat, sum"):
        make(fusion="late")
