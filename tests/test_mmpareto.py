"""MMPareto: the weights and the rescaling by hand, the release's step (GeWu-Lab/MMPareto_ICML2024)
and BalanceBenchmark's (GeWu-Lab/BalanceBenchmark) transcribed and run beside the method, every
switch in both positions, the uniform baseline it reduces to, three modalities, the harness."""

from __future__ import annotations

import copy
import re

import numpy as np
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
from mmbalance.methods.mmpareto import MMPareto, MMParetoParams, combine, cosine, gram, min_norm_weight
from mmbalance.models.small import MLPEncoder, MLPParams
from tests.conftest import step_context, step_recording_grads
from tests.test_method_contract import same

C = 4
BATCH = 12
LR, MOMENTUM, WD = 0.05, 0.9, 1e-4
AV = ("audio", "visual")


def make(names=AV, fusion="concat", seed=0, **params) -> MMPareto:
    torch.manual_seed(seed)
    mods = tuple(Modality(m, "vector", (5 + i,)) for i, m in enumerate(names))
    encoders = nn.ModuleDict({m.name: MLPEncoder(MLPParams(hidden=7, out_dim=6), m) for m in mods})
    method = MMPareto(MMParetoParams(**params), MethodSetup(encoders, C, mods, fusion=fusion))
    method.attach(step_context(lambda: torch.optim.SGD(method.parameters(), lr=LR, momentum=MOMENTUM,
                                                       weight_decay=WD)))
    return method


def make_batch(names=AV, seed=1) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return Batch({m: torch.randn(BATCH, 5 + i, generator=gen) for i, m in enumerate(names)},
                 torch.randint(0, C, (BATCH,), generator=gen))


# ------------------------------------------------------------------------------------- by hand


def test_min_norm_weight_three_cases_by_hand():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0])
    mm, mu, uu = gram(a, b)
    assert (mm.item(), mu.item(), uu.item()) == (4.0, -2.0, 2.0)
    # min over w of ||w a + (1-w) b||^2 = ||(3w - 1, 1 - w)||^2: derivative 20w - 8 = 0 -> w = 0.4
    assert min_norm_weight(mm, mu, uu).item() == pytest.approx(0.4, abs=1e-7)
    # <a,b> >= ||a||^2: the solver's end 0.999; <a,b> >= ||b||^2: 0.001
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 1.0])
    assert min_norm_weight(*gram(x, y)).item() == pytest.approx(0.999, abs=1e-7)
    assert min_norm_weight(*gram(y, x)).item() == pytest.approx(0.001, abs=1e-7)
    assert cosine(mm, mu, uu).item() == pytest.approx(-2 / (2 * 2**0.5), rel=1e-6)
    assert cosine(*gram(torch.zeros(2), b)).item() == 0.0  # the norms clamped, as F.cosine_similarity


def test_combine_scales_up_only_a_shorter_direction_by_hand():
    g_mm, g_u = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    one = [2]  # one tensor of two elements
    # w = 1/2: h = g_mm + g_u, as long as the plain sum: only gamma
    assert torch.allclose(combine(g_mm, g_u, torch.tensor(0.5), 1.5, one), torch.tensor([4.5, 6.0]))
    # w = 0.9: h = (5.4, 0.8), |h| = 5.459 > |plain| = 5: kept, times gamma
    assert torch.allclose(combine(g_mm, g_u, torch.tensor(0.9), 2.0, one), torch.tensor([10.8, 1.6]))
    # w = 0.1: h = (0.6, 7.2), |h| = 7.225 > 5: kept
    assert torch.allclose(combine(g_mm, g_u, torch.tensor(0.1), 1.0, one), torch.tensor([0.6, 7.2]))
    # opposed: g_u = (-1, 0), w = 0.25: h = (1.5 - 1.5, 0) = 0 -> kept at 0 (the code: NaN)
    assert torch.equal(combine(g_mm, torch.tensor([-1.0, 0.0]), torch.tensor(0.25), 1.5, one), torch.zeros(2))
    # w = 0.4, g_u = (-1, 1): h = (2.4 - 1.2, 1.2) = (1.2, 1.2), |h| = 1.697 < |plain| = |(2, 1)| = 2.236
    h = torch.tensor([1.2, 1.2])
    expected = h * (5**0.5 / h.norm()) * 1.5
    assert torch.allclose(combine(g_mm, torch.tensor([-1.0, 1.0]), torch.tensor(0.4), 1.5, one), expected)


def test_combine_rescales_each_tensor_on_its_own():
    # two tensors in one flat vector: the first's h is shorter than its plain sum (scaled up),
    # the second's longer (kept); one weight for both, as the code's per-encoder weights
    g_mm, g_u, w = torch.tensor([3.0, 0.0, 1.0]), torch.tensor([-1.0, 1.0, 1.0]), torch.tensor(0.4)
    h1, h2 = torch.tensor([1.2, 1.2]), torch.tensor([2.0])
    expected = torch.cat([h1 * (5**0.5 / h1.norm()), h2]) * 1.5
    assert torch.allclose(combine(g_mm, g_u, w, 1.5, [2, 1]), expected)
    assert not torch.allclose(combine(g_mm, g_u, w, 1.5, [3]), expected)


# ---------------------------------------------------- the release's step, transcribed (MMPareto)
# GeWu-Lab/MMPareto_ICML2024 @ a339db39cc25: code/min_norm_solvers.py l.5-129 (the two-vector path:
# find_min_norm_element returns at l.127-129 for n = 2) and code/MMPareto.py train_epoch l.74-209,
# written as there; the loop over the loader taken out, `gamma` (l.178: 1.5) an argument, the
# suite's tiny encoders (their weights) in place of the ResNet18s and their pooling.


class MinNormSolver:
    MAX_ITER = 250
    STOP_CRIT = 1e-5

    def _min_norm_element_from2(v1v1, v1v2, v2v2):
        if v1v2 >= v1v1:
            gamma = 0.999
            cost = v1v1
            return gamma, cost
        if v1v2 >= v2v2:
            gamma = 0.001
            cost = v2v2
            return gamma, cost
        gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
        cost = v2v2 + gamma * (v1v2 - v2v2)
        return gamma, cost

    def _min_norm_2d(vecs, dps):
        dmin = 1e8
        for i in range(len(vecs)):
            for j in range(i + 1, len(vecs)):
                if (i, j) not in dps:
                    dps[(i, j)] = 0.0
                    for k in range(len(vecs[i])):
                        dps[(i, j)] += torch.mul(vecs[i][k], vecs[j][k]).sum().data.cpu()
                    dps[(j, i)] = dps[(i, j)]
                if (i, i) not in dps:
                    dps[(i, i)] = 0.0
                    for k in range(len(vecs[i])):
                        dps[(i, i)] += torch.mul(vecs[i][k], vecs[i][k]).sum().data.cpu()
                if (j, j) not in dps:
                    dps[(j, j)] = 0.0
                    for k in range(len(vecs[i])):
                        dps[(j, j)] += torch.mul(vecs[j][k], vecs[j][k]).sum().data.cpu()
                c, d = MinNormSolver._min_norm_element_from2(dps[(i, i)], dps[(i, j)], dps[(j, j)])
                if d < dmin:
                    dmin = d
                    sol = [(i, j), c, d]
        return sol, dps

    def find_min_norm_element(vecs):
        dps = {}
        init_sol, dps = MinNormSolver._min_norm_2d(vecs, dps)
        new_dps = {}
        new_init_sol = []
        for item in dps:
            new_dps[item] = dps[item].numpy()
        for item in init_sol:
            if torch.is_tensor(item):
                data = item.numpy()
            else:
                data = item
            new_init_sol.append(data)
        dps = new_dps
        init_sol = new_init_sol
        n = len(vecs)
        sol_vec = np.zeros(n)
        sol_vec[init_sol[0][0]] = init_sol[1]
        sol_vec[init_sol[0][1]] = 1 - init_sol[1]
        assert n < 3  # MMPareto always has two objectives per encoder; l.131-156 never run
        return sol_vec, init_sol[2]


class CodeAV(nn.Module):
    """models/models.py AVClassifier with the method's encoders and heads (their weights). `split`:
    out_a/out_v from the fusion head's blocks, bias / 2 (BalanceBenchmark's unimodality_calculate)."""

    def __init__(self, method: MMPareto, split: bool = False) -> None:
        super().__init__()
        method = copy.deepcopy(method)
        self.audio_net, self.visual_net = method.encoders["audio"], method.encoders["visual"]
        self.head = method.fusion.fc_out
        self.split = split
        if not split:
            self.head_audio, self.head_video = method.heads["audio"], method.heads["visual"]

    def forward(self, audio, visual):
        a = self.audio_net(audio)
        v = self.visual_net(visual)
        out = torch.cat((a, v), 1)
        out = self.head(out)
        if self.split:
            d = a.shape[1]
            out_audio = torch.mm(a, self.head.weight[:, :d].t()) + self.head.bias / 2
            out_video = torch.mm(v, self.head.weight[:, d:].t()) + self.head.bias / 2
        else:
            out_audio = self.head_audio(a)
            out_video = self.head_video(v)
        return out, out_audio, out_video


def release_step(model, optimizer, spec, images, label, gamma=1.5):
    criterion = nn.CrossEntropyLoss()
    record_names_audio = []
    record_names_visual = []
    for name, param in model.named_parameters():
        if 'head' in name:
            continue
        if ('audio' in name):
            record_names_audio.append((name, param))
            continue
        if ('visual' in name):
            record_names_visual.append((name, param))
            continue

    optimizer.zero_grad()
    out, out_a, out_v = model(spec.float(), images.float())
    loss_mm = criterion(out, label)
    loss_a = criterion(out_a, label)
    loss_v = criterion(out_v, label)
    losses = [loss_mm, loss_a, loss_v]
    all_loss = ['both', 'audio', 'visual']
    grads_audio = {}
    grads_visual = {}
    for idx, loss_type in enumerate(all_loss):
        loss = losses[idx]
        loss.backward(retain_graph=True)
        if (loss_type == 'visual'):
            for tensor_name, param in record_names_visual:
                if loss_type not in grads_visual.keys():
                    grads_visual[loss_type] = {}
                grads_visual[loss_type][tensor_name] = param.grad.data.clone()
            grads_visual[loss_type]["concat"] = torch.cat(
                [grads_visual[loss_type][tensor_name].flatten() for tensor_name, _ in record_names_visual])
        elif (loss_type == 'audio'):
            for tensor_name, param in record_names_audio:
                if loss_type not in grads_audio.keys():
                    grads_audio[loss_type] = {}
                grads_audio[loss_type][tensor_name] = param.grad.data.clone()
            grads_audio[loss_type]["concat"] = torch.cat(
                [grads_audio[loss_type][tensor_name].flatten() for tensor_name, _ in record_names_audio])
        else:
            for tensor_name, param in record_names_audio:
                if loss_type not in grads_audio.keys():
                    grads_audio[loss_type] = {}
                grads_audio[loss_type][tensor_name] = param.grad.data.clone()
            grads_audio[loss_type]["concat"] = torch.cat(
                [grads_audio[loss_type][tensor_name].flatten() for tensor_name, _ in record_names_audio])
            for tensor_name, param in record_names_visual:
                if loss_type not in grads_visual.keys():
                    grads_visual[loss_type] = {}
                grads_visual[loss_type][tensor_name] = param.grad.data.clone()
            grads_visual[loss_type]["concat"] = torch.cat(
                [grads_visual[loss_type][tensor_name].flatten() for tensor_name, _ in record_names_visual])
        optimizer.zero_grad()

    this_cos_audio = F.cosine_similarity(grads_audio['both']["concat"], grads_audio['audio']["concat"], dim=0)
    this_cos_visual = F.cosine_similarity(grads_visual['both']["concat"], grads_visual['visual']["concat"], dim=0)
    audio_task = ['both', 'audio']
    visual_task = ['both', 'visual']
    audio_k = [0, 0]
    visual_k = [0, 0]
    if (this_cos_audio > 0):
        audio_k[0] = 0.5
        audio_k[1] = 0.5
    else:
        audio_k, min_norm = MinNormSolver.find_min_norm_element([list(grads_audio[t].values()) for t in audio_task])
    if (this_cos_visual > 0):
        visual_k[0] = 0.5
        visual_k[1] = 0.5
    else:
        visual_k, min_norm = MinNormSolver.find_min_norm_element([list(grads_visual[t].values()) for t in visual_task])

    loss = loss_mm + loss_a + loss_v
    loss.backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            layer = re.split('[_.]', str(name))
            if ('head' in layer):
                continue
            if ('audio' in layer):
                three_norm = torch.norm(param.grad.data.clone())
                new_grad = 2 * audio_k[0] * grads_audio['both'][name] + 2 * audio_k[1] * grads_audio['audio'][name]
                new_norm = torch.norm(new_grad)
                diff = three_norm / new_norm
                if (diff > 1):
                    param.grad = diff * new_grad * gamma
                else:
                    param.grad = new_grad * gamma
            if ('visual' in layer):
                three_norm = torch.norm(param.grad.data.clone())
                new_grad = 2 * visual_k[0] * grads_visual['both'][name] + 2 * visual_k[1] * grads_visual['visual'][name]
                new_norm = torch.norm(new_grad)
                diff = three_norm / new_norm
                if (diff > 1):
                    param.grad = diff * new_grad * gamma
                else:
                    param.grad = new_grad * gamma
    optimizer.step()
    return {"loss": loss.item(), "loss.mm": loss_mm.item(), "loss.audio": loss_a.item(), "loss.visual": loss_v.item(),
            "cos.audio": this_cos_audio.item(), "cos.visual": this_cos_visual.item(),
            "w_mm.audio": float(audio_k[0]), "w_mm.visual": float(visual_k[0])}


def uniform_baseline_step(model, optimizer, spec, images, label):
    """code/uniform_baseline.py's step: the three losses summed, one backward, one step."""
    criterion = nn.CrossEntropyLoss()
    optimizer.zero_grad()
    out, out_a, out_v = model(spec.float(), images.float())
    loss = criterion(out, label) + criterion(out_a, label) + criterion(out_v, label)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item()}


def code_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)


def release_pairs(method: MMPareto, code: CodeAV) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    mods = [("encoders.audio", code.audio_net), ("encoders.visual", code.visual_net), ("fusion.fc_out", code.head)]
    if not code.split:
        mods += [("heads.audio", code.head_audio), ("heads.visual", code.head_video)]
    return [(f"{prefix}.{n}", method.get_parameter(f"{prefix}.{n}"), q) for prefix, module in mods
            for n, q in module.named_parameters()]


STEPS = 6


def run_beside(method: MMPareto, code: nn.Module, step, batches) -> tuple[float, list[dict]]:
    """Steps both on the same batches; the largest difference of the reported quantities and the
    parameters, and the method's outputs."""
    optimizer, outs, gap = code_optimizer(code), [], 0.0
    for b in batches:
        out = method.training_step(b)
        ref = step(code, optimizer, b)
        for key, value in ref.items():
            gap = max(gap, abs(out[key].item() - value))
        outs.append(out)
    return gap, outs


def conflicts(outs: list[dict]) -> set[float]:
    return {o[k].item() for o in outs for k in o if k.startswith("conflict.")}


@pytest.mark.parametrize("gamma", [1.5, 0.7])
@pytest.mark.parametrize("heads", ["private", "fusion_split"])
def test_release_step_equals_the_method(gamma, heads):
    method = make(gamma=gamma, unimodal_heads=heads)
    code = CodeAV(method, split=heads == "fusion_split")
    batches = [make_batch(seed=s) for s in range(STEPS)]
    gap, outs = run_beside(method, code, lambda m, o, b: release_step(m, o, b.inputs["audio"], b.inputs["visual"],
                                                                      b.labels, gamma), batches)
    assert gap < 1e-5
    # private heads: both branches (equal weights, solved Pareto weights) occur in these steps; the
    # fusion head's own blocks make L_m's gradient nearly L_mm's (cos ~ 1), so no conflict there
    assert conflicts(outs) == ({0.0, 1.0} if heads == "private" else {0.0})
    solved = [o[f"w_mm.{m}"].item() for o in outs for m in AV if o[f"conflict.{m}"].item() == 1]
    assert all(0.001 <= w <= 0.999 and w != 0.5 for w in solved)
    params = release_pairs(method, code)
    assert len(params) == (14 if heads == "private" else 10)
    worst = max((p - q).abs().max().item() for _, p, q in params)
    assert worst < 1e-5  # measured: ~1e-8
    moved = make(gamma=gamma, unimodal_heads=heads)
    assert all(not torch.equal(p, moved.get_parameter(n)) for n, p, _ in params)  # it did train


def test_the_release_step_differs_from_the_uniform_sum():
    # the same batches under pareto off and gamma 1 (the uniform baseline) train differently
    on, off = make(), make(pareto=False, gamma=1.0)
    for s in range(3):
        on.training_step(make_batch(seed=s))
        off.training_step(make_batch(seed=s))
    gap = max((p - q).abs().max().item() for p, q in zip(on.parameters(), off.parameters()))
    assert gap > 1e-3


# ------------------------------------------------ switched off: the uniform baseline, and pareto off


def test_pareto_off_gamma1_is_the_released_uniform_baseline():
    method = make(pareto=False, gamma=1.0)
    code = CodeAV(method)
    batches = [make_batch(seed=s) for s in range(STEPS)]
    gap, outs = run_beside(method, code, lambda m, o, b: uniform_baseline_step(m, o, b.inputs["audio"],
                                                                                b.inputs["visual"], b.labels),
                           batches)
    assert gap < 1e-5
    assert all(o[f"w_mm.{m}"].item() == 0.5 for o in outs for m in AV)
    assert 1.0 in conflicts(outs)  # conflicting steps too kept the equal weights
    assert max((p - q).abs().max().item() for _, p, q in release_pairs(method, code)) < 1e-6


def test_pareto_off_scales_the_plain_encoder_gradient_by_gamma():
    method, batch = make(pareto=False, gamma=2.5), make_batch()
    ref = copy.deepcopy(method)
    feats = ref.encode(batch.inputs)
    loss = F.cross_entropy(ref.fusion(feats), batch.labels) + sum(
        F.cross_entropy(ref.heads[m](feats[m]), batch.labels) for m in AV)
    loss.backward()
    out, seen = step_recording_grads(method, batch)
    for name, p in ref.named_parameters():
        factor = 2.5 if name.startswith("encoders.") else 1.0
        assert torch.allclose(seen[name], factor * p.grad, atol=1e-7, rtol=1e-5), name
    assert all(out[f"boost.{m}"].item() == pytest.approx(2.5, rel=1e-5) for m in AV)


# ------------------------------------------- BalanceBenchmark's step, transcribed (MMParetoTrainer)
# GeWu-Lab/BalanceBenchmark: balancemm/trainer/MMPareto_trainer.py @ 4c1482fca5aa, training_step
# l.330-406 and train_loop l.282-310 (record_names; optimizer.step and zero_grad after the step),
# models/avclassify_model.py BaseClassifierModel.forward/unimodality_calculate (concat, l.256-301),
# fusion_arch.py ConcatFusion_N; written as there with the model's attribute names of commit
# 0d206ba (Unimodality_Calculate/Uni_res; the HEAD trainer calls a name its model no longer has).
# `private`: the unimodal logits from heads named head_<m> (skipped by its 'head' rules), to test
# grads=accumulated with the release's heads.


class ConcatFusion_N(nn.Module):
    def __init__(self, fc_out: nn.Linear) -> None:
        super().__init__()
        self.fc_out = fc_out

    def forward(self, encoder_res):
        output = torch.cat(list(encoder_res.values()), dim=1)
        output = self.fc_out(output)
        return output


class BBModel(nn.Module):
    def __init__(self, method: MMPareto, private: bool = False) -> None:
        super().__init__()
        method = copy.deepcopy(method)
        self.modalitys = method.modality_names
        self.modality_encoder = method.encoders
        self.fusion_module = ConcatFusion_N(method.fusion.fc_out)
        self.modality_size = {m: e.out_dim for m, e in method.encoders.items()}
        self.fusion = 'concat'
        self.private = private
        if private:
            for m in self.modalitys:
                setattr(self, f"head_{m}", method.heads[m])

    def forward(self, batch):
        self.encoder_res = {}
        for modality in self.modalitys:
            self.encoder_res[modality] = self.modality_encoder[modality](batch[modality])
        self.encoder_res['output'] = self.fusion_module({m: self.encoder_res[m] for m in self.modalitys})

    def Unimodality_Calculate(self):
        all_nums = len(self.encoder_res.keys()) - 1
        self.Uni_res = {}
        now_size = 0
        for modality in self.encoder_res.keys():
            if modality == 'output':
                self.Uni_res[modality] = self.encoder_res[modality]
                continue
            if self.private:
                self.Uni_res[modality] = getattr(self, f"head_{modality}")(self.encoder_res[modality])
                continue
            block = self.fusion_module.fc_out.weight[:, now_size:now_size + self.modality_size[modality]]
            self.Uni_res[modality] = (torch.mm(self.encoder_res[modality], torch.transpose(block, 0, 1))
                                      + self.fusion_module.fc_out.bias / all_nums)
            now_size += self.modality_size[modality]
        return self.Uni_res


def bb_step(model, optimizer, batch, label, alpha=1.5):
    record_names = {}
    for modality in model.modalitys:
        record_names[modality] = []
    for name, param in model.named_parameters():
        if 'head' in name:
            continue
        for modality in model.modalitys:
            if modality in name:
                record_names[modality].append((name, param))
                continue

    criterion = nn.CrossEntropyLoss()
    model(batch)
    model.Unimodality_Calculate()
    modality_list = model.modalitys
    grads = {}
    for modality in modality_list:
        grads[modality] = {}
    loss = {}
    for modality in model.Uni_res.keys():
        loss[modality] = criterion(model.Uni_res[modality], label)
        loss[modality].backward(retain_graph=True)
    for modality in modality_list:
        for loss_type in loss.keys():
            if loss_type == modality:
                for tensor_name, param in record_names[modality]:
                    if loss_type not in grads[modality].keys():
                        grads[modality][loss_type] = {}
                    grads[modality][loss_type][tensor_name] = param.grad.data.clone()
                grads[modality][loss_type]["concat"] = torch.cat(
                    [grads[modality][loss_type][tensor_name].flatten() for tensor_name, _ in record_names[modality]])
            if loss_type == 'output':
                for tensor_name, param in record_names[modality]:
                    if loss_type not in grads[modality].keys():
                        grads[modality][loss_type] = {}
                    grads[modality][loss_type][tensor_name] = param.grad.data.clone()
                grads[modality][loss_type]["concat"] = torch.cat(
                    [grads[modality][loss_type][tensor_name].flatten() for tensor_name, _ in record_names[modality]])
    optimizer.zero_grad()
    this_cos = {}
    for modality in modality_list:
        this_cos[modality] = F.cosine_similarity(grads[modality]['output']["concat"],
                                                 grads[modality][modality]["concat"], dim=0)
    weight = {}
    for modality in modality_list:
        weight[modality] = [0, 0]
    for modality in modality_list:
        if (this_cos[modality] > 0):
            weight[modality][0] = 0.5
            weight[modality][1] = 0.5
        else:
            modality, min_norm = MinNormSolver.find_min_norm_element(
                [list(grads[modality][t].values()) for t in grads[modality].keys()])
    total_loss = sum(loss.values())
    total_loss.backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            layer = re.split('[_.]', str(name))
            if ('head' in layer):
                continue
            for modality in modality_list:
                if modality in layer:
                    three_norm = torch.norm(param.grad.data.clone())
                    new_grad = (2 * weight[modality][0] * grads[modality]['output'][name]
                                + 2 * weight[modality][1] * grads[modality][modality][name])
                    new_norm = torch.norm(new_grad)
                    diff = three_norm / new_norm
                    if (diff > 1):
                        param.grad = diff * new_grad * alpha
                    else:
                        param.grad = new_grad * alpha
    total_loss = total_loss.item()
    optimizer.step()  # train_loop l.307-310
    optimizer.zero_grad()
    out = {"loss": total_loss, **{f"cos.{m}": this_cos[m].item() for m in modality_list},
           **{f"w_mm.{m}": float(weight[m][0]) for m in modality_list}}
    return out | {f"loss.{m}": loss[m].item() for m in modality_list} | {"loss.mm": loss['output'].item()}


def bb_pairs(method: MMPareto, code: BBModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = [(method.encoders[m].get_parameter(n), q) for m in method.modality_names
             for n, q in code.modality_encoder[m].named_parameters()]
    pairs += list(zip(method.fusion.fc_out.parameters(), code.fusion_module.fc_out.parameters()))
    if code.private:
        pairs += [(p, q) for m in method.modality_names
                  for p, q in zip(method.heads[m].parameters(), getattr(code, f"head_{m}").parameters())]
    return pairs


@pytest.mark.parametrize("names", [AV, ("audio", "visual", "text")], ids=len)
@pytest.mark.parametrize("heads", ["fusion_split", "private"])
def test_balancebenchmark_step_equals_the_method(heads, names):
    method = make(names, grads="accumulated", unimodal_heads=heads)
    code = BBModel(method, private=heads == "private")
    batches = [make_batch(names, seed=s) for s in range(STEPS)]
    gap, outs = run_beside(method, code, lambda m, o, b: bb_step(m, o, b.inputs, b.labels), batches)
    assert gap < 1e-5
    # its reading of the gradients: the cosine is 1, the weights 1/2, the encoders 2 gamma x the sum
    assert all(o[f"cos.{m}"].item() == pytest.approx(1.0, abs=1e-5) for o in outs for m in names)
    assert all(o[f"boost.{m}"].item() == pytest.approx(3.0, rel=1e-5) for o in outs for m in names)
    assert conflicts(outs) == {0.0}
    worst = max((p - q).abs().max().item() for p, q in bb_pairs(method, code))
    assert worst < 1e-5


def test_accumulated_differs_from_separate():
    sep, acc = make(), make(grads="accumulated")
    for s in range(3):
        sep.training_step(make_batch(seed=s))
        acc.training_step(make_batch(seed=s))
    assert max((p - q).abs().max().item() for p, q in zip(sep.parameters(), acc.parameters())) > 1e-3


# ------------------------------------------------------------------------------ three modalities


def independent_update(method: MMPareto, batch: Batch) -> dict[str, torch.Tensor]:
    """Every gradient MMPareto should step with, from each loss's own autograd and float64 numpy."""
    ref, y = copy.deepcopy(method), batch.labels
    feats = ref.encode(batch.inputs)
    l_mm = F.cross_entropy(ref.fusion(feats), y)
    l_u = {m: F.cross_entropy(ref.heads[m](feats[m]), y) for m in feats}
    names = [n for n, _ in ref.named_parameters()]
    params = list(ref.parameters())
    g_mm = dict(zip(names, torch.autograd.grad(l_mm, params, retain_graph=True, allow_unused=True)))
    g_all = dict(zip(names, torch.autograd.grad(l_mm + sum(l_u.values()), params, retain_graph=True)))
    expected = {n: g.double().numpy() for n, g in g_all.items()}  # heads: the plain sum
    for m in feats:
        enc = [n for n in names if n.startswith(f"encoders.{m}.")]
        g_u = torch.autograd.grad(l_u[m], [ref.get_parameter(n) for n in enc], retain_graph=True)
        a = {n: g_mm[n].double().numpy() for n in enc}
        b = {n: g.double().numpy() for n, g in zip(enc, g_u)}
        va, vb = np.concatenate([a[n].ravel() for n in enc]), np.concatenate([b[n].ravel() for n in enc])
        cos = va @ vb / np.linalg.norm(va) / np.linalg.norm(vb)
        w = 0.5 if cos > 0 else (vb @ vb - va @ vb) / ((va - vb) @ (va - vb))
        for n in enc:
            h = 2 * w * a[n] + 2 * (1 - w) * b[n]
            expected[n] = method.params.gamma * max(1.0, np.linalg.norm(a[n] + b[n]) / np.linalg.norm(h)) * h
    return {n: torch.from_numpy(v) for n, v in expected.items()}


def test_three_modalities_unit_steps_by_independent_computation():
    names = ("audio", "visual", "text")
    method, seen_conflict = make(names, seed=2), set()
    for s in range(4):
        batch = make_batch(names, seed=s)
        expected = independent_update(method, batch)
        out, seen = step_recording_grads(method, batch)
        assert seen.keys() == expected.keys()
        for name, g in expected.items():
            assert torch.allclose(seen[name].double(), g, atol=1e-6, rtol=1e-4), (s, name)
        seen_conflict |= conflicts([out])
    assert seen_conflict == {0.0, 1.0}


def test_three_modalities_through_the_harness(fast_config, store):
    result = run(fast_config("dataset.name=gaussian3", "method.name=mmpareto", "train.epochs=2"), store)
    assert result.state == "finished"
    for record in RunDir(result.path).read_metrics():
        train = record["train"]
        for m in ("audio", "visual", "text"):
            assert -1 <= train[f"cos.{m}"] <= 1 and 0 <= train[f"conflict.{m}"] <= 1
            assert 0.001 <= train[f"w_mm.{m}"] <= 0.999 and train[f"boost.{m}"] >= 1.5 - 1e-6
            assert train[f"loss.{m}"] > 0
        assert train["loss"] == pytest.approx(train["loss.mm"] + sum(train[f"loss.{m}"] for m in
                                                                      ("audio", "visual", "text")), rel=1e-6)
        assert set(record["val"]["modality_acc"]) == {"audio", "visual", "text"}
    assert set(result.summary["probes"]) == {"audio", "visual", "text"}


# ------------------------------------------------------------------- cost, diagnostics, params


def test_cost_diagnostics_and_bench_listing(fast_config, store):
    result = run(fast_config("method.name=mmpareto", "train.epochs=1"), store)
    cost = result.summary["cost"]
    assert cost["forward_passes_per_step"] == 1.0 and cost["backward_passes_per_step"] == 2.0
    records = RunDir(result.path).read_metrics()
    panels = {k.partition(".")[0] for _, k in diagnostic_keys(records)}
    assert {"cos", "conflict", "w_mm", "boost", "loss"} <= panels
    assert [v.label for v in variants_named(["mmpareto"])] == ["joint", "mmpareto"]


def without_context(method: MMPareto) -> dict:
    return {k: v for k, v in vars(method).items() if k != "_step_context"}


def test_predict_uses_the_variant_s_unimodal_logits_and_has_no_side_effect():
    batch = make_batch()
    for heads in ("private", "fusion_split"):
        method = make(unimodal_heads=heads).eval()
        method.training_step(make_batch(seed=5))  # some state to keep: moved weights, momentum
        before = copy.deepcopy(without_context(method))
        with torch.no_grad():
            pred, feats = method.predict(batch), method.encode(batch.inputs)
        assert same(without_context(method), before)  # the contract's check: every attribute, submodule
        assert torch.equal(pred.fused, method.fusion(feats))
        expected = (method.fusion.per_modality(feats) if heads == "fusion_split"
                    else {m: method.heads[m](feats[m]) for m in AV})
        assert all(torch.equal(pred.per_modality[m], expected[m]) for m in AV)
    assert make(unimodal_heads="fusion_split").heads is None


def test_params_are_validated():
    with pytest.raises(ConfigError, match="method.gamma"):
        load_config(None, ["dataset.name=gaussian", "method.name=mmpareto", "method.gamma=0"])
    with pytest.raises(ConfigError, match="method.grads"):
        load_config(None, ["dataset.name=gaussian", "method.name=mmpareto", "method.grads=summed"])
    with pytest.raises(ConfigError, match=r"unimodal_heads='fusion_split' .* model.fusion='film'"):
        make(fusion="film", unimodal_heads="fusion_split")
    assert make(fusion="film").heads is not None  # private heads work with any fusion
    assert make(fusion="sum", unimodal_heads="fusion_split").heads is None
