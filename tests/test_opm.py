"""OPM: the drop by hand; the method beside transcriptions of the BML release and of
BalanceBenchmark's OPMTrainer on identical tiny models, batches and RNG; the window; switched-off
equivalence with joint training; three modalities, cost and resume through the harness."""

from __future__ import annotations

import copy
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbalance.bench.store import RunDir, Store
from mmbalance.bench.train import run
from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Batch
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.joint import Joint, JointParams
from mmbalance.methods.opm import (
    OPM,
    OPMParams,
    drop_features,
    drop_probabilities,
    dropped_fraction,
    keep_masks,
    kept_cross_entropy,
    score_ratios,
)
from tests import bml_release as bml
from tests.conftest import assert_resumes_exactly, largest_difference, mlp_setup, step_context, without_timing

C = 3
B = 16
AV = ("audio", "visual")
TOL = 1e-5  # the bound for parameters and reported quantities against released code


def setup(names=AV, dims=None, fusion="concat", epochs=10, seed=0) -> MethodSetup:
    return mlp_setup(names, C, dims=dims or 6, fusion=fusion, epochs=epochs, seed=seed)


def make_batches(names=AV, n=6, seed=1) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [Batch({m: torch.randn(B, 5, generator=gen) for m in names}, torch.randint(0, C, (B,), generator=gen))
            for _ in range(n)]


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def attached(method, epoch=0):
    method.attach(step_context(lambda: sgd(method.parameters()), epoch=epoch))
    return method


def steps(method, batches, epochs, seed) -> list[dict]:
    np.random.seed(seed)
    torch.manual_seed(seed)
    outs = []
    for epoch, batch in zip(epochs, batches):
        method.step_context.epoch = epoch
        outs.append(method.training_step(batch))
    return outs




# ------------------------------------------------------------------------------- by hand


def test_ratios_direct_and_sequential_by_hand():
    s = {"audio": torch.tensor(8.0), "visual": torch.tensor(4.0)}
    direct = score_ratios(s)
    assert direct["audio"].item() == 2.0 and direct["visual"].item() == 0.5
    # BalanceBenchmark's in-place quirk: visual divides by audio's ratio (+ eps), not its score
    seq = score_ratios(s, 1e-5, sequential=True)
    rho_a = 8 / (4 + 1e-5)
    assert seq["audio"].item() == pytest.approx(rho_a, rel=1e-6)
    assert seq["visual"].item() == pytest.approx(4 / (rho_a + 1e-5), rel=1e-6)  # 2.0: both lead
    three = {"audio": torch.tensor(9.0), "visual": torch.tensor(2.0), "text": torch.tensor(1.0)}
    assert [r.item() for r in score_ratios(three).values()] == pytest.approx([3.0, 2 / 10, 1 / 11])
    seq3 = score_ratios(three, sequential=True)
    assert [r.item() for r in seq3.values()] == pytest.approx([3.0, 2 / 4, 1 / 3.5])


def test_drop_probabilities_by_hand():
    rho = {"a": torch.tensor(1.5), "v": torch.tensor(1 / 1.5), "t": torch.tensor(1.0), "big": torch.tensor(50.0)}
    q = drop_probabilities(rho, q_base=0.5, lam=0.5)
    assert q["a"].item() == pytest.approx(0.5 * (1 + 0.5 * math.tanh(0.5)), rel=1e-6)
    assert q["v"].item() == 0.0 and q["t"].item() == 0.0  # rho <= 1: never dropped
    assert drop_probabilities(rho, q_base=0.8, lam=0.5)["big"].item() == 1.0  # 1.2 clipped


def test_keep_masks_draw_as_torch_bernoulli_sample_and_drop_rescales_by_theta():
    q = torch.tensor([0.6, 0.0, 0.3])
    torch.manual_seed(3)
    masks = keep_masks(q, 50)
    torch.manual_seed(3)
    ref = torch.distributions.Bernoulli(1 - q).sample([50, 1]).permute(2, 1, 0).reshape(3, 50)
    assert torch.equal(masks, ref) and masks[1].all() and not masks[0].all()
    feats = {"a": torch.ones(50, 4), "v": torch.ones(50, 2), "t": torch.ones(50, 2)}
    dims = {"a": 4, "v": 2, "t": 2}
    theta = (4 * 0.6 + 2 * 0.3) / 8
    assert dropped_fraction(q, [4, 2, 2]).item() == pytest.approx(theta, rel=1e-6)
    for eps in (0.0, 1e-5):
        out = drop_features(feats, masks, torch.tensor(theta), eps)
        for k, m in enumerate(feats):
            expected = masks[k][:, None].expand(50, dims[m]) / (1 - theta + eps)
            assert torch.allclose(out[m], expected, rtol=1e-6), (m, eps)


def test_kept_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 2, 2])
    per = F.cross_entropy(logits, labels, reduction="none")
    assert kept_cross_entropy(logits, labels, torch.tensor([1.0, 0.0, 1.0])).item() == \
        pytest.approx((per[0] + per[2]).item() / 2, rel=1e-6)
    assert kept_cross_entropy(logits, labels, torch.ones(3)).item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert kept_cross_entropy(logits, labels, torch.zeros(3)).item() == 0.0


# ------------------------------------------------------------ beside the BML release


def bml_beside(epochs, seed, q_base=0.5, lam=0.5, p_exe=0.7):
    method = attached(OPM(OPMParams(q_base=q_base, lam=lam, p_exe=p_exe), setup()))
    cfg = bml.bml_config(use_adam_drop=True, q_base=q_base, lam=lam, p_exe=p_exe, d=[6, 6])
    ref = bml.Classifier(cfg, copy.deepcopy(method.encoders["audio"]), copy.deepcopy(method.encoders["visual"]),
                         copy.deepcopy(method.fusion.fc_out))
    optimizer = sgd(ref.parameters())
    batches = make_batches(n=len(epochs))
    outs = steps(method, batches, epochs, seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    refs = []
    for epoch, b in zip(epochs, batches):
        ref.modality_drop.mask = None
        refs.append(bml.train_iteration(cfg, epoch, ref, optimizer, b.inputs["audio"], b.inputs["visual"], b.labels))
        refs[-1]["mask"] = ref.modality_drop.mask
    pairs = [(method.encoders["audio"], ref.encoder_1), (method.encoders["visual"], ref.encoder_2),
             (method.fusion.fc_out, ref.fusion_model.fxy)]
    return outs, refs, largest_difference(pairs)


def test_equals_the_bml_release_over_steps_with_warmup_drop_and_no_drop():
    epochs = [4, 5, 6, 6, 6, 6, 7, 7]  # two warm-up steps (epoch <= 5), then the drop's window
    outs, refs, diff = bml_beside(epochs, seed=14)
    assert diff <= TOL, diff
    executed = []
    for epoch, out, ref in zip(epochs, outs, refs):
        p1, p2 = ref["performance"]
        assert out["loss"].item() == pytest.approx(ref["loss"].item(), abs=TOL)
        assert out["ratio.audio"].item() == pytest.approx((p1 / p2).item(), abs=TOL)
        assert out["ratio.visual"].item() == pytest.approx((p2 / p1).item(), abs=TOL)
        ran = ref["update_flag"].dtype == torch.bool  # execute_drop's flag; ones of int32 when it did not run
        assert out["executed"].item() == float(ran) and out["modulated"].item() == float(epoch > 5)
        if epoch > 5:
            q = ref["q"]
            assert [out["drop_prob.audio"].item(), out["drop_prob.visual"].item()] == pytest.approx(q.tolist(), abs=TOL)
        if ran:
            mask = ref["mask"]  # [B, 2]
            for k, m in enumerate(AV):
                assert out[f"dropped.{m}"].item() == pytest.approx(1 - mask[:, k].mean().item(), abs=1e-6)
        executed.append(ran)
    # the run covers both draws, and a drop that zeroed features of the modality that leads
    assert True in executed and False in executed[2:]
    assert max(max(o["dropped.audio"].item(), o["dropped.visual"].item()) for o in outs) > 0
    # only the leading modality is ever dropped
    assert all(min(o["drop_prob.audio"].item(), o["drop_prob.visual"].item()) == 0.0 for o in outs)


def test_the_equality_fails_when_the_drop_is_wrong(monkeypatch):
    """The comparison can fail: rescaling by 1 instead of 1/(1 - theta) is caught."""
    import mmbalance.methods.opm as opm

    def unscaled(feats, masks, theta, eps=0.0):
        return {m: f * masks[k][:, None] for k, (m, f) in enumerate(feats.items())}

    monkeypatch.setattr(opm, "drop_features", unscaled)
    *_, diff = bml_beside([6, 6, 6, 6], seed=14)
    assert diff > 1e-3


# ------------------------------------------- beside BalanceBenchmark's OPMTrainer


class ConcatFusion_N(nn.Module):  # noqa: N801 -- BalanceBenchmark's name (fusion_arch.py L33-40)
    def __init__(self, fc_out: nn.Linear) -> None:
        super().__init__()
        self.fc_out = fc_out

    def forward(self, encoder_res):
        output = torch.cat(list(encoder_res.values()), dim=1)
        output = self.fc_out(output)
        return output


class BBModel(nn.Module):
    """BaseClassifierModel (avclassify_model.py @ 4c1482f L185-300) for concat fusion, around
    copies of the suite's encoders (encoder_process: they return features, as its Transformer_)."""

    def __init__(self, encoders: dict[str, nn.Module], fc_out: nn.Linear) -> None:
        super().__init__()
        self.modality_encoder = nn.ModuleDict(encoders)
        self.modalitys = self.modality_encoder.keys()
        self.modality_size = {m: e.out_dim for m, e in encoders.items()}
        self.fusion = "concat"
        self.fusion_module = ConcatFusion_N(fc_out)
        self.device = "cpu"

    def forward(self, batch):
        self.encoder_result = {}
        for modality in self.modalitys:
            self.encoder_result[modality] = self.modality_encoder[modality](batch[modality])
        self.encoder_result["output"] = self.fusion_module(self.encoder_result)
        self.unimodality_calculate()
        return self.encoder_result, self.unimodal_result, self.prediction

    def unimodality_calculate(self):
        all_nums = len(self.encoder_result.keys()) - 1
        self.unimodal_result = {}
        self.prediction = {}
        now_size = 0
        for modality in self.encoder_result.keys():
            if modality == "output":
                self.unimodal_result[modality] = self.encoder_result[modality]
                continue
            if self.fusion == "concat":
                self.unimodal_result[modality] = (torch.mm(self.encoder_result[modality], torch.transpose(
                    self.fusion_module.fc_out.weight[:, now_size:now_size + self.modality_size[modality]], 0, 1))
                    + self.fusion_module.fc_out.bias / all_nums)
                now_size += self.modality_size[modality]
        softmax = nn.Softmax(dim=1)
        for modality in self.unimodal_result.keys():
            self.prediction[modality] = torch.argmax(softmax(self.unimodal_result[modality]), dim=1)
        return self.encoder_result, self.unimodal_result, self.prediction


class BBModalityDrop:
    """OPM_trainer.py L16-49 (Modality_drop), plus one instrumentation line keeping the mask."""

    def __init__(self, dim_list, p_exe=0.7, device="cpu"):
        self.dim_list = dim_list
        self.p_exe = p_exe
        self.device = device

    def execute_drop(self, feat_list, q, model):
        modality_list = list(model.modalitys)
        B = feat_list[modality_list[0]].shape[0]
        exe_drop = torch.tensor(np.random.rand(1)).to(device=self.device) >= 1 - self.p_exe
        if not exe_drop:
            return feat_list, torch.ones([B], dtype=torch.float32, device=self.device)
        d_sum = sum(self.dim_list.values())
        q_sum = sum(self.dim_list[m] * q[m] for m in modality_list)
        theta = q_sum / d_sum
        num_mod = len(modality_list)
        q_temp = torch.tensor([q[m] for m in modality_list], device=self.device)
        mask = torch.distributions.Bernoulli(1 - q_temp).sample([B, 1]).permute(2, 1, 0).contiguous().reshape(
            num_mod, B, -1).to(self.device)
        cleaned = {}
        for idx, modality in enumerate(modality_list):
            D = feat_list[modality].shape[1]
            current_mask = mask[idx].expand(-1, D)
            cleaned_fea = torch.mul(feat_list[modality], current_mask)
            cleaned_fea = cleaned_fea / (1 - theta + 1e-5)
            cleaned[modality] = cleaned_fea
        mask = mask.squeeze(-1).transpose(0, 1)  # [B,num_mod]
        self.mask = mask  # instrumentation: not in the trainer
        update_flag = torch.sum(mask, dim=1) > 0
        for modality in modality_list:
            cleaned[modality] = cleaned[modality][update_flag]
        return cleaned, update_flag


def bb_clip(a, b, c):  # OPM_trainer.py L52-57
    if b < a:
        return a
    if c < b:
        return c
    return b


def bb_training_step(trainer, model, batch, batch_idx):
    """OPMTrainer.training_step, L138-208, without L148 (`model.Unimodality_Calculate()`: renamed
    in the release, an AttributeError at HEAD; forward already computed the unimodal logits)."""
    softmax = nn.Softmax(dim=1)
    criterion = nn.CrossEntropyLoss()
    relu = nn.ReLU(inplace=True)
    tanh = nn.Tanh()
    label = batch["label"]
    model(batch)
    loss = {}
    modality_list = model.modalitys
    modality_nums = len(modality_list)
    scores, ratios, coeffs = {}, {}, {}
    if trainer.modulation_starts <= trainer.current_epoch <= trainer.modulation_ends:
        for modality in modality_list:
            scores[modality] = sum([softmax(model.unimodal_result[modality])[i][label[i]]
                                    for i in range(model.unimodal_result["output"].shape[0])])
        for modality in modality_list:
            ratios[modality] = scores[modality]
            if modality_nums == 2:
                for modality_another in modality_list:
                    if modality_another == modality:
                        continue
                    ratios[modality] /= (scores[modality_another] + 1e-5)
                    ratios[modality] = tanh(relu(ratios[modality] - 1))
            if modality_nums == 3:
                temp_score = 0.0
                for modality_another in modality_list:
                    if modality_another == modality:
                        continue
                    temp_score += scores[modality_another]
                ratios[modality] /= (temp_score + 1e-5)
                ratios[modality] = tanh(relu(ratios[modality] - 1))
        for modality in modality_list:
            coeffs[modality] = trainer.q_base * (1 + trainer.alpha * ratios[modality]) if ratios[modality] > 0 else 0
            coeffs[modality] = bb_clip(coeffs[modality], 0.0, 1.0)
        model.encoder_result.pop("output")
        cleaned_fea, update_flag = trainer.modality_drop.execute_drop(model.encoder_result, coeffs, model)
        model.unimodal_result["output"] = model.fusion_module(cleaned_fea)
        select_mask = update_flag != 0
        label = label[select_mask]
        for modality in modality_list:
            model.unimodal_result[modality] = model.unimodal_result[modality][select_mask]
        for modality in model.unimodal_result.keys():
            loss[modality] = criterion(model.unimodal_result[modality], label)
        loss["output"].backward()
    trainer.record = {"loss": loss["output"].detach(), "q": coeffs, "flag": update_flag}
    return loss["output"]


BB_PARAMS = dict(variant="balancebenchmark", q_base=0.4, lam=0.5, p_exe=0.7, modulation_starts=0,
                 modulation_ends=80)  # configs/trainer_config.yaml's OPM block


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # its L33, on its q
@pytest.mark.parametrize("names,dims", [(AV, {"audio": 6, "visual": 4}),
                                        (("audio", "visual", "text"), {"audio": 6, "visual": 4, "text": 5})])
def test_balancebenchmark_variant_equals_its_trainer(names, dims):
    method = attached(OPM(OPMParams(**BB_PARAMS), setup(names, dims)))
    model = BBModel({m: copy.deepcopy(method.encoders[m]) for m in names}, copy.deepcopy(method.fusion.fc_out))
    trainer = type("Trainer", (), {})()
    trainer.q_base, trainer.alpha, trainer.current_epoch = 0.4, 0.5, 3
    trainer.modulation_starts, trainer.modulation_ends = 0, 80
    trainer.modality_drop = BBModalityDrop(model.modality_size, p_exe=0.7)
    optimizer = sgd(model.parameters())
    batches = make_batches(names, n=8)
    outs = steps(method, batches, [3] * len(batches), seed=5)
    np.random.seed(5)
    torch.manual_seed(5)
    kept, both = [], False
    for i, (batch, out) in enumerate(zip(batches, outs)):
        trainer.modality_drop.mask = None
        optimizer.step(partial(bb_training_step, trainer, model, {**batch.inputs, "label": batch.labels}, i))
        optimizer.zero_grad()
        rec = trainer.record
        assert out["loss"].item() == pytest.approx(rec["loss"].item(), abs=TOL)
        for m in names:
            q_ref = float(torch.as_tensor(rec["q"][m]).detach())
            assert out[f"drop_prob.{m}"].item() == pytest.approx(q_ref, abs=TOL), (i, m)
        mask = trainer.modality_drop.mask
        assert out["executed"].item() == float(mask is not None)
        if mask is not None:
            for k, m in enumerate(names):
                assert out[f"dropped.{m}"].item() == pytest.approx(1 - mask[:, k].mean().item(), abs=1e-6)
            kept.append(int(rec["flag"].sum()))
            both |= out["drop_prob.audio"].item() > 0 and out["drop_prob.visual"].item() > 0
            # the in-place ratios: the last modality divides by the others' ratios, and leads
            assert out[f"drop_prob.{names[-1]}"].item() > 0
    pairs = [(method.encoders[m], model.modality_encoder[m]) for m in names] + [(method.fusion.fc_out,
                                                                                  model.fusion_module.fc_out)]
    diff = largest_difference(pairs)
    assert diff <= TOL, diff
    assert 0.0 in [o["executed"].item() for o in outs]
    if len(names) == 2:  # both modalities dropped in a step, whole samples left out
        assert both and min(kept) < B


@pytest.mark.parametrize("variant", ["bml", "balancebenchmark"])
def test_q_grad_none_is_a_constant_drop_written_by_hand(variant):
    """q_grad=none: the drop with q, theta and the masks constants of the step, written
    independently here; q_grad=code (the reference codes) trains differently on the same steps."""
    bb, eps = variant == "balancebenchmark", (1e-5 if variant == "balancebenchmark" else 0.0)
    made = {g: attached(OPM(OPMParams(variant=variant, q_grad=g, p_exe=1.0, modulation_starts=0), setup()))
            for g in ("none", "code")}
    ref = copy.deepcopy(made["none"])
    optimizer = sgd(ref.parameters())
    batches = make_batches(n=4)
    outs = {g: steps(m, batches, [0] * 4, seed=2) for g, m in made.items()}
    np.random.seed(2)
    torch.manual_seed(2)
    for batch, out in zip(batches, outs["none"]):
        np.random.rand(1)  # the executing draw (p_exe = 1: always executed)
        optimizer.zero_grad()
        f = {m: ref.encoders[m](batch.inputs[m]) for m in AV}
        y = batch.labels
        with torch.no_grad():
            W, b = ref.fusion.fc_out.weight, ref.fusion.fc_out.bias
            s = {m: F.softmax(f[m] @ W[:, 6 * k:6 * k + 6].t() + b / 2, 1)[torch.arange(B), y].sum()
                 for k, m in enumerate(AV)}
            rho_a = s["audio"] / (s["visual"] + eps)
            rho_v = s["visual"] / ((rho_a if bb else s["audio"]) + eps)
            q = [min(1.0, 0.5 * (1 + 0.5 * math.tanh(r - 1))) if r > 1 else 0.0 for r in (rho_a.item(), rho_v.item())]
            keep = torch.bernoulli(torch.tensor([1 - q[0], 1 - q[1]]).expand(B, 1, 2))[:, 0, :]  # B x 2
            theta = (6 * q[0] + 6 * q[1]) / 12
        z = ref.fusion.fc_out(torch.cat([f["audio"] * keep[:, :1], f["visual"] * keep[:, 1:]], 1) / (1 - theta + eps))
        kept = keep.amax(1)
        loss = (F.cross_entropy(z, y, reduction="none") * kept).sum() / kept.sum()
        loss.backward()
        optimizer.step()
        assert out["loss"].item() == pytest.approx(loss.item(), abs=TOL)
        assert [out["drop_prob.audio"].item(), out["drop_prob.visual"].item()] == pytest.approx(q, abs=TOL)
    assert largest_difference([(made["none"], ref)]) <= TOL
    assert largest_difference([(made["code"], ref)]) > 1e-4


@pytest.mark.parametrize("variant,eps,sequential", [("bml", 0.0, False), ("balancebenchmark", 1e-5, True)])
def test_each_variant_hands_its_guards_to_the_ratio_and_the_rescaling(monkeypatch, variant, eps, sequential):
    """BalanceBenchmark's 1e-5 guards move parameters by about 1e-6 over a few steps, below the
    equality test's tolerance, so their wiring is checked here."""
    import mmbalance.methods.opm as opm

    seen = {}

    def spy(name):
        original = getattr(opm, name)

        def wrapped(*args, **kwargs):
            seen[name] = (args, kwargs)
            return original(*args, **kwargs)
        return wrapped

    for name in ("score_ratios", "drop_features"):
        monkeypatch.setattr(opm, name, spy(name))
    method = attached(OPM(OPMParams(variant=variant, p_exe=1.0, modulation_starts=0), setup()))
    method.training_step(make_batches(n=1)[0])
    (_, ratio_eps), kwargs = seen["score_ratios"]
    assert ratio_eps == eps and kwargs == {"sequential": sequential}
    assert seen["drop_features"][0][3] == eps


def test_variants_differ_on_the_same_steps():
    def final(variant):
        method = attached(OPM(OPMParams(variant=variant, modulation_starts=0), setup()))
        steps(method, make_batches(n=4), [0] * 4, seed=14)
        return method.fusion.fc_out.weight.detach()

    assert not torch.allclose(final("bml"), final("balancebenchmark"), atol=1e-4)


# ------------------------------------------------------------------------- the window


def test_window_is_inclusive_and_open_ended_by_default():
    method = OPM(OPMParams(), setup(epochs=100))
    assert [method.in_window(e) for e in (0, 5, 6, 99)] == [False, False, True, True]
    windowed = OPM(OPMParams(modulation_starts=2, modulation_ends=4), setup())
    assert [windowed.in_window(e) for e in range(6)] == [False, False, True, True, True, False]


def test_params_are_validated():
    with pytest.raises(ValueError, match="never open"):
        OPMParams(modulation_starts=5, modulation_ends=4)
    with pytest.raises(ValueError, match="less than or equal to 1"):
        OPMParams(p_exe=1.5)
    with pytest.raises(ConfigError, match="model.fusion='film'"):
        OPM(OPMParams(), setup(fusion="film"))
    with pytest.raises(ConfigError, match="modulation_starts=6 is not below train.epochs=4"):
        OPM(OPMParams(), setup(epochs=4))


# ----------------------------------------------------------- switched-off equivalence


def joint_beside(params: OPMParams, epochs, fusion="concat", tol=0.0):
    late = {"late_loss": "fused"} if fusion == "late" else {}
    joint = attached(Joint(JointParams(**late), setup(fusion=fusion, seed=3)))
    opm = attached(OPM(params, setup(fusion=fusion, seed=3)))
    batches = make_batches(n=len(epochs))
    steps(joint, batches, epochs, seed=0)
    outs = steps(opm, batches, epochs, seed=0)
    for key, value in joint.state_dict().items():
        assert torch.allclose(opm.state_dict()[key], value, atol=tol, rtol=0), key
    return outs


@pytest.mark.parametrize("fusion", ["concat", "sum", "late"])
def test_p_exe_0_equals_joint_exactly(fusion):
    outs = joint_beside(OPMParams(p_exe=0.0, modulation_starts=0), [0, 1, 2, 3], fusion)
    assert all(o["executed"].item() == 0.0 and o["modulated"].item() == 1.0 for o in outs)


def test_q_base_0_equals_joint_and_outside_the_window_exactly():
    outs = joint_beside(OPMParams(q_base=0.0, p_exe=1.0, modulation_starts=0), [0, 1, 2, 3], tol=1e-6)
    assert all(o["executed"].item() == 1.0 and o["dropped.audio"].item() == 0.0 for o in outs)
    joint_beside(OPMParams(p_exe=1.0), [0, 1, 2, 5])  # the warm-up: epochs 0-5


@pytest.mark.parametrize("fusion", ["sum", "late"])
def test_sum_and_late_drop_with_their_own_split(fusion):
    method = attached(OPM(OPMParams(p_exe=1.0, modulation_starts=0), setup(fusion=fusion)))
    batch = make_batches(n=1)[0]
    with torch.no_grad():
        feats = method.encode(batch.inputs)
        own = method.fusion.per_modality(feats)
    p = {m: F.softmax(own[m], 1).gather(1, batch.labels[:, None]).sum() for m in AV}
    out = method.training_step(batch)
    assert out["ratio.audio"].item() == pytest.approx((p["audio"] / p["visual"]).item(), rel=1e-5)
    assert out["executed"].item() == 1.0


def test_predict_has_no_side_effects_and_never_drops():
    method = OPM(OPMParams(p_exe=1.0, modulation_starts=0), setup()).eval()
    batch = make_batches(n=1)[0]
    state = copy.deepcopy(method.state_dict())
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    with torch.no_grad():
        first, second = method.predict(batch), method.predict(batch)
        feats = method.encode(batch.inputs)
    assert torch.equal(first.fused, second.fused) and torch.equal(first.fused, method.fusion(feats))
    assert all(torch.equal(first.per_modality[m], method.fusion.per_modality(feats)[m]) for m in AV)
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in state.items())
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)


# ---------------------------------------------------------------------- through the harness

HARNESS = ["method.name=opm", "method.modulation_starts=1", "train.epochs=3"]


def test_harness_off_equals_joint_and_on_reports_the_drop(fast_config, tmp_path):
    joint = run(fast_config("method.name=joint", "train.epochs=3"), Store(tmp_path / "joint"))
    off = run(fast_config(*HARNESS, "method.p_exe=0"), Store(tmp_path / "off"))
    mj, mo = RunDir(joint.path).read_metrics(), RunDir(off.path).read_metrics()
    for rj, ro in zip(without_timing(mj), without_timing(mo)):
        assert ro["val"] == rj["val"] and ro["test"] == rj["test"] and ro["train"]["loss"] == rj["train"]["loss"]
    for key in ("best_val", "best_test", "last", "probes"):
        assert off.summary[key] == joint.summary[key], key
    on = run(fast_config(*HARNESS, "method.p_exe=1"), Store(tmp_path / "on"))
    history = RunDir(on.path).read_metrics()
    assert [r["train"]["modulated"] for r in history] == [0.0, 1.0, 1.0]
    assert [r["train"]["executed"] for r in history] == [0.0, 1.0, 1.0]
    assert set(without_timing(history)[1]["train"]) == {"loss", "modulated", "executed", *(
        f"{k}.{m}" for k in ("ratio", "drop_prob", "dropped") for m in AV)}
    assert max(history[2]["train"]["dropped.audio"], history[2]["train"]["dropped.visual"]) > 0
    for key in ("forward_passes_per_step", "backward_passes_per_step"):  # joint's cost: 1F + 1B
        assert on.summary["cost"][key] == joint.summary["cost"][key] == 1.0


@pytest.mark.parametrize("variant", ["bml", "balancebenchmark"])
def test_three_modalities_through_the_harness(fast_config, store, variant):
    result = run(fast_config("dataset.name=gaussian3", *HARNESS, "method.p_exe=1", f"method.variant={variant}"), store)
    history = RunDir(result.path).read_metrics()
    names = ("audio", "visual", "text")
    assert set(history[-1]["val"]["modality_acc"]) == set(names)
    train = history[-1]["train"]
    assert train["executed"] == 1.0 and all(train[f"ratio.{m}"] > 0 for m in names)
    if variant == "bml":
        # s_m over the SUM of the others: only a modality holding more than half of the total
        # score is dropped, and none does on gaussian3
        assert all(train[f"ratio.{m}"] < 1 and train[f"drop_prob.{m}"] == 0 for m in names)
    else:
        # the in-place ratios: text divides by the two others' ratios, leads and is dropped
        assert train["ratio.text"] > 1 and train["dropped.text"] > 0


def test_resume_is_exact(fast_config, store, tmp_path, monkeypatch):
    # the executing draw (numpy) and the masks (torch) both come from checkpointed RNGs
    cfg = fast_config("method.name=opm", "method.modulation_starts=0")
    assert_resumes_exactly(cfg, store, tmp_path, monkeypatch)


def test_bench_times_opm_inside_its_window(tmp_path):
    import json

    from mmbalance.bench.cli import main as cli

    out = tmp_path / "bench.json"
    assert cli(["bench", "--quick", "--only", "steps", "--device", "cpu", "--methods", "opm", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["steps"]
    assert [r["method"] for r in rows] == ["joint", "opm (window open)"]
    assert rows[1]["forward_passes_per_step"] == rows[1]["backward_passes_per_step"] == 1.0
