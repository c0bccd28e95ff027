"""MMCosine: the release's step and evaluation (GeWu-Lab/MMCosine_ICASSP23) and BalanceBenchmark's
(GeWu-Lab/BalanceBenchmark) transcribed and run beside the method, every switch in both positions,
joint training when switched off, three modalities, sum fusion, the harness."""

from __future__ import annotations

import copy
from types import SimpleNamespace

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
from mmbalance.methods.joint import Joint, JointParams
from mmbalance.methods.mmcosine import MMCosine, MMCosineParams
from mmbalance.models.small import MLPEncoder, MLPParams
from tests.conftest import step_context, step_recording_grads
from tests.test_method_contract import same

C = 4
BATCH = 12
D = 6  # the feature size: the release's 512 (its `[:, :512]` split of fc_out)
LR, MOMENTUM, WD = 0.05, 0.9, 1e-4  # momentum and weight decay as the release's SGD (main_CD.py l.262)
AV = ("audio", "visual")
AVT = ("audio", "visual", "text")
STEPS = 5


def encoders(names, seed):
    torch.manual_seed(seed)
    mods = tuple(Modality(m, "vector", (5 + i,)) for i, m in enumerate(names))
    return mods, nn.ModuleDict({m.name: MLPEncoder(MLPParams(hidden=7, out_dim=D), m) for m in mods})


def attach(method):
    method.attach(step_context(lambda: torch.optim.SGD(method.parameters(), lr=LR, momentum=MOMENTUM,
                                                       weight_decay=WD)))
    return method


def make(names=AV, fusion="concat", seed=0, **params) -> MMCosine:
    mods, encs = encoders(names, seed)
    return attach(MMCosine(MMCosineParams(**params), MethodSetup(encs, C, mods, fusion=fusion)))


def make_joint(names=AV, fusion="concat", seed=0) -> Joint:
    mods, encs = encoders(names, seed)
    return attach(Joint(JointParams(), MethodSetup(encs, C, mods, fusion=fusion)))


def make_batch(names=AV, seed=1) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return Batch({m: torch.randn(BATCH, 5 + i, generator=gen) for i, m in enumerate(names)},
                 torch.randint(0, C, (BATCH,), generator=gen))


def code_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)


# ------------------------------------------------ the release's step, transcribed (MMCosine_ICASSP23)
# GeWu-Lab/MMCosine_ICASSP23 @ 00ba0a9cbd9b: main_CD.py train_epoch l.103-146 and valid l.181-198,
# written as there (the loop over the loader taken out; `--lam` 0, its default, so the NCE term is
# left out; the tensorboard scalars returned), models/basic_model.py AVClassifier.forward l.45-66 and
# models/fusion_modules.py ConcatFusion l.20-28, with the method's encoders and head (their weights).


class ConcatFusion(nn.Module):
    def __init__(self, fc_out: nn.Linear) -> None:
        super().__init__()
        self.fc_out = fc_out

    def forward(self, x, y):
        output = torch.cat((x, y), dim=1)
        output = self.fc_out(output)
        return x, y, output


class AVClassifier(nn.Module):
    def __init__(self, method: MMCosine) -> None:
        super().__init__()
        method = copy.deepcopy(method)
        self.audio_net, self.visual_net = method.encoders["audio"], method.encoders["visual"]
        self.fusion_module = ConcatFusion(method.fusion.fc_out)

    def forward(self, audio, visual, args):
        a = self.audio_net(audio)
        v = self.visual_net(visual)
        a, v, out = self.fusion_module(a, v)
        return a, v, out


class DataParallel(nn.Module):
    """`model.module.` as the release reaches its head under DataParallel."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def release_step(args, model, optimizer, spec, image, label):
    criterion = nn.CrossEntropyLoss()
    optimizer.zero_grad()
    a, v, out = model(spec.float(), image.float(), args=args)
    if args.mmcosine:
        out_a = torch.mm(F.normalize(a, dim=1), F.normalize(torch.transpose(model.module.fusion_module.fc_out.weight[:, :D], 0, 1), dim=0))  # noqa: E501
        out_v = torch.mm(F.normalize(v, dim=1), F.normalize(torch.transpose(model.module.fusion_module.fc_out.weight[:, D:], 0, 1), dim=0))  # noqa: E501
        out_a = out_a * args.scaling
        out_v = out_v * args.scaling
        out = out_a + out_v
    else:
        out_a = (torch.mm(a, torch.transpose(model.module.fusion_module.fc_out.weight[:, :D], 0, 1)) +
                 model.module.fusion_module.fc_out.bias / 2)
        out_v = (torch.mm(v, torch.transpose(model.module.fusion_module.fc_out.weight[:, D:], 0, 1)) +
                 model.module.fusion_module.fc_out.bias / 2)
    label_onehot = nn.functional.one_hot(label, num_classes=out_v.size(1))
    fy_v = torch.mean(torch.sum(out_v * label_onehot, dim=1))
    fy_a = torch.mean(torch.sum(out_a * label_onehot, dim=1))
    loss = criterion(out, label)
    loss_v = criterion(out_v, label)
    loss_a = criterion(out_a, label)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "loss.audio": loss_a.item(), "loss.visual": loss_v.item(),
            "logit_y.audio": fy_a.item(), "logit_y.visual": fy_v.item()}


def release_valid(args, model, spec, image):
    """valid l.181-198: the fused, audio and visual scores (softmax) of one batch."""
    softmax = nn.Softmax(dim=1)
    with torch.no_grad():
        model.eval()
        a, v, out = model(spec.float(), image.float(), args=args)
        if args.mmcosine:
            out_a = torch.mm(F.normalize(a, dim=1), F.normalize(torch.transpose(model.module.fusion_module.fc_out.weight[:, :D], 0, 1), dim=0))  # noqa: E501
            out_v = torch.mm(F.normalize(v, dim=1), F.normalize(torch.transpose(model.module.fusion_module.fc_out.weight[:, D:], 0, 1), dim=0))  # noqa: E501
            out_a = out_a * args.scaling
            out_v = out_v * args.scaling
        else:
            out_a = (torch.mm(a, torch.transpose(model.module.fusion_module.fc_out.weight[:, :D], 0, 1)) +
                     model.module.fusion_module.fc_out.bias / 2)
            out_v = (torch.mm(v, torch.transpose(model.module.fusion_module.fc_out.weight[:, D:], 0, 1)) +
                     model.module.fusion_module.fc_out.bias / 2)
        prediction = softmax(out)
        pred_v = softmax(out_v)
        pred_a = softmax(out_a)
    model.train()
    return prediction, pred_a, pred_v


def run_beside(method, step, batches) -> float:
    """Steps the method and `step` (the transcription, closed over its model) on the same batches;
    the largest difference of the reported quantities."""
    gap = 0.0
    for b in batches:
        out, ref = method.training_step(b), step(b)
        assert set(ref) <= set(out)
        gap = max([gap] + [abs(out[k].item() - v) for k, v in ref.items()])
    return gap


def param_gap(pairs) -> float:
    return max((p - q).abs().max().item() for p, q in pairs)


def release_pairs(method: MMCosine, code: DataParallel):
    m = code.module
    return list(zip(method.encoders["audio"].parameters(), m.audio_net.parameters())) + \
        list(zip(method.encoders["visual"].parameters(), m.visual_net.parameters())) + \
        list(zip(method.fusion.fc_out.parameters(), m.fusion_module.fc_out.parameters()))


@pytest.mark.parametrize("scaling", [10.0, 15.0])
@pytest.mark.parametrize("cosine", [True, False])
def test_release_step_and_valid_equal_the_method(cosine, scaling):
    method = make(cosine=cosine, scaling=scaling)
    code = DataParallel(AVClassifier(method))
    args = SimpleNamespace(mmcosine=cosine, scaling=scaling)
    optimizer = code_optimizer(code)
    batches = [make_batch(seed=s) for s in range(STEPS)]
    gap = run_beside(method, lambda b: release_step(args, code, optimizer, b.inputs["audio"], b.inputs["visual"],
                                                    b.labels), batches)
    assert gap < 1e-5
    assert param_gap(release_pairs(method, code)) < 1e-5  # measured: ~1e-8
    assert not torch.equal(method.fusion.fc_out.weight, make().fusion.fc_out.weight)  # it did train
    # valid(): the fused prediction from the linear head (with its bias), each modality's cosine logits
    batch = make_batch(seed=9)
    fused, pa, pv = release_valid(args, code, batch.inputs["audio"], batch.inputs["visual"])
    with torch.no_grad():
        pred = method.eval().predict(batch)
    assert (F.softmax(pred.fused, 1) - fused).abs().max() < 1e-5
    assert (F.softmax(pred.per_modality["audio"], 1) - pa).abs().max() < 1e-5
    assert (F.softmax(pred.per_modality["visual"], 1) - pv).abs().max() < 1e-5


def test_the_cosine_logits_by_hand():
    method, batch = make(scaling=10.0), make_batch()
    with torch.no_grad():
        feats = method.encode(batch.inputs)
        own = method.predict(batch).per_modality
        w = method.fusion.fc_out.weight
        for m, block in (("audio", w[:, :D]), ("visual", w[:, D:])):
            f = feats[m]
            for i in range(3):
                for c in range(C):
                    cos = (f[i] @ block[c]) / (f[i].norm().clamp_min(1e-12) * block[c].norm())
                    assert own[m][i, c].item() == pytest.approx(10 * cos.item(), abs=1e-5)
    assert own["audio"].abs().max() <= 10 + 1e-5


# ---------------------------------------- BalanceBenchmark's step, transcribed (MMCosineTrainer)
# GeWu-Lab/BalanceBenchmark @ 4c1482fca5aa: balancemm/trainer/MMCosine_trainer.py training_step
# l.92-137 and validation_step l.208-248 (model.prediction's argmax kept as the logits it is taken
# of); train_loop l.66-69 steps the optimizer with training_step as its closure, then zero_grad.
# The model: models/avclassify_model.py's encoder_result with the concat fusion (fc_out over the
# features in the modality order).


class BBModel(nn.Module):
    def __init__(self, method: MMCosine) -> None:
        super().__init__()
        method = copy.deepcopy(method)
        self.modalitys = method.modality_names
        self.modality_encoder = method.encoders
        self.fusion_module = SimpleNamespace(fc_out=method.fusion.fc_out)
        self.head = method.fusion.fc_out  # registered, for parameters()
        self.unimodal_result = {}
        self.prediction = {}

    def forward(self, batch, padding=()):
        self.encoder_result = {m: self.modality_encoder[m](batch[m]) for m in self.modalitys}
        self.encoder_result["output"] = self.fusion_module.fc_out(
            torch.cat([self.encoder_result[m] for m in self.modalitys], dim=1))


def bb_training_step(self, model, batch, label):
    modality_list = model.modalitys
    key = list(modality_list)
    m = {}
    criterion = nn.CrossEntropyLoss()
    model(batch)
    for modality in modality_list:
        m[modality] = model.encoder_result[modality]
    m['out'] = model.encoder_result['output']
    if self.modulation_starts <= self.current_epoch <= self.modulation_ends:
        unimodal_result = {}
        if len(key) == 2:
            unimodal_result[key[0]] = torch.mm(F.normalize(m[key[0]], dim=1), F.normalize(torch.transpose(model.fusion_module.fc_out.weight[:, :m[key[0]].size(1)], 0, 1), dim=0))  # noqa: E501
            unimodal_result[key[1]] = torch.mm(F.normalize(m[key[1]], dim=1), F.normalize(torch.transpose(model.fusion_module.fc_out.weight[:, m[key[0]].size(1):], 0, 1), dim=0))  # noqa: E501
        if len(key) == 3:
            unimodal_result[key[0]] = torch.mm(F.normalize(m[key[0]], dim=1), F.normalize(torch.transpose(model.fusion_module.fc_out.weight[:, :m[key[0]].size(1)], 0, 1), dim=0))  # noqa: E501
            unimodal_result[key[1]] = torch.mm(F.normalize(m[key[1]], dim=1), F.normalize(torch.transpose(model.fusion_module.fc_out.weight[:, m[key[0]].size(1):m[key[0]].size(1)+m[key[1]].size(1)], 0, 1), dim=0))  # noqa: E501
            unimodal_result[key[2]] = torch.mm(F.normalize(m[key[2]], dim=1), F.normalize(torch.transpose(model.fusion_module.fc_out.weight[:, m[key[0]].size(1)+m[key[1]].size(1):], 0, 1), dim=0))  # noqa: E501
        for modality in modality_list:
            unimodal_result[modality] = unimodal_result[modality] * self.scaling
        unimodal_result['output'] = sum(unimodal_result[modality] for modality in key)
        loss = criterion(unimodal_result['output'], label)
    else:
        loss = criterion(m['out'], label)
    loss.backward()
    return loss


def bb_validation_step(self, model, batch):
    """validation_step l.208-237: the logits whose argmax are model.prediction."""
    model(batch)
    key = list(model.modalitys)
    m = {modality: model.encoder_result[modality] for modality in model.modalitys}
    if len(key) == 2:
        model.unimodal_result[key[0]] = torch.mm(F.normalize(m[key[0]], dim=1), F.normalize(torch.transpose(model.fusion_module.fc_out.weight[:, :m[key[0]].size(1)], 0, 1), dim=0))  # noqa: E501
        model.unimodal_result[key[1]] = torch.mm(F.normalize(m[key[1]], dim=1), F.normalize(torch.transpose(model.fusion_module.fc_out.weight[:, m[key[0]].size(1):], 0, 1), dim=0))  # noqa: E501
    if len(key) == 3:
        model.unimodal_result[key[0]] = torch.mm(F.normalize(m[key[0]], dim=1), F.normalize(torch.transpose(model.fusion_module.fc_out.weight[:, :m[key[0]].size(1)], 0, 1), dim=0))  # noqa: E501
        model.unimodal_result[key[1]] = torch.mm(F.normalize(m[key[1]], dim=1), F.normalize(torch.transpose(model.fusion_module.fc_out.weight[:, m[key[0]].size(1):m[key[0]].size(1)+m[key[1]].size(1)], 0, 1), dim=0))  # noqa: E501
        model.unimodal_result[key[2]] = torch.mm(F.normalize(m[key[2]], dim=1), F.normalize(torch.transpose(model.fusion_module.fc_out.weight[:, m[key[0]].size(1)+m[key[1]].size(1):], 0, 1), dim=0))  # noqa: E501
    for modality in model.modalitys:
        model.unimodal_result[modality] = model.unimodal_result[modality] * self.scaling
    model.unimodal_result['output'] = sum(model.unimodal_result[modality] for modality in key)
    return model.unimodal_result


@pytest.mark.parametrize("names", [AV, AVT], ids=len)
@pytest.mark.parametrize("window", ["open", "closed"])
def test_balancebenchmark_step_and_validation_equal_the_method(names, window):
    start = 0 if window == "open" else 3
    method = make(names, scaling=15.0, modulation_starts=start, modulation_ends=80, fused_eval="cosine")
    code = BBModel(method)
    trainer = SimpleNamespace(modulation_starts=start, modulation_ends=80, scaling=15.0, current_epoch=0)
    optimizer = code_optimizer(code)

    def step(b):
        loss = optimizer.step(lambda: bb_training_step(trainer, code, b.inputs, b.labels))
        optimizer.zero_grad()
        return {"loss": loss.item()}

    outs = []
    for epoch in range(2):
        method.step_context.epoch = trainer.current_epoch = epoch
        batches = [make_batch(names, seed=10 * epoch + s) for s in range(3)]
        assert run_beside(method, step, batches) < 1e-5
        outs.append(method.training_step(make_batch(names, seed=99)))
        step(make_batch(names, seed=99))
    assert {o["cosine"].item() for o in outs} == {1.0 if window == "open" else 0.0}
    pairs = [(p, q) for n in names for p, q in zip(method.encoders[n].parameters(),
                                                   code.modality_encoder[n].parameters())]
    assert param_gap(pairs + list(zip(method.fusion.fc_out.parameters(), code.head.parameters()))) < 1e-5
    batch = make_batch(names, seed=7)
    with torch.no_grad():
        pred = method.eval().predict(batch)
        ref = bb_validation_step(trainer, code.eval(), batch.inputs)
    assert (pred.fused - ref["output"]).abs().max() < 1e-5
    assert all((pred.per_modality[n] - ref[n]).abs().max() < 1e-5 for n in names)


def test_fused_eval_switch():
    batch = make_batch()
    linear, cosine = make(), make(fused_eval="cosine")
    with torch.no_grad():
        pl, pc = linear.predict(batch), cosine.predict(batch)
        feats = linear.encode(batch.inputs)
    assert torch.equal(pl.fused, linear.fusion(feats))
    assert torch.allclose(pc.fused, pc.per_modality["audio"] + pc.per_modality["visual"])
    assert all(torch.equal(pl.per_modality[m], pc.per_modality[m]) for m in AV)
    assert not torch.allclose(pl.fused, pc.fused)


# ------------------------------------------------------------------ switched off: joint training


@pytest.mark.parametrize("off", [{"cosine": False}, {"modulation_starts": 10}])
def test_switched_off_is_joint_training(off):
    method, joint = make(**off), make_joint()
    for s in range(STEPS):
        b = make_batch(seed=s)
        out, ref = method.training_step(b), joint.training_step(b)
        assert out["loss"].item() == pytest.approx(ref["loss"].item(), abs=1e-6)
        assert out["cosine"].item() == 0.0
    assert param_gap(zip(method.parameters(), joint.parameters())) < 1e-6
    if "cosine" in off:
        batch = make_batch(seed=9)
        with torch.no_grad():
            assert same(vars(method.predict(batch)), vars(joint.predict(batch)))


def test_the_cosine_loss_trains_differently_from_joint():
    method, joint = make(), make_joint()
    for s in range(3):
        method.training_step(make_batch(seed=s))
        joint.training_step(make_batch(seed=s))
    assert param_gap(zip(method.parameters(), joint.parameters())) > 1e-3


def test_the_window_opens_and_closes_by_epoch():
    method = make(modulation_starts=1, modulation_ends=2)
    seen = []
    for epoch in range(4):
        method.step_context.epoch = epoch
        seen.append(method.training_step(make_batch(seed=epoch))["cosine"].item())
    assert seen == [0.0, 1.0, 1.0, 0.0]


# ----------------------------------------------------------------- sum fusion, by autograd


def test_sum_fusion_uses_each_head_s_weights():
    method, batch = make(fusion="sum", scaling=12.0), make_batch()
    ref = copy.deepcopy(method)
    feats = ref.encode(batch.inputs)
    z = sum(12.0 * F.normalize(feats[m], dim=1) @ F.normalize(ref.fusion.heads[m].weight, dim=1).t() for m in AV)
    F.cross_entropy(z, batch.labels).backward()
    out, seen = step_recording_grads(method, batch)
    for name, p in ref.named_parameters():
        if p.grad is None:  # the heads' biases: not in the cosine loss
            assert name.endswith("bias") and name.startswith("fusion.heads") and name not in seen
            continue
        assert torch.allclose(seen[name], p.grad, atol=1e-7, rtol=1e-5), name
    assert out["loss"].item() == pytest.approx(F.cross_entropy(z, batch.labels).item(), abs=1e-6)


# ------------------------------------------------------------------- harness, cost, diagnostics


def test_three_modalities_through_the_harness(fast_config, store):
    result = run(fast_config("dataset.name=gaussian3", "method.name=mmcosine", "train.epochs=2"), store)
    assert result.state == "finished"
    for record in RunDir(result.path).read_metrics():
        train = record["train"]
        assert train["cosine"] == 1.0
        for m in AVT:
            assert -10 <= train[f"logit_y.{m}"] <= 10 and train[f"loss.{m}"] > 0
        assert set(record["val"]["modality_acc"]) == set(AVT)
    assert set(result.summary["probes"]) == set(AVT)


def test_cost_diagnostics_and_bench_listing(fast_config, store):
    result = run(fast_config("method.name=mmcosine", "train.epochs=1"), store)
    cost = result.summary["cost"]
    assert cost["forward_passes_per_step"] == 1.0 and cost["backward_passes_per_step"] == 1.0
    panels = {k.partition(".")[0] for _, k in diagnostic_keys(RunDir(result.path).read_metrics())}
    assert {"loss", "logit_y", "cosine"} <= panels
    assert [v.label for v in variants_named(["mmcosine"])] == ["joint", "mmcosine"]


def test_params_are_validated():
    with pytest.raises(ConfigError, match="method.scaling"):
        load_config(None, ["dataset.name=gaussian", "method.name=mmcosine", "method.scaling=0"])
    with pytest.raises(ConfigError, match="method.fused_eval"):
        load_config(None, ["dataset.name=gaussian", "method.name=mmcosine", "method.fused_eval=sum"])
    with pytest.raises(ConfigError, match="modulation_ends=1 is before modulation_starts=2"):
        load_config(None, ["dataset.name=gaussian", "method.name=mmcosine", "method.modulation_starts=2",
                           "method.modulation_ends=1"])
    with pytest.raises(ConfigError, match="fused_eval='cosine' needs cosine=true"):
        load_config(None, ["dataset.name=gaussian", "method.name=mmcosine", "method.cosine=false",
                           "method.fused_eval=cosine"])
    with pytest.raises(ConfigError, match=r"mmcosine splits .* model.fusion='film' .* concat, sum"):
        make(fusion="film")
