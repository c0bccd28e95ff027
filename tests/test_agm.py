"""AGM: the Shapley responses, ratios and coefficients by hand; the step against transcriptions of
both released implementations (the paper's release, two and three modalities; BalanceBenchmark's
AGMTrainer) over several steps; every switch; alpha = 0 is joint training; the harness, three
modalities, the pass count, predict, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from mmbalance.bench.config import load_config
from mmbalance.bench.perf.steps import SHAPES, measure_steps, variants_named
from mmbalance.bench.store import RunDir, Store
from mmbalance.bench.train import run
from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Batch, Modality
from mmbalance.methods.agm import (
    AGM,
    AGMParams,
    coalitions,
    discrepancy_ratios,
    modulation_coefficients,
    mono_modal_responses,
    shapley_weight,
)
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.joint import Joint, JointParams
from tests.conftest import run_interrupted, step_context, without_timing
from tests.test_method_contract import test_predict_is_free_of_side_effects as predict_contract

# tiny models at small batches: one intra-op thread (see the fixture)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

C = 4
B = 12
DIMS = {"audio": 5, "visual": 3, "text": 4}
TOL = 1e-5


class Tiny(nn.Module):
    """Linear, BatchNorm, ReLU, dropout, Linear: train and eval mode differ (BatchNorm statistics,
    dropout), so the masked passes' mode and order are checked too."""

    def __init__(self, d_in: int, out_dim: int = 6) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.net = nn.Sequential(nn.Linear(d_in, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(8, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_setup(names, seed=0, fusion="concat") -> MethodSetup:
    torch.manual_seed(seed)
    mods = tuple(Modality(m, "vector", (DIMS[m],)) for m in names)
    return MethodSetup(nn.ModuleDict({m: Tiny(DIMS[m]) for m in names}), C, mods, fusion=fusion)


def make_batches(names, n=3, seed=1) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [Batch({m: torch.randn(B, DIMS[m], generator=gen) * 2 for m in names},
                  torch.randint(0, C, (B,), generator=gen)) for _ in range(n)]


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def attach(method):
    method.attach(step_context(lambda: sgd(method.parameters()), num_batches=3))
    return method


# ------------------------------------------------------------------- pure functions by hand


def test_shapley_weights_and_coalitions():
    assert [shapley_weight(k, 2) for k in (0, 1)] == [0.5, 0.5]
    assert [shapley_weight(k, 3) for k in (0, 1, 2)] == pytest.approx([1 / 3, 1 / 6, 1 / 3])
    assert len(coalitions(("a", "v", "t"))) == 7 and frozenset() not in coalitions(("a", "v", "t"))


def values_of(names, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {s: torch.randn(2, C, generator=gen, dtype=torch.float64) for s in coalitions(names)}


def test_two_modality_responses_are_the_codes_formulas():
    v = values_of(("audio", "visual"))
    total, pad_a, pad_v = v[frozenset({"audio", "visual"})], v[frozenset({"visual"})], v[frozenset({"audio"})]
    rel = mono_modal_responses(v, ("audio", "visual"), with_singleton=True)
    assert torch.allclose(rel["audio"], 0.5 * (total - pad_a + pad_v))  # CREMAD_net.py Modality_Audio
    assert torch.allclose(rel["visual"], 0.5 * (total - pad_v + pad_a))
    bb = mono_modal_responses(v, ("audio", "visual"), with_singleton=False)
    assert torch.allclose(bb["audio"], 0.5 * (total - pad_a))  # newGrad: no empty coalition
    assert torch.allclose(bb["visual"], 0.5 * (total - pad_v))


def test_three_modality_responses_are_the_codes_formulas_and_sum_to_the_output():
    names = ("audio", "visual", "text")
    v = values_of(names)
    S = lambda *m: frozenset(m)  # noqa: E731
    total = v[S(*names)]
    pa, pv, pt = v[S("visual", "text")], v[S("audio", "text")], v[S("audio", "visual")]
    pva, pvt, pat = v[S("text")], v[S("audio")], v[S("visual")]
    rel = mono_modal_responses(v, names, with_singleton=True)
    # URFunny_net.py Modality_Audio / Modality_Visual / Modality_Text
    assert torch.allclose(rel["audio"], (total - pa + pvt) / 3 + (pv - pat + pt - pva) / 6)
    assert torch.allclose(rel["visual"], (total - pv + pat) / 3 + (pa - pvt + pt - pva) / 6)
    assert torch.allclose(rel["text"], (total - pt + pva) / 3 + (pv - pat + pa - pvt) / 6)
    assert torch.allclose(sum(rel.values()), total)  # efficiency: the fused output
    bb = mono_modal_responses(v, names, with_singleton=False)
    # AGM_trainer.py Modality_Audio without the 1/3 A term (newGrad's include_empty=False)
    assert torch.allclose(bb["audio"], (total - pa) / 3 + (pt - pat + pv - pva) / 6)


def test_ratios_and_coefficients_by_hand():
    s = {"audio": torch.tensor(0.7, dtype=torch.float64), "visual": torch.tensor(1.3, dtype=torch.float64)}
    r = discrepancy_ratios(s, +1)
    assert r["audio"].item() == pytest.approx(math.exp(1.3 - 0.7))
    assert r["visual"].item() == pytest.approx(math.exp(-0.6))
    assert discrepancy_ratios(s, -1)["audio"].item() == pytest.approx(math.exp(-0.6))
    s3 = {m: torch.tensor(x, dtype=torch.float64) for m, x in zip("avt", (0.5, 1.0, 2.1))}
    mean = (0.5 + 1.0 + 2.1) / 3
    assert discrepancy_ratios(s3, +1)["a"].item() == pytest.approx(math.exp((mean - 0.5) * 3 / 2))
    opt = {"audio": torch.tensor(5.0, dtype=torch.float64), "visual": torch.tensor(0.2, dtype=torch.float64)}
    k = modulation_coefficients(r, opt, 1.5, cap=2.0)
    assert k["audio"].item() == pytest.approx(math.exp(1.5 * 2.0))  # capped
    assert k["visual"].item() == pytest.approx(math.exp(1.5 * (0.2 - math.exp(-0.6))))
    assert modulation_coefficients(r, opt, 1.5, cap=None)["audio"].item() == pytest.approx(
        math.exp(1.5 * (5.0 - math.exp(0.6))))


# ------------------------------------------------- transcription 1: the paper's release, M = 2


class Modality_out(nn.Module):  # noqa: N801  (the code's names)
    def forward(self, x):
        return x


class ReleaseNet(nn.Module):
    """AVClassifier (CREMAD_net.py:85-125): each input zeroed when padded, the encoders, a concat
    `fusion_module.fc_out` — here the suite's encoders and head, copied before training."""

    def __init__(self, method: AGM) -> None:
        super().__init__()
        self.encoders = copy.deepcopy(method.encoders)
        self.fusion_module = nn.Module()
        self.fusion_module.fc_out = copy.deepcopy(method.fusion.fc_out)

    def forward(self, inputs, pad=()):
        feats = [self.encoders[m](torch.zeros_like(x) if m in pad else x) for m, x in inputs.items()]
        return self.fusion_module.fc_out(torch.cat(feats, dim=1))


class GradMod2(nn.Module):
    """CREMAD_net.py:25-69, line for line (audio, visual)."""

    def __init__(self, net):
        super().__init__()
        self.mode = "train"
        self.net = net
        self.m_v_o, self.m_a_o = Modality_out(), Modality_out()
        self.scale_a = self.scale_v = 1.0
        self.m_a_o.register_full_backward_hook(self.hooka)
        self.m_v_o.register_full_backward_hook(self.hookv)

    def hooka(self, m, ginp, gout):
        gnew = ginp[0].clone()
        return gnew * self.scale_a,

    def hookv(self, m, ginp, gout):
        gnew = ginp[0].clone()
        return gnew * self.scale_v,

    def update_scale(self, coeff_a, coeff_v):
        self.scale_a, self.scale_v = coeff_a, coeff_v

    def forward(self, inputs):
        total_out = self.net(inputs)
        self.net.eval()
        pad_visual_out = self.net(inputs, pad=("visual",))
        pad_audio_out = self.net(inputs, pad=("audio",))
        zero_padding_out = self.net(inputs, pad=("audio", "visual"))
        if self.mode == "train":
            self.net.train()
        m_a = self.m_a_o(0.5 * (total_out - pad_audio_out + pad_visual_out))
        m_v = self.m_v_o(0.5 * (total_out - pad_visual_out + pad_audio_out))
        return total_out, pad_visual_out, pad_audio_out, zero_padding_out, m_a + m_v


def release_scores(outs, label, floor: bool):
    """CREMAD_main.py:128-143 (floor: the 1e-8 guard) / URFunny_main.py:109-115 (no guard)."""
    softmax = nn.Softmax(dim=1)
    scores = []
    for out in outs:
        score = 0.
        for k in range(out.size(0)):
            if floor and (torch.isinf(torch.log(softmax(out)[k][label[k]])) or softmax(out)[k][label[k]] < 1e-8):
                score += - torch.log(torch.tensor(1e-8, dtype=out.dtype, device=out.device))
            else:
                score += - torch.log(softmax(out)[k][label[k]])
        scores.append(score / out.size(0))
    return scores


class ReleaseRun:
    """The training loop of CREMAD_main.py (M = 2) or URFunny_main.py (M = 3) for AGM, with the
    running scores carried across epochs as the code returns and passes them."""

    def __init__(self, method: AGM, alpha, cap, clip, starts=1, ends=10**6, hold=True):
        names = method.modality_names
        self.model = GradMod2(ReleaseNet(method)) if len(names) == 2 else GradMod3(ReleaseNet(method))
        self.optimizer = sgd(self.model.parameters())
        self.alpha, self.cap, self.clip, self.starts, self.ends, self.hold = alpha, cap, clip, starts, ends, hold
        self.train_scores = dict.fromkeys(names, 0.)
        self.names = names

    def step(self, batch: Batch, epoch: int, step: int, total_batch: int) -> dict[str, float]:
        """`epoch` 1-based, as the code counts."""
        model, label = self.model, batch.labels
        iteration = (epoch - 1) * total_batch + step + 1
        out = model(batch.inputs)
        total, rest = out[0], out[1:]
        if len(self.names) == 2:  # CREMAD_main.py:60-62
            _, pad_visual_out, pad_audio_out, _, fused = out
            outs = {"audio": 0.5 * (total - pad_audio_out + pad_visual_out),
                    "visual": 0.5 * (total - pad_visual_out + pad_audio_out)}
        else:  # URFunny_main.py:104
            _, _, _, m_a_out, m_v_out, m_t_out, fused = rest[-1]
            outs = {"audio": m_a_out, "visual": m_v_out, "text": m_t_out}
        loss = nn.CrossEntropyLoss()(fused, label)
        self.optimizer.zero_grad()
        n = len(self.names)
        score = dict(zip(self.names, release_scores(list(outs.values()), label, floor=n == 2)))
        # CREMAD_main.py:145-152 (exp(s_v - s_a)); URFunny_main.py:117-130 (the 3/2 form)
        mean_score = sum(s.item() for s in score.values()) / n
        ratio = {m: math.exp((mean_score - score[m].item()) * n / (n - 1)) for m in self.names}
        optimal_mean_score = sum(self.train_scores.values()) / n
        optimal = {m: math.exp((optimal_mean_score - self.train_scores[m]) * n / (n - 1)) for m in self.names}
        gap = {m: optimal[m] - ratio[m] for m in self.names}
        coeff = {m: math.exp(self.alpha * (gap[m] if self.cap is None else min(gap[m], self.cap))) for m in self.names}
        for m in self.names:  # CREMAD_main.py:154-155
            self.train_scores[m] = self.train_scores[m] * (iteration - 1) / iteration + score[m].item() / iteration
        if self.starts <= epoch <= self.ends:  # CREMAD_main.py:159-166
            model.update_scale(*(coeff[m] for m in self.names))
        elif not self.hold:  # hold_after_window=False, written here: the scale back to 1
            model.update_scale(*(1.0 for _ in self.names))
        loss.backward()
        clipped = 0.0
        if self.clip is not None:  # CREMAD_main.py:234-238 (threshold 1), URFunny_main.py:203-207 (5)
            grad_max = torch.max(model.net.fusion_module.fc_out.weight.grad)
            grad_min = torch.min(model.net.fusion_module.fc_out.weight.grad)
            if grad_max > self.clip or grad_min < -self.clip:
                nn.utils.clip_grad_norm_(model.parameters(), max_norm=self.clip)
                clipped = 1.0
        self.optimizer.step()
        reported = {"loss": loss.item(), "clipped": clipped}
        for m in self.names:
            reported |= {f"score.{m}": score[m].item(), f"ratio.{m}": ratio[m],
                         f"optimal_ratio.{m}": optimal[m], f"coef.{m}": coeff[m]}
        return reported


# ------------------------------------------------- transcription 2: the paper's release, M = 3


class GradMod3(nn.Module):
    """URFunny_net.py:39-125, line for line (audio, visual, text)."""

    def __init__(self, net):
        super().__init__()
        self.mode = "train"
        self.net = net
        self.m_v_o, self.m_a_o, self.m_t_o = Modality_out(), Modality_out(), Modality_out()
        self.scale_a = self.scale_v = self.scale_t = 1.0
        self.m_a_o.register_full_backward_hook(self.hooka)
        self.m_v_o.register_full_backward_hook(self.hookv)
        self.m_t_o.register_full_backward_hook(self.hookt)

    def hooka(self, m, ginp, gout):
        return ginp[0].clone() * self.scale_a,

    def hookv(self, m, ginp, gout):
        return ginp[0].clone() * self.scale_v,

    def hookt(self, m, ginp, gout):
        return ginp[0].clone() * self.scale_t,

    def update_scale(self, coeff_a, coeff_v, coeff_t):
        self.scale_a, self.scale_v, self.scale_t = coeff_a, coeff_v, coeff_t

    def forward(self, inputs):
        total_out = self.net(inputs)
        self.net.eval()
        pad_audio_out = self.net(inputs, pad=("audio",))
        pad_visual_out = self.net(inputs, pad=("visual",))
        pad_text_out = self.net(inputs, pad=("text",))
        pad_visual_audio_out = self.net(inputs, pad=("visual", "audio"))
        pad_visual_text_out = self.net(inputs, pad=("visual", "text"))
        pad_audio_text_out = self.net(inputs, pad=("audio", "text"))
        zero_padding_out = self.net(inputs, pad=("audio", "visual", "text"))
        if self.mode == "train":
            self.net.train()
        m_a_out = self.m_a_o((total_out - pad_audio_out + pad_visual_text_out) / 3
                             + (pad_visual_out - pad_audio_text_out + pad_text_out - pad_visual_audio_out) / 6)
        m_v_out = self.m_v_o((total_out - pad_visual_out + pad_audio_text_out) / 3
                             + (pad_audio_out - pad_visual_text_out + pad_text_out - pad_visual_audio_out) / 6)
        m_t_out = self.m_t_o((total_out - pad_text_out + pad_visual_audio_out) / 3
                             + (pad_visual_out - pad_audio_text_out + pad_audio_out - pad_visual_text_out) / 6)
        m_a_mc, m_v_mc, m_t_mc = (m - zero_padding_out / 3 for m in (m_a_out, m_v_out, m_t_out))
        return total_out, (m_a_mc, m_v_mc, m_t_mc, m_a_out, m_v_out, m_t_out, m_a_out + m_v_out + m_t_out)


# ----------------------------------------------------- transcription 3: BalanceBenchmark


class BBModel(nn.Module):
    """BaseClassifierModel.forward (avclassify_model.py:258-273): padded modalities' inputs zeroed,
    the encoders, concat fusion_module.fc_out; the output left in unimodal_result['output']."""

    def __init__(self, method: AGM) -> None:
        super().__init__()
        self.modalitys = list(method.modality_names)
        self.modality_encoder = copy.deepcopy(method.encoders)
        self.fusion_module = nn.Module()
        self.fusion_module.fc_out = copy.deepcopy(method.fusion.fc_out)
        self.unimodal_result = {}

    def forward(self, batch, padding=()):
        feats = []
        for modality in self.modalitys:
            data = batch[modality]
            if modality in padding:
                data = torch.zeros_like(data, device=data.device)
            feats.append(self.modality_encoder[modality](data))
        self.unimodal_result = {"output": self.fusion_module.fc_out(torch.cat(feats, dim=1))}


def generate_all_combinations(input_list, include_empty=True):  # evaluation/modalitys.py:9-17
    import itertools
    start_range = 0 if include_empty else 1
    return [list(c) for r in range(start_range, len(input_list) + 1) for c in itertools.combinations(input_list, r)]


def new_grad(model: BBModel, batch):
    """newGrad.forward (AGM_trainer.py:225-275)."""
    modalitys = list(model.modalitys)
    modality_nums = len(modalitys)
    res, res_cache = {}, {}
    with torch.no_grad():
        model.eval()
        for modality in modalitys:
            temp_modality = copy.deepcopy(modalitys)
            temp_modality.remove(modality)
            for combo in generate_all_combinations(temp_modality, include_empty=False):
                indentifer = tuple(sorted(combo))
                weight = (math.factorial(len(combo)) * math.factorial(modality_nums - len(combo) - 1)
                          / math.factorial(modality_nums))
                if indentifer not in res_cache:
                    model(batch, padding=[a for a in modalitys if a not in combo])
                    res_cache[indentifer] = model.unimodal_result["output"]
                out = res_cache[indentifer]
                combo_add = [*combo, modality]
                indentifer = tuple(sorted(combo_add))
                if indentifer not in res_cache:
                    model(batch, padding=[a for a in modalitys if a not in combo_add])
                    res_cache[indentifer] = model.unimodal_result["output"]
                out_add = res_cache[indentifer]
                res[modality] = res.get(modality, 0) + weight * (out_add - out)
    model.train()
    model(batch)
    return res, model.unimodal_result["output"]


class BBRun:
    """AGMTrainer.training_step (AGM_trainer.py:535-589) and its loop's optimizer.step."""

    def __init__(self, method: AGM, alpha, cap, clip):
        self.model = BBModel(method)
        self.optimizer = sgd(self.model.parameters())
        self.alpha, self.cap, self.clip = alpha, cap, clip
        self.train_scores = {m: torch.tensor(0) for m in self.model.modalitys}  # train_loop, starts == 1

    def step(self, batch: Batch, epoch0: int, step: int, total_batch: int) -> dict[str, float]:
        model, label = self.model, batch.labels
        softmax = nn.Softmax(dim=1)
        res, out = new_grad(model, batch.inputs)
        loss = nn.CrossEntropyLoss()(out, label)
        loss.backward()
        scores = {}
        for modality in model.modalitys:
            out_m = res[modality]
            scores[modality] = 0.
            for k in range(out_m.size(0)):
                if torch.isinf(torch.log(softmax(out_m)[k][label[k]])) or softmax(out_m)[k][label[k]] < 1e-8:
                    scores[modality] += -torch.log(torch.tensor(1e-8, dtype=out_m.dtype))
                else:
                    scores[modality] += -torch.log(softmax(out_m)[k][label[k]])
            scores[modality] /= out_m.size(0)
        num = len(model.modalitys)
        scores_mean = sum(scores.values()) / num
        train_score_mean = sum(self.train_scores.values()) / num
        iteration = epoch0 * total_batch + step + 1
        coeffs, reported = {}, {"loss": loss.item()}
        for modality in model.modalitys:
            ratio = math.exp(num / (num - 1) * (scores[modality].item() - scores_mean.item()))
            optimal_ratio = math.exp(num / (num - 1) * (self.train_scores[modality].item() - train_score_mean))
            gap = optimal_ratio - ratio
            coeffs[modality] = math.exp(self.alpha * (gap if self.cap is None else min(gap, self.cap)))
            self.train_scores[modality] = (self.train_scores[modality] * (iteration - 1) / iteration
                                           + scores[modality].item() / iteration)
            reported |= {f"score.{modality}": scores[modality].item(), f"ratio.{modality}": ratio,
                         f"optimal_ratio.{modality}": optimal_ratio, f"coef.{modality}": coeffs[modality]}
        for name, parms in model.named_parameters():
            for modality in model.modalitys:
                if modality in name and len(parms.grad.size()) != 1:
                    parms.grad *= coeffs[modality]
        reported["clipped"] = 0.0
        if self.clip is not None:
            grad_max = torch.max(model.fusion_module.fc_out.weight.grad)
            grad_min = torch.min(model.fusion_module.fc_out.weight.grad)
            if grad_max > self.clip or grad_min < -self.clip:
                nn.utils.clip_grad_norm_(model.parameters(), max_norm=self.clip)
                reported["clipped"] = 1.0
        self.optimizer.step()
        self.optimizer.zero_grad()
        return reported


# ----------------------------------------------------------------- running both side by side


def suite_to_reference(name: str) -> str:
    """The suite's state-dict key -> the transcription's (encoders.* / fusion.fc_out.*)."""
    return name.replace("fusion.", "fusion_module.", 1)


def largest_difference(method: AGM, reference: nn.Module) -> float:
    ref = {k.removeprefix("net.").replace("modality_encoder.", "encoders.", 1): v
           for k, v in reference.state_dict().items()}
    worst = 0.0
    for key, value in method.state_dict().items():
        if key in ("running_scores", "steps", "held"):
            continue
        other = ref[suite_to_reference(key)]
        worst = max(worst, (value.double() - other.double()).abs().max().item())
    return worst


def run_side_by_side(params: AGMParams, names, reference_cls, epochs=2, steps=3,
                     **ref_kwargs) -> tuple[float, float, set[float]]:
    """Trains the suite's method and the transcription on the same batches and RNG; returns the
    largest parameter and reported-quantity differences over all steps (asserted < TOL) and the
    clipping decisions seen."""
    method = attach(AGM(params, make_setup(names)))
    if reference_cls is ReleaseRun:
        reference = ReleaseRun(method, params.alpha, params.ratio_cap, params.clip_threshold, **ref_kwargs)
    else:
        reference = BBRun(method, params.alpha, params.ratio_cap, params.clip_threshold)
    batches = make_batches(names, steps)
    worst_param = worst_reported = 0.0
    seen_clip, coefs = set(), set()
    for epoch in range(epochs):
        method.step_context.epoch = epoch
        for i, batch in enumerate(batches):
            method.step_context.batch_index = i
            torch.manual_seed(100 * epoch + i)  # the same dropout masks for both
            out = method.training_step(batch)
            torch.manual_seed(100 * epoch + i)
            if reference_cls is ReleaseRun:
                ref = reference.step(batch, epoch + 1, i, len(batches))
            else:
                ref = reference.step(batch, epoch, i, len(batches))
            for key, value in ref.items():
                if key == "clipped" and params.clip_threshold is None:
                    assert "clipped" not in out
                    continue
                worst_reported = max(worst_reported, abs(float(out[key]) - value) / max(1.0, abs(value)))
            seen_clip.add(ref["clipped"])
            worst_param = max(worst_param, largest_difference(method, reference.model))
            coefs.update(float(out[f"coef.{m}"]) for m in names)
    assert worst_param < TOL and worst_reported < TOL, (worst_param, worst_reported)
    if params.ratio_cap is not None and params.ratio_cap < 0.1:  # the cap did bind
        assert any(k == pytest.approx(math.exp(params.alpha * params.ratio_cap), rel=1e-6) for k in coefs)
    return worst_param, worst_reported, seen_clip


# the cap and the threshold: the code's (10 / 1), binding ones, and switched off
SWITCHES = [(10.0, 1.0), (0.01, 0.05), (None, None)]


@pytest.mark.parametrize(("cap", "clip"), SWITCHES)
def test_release_two_modalities_equals_the_code(cap, clip):
    params = AGMParams(alpha=1.5, ratio_cap=cap, clip_threshold=clip)
    _, _, clipped = run_side_by_side(params, ("audio", "visual"), ReleaseRun)
    if clip == 0.05:
        assert clipped == {1.0}
    elif clip == 1.0:
        assert clipped == {0.0}  # the code's threshold: the steps whose gradient is small are left alone


@pytest.mark.parametrize(("cap", "clip"), [(7.0, 5.0), (0.01, 0.05)])
def test_release_three_modalities_equals_the_code(cap, clip):
    run_side_by_side(AGMParams(alpha=4.0, ratio_cap=cap, clip_threshold=clip), ("audio", "visual", "text"),
                     ReleaseRun)


@pytest.mark.parametrize("hold", [True, False])
def test_release_window_and_hold(hold):
    # the code's 1-based window [2, 2] of three epochs is modulation_starts = ends = 1 here
    params = AGMParams(alpha=1.5, modulation_starts=1, modulation_ends=1, hold_after_window=hold)
    run_side_by_side(params, ("audio", "visual"), ReleaseRun, epochs=3, starts=2, ends=2, hold=hold)


def test_hold_changes_the_steps_after_the_window():
    finals = []
    for hold in (True, False):
        params = AGMParams(alpha=1.5, modulation_ends=0, hold_after_window=hold)
        method = attach(AGM(params, make_setup(("audio", "visual"))))
        for epoch, batch in enumerate(make_batches(("audio", "visual"), 3)):
            method.step_context.epoch = epoch
            torch.manual_seed(epoch)
            out = method.training_step(batch)
            assert out["modulated"].item() == float(epoch == 0)
        assert method.held.ne(1).all()  # the window's last kappa
        finals.append(method.fusion.fc_out.weight.detach().clone())
    assert not torch.allclose(*finals)


@pytest.mark.parametrize("names", [("audio", "visual"), ("audio", "visual", "text")], ids=len)
@pytest.mark.parametrize(("cap", "clip"), [(7.0, 5.0), (0.01, 0.05), (None, None)])
def test_balancebenchmark_equals_its_trainer(names, cap, clip):
    params = AGMParams(variant="balancebenchmark", alpha=2.0, ratio_cap=cap, clip_threshold=clip)
    run_side_by_side(params, names, BBRun)


def test_the_variants_differ():
    names = ("audio", "visual")
    out = {}
    for variant in ("release", "balancebenchmark"):
        method = attach(AGM(AGMParams(variant=variant, alpha=2.0, clip_threshold=None), make_setup(names)))
        for batch in make_batches(names, 3):
            torch.manual_seed(0)
            method.training_step(batch)
        out[variant] = method.fusion.fc_out.weight.detach().clone()
    assert not torch.allclose(out["release"], out["balancebenchmark"], atol=1e-4)


# ------------------------------------------------------------------ switched-off equivalence


@pytest.mark.parametrize("variant", ["release", "balancebenchmark"])
def test_alpha0_without_clipping_is_joint_training(variant):
    names = ("audio", "visual")
    joint = attach(Joint(JointParams(), make_setup(names, seed=3)))
    agm = attach(AGM(AGMParams(variant=variant, alpha=0.0, clip_threshold=None), make_setup(names, seed=3)))
    for key, value in joint.state_dict().items():
        assert torch.equal(agm.state_dict()[key], value), key
    for i, batch in enumerate(make_batches(names, 5)):
        torch.manual_seed(i)
        lj = joint.training_step(batch)["loss"]
        torch.manual_seed(i)
        out = agm.training_step(batch)
        assert out["coef.audio"].item() == out["coef.visual"].item() == 1.0
        assert out["loss"].item() == pytest.approx(lj.item(), abs=1e-6)
    worst = max((agm.state_dict()[k].double() - v.double()).abs().max().item() for k, v in joint.state_dict().items())
    assert worst < 1e-6, worst
    if variant == "balancebenchmark":  # no eval-path terms that only cancel numerically: exact
        assert worst == 0.0
    initial = Joint(JointParams(), make_setup(names, seed=3)).state_dict()
    assert not torch.equal(agm.state_dict()["fusion.fc_out.weight"], initial["fusion.fc_out.weight"])


# ----------------------------------------------------------------------- params and refusals


def test_variant_defaults_and_validation():
    rel, bb = AGMParams(), AGMParams(variant="balancebenchmark")
    assert (rel.alpha, rel.ratio_cap, rel.clip_threshold) == (1.0, 10.0, 1.0)
    assert (bb.alpha, bb.ratio_cap, bb.clip_threshold) == (0.1, 7.0, 5.0)
    assert AGMParams(variant="balancebenchmark", ratio_cap=None, alpha=1.0).ratio_cap is None
    with pytest.raises(ValueError, match="never open"):
        AGMParams(modulation_starts=5, modulation_ends=4)
    with pytest.raises(ValueError, match="apply only to variant='release'"):
        AGMParams(variant="balancebenchmark", modulation_ends=10)
    with pytest.raises(ConfigError, match="method.variant"):
        load_config(None, ["dataset.name=gaussian", "method.name=agm", "method.variant=paper"])
    cfg = load_config(None, ["dataset.name=gaussian", "method.name=agm", "method.variant=balancebenchmark"])
    assert cfg.method["name"] == "agm"


def test_one_modality_is_refused():
    with pytest.raises(ConfigError, match="method agm compares modalities, so it needs at least 2; "
                                          "this dataset has 1: audio"):
        AGM(AGMParams(), make_setup(("audio",)))


@pytest.mark.parametrize("fusion", ["sum", "late", "film", "gated"])
def test_other_fusions_train_and_clip_on_their_output_layer(fusion):
    names = ("audio", "visual")
    method = attach(AGM(AGMParams(alpha=1.5, clip_threshold=1e-4), make_setup(names, fusion=fusion)))
    for batch in make_batches(names, 2):
        out = method.training_step(batch)
        assert out["clipped"].item() == 1.0
        grads = [p.grad for p in method.parameters() if p.grad is not None]
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() == pytest.approx(1e-4, rel=1e-3)
    with torch.no_grad():
        pred = method.eval().predict(make_batches(names, 1)[0])
    assert set(pred.per_modality) == set(names) and pred.fused.shape == (B, C)


@pytest.mark.parametrize("section", [{"name": "agm"}, {"name": "agm", "variant": "balancebenchmark"}],
                         ids=["release", "balancebenchmark"])
def test_predict_is_free_of_side_effects(section):
    predict_contract(section)


def test_predict_gives_the_eval_output_and_the_responses():
    names = ("audio", "visual")
    method = AGM(AGMParams(), make_setup(names)).eval()
    batch = make_batches(names, 1)[0]
    net = ReleaseNet(method).eval()
    with torch.no_grad():
        pred = method.predict(batch)
        total, pa, pv = net(batch.inputs), net(batch.inputs, ("audio",)), net(batch.inputs, ("visual",))
    assert torch.allclose(pred.fused, total, atol=1e-6)
    assert torch.allclose(pred.per_modality["audio"], 0.5 * (total - pa + pv), atol=1e-6)


# ------------------------------------------------------------------------------ the harness


def test_harness_two_and_three_modalities_cost_and_diagnostics(fast_config, store):
    for dataset, names in (("gaussian", ("audio", "visual")), ("gaussian3", ("audio", "visual", "text"))):
        result = run(fast_config(f"dataset.name={dataset}", "method.name=agm", "method.alpha=1.5", "train.epochs=2"),
                     store)
        assert result.state == "finished"
        history = RunDir(result.path).read_metrics()
        keys = {"loss", "modulated", "clipped"} | {f"{q}.{m}" for q in ("score", "ratio", "optimal_ratio", "coef")
                                                   for m in names}
        for record in history:
            assert keys <= set(record["train"])
            assert record["train"]["modulated"] == 1.0
            assert any(abs(record["train"][f"coef.{m}"] - 1) > 1e-4 for m in names)
            assert set(record["val"]["modality_acc"]) == set(names)
        # one training-mode pass, one eval pass on the inputs, one on a zero sample; one backward
        assert result.summary["cost"]["forward_passes_per_step"] == 3.0
        assert result.summary["cost"]["backward_passes_per_step"] == 1.0


def test_bench_lists_agm_with_its_pass_counts():
    variants = variants_named(["agm"])
    assert [v.label for v in variants] == ["joint", "agm"]
    rows = measure_steps(SHAPES["quick"], torch.device("cpu"), variants=variants, rounds=1, steps=1, warmup=1)
    assert rows[1]["method"] == "agm" and rows[1]["ratio_to_joint"] > 0
    assert rows[1]["forward_passes_per_step"] == 3.0 and rows[1]["backward_passes_per_step"] == 1.0
    assert rows[0]["forward_passes_per_step"] == 1.0


def test_alpha0_balancebenchmark_matches_joint_through_the_harness(fast_config, tmp_path):
    joint = run(fast_config("method.name=joint", "train.epochs=2"), Store(tmp_path / "joint"))
    agm = run(fast_config("method.name=agm", "method.variant=balancebenchmark", "method.alpha=0",
                          "method.clip_threshold=null", "train.epochs=2"), Store(tmp_path / "agm"))
    def fused(block: dict) -> dict:  # the per-modality view is AGM's own: the responses, not the weight split
        return {k: v for k, v in block.items() if k != "modality_acc"}

    for rj, ra in zip(RunDir(joint.path).read_metrics(), RunDir(agm.path).read_metrics()):
        assert fused(ra["val"]) == fused(rj["val"]) and ra["train"]["loss"] == rj["train"]["loss"]
    assert fused(agm.summary["best_val"]["test"]) == fused(joint.summary["best_val"]["test"])


def test_resume_is_exact(fast_config, store, tmp_path, monkeypatch):
    cfg = fast_config("method.name=agm", "method.alpha=1.5", "method.modulation_ends=1", "train.epochs=3")
    reference = run(cfg, Store(tmp_path / "ref"))
    run_interrupted(cfg, store, monkeypatch, at_epoch=2)  # after the window: the held kappa must survive
    resumed = run(cfg, store)
    rd = store.run_dir(cfg.group, cfg.run_id())
    assert without_timing(rd.read_metrics()) == without_timing(RunDir(reference.path).read_metrics())
    assert resumed.summary["best_val"] == reference.summary["best_val"]
