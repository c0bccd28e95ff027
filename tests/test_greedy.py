"""Greedy: the method beside transcriptions of nyukat's release (MMTM_MVCNN with MMTM_mitigate,
Bias_Mitigation_Strong and _Random, blend_loss) and of BalanceBenchmark's GreedyTrainer with
BaseClassifierGreedyModel and its MMTM, on identical tiny models, batches and RNG; MMTM placement
in ResNet18; switched-off equivalence with joint training; the refusals; the utilisation logs;
resume through the harness."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from mmbalance.bench.train import PassCounter
from mmbalance.core.errors import ConfigError
from mmbalance.core.params import NoParams
from mmbalance.core.types import Batch, Modality
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.greedy import Greedy, GreedyParams, utilisation_rates
from mmbalance.methods.joint import Joint, JointParams
from mmbalance.models.resnet import ResNet18Encoder
from mmbalance.models.small import MLPEncoder, MLPParams
from tests.conftest import assert_resumes_exactly, mlp_setup, step_context
from tests.test_opm import ConcatFusion_N  # BalanceBenchmark's fusion_arch.py L33-40

C = 4
B = 16
AV = ("audio", "visual")
TOL = 1e-5  # the bound for parameters and reported quantities against released code


def setup(names=AV, fusion="late", seed=0, hidden=8, out_dim=8) -> MethodSetup:
    return mlp_setup(names, C, dims=out_dim, hidden=hidden, fusion=fusion, epochs=4, seed=seed)


def make_batches(n=20, seed=1) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        inputs = {m: torch.randn(B, 5, generator=gen) for m in AV}
        labels = torch.randint(0, C, (B,), generator=gen)
        inputs["audio"][:, 0] += 2 * labels  # audio carries the label: the branches learn unequally
        out.append(Batch(inputs, labels))
    return out


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


EPOCHS = [0, 0, 0] + [1] * 17  # one warm-up epoch (the release's starting_epoch=2, 1-based), then more


def run_method(method: Greedy, batches, epochs=EPOCHS, seed=5) -> list[dict]:
    method.attach(step_context(lambda: sgd(method.parameters())))
    torch.manual_seed(seed)
    outs, current = [], None
    for epoch, batch in zip(epochs, batches):
        if epoch != current:
            method.on_epoch_start(epoch)
            current = epoch
        method.step_context.epoch = epoch
        outs.append({k: float(v) for k, v in method.training_step(batch).items()})
    return outs


# ----------------------------------------------------------- nyukat's release, transcribed


class MMTM_mitigate(nn.Module):  # noqa: N801 -- src/balanced_mmtm.py @ a190e03 L16-154 (SEonly, shareweight off; CPU)
    def __init__(self, dim_visual, dim_skeleton, ratio):
        super().__init__()
        dim = dim_visual + dim_skeleton
        dim_out = int(2 * dim / ratio)
        self.running_avg_weight_visual = torch.zeros(dim_visual)
        self.running_avg_weight_skeleton = torch.zeros(dim_visual)
        self.step = 0
        self.fc_squeeze = nn.Linear(dim, dim_out)
        self.fc_visual = nn.Linear(dim_out, dim_visual)
        self.fc_skeleton = nn.Linear(dim_out, dim_skeleton)
        self.relu = nn.ReLU()
        self.sigmoid = nn.Sigmoid()

    def forward(self, visual, skeleton, turnoff_cross_modal_flow=False, average_squeezemaps=None,
                curation_mode=False, caring_modality=0):
        if turnoff_cross_modal_flow:
            tview = visual.view(visual.shape[:2] + (-1,))
            squeeze = torch.cat([torch.mean(tview, dim=-1), torch.stack(visual.shape[0] * [average_squeezemaps[1]])], 1)
            excitation = self.relu(self.fc_squeeze(squeeze))
            vis_out = self.fc_visual(excitation)
            tview = skeleton.view(skeleton.shape[:2] + (-1,))
            squeeze = torch.cat([torch.stack(skeleton.shape[0] * [average_squeezemaps[0]]),
                                 torch.mean(tview, dim=-1)], 1)
            excitation = self.relu(self.fc_squeeze(squeeze))
            sk_out = self.fc_skeleton(excitation)
        else:
            squeeze_array = []
            for tensor in [visual, skeleton]:
                tview = tensor.view(tensor.shape[:2] + (-1,))
                squeeze_array.append(torch.mean(tview, dim=-1))
            squeeze = torch.cat(squeeze_array, 1)
            excitation = self.fc_squeeze(squeeze)
            excitation = self.relu(excitation)
            vis_out = self.fc_visual(excitation)
            sk_out = self.fc_skeleton(excitation)
        vis_out = self.sigmoid(vis_out)
        sk_out = self.sigmoid(sk_out)
        self.running_avg_weight_visual = (vis_out.mean(0) + self.running_avg_weight_visual * self.step).detach() / (self.step + 1)  # noqa: E501
        self.running_avg_weight_skeleton = (vis_out.mean(0) + self.running_avg_weight_skeleton * self.step).detach() / (self.step + 1)  # noqa: E501 -- vis_out: the release's L114
        self.step += 1
        if not curation_mode:
            vis_out = vis_out.view(vis_out.shape + (1,) * (len(visual.shape) - len(vis_out.shape)))
            sk_out = sk_out.view(sk_out.shape + (1,) * (len(skeleton.shape) - len(sk_out.shape)))
        elif caring_modality == 0:
            sk_out = sk_out.view(sk_out.shape + (1,) * (len(skeleton.shape) - len(sk_out.shape)))
            vis_out = torch.stack(vis_out.shape[0] * [self.running_avg_weight_visual]).view(
                vis_out.shape + (1,) * (len(visual.shape) - len(vis_out.shape)))
        elif caring_modality == 1:
            vis_out = vis_out.view(vis_out.shape + (1,) * (len(visual.shape) - len(vis_out.shape)))
            sk_out = torch.stack(sk_out.shape[0] * [self.running_avg_weight_skeleton]).view(
                sk_out.shape + (1,) * (len(skeleton.shape) - len(sk_out.shape)))
        return visual * vis_out, skeleton * sk_out


class ReleaseModel(nn.Module):
    """MMTM_MVCNN (src/model.py L15-108) around copies of the suite's blocks and heads: the blocks
    before the first MMTM, then block i of both views and mmtm_i; the per-view fc, fused = mean."""

    def __init__(self, method: Greedy) -> None:
        super().__init__()
        first, second = method.modality_names
        self.positions = method.positions[first]
        for k, m in enumerate((first, second)):
            blocks = copy.deepcopy(nn.ModuleList(method.encoders[m].stages().blocks))
            head = copy.deepcopy(method.fusion.heads[m])
            setattr(self, f"net_view_{k}", nn.ModuleDict({"blocks": blocks, "fc": head}))
        for j, mmtm in enumerate(method.mmtms):
            widths = mmtm.fc_excite[first].out_features, mmtm.fc_excite[second].out_features
            release = MMTM_mitigate(*widths, method.params.ratio)
            release.fc_squeeze.load_state_dict(mmtm.fc_squeeze.state_dict())
            release.fc_visual.load_state_dict(mmtm.fc_excite[first].state_dict())
            release.fc_skeleton.load_state_dict(mmtm.fc_excite[second].state_dict())
            setattr(self, f"mmtm{j + 2}", release)

    def forward(self, x0, x1, curation_mode=False, caring_modality=None, mmtm_rescale=None):
        """mmtm_rescale: per MMTM the average squeezes (eval.gin's mmtm_off: the cross-modal flow cut)."""
        v0, v1, done = x0, x1, 0
        for j, position in enumerate(self.positions):
            for i in range(done, position + 1):
                v0 = self.net_view_0["blocks"][i](v0)
                v1 = self.net_view_1["blocks"][i](v1)
            done = position + 1
            v0, v1 = getattr(self, f"mmtm{j + 2}")(
                v0, v1, turnoff_cross_modal_flow=mmtm_rescale is not None,
                average_squeezemaps=None if mmtm_rescale is None else mmtm_rescale[j],
                curation_mode=curation_mode, caring_modality=caring_modality)
        x_0 = self.net_view_0["fc"](torch.flatten(v0, 1))
        x_1 = self.net_view_1["fc"](torch.flatten(v1, 1))
        return (x_0 + x_1) / 2, [x_0, x_1]


def blend_loss(y_hat, y):  # train.py L22-28
    loss_func = torch.nn.CrossEntropyLoss()
    return sum(loss_func(y_pred, y) for y_pred in y_hat)


class BiasMitigationStrong:
    """src/callbacks.py L173-267 (the model's curation state kept here)."""

    def __init__(self, epsilon, curation_windowsize, branchnames, starting_epoch=2, MMTMnames=("visual", "skeleton")):  # noqa: N803
        self.epsilon, self.branchnames, self.MMTMnames = epsilon, branchnames, MMTMnames
        self.curation_windowsize, self.starting_epoch = curation_windowsize, starting_epoch
        self.M_bypass_modal_0 = self.M_bypass_modal_1 = self.M_main_modal_0 = self.M_main_modal_1 = 0
        self.curation_mode, self.caring_modality, self.unlock = False, None, False

    def compute_BDR(self, model):  # noqa: N802
        wn_main, wn_bypass = [0] * len(self.branchnames), [0] * len(self.branchnames)
        gn_main, gn_bypass = [0] * len(self.branchnames), [0] * len(self.branchnames)
        for name, parameter in model.named_parameters():
            wn = (parameter ** 2).sum().item()
            gn = (parameter.grad.data ** 2).sum().item()
            if "mmtm" in name:
                shared = True
                for ind, modal in enumerate(self.MMTMnames):
                    if modal in name:
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
                        shared = False
                if shared:
                    for ind, _ in enumerate(self.MMTMnames):
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
            else:
                for ind, modal in enumerate(self.branchnames):
                    if modal in name:
                        wn_main[ind] += wn
                        gn_main[ind] += gn
        self.M_bypass_modal_0 += gn_bypass[0] / wn_bypass[0]
        self.M_bypass_modal_1 += gn_bypass[1] / wn_bypass[1]
        self.M_main_modal_0 += gn_main[0] / wn_main[0]
        self.M_main_modal_1 += gn_main[1] / wn_main[1]
        BDR_0 = np.log10(self.M_bypass_modal_0 / self.M_main_modal_0)  # noqa: N806
        BDR_1 = np.log10(self.M_bypass_modal_1 / self.M_main_modal_1)  # noqa: N806
        return BDR_0 - BDR_1

    def on_backward_end(self, model):
        if self.unlock:
            if not self.curation_mode:
                self.d_BDR = self.compute_BDR(model)
                if abs(self.d_BDR) > self.epsilon:
                    biased_direction = np.sign(self.d_BDR)
                    self.curation_mode = True
                    self.curation_step = 0
                    if biased_direction == -1:
                        self.caring_modality = 1
                    elif biased_direction == 1:
                        self.caring_modality = 0
                else:
                    self.curation_mode = False
                    self.caring_modality = 0
            else:
                self.curation_step += 1
                if self.curation_step == self.curation_windowsize:
                    self.curation_mode = False
        else:
            self.d_BDR = self.compute_BDR(model)
            self.curation_mode = False
            self.caring_modality = 0

    def on_epoch_begin(self, epoch):  # 1-based epochs (framework.py L293)
        if epoch >= self.starting_epoch:
            self.unlock = True


class BiasMitigationRandom(BiasMitigationStrong):
    """src/callbacks.py L269-302; `random.choice([0, 1, 2])` drawn as torch.randint(3, ()), the suite's RNG."""

    def on_backward_end(self, model):
        if self.unlock:
            mode = int(torch.randint(3, ()).item())
            if mode == 0:
                self.curation_mode, self.caring_modality = False, 0
            elif mode == 1:
                self.curation_mode, self.caring_modality = True, 1
            else:
                self.curation_mode, self.caring_modality = True, 0
        else:
            self.curation_mode, self.caring_modality = False, 0


def run_release(model: ReleaseModel, callback, batches, epochs=EPOCHS, seed=5) -> list[dict]:
    """framework.py train_loop L293-315: zero_grad, forward, backward, on_backward_end, step."""
    optimizer = sgd(model.parameters())
    torch.manual_seed(seed)
    outs, current = [], None
    for epoch, batch in zip(epochs, batches):
        if epoch != current:
            callback.on_epoch_begin(epoch + 1)
            current = epoch
        mode = callback.caring_modality if callback.curation_mode else None
        optimizer.zero_grad()
        _, pred_y = model(batch.inputs["audio"], batch.inputs["visual"], curation_mode=callback.curation_mode,
                          caring_modality=callback.caring_modality)
        loss = blend_loss(pred_y, batch.labels)
        loss.backward()
        callback.on_backward_end(model)
        optimizer.step()
        outs.append({"loss": loss.item(), "speed": getattr(callback, "d_BDR", None), "mode": mode})
    return outs


def release_pairs(method: Greedy, model: ReleaseModel):
    """(suite tensor, release tensor) for every parameter and gate average."""
    first, second = method.modality_names
    pairs = []
    for k, m in enumerate((first, second)):
        view = getattr(model, f"net_view_{k}")
        pairs += list(zip(method.encoders[m].parameters(), view["blocks"].parameters(), strict=True))
        pairs += list(zip(method.fusion.heads[m].parameters(), view["fc"].parameters(), strict=True))
    for j, mmtm in enumerate(method.mmtms):
        release = getattr(model, f"mmtm{j + 2}")
        for ours, theirs in ((mmtm.fc_squeeze, release.fc_squeeze), (mmtm.fc_excite[first], release.fc_visual),
                             (mmtm.fc_excite[second], release.fc_skeleton)):
            pairs += list(zip(ours.parameters(), theirs.parameters(), strict=True))
        pairs += [(mmtm.gate_avg_audio, release.running_avg_weight_visual),
                  (mmtm.gate_avg_visual, release.running_avg_weight_skeleton)]
    return pairs


def largest(pairs) -> float:
    return max((a.detach() - b.detach()).abs().max().item() for a, b in pairs)


def mode_of(out: dict) -> str | None:
    return next((m for m in AV if out[f"rebalance.{m}"] == 1.0), None)


# the release's epsilon (0.01) and a window of 3: in these 20 steps, after the warm-up, plain steps
# and windows for each modality (checked below)
GUIDED = {"epsilon": 0.01, "window": 3}


@pytest.mark.parametrize("rebalance", ["guided", "random", "off"])
def test_equals_the_release(rebalance):
    params = GreedyParams(rebalance=rebalance, **(GUIDED if rebalance == "guided" else {}))
    method = Greedy(params, setup())
    model = ReleaseModel(method)
    assert largest(release_pairs(method, model)) == 0
    batches = make_batches()
    ours = run_method(method, batches)
    callback_cls = BiasMitigationRandom if rebalance == "random" else BiasMitigationStrong
    callback = callback_cls(params.epsilon, params.window, ["net_view_0", "net_view_1"])
    if rebalance == "off":
        callback.on_backward_end = lambda model: None  # training.gin without Bias_Mitigation_Strong
    theirs = run_release(model, callback, batches)
    assert largest(release_pairs(method, model)) < TOL
    for o, t in zip(ours, theirs, strict=True):
        assert o["loss"] == pytest.approx(t["loss"], abs=TOL)
        if rebalance != "off":
            assert mode_of(o) == (None if t["mode"] is None else AV[t["mode"]])
        if rebalance == "guided":
            assert o["speed"] == pytest.approx(t["speed"], abs=TOL)
    if rebalance == "off":
        assert "speed" not in ours[0]
    else:  # the warm-up never re-balances; after it, plain steps and both modalities' windows
        modes = [mode_of(o) for o in ours]
        assert modes[:4] == [None] * 4 and {None, "audio", "visual"} <= set(modes[4:]), modes


def test_the_release_average_takes_the_first_modality_gates_and_own_does_not():
    batches = make_batches(3)
    for average in ("release", "own"):
        method = Greedy(GreedyParams(rebalance="off", running_average=average), setup())
        run_method(method, batches, epochs=[0, 0, 0])
        first, second = method.mmtms[0].gate_avg_audio, method.mmtms[0].gate_avg_visual
        assert torch.equal(first, second) == (average == "release")
    with pytest.raises(ConfigError, match=r"running_average=release .* needs equal widths at each MMTM; MMTM 1 "
                                          r"joins \{'audio': 8, 'visual': 6\}"):
        s = setup()
        s.encoders["visual"] = MLPEncoder(MLPParams(hidden=6, out_dim=8), s.modalities[1])
        Greedy(GreedyParams(), s)


# ------------------------------------------------------------ BalanceBenchmark, transcribed


class BBMMTM(nn.Module):
    """MMTM (avclassify_model.py @ 3f27575 L563-650, = HEAD L537-624 without HEAD's reset of
    running_avg_weight in forward, which raises KeyError), for (N, C) maps."""

    def __init__(self, modalities_dims, ratio, modalitys):
        super().__init__()
        total_dim = sum(modalities_dims)
        dim_out = int(2 * total_dim / ratio)
        self.fc_squeeze = nn.Linear(total_dim, dim_out)
        key = list(modalitys)
        self.fc_excites = nn.ModuleDict({key[0]: nn.Linear(dim_out, modalities_dims[0]),
                                         key[1]: nn.Linear(dim_out, modalities_dims[1])})
        self.running_avg_weight = {m: torch.zeros(d) for m, d in zip(modalitys, modalities_dims)}
        self.step = 0
        self.relu, self.sigmoid = nn.ReLU(), nn.Sigmoid()

    def forward(self, data, modality_list, curation_mode=False, caring_modality=0):
        squeeze_array = []
        for modality in modality_list:
            B, C = data[modality].shape[0], data[modality].shape[1]  # noqa: N806
            tview = data[modality].reshape(B, C, -1)
            squeeze_array.append(torch.mean(tview, dim=-1))
        squeeze = torch.cat(squeeze_array, 1)
        excitation = self.relu(self.fc_squeeze(squeeze))
        out = {}
        for modality in modality_list:
            out[modality] = self.sigmoid(self.fc_excites[modality](excitation))
            self.running_avg_weight[modality] = (out[modality].mean(0) + self.running_avg_weight[modality] * self.step).detach() / (self.step + 1)  # noqa: E501
        self.step += 1
        key = list(modality_list)
        if not curation_mode:
            for modality in modality_list:
                out[modality] = out[modality].view(out[modality].shape + (1,) * (len(data[modality].shape) - len(out[modality].shape)))  # noqa: E501
        else:
            c, o = (key[0], key[1]) if caring_modality == 0 else (key[1], key[0])
            out[c] = torch.stack(out[c].shape[0] * [self.running_avg_weight[c]]).view(
                out[c].shape + (1,) * (len(data[c].shape) - len(out[c].shape)))
            out[o] = out[o].view(out[o].shape + (1,) * (len(data[o].shape) - len(out[o].shape)))
        return {m: data[m] * out[m] for m in modality_list}


class BBGreedyModel(nn.Module):
    """BaseClassifierGreedyModel.forward (L453-508) with concat fusion, around copies of the suite's blocks."""

    def __init__(self, method: Greedy) -> None:
        super().__init__()
        self.modalitys = method.modality_names
        self.positions = method.positions[self.modalitys[0]]
        self.modality_encoder = nn.ModuleDict(
            {m: copy.deepcopy(nn.ModuleList(method.encoders[m].stages().blocks)) for m in self.modalitys})
        self.mmtm_layers = nn.ModuleDict()
        for j, mmtm in enumerate(method.mmtms):
            bb = BBMMTM([mmtm.fc_excite[m].out_features for m in self.modalitys], method.params.ratio, self.modalitys)
            bb.fc_squeeze.load_state_dict(mmtm.fc_squeeze.state_dict())
            for m in self.modalitys:
                bb.fc_excites[m].load_state_dict(mmtm.fc_excite[m].state_dict())
            self.mmtm_layers[f"mmtm{j + 1}"] = bb
        self.fusion_module = ConcatFusion_N(copy.deepcopy(method.fusion.fc_out))

    def forward(self, batch, curation_mode=False, caring_modality=0):
        result, done = {m: batch[m] for m in self.modalitys}, 0
        for j, position in enumerate(self.positions):
            for m in self.modalitys:
                for i in range(done, position + 1):
                    result[m] = self.modality_encoder[m][i](result[m])
            done = position + 1
            result = self.mmtm_layers[f"mmtm{j + 1}"](result, self.modalitys, curation_mode, caring_modality)
        return self.fusion_module(result)


class BBGreedyTrainer:
    """GreedyTrainer (Greedy_trainer.py @ 4c1482f L19-180): train_loop's step and compute_learning_speed."""

    def __init__(self, alpha, window_size):
        self.alpha, self.window_size = alpha, window_size
        self.M_bypass_modal_0 = self.M_bypass_modal_1 = self.M_main_modal_0 = self.M_main_modal_1 = 0
        self.curation_mode, self.caring_modality, self.curation_step, self.speed = False, 0, window_size, 0

    def step(self, model, optimizer, batch):
        mode = self.caring_modality if self.curation_mode else None
        out = model(batch.inputs, self.curation_mode, self.caring_modality)
        loss = nn.CrossEntropyLoss()(out, batch.labels)
        loss.backward()
        if not self.curation_mode:
            self.speed = self.compute_learning_speed(model)
            if abs(self.speed) > self.alpha:
                biased_direction = np.sign(self.speed)
                self.curation_mode = True
                self.curation_step = 0
                if biased_direction == -1:
                    self.caring_modality = 1
                elif biased_direction == 1:
                    self.caring_modality = 0
            else:
                self.curation_mode = False
                self.caring_modality = 0
        else:
            self.curation_step += 1
            if self.curation_step == self.window_size:
                self.curation_mode = False
        optimizer.step()
        optimizer.zero_grad()
        return {"loss": loss.item(), "speed": self.speed, "mode": mode}

    def compute_learning_speed(self, model):
        modality_list = model.modalitys
        wn_main, wn_bypass = [0] * len(modality_list), [0] * len(modality_list)
        gn_main, gn_bypass = [0] * len(modality_list), [0] * len(modality_list)
        for name, parameter in model.named_parameters():
            wn = (parameter ** 2).sum().item()
            gn = (parameter.grad.data ** 2).sum().item()
            if "mmtm_layers" in name:
                shared = True
                for ind, modal in enumerate(modality_list):
                    if modal in name:
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
                        shared = False
                if shared:
                    for ind, _ in enumerate(modality_list):
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
            else:
                for ind, modal in enumerate(modality_list):
                    if modal in name:
                        wn_main[ind] += wn
                        gn_main[ind] += gn
        self.M_bypass_modal_0 += gn_bypass[0] / wn_bypass[0]
        self.M_bypass_modal_1 += gn_bypass[1] / wn_bypass[1]
        self.M_main_modal_0 += gn_main[0] / wn_main[0]
        self.M_main_modal_1 += gn_main[1] / wn_main[1]
        BDR_0 = np.log10(self.M_bypass_modal_0 / self.M_main_modal_0)  # noqa: N806
        BDR_1 = np.log10(self.M_bypass_modal_1 / self.M_main_modal_1)  # noqa: N806
        return BDR_0 - BDR_1


def test_equals_balancebenchmark():
    params = GreedyParams(variant="balancebenchmark", epsilon=0.1, window=3)
    assert (params.mmtm_stages, params.warmup_epochs, params.running_average) == (4, 0, "own")
    method = Greedy(params, setup(fusion="concat"))
    model = BBGreedyModel(method)
    batches = make_batches()
    ours = run_method(method, batches)
    trainer, optimizer = BBGreedyTrainer(params.epsilon, params.window), sgd(model.parameters())
    theirs = [trainer.step(model, optimizer, b) for b in batches]
    pairs = [(p, q) for m in AV for p, q in zip(method.encoders[m].parameters(), model.modality_encoder[m].parameters(),
                                                strict=True)]
    pairs += list(zip(method.fusion.parameters(), model.fusion_module.parameters(), strict=True))
    for j, mmtm in enumerate(method.mmtms):
        bb = model.mmtm_layers[f"mmtm{j + 1}"]
        pairs += list(zip(mmtm.parameters(), bb.parameters(), strict=True))
        pairs += [(getattr(mmtm, f"gate_avg_{m}"), bb.running_avg_weight[m]) for m in AV]
    assert largest(pairs) < TOL
    for o, t in zip(ours, theirs, strict=True):
        assert o["loss"] == pytest.approx(t["loss"], abs=TOL)
        assert o["speed"] == pytest.approx(t["speed"], abs=TOL)
        assert mode_of(o) == (None if t["mode"] is None else AV[t["mode"]])
    # no warm-up: it may re-balance from the second step
    assert {mode_of(o) for o in ours} == {None, "audio", "visual"}


# ---------------------------------------------------------------- the architecture in ResNet18


@pytest.mark.parametrize(("variant", "after"), [("release", ["layer2", "layer3", "layer4"]),
                                                ("balancebenchmark", ["layer1", "layer2", "layer3", "layer4"])])
def test_mmtm_sits_after_the_release_resnet18_layers(variant, after):
    mods = tuple(Modality(m, "image", (3, 16, 16)) for m in AV)
    encoders = nn.ModuleDict({m.name: ResNet18Encoder(NoParams(), m) for m in mods})
    method = Greedy(GreedyParams(variant=variant), MethodSetup(encoders, C, mods, fusion="late"))
    names = ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert [names[i] for i in method.positions["audio"]] == after
    widths = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    assert [m.fc_excite["audio"].out_features for m in method.mmtms] == [widths[n] for n in after]
    # the release's MMTM(128, 128, 4): squeeze 256 -> 128
    assert method.mmtms[-3].fc_squeeze.weight.shape == (128, 256)


# ------------------------------------------------------------------- switched off, refusals


@pytest.mark.parametrize("fusion", ["concat", "late"])
def test_without_mmtm_and_rebalancing_it_is_joint_training(fusion):
    batches = make_batches(4)
    greedy = Greedy(GreedyParams(mmtm_stages=0, rebalance="off"), setup(fusion=fusion))
    joint = Joint(JointParams(), setup(fusion=fusion))
    outs = [run_method(m, batches, epochs=[0, 0, 1, 1]) for m in (greedy, joint)]
    assert largest(zip(greedy.parameters(), joint.parameters(), strict=True)) < 1e-6
    assert [o["loss"] for o in outs[0]] == pytest.approx([o["loss"] for o in outs[1]], abs=1e-6)


def test_refusals_are_one_line_and_name_what_is_allowed():
    with pytest.raises(ConfigError, match=r"method greedy is defined for exactly 2 modalities .*; this dataset has "
                                          r"3: audio, visual, text"):
        Greedy(GreedyParams(), setup(names=("audio", "visual", "text")))
    with pytest.raises(ValueError, match=r"rebalance='guided' needs MMTM blocks"):
        GreedyParams(mmtm_stages=0)

    class Plain(nn.Module):
        out_dim = 8

        def forward(self, x):
            return x

    s = setup()
    s.encoders["visual"] = Plain()
    with pytest.raises(ConfigError, match=r"^method greedy runs between the encoders' blocks, but encoder 'Plain' "
                                          r"\(model.encoders.visual\) does not expose its stages; encoders that do: "
                                          r"mlp, resnet18, small_cnn$"):
        Greedy(GreedyParams(), s)


# ----------------------------------------------------------------- diagnostics, cost, resume


def test_utilisation_logs_and_rates():
    assert utilisation_rates({"a": 0.8, "v": 0.5}, {"a": 0.6, "v": 0.5}) == pytest.approx({"a": 0.25, "v": 0.0})
    method = Greedy(GreedyParams(rebalance="off"), setup())
    run_method(method, make_batches(4), epochs=[0, 0, 0, 0])
    batch = make_batches(1, seed=9)[0]
    with torch.no_grad():
        pred = method.eval().predict(batch)
        alone = method.fusion.per_modality(method.features(batch))
    for m in AV:
        assert pred.logs[f"acc_mmtm.{m}"].item() == (pred.per_modality[m].argmax(1) == batch.labels).float().mean()
        assert pred.logs[f"acc_bypass.{m}"].item() == (alone[m].argmax(1) == batch.labels).float().mean()
    # the cut branches are the release's eval with mmtm_off, given the same average squeezes
    model = ReleaseModel(method).eval()
    averages = [[m.squeeze_avg_audio, m.squeeze_avg_visual] for m in method.mmtms]
    with torch.no_grad():
        _, (x0, x1) = model(batch.inputs["audio"], batch.inputs["visual"], mmtm_rescale=averages)
    assert largest([(alone["audio"], x0), (alone["visual"], x1)]) < TOL
    assert averages[0][0].abs().sum() > 0
    # the cut branch of audio is a function of audio alone
    other = Batch({"audio": batch.inputs["audio"], "visual": torch.randn(B, 5)}, batch.labels)
    with torch.no_grad():
        assert torch.equal(method.features(other)["audio"], method.features(batch)["audio"])
        assert not torch.equal(method.branches(other.inputs)["audio"], method.branches(batch.inputs)["audio"])


def test_one_forward_and_one_backward_per_step():
    method = Greedy(GreedyParams(**GUIDED), setup())
    method.attach(step_context(lambda: sgd(method.parameters())))
    counter = PassCounter(method.encoders)
    for batch in make_batches(3):
        with counter.step():
            method.training_step(batch)
    assert counter.calls / (3 * counter.n_encoders) == 1.0
    assert method.step_context.backward_passes == 3


def test_resumes_exactly(fast_config, store, tmp_path, monkeypatch, one_torch_thread):
    cfg = fast_config("method.name=greedy", "method.warmup_epochs=1", "method.epsilon=0.1")
    assert_resumes_exactly(cfg, store, tmp_path, monkeypatch, at_epoch=2)
