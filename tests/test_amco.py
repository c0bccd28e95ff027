"""AMCo: the mask and the dependence scores by hand; the method beside a transcription of
BalanceBenchmark's AMCoTrainer and BaseClassifierAMCoModel on identical tiny models, batches and
RNG; the window; switched-off equivalence with joint training; three modalities, cost, resume and
bench through the harness."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from mmbalance.bench.store import RunDir, Store
from mmbalance.bench.train import run
from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Batch
from mmbalance.methods.amco import AMCo, AMCoParams, class_mask, dependence_scores, mask_ratio, masked_logits
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.joint import Joint, JointParams
from tests.conftest import assert_resumes_exactly, largest_difference, mlp_setup, step_context, without_timing
from tests.test_opm import ConcatFusion_N  # BalanceBenchmark's fusion_arch.py L33-40

C = 4
B = 16
AV = ("audio", "visual")
TOL = 1e-5  # the bound for parameters and reported quantities against released code


def setup(names=AV, dims=None, fusion="concat", epochs=10, seed=0) -> MethodSetup:
    return mlp_setup(names, C, dims=dims or 6, fusion=fusion, epochs=epochs, seed=seed)


def make_batches(names=AV, n=6, seed=1) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        inputs = {m: torch.randn(B, 5, generator=gen) for m in names}
        inputs["audio"] = inputs["audio"] * 3  # a louder audio: its share of the softmax leads
        out.append(Batch(inputs, torch.randint(0, C, (B,), generator=gen)))
    return out


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def attached(method, epoch=0):
    method.attach(step_context(lambda: sgd(method.parameters()), epoch=epoch))
    return method


def steps(method, batches, epochs, seed) -> list[dict]:
    """Steps in order; on_epoch_start runs where the epoch changes, as the harness calls it."""
    np.random.seed(seed)
    outs, current = [], None
    for epoch, batch in zip(epochs, batches):
        if epoch != current:
            method.on_epoch_start(epoch)
            current = epoch
        method.step_context.epoch = epoch
        outs.append(method.training_step(batch))
    return outs




# ------------------------------------------------------------------------------- by hand


def test_mask_ratio_and_class_mask_by_hand():
    assert mask_ratio(0.0, 0.3) == 0.0
    assert mask_ratio(0.15, 0.3) == pytest.approx(np.sin(np.pi / 4))
    assert mask_ratio(0.3, 0.3) == 1.0 and mask_ratio(5.0, 0.3) == 1.0
    np.random.seed(0)
    mask = class_mask(0.6, 10)  # int(6.0) = 6 zeros
    assert sorted(mask.tolist()) == [0.0] * 6 + [1.0] * 4
    np.random.seed(0)
    ref = np.pad(np.ones(4), (0, 6))
    np.random.shuffle(ref)
    assert np.array_equal(mask, ref)
    assert class_mask(0.0, 5).tolist() == [1.0] * 5 and class_mask(1.0, 5).tolist() == [0.0] * 5


def test_dependence_scores_and_masked_logits_by_hand():
    a = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    v = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    s = dependence_scores({"audio": a, "visual": v})
    e = np.exp
    share0 = (e(2) + 1) / (e(2) + 3)
    share1 = 2 / (2 + e(1) + e(-1))
    assert s["audio"].item() == pytest.approx((share0 + share1) / 2, rel=1e-6)
    assert (s["audio"] + s["visual"]).item() == pytest.approx(1.0, rel=1e-6)
    mask = torch.tensor([1.0, 0.0])
    out = masked_logits({"audio": a, "visual": v}, mask, {"audio": torch.tensor(1.0), "visual": torch.tensor(0.0)})
    assert torch.equal(out["audio"], a * mask) and torch.equal(out["visual"], v)


# ---------------------------------------------- beside BalanceBenchmark's AMCoTrainer


class BBAMCoModel(nn.Module):
    """BaseClassifierAMCoModel (avclassify_model.py @ 4c1482f L326-385), concat fusion, around
    copies of the suite's encoders (encoder_process: they return features). The mask is applied
    as one row for the whole batch (see methods/amco.py on the release's two-row expand)."""

    def __init__(self, encoders, fc_out: nn.Linear, linear_star: nn.Linear) -> None:
        super().__init__()
        self.modality_encoder = nn.ModuleDict(encoders)
        self.modalitys = self.modality_encoder.keys()
        self.modality_size = {m: e.out_dim for m, e in encoders.items()}
        self.fusion = "concat"
        self.fusion_module = ConcatFusion_N(fc_out)
        self.linear_star = linear_star
        self.n_classes = fc_out.out_features
        self.device = "cpu"

    def forward(self, batch, mask=None, dependent_modality={}, pt=0):  # noqa: B006 -- the release's signature
        self.encoder_result = {}
        for modality in self.modalitys:
            self.encoder_result[modality] = self.modality_encoder[modality](batch[modality])
        self.encoder_result["output"] = self.fusion_module(self.encoder_result)
        self.unimodality_calculate(mask, dependent_modality)
        self.encoder_result["output"] = self.linear_star(self.encoder_result["output"])
        self.unimodal_result["output"] = self.encoder_result["output"]

    def unimodality_calculate(self, mask=None, dependent_modality={}):  # noqa: B006
        all_nums = len(self.encoder_result.keys()) - 1
        self.unimodal_result = {"output": torch.zeros_like(self.encoder_result["output"])}
        now_size = 0
        for modality in self.encoder_result.keys():
            if modality == "output":
                continue
            self.unimodal_result[modality] = (torch.mm(self.encoder_result[modality], torch.transpose(
                self.fusion_module.fc_out.weight[:, now_size:now_size + self.modality_size[modality]], 0, 1))
                + self.fusion_module.fc_out.bias / all_nums)
            now_size += self.modality_size[modality]
            if dependent_modality.get(modality, False):
                self.unimodal_result[modality] = torch.mul(self.unimodal_result[modality], mask)
            self.unimodal_result["output"] += self.unimodal_result[modality]
        self.encoder_result["output"] = self.unimodal_result["output"]


class BBTrainer:
    """AMCoTrainer (AMCo_trainer.py @ 4c1482f): train_loop's per-batch lines T:57-92 and
    training_step T:122-160, for one epoch of batches; the mask is one row (T:83 expands it to
    two). Records what the suite reports."""

    def __init__(self, sigma=0.5, eps=0.3, starts=0, ends=80):
        self.sigma, self.eps = sigma, eps
        self.modulation_starts, self.modulation_ends = starts, ends

    def train_epoch(self, model, optimizer, batches, epoch):
        self.current_epoch = epoch
        dependent_modality = dict.fromkeys(model.modalitys, False)
        l_t = 0
        records = []
        for batch in batches:
            pt = np.sin(np.pi / 2 * (min(self.eps, l_t) / self.eps))
            N = int(pt * model.n_classes)
            mask_t = np.ones(model.n_classes - N)
            mask_t = np.pad(mask_t, (0, N))
            np.random.shuffle(mask_t)
            mask_t = torch.from_numpy(mask_t).float().unsqueeze(0)  # the release's expand(2, -1) left out
            l_t += self.current_epoch / 10
            before = dict(dependent_modality)
            loss, dependent_modality, sft = self.training_step(model, batch, dependent_modality, mask_t, pt)
            optimizer.step()
            optimizer.zero_grad()
            records.append({"loss": loss.item(), "pt": pt, "mask": mask_t[0], "dependent": before, "score": sft})
        return records

    def training_step(self, model, batch, dependent_modality, mask, pt):
        criterion = nn.CrossEntropyLoss()
        softmax = nn.Softmax(dim=1)
        window = self.modulation_starts <= self.current_epoch <= self.modulation_ends
        if window:
            model(batch, dependent_modality=dependent_modality, mask=mask, pt=pt)
        else:
            model(batch)
        label = batch["label"]
        out = model.unimodal_result["output"]
        loss = criterion(out, label)
        sft = {}
        if window:
            loss.backward(retain_graph=True)
            for modality in model.modalitys:
                loss_uni = criterion(model.unimodal_result[modality], label)
                loss_uni.backward()
            out_combine = torch.cat([value for key, value in model.unimodal_result.items() if key != "output"], 1)
            sft_out = softmax(out_combine)
            now_dim = 0
            for modality in model.modalitys:
                if now_dim < sft_out.shape[1] - model.n_classes:
                    sft_uni = torch.sum(sft_out[:, now_dim: now_dim + model.n_classes]) / (len(label))
                else:
                    sft_uni = torch.sum(sft_out[:, now_dim:]) / (len(label))
                dependent_modality[modality] = bool(sft_uni > self.sigma)
                sft[modality] = sft_uni.item()
                now_dim += model.n_classes
        else:
            loss.backward()
        return loss, dependent_modality, sft


def released_beside(names, epochs_batches, seed=3, **params):
    """The suite's AMCo and the transcription trained on the same batches and numpy draws;
    returns (suite outputs, reference records, largest parameter difference)."""
    method = attached(AMCo(AMCoParams(**params), setup(names)))
    model = BBAMCoModel({m: copy.deepcopy(method.encoders[m]) for m in names},
                        copy.deepcopy(method.fusion.fc_out), copy.deepcopy(method.linear_star))
    trainer = BBTrainer(sigma=params.get("sigma", 0.5), eps=params.get("eps", 0.3),
                        starts=params.get("modulation_starts", 0), ends=params.get("modulation_ends", 80))
    optimizer = sgd(model.parameters())
    batches = make_batches(names, n=sum(n for _, n in epochs_batches))
    epochs = [e for e, n in epochs_batches for _ in range(n)]
    outs = steps(method, batches, epochs, seed)
    np.random.seed(seed)
    refs, start = [], 0
    for epoch, n in epochs_batches:
        chunk = [{**b.inputs, "label": b.labels} for b in batches[start:start + n]]
        refs += trainer.train_epoch(model, optimizer, chunk, epoch)
        start += n
    pairs = [(method.encoders[m], model.modality_encoder[m]) for m in names] + [
        (method.fusion.fc_out, model.fusion_module.fc_out), (method.linear_star, model.linear_star)]
    return outs, refs, largest_difference(pairs)


# three modalities of these tiny models hold about a third of the mass each: sigma 0.3 marks
# them all dependent (with two, sigma 0.5 marks at most one)
@pytest.mark.parametrize("names,sigma", [(AV, 0.5), (("audio", "visual", "text"), 0.3)])
def test_equals_balancebenchmark_over_epochs_with_masks(names, sigma):
    # epoch 0 never masks (l_t stays 0), epochs 1 and 2 ramp the mask to every class within steps
    outs, refs, diff = released_beside(names, [(0, 3), (1, 4), (2, 3)], sigma=sigma)
    assert diff <= TOL, diff
    for out, ref in zip(outs, refs):
        assert out["loss"].item() == pytest.approx(ref["loss"], abs=TOL)
        assert out["mask_ratio"].item() == pytest.approx(ref["pt"], abs=1e-7)
        for m in names:
            assert out[f"score.{m}"].item() == pytest.approx(ref["score"][m], abs=TOL)
            assert out[f"dependent.{m}"].item() == float(ref["dependent"][m])
            zeroed = 1 - ref["mask"].mean().item() if ref["dependent"][m] else 0.0
            assert out[f"masked.{m}"].item() == pytest.approx(zeroed, abs=1e-7)
    # the run covers a partial mask and the full one on a dependent modality, and a free one
    masked = [max(o[f"masked.{m}"].item() for m in names) for o in outs]
    assert 0 < min(x for x in masked if x > 0) < 1 and max(masked) == 1.0
    assert all(sum(o[f"dependent.{m}"].item() for m in names) <= 1 for o in outs) == (sigma == 0.5)


def test_equals_balancebenchmark_with_its_window_and_sigma():
    """Outside the window (epoch 3 of a 1-2 window) a step is the fused loss alone, and the flags
    hold; a higher sigma marks nothing dependent."""
    outs, _, diff = released_beside(AV, [(0, 2), (1, 3), (3, 3)], modulation_starts=1, modulation_ends=2)
    assert diff <= TOL, diff
    assert [o["modulated"].item() for o in outs] == [0.0] * 2 + [1.0] * 3 + [0.0] * 3
    assert all(o["loss_total"].item() == o["loss"].item() for i, o in enumerate(outs) if i not in (2, 3, 4))
    outs, _, diff = released_beside(AV, [(1, 4)], sigma=0.95)
    assert diff <= TOL, diff
    assert all(o[f"dependent.{m}"].item() == 0.0 for o in outs for m in AV)


def test_the_equality_fails_when_the_mask_is_wrong(monkeypatch):
    """The comparison can fail: masking the modality that is NOT dependent is caught."""
    import mmbalance.methods.amco as amco

    def inverted(logits, mask, dependent):
        return {m: z * ((1 - dependent[m]) * mask + dependent[m]) for m, z in logits.items()}

    monkeypatch.setattr(amco, "masked_logits", inverted)
    *_, diff = released_beside(AV, [(1, 4)])
    assert diff > 1e-3


# ----------------------------------------------------------- switched-off equivalence


def joint_beside(params: AMCoParams, epochs, fusion="concat", tol=0.0):
    joint = attached(Joint(JointParams(), setup(fusion=fusion, seed=3)))
    amco = attached(AMCo(params, setup(fusion=fusion, seed=3)))
    batches = make_batches(n=len(epochs))
    steps(joint, batches, epochs, seed=0)
    outs = steps(amco, batches, epochs, seed=0)
    for key, value in joint.state_dict().items():
        assert torch.allclose(amco.state_dict()[key], value, atol=tol, rtol=0), key
    return outs


def test_window_closed_without_linear_star_equals_joint():
    outs = joint_beside(AMCoParams(modulation_starts=5, linear_star=False), [0, 1, 2, 3], tol=1e-6)
    assert all(o["modulated"].item() == 0.0 for o in outs)


def test_linear_star_switch_in_both_positions():
    star, plain = AMCo(AMCoParams(), setup()), AMCo(AMCoParams(linear_star=False), setup())
    assert isinstance(star.linear_star, nn.Linear) and star.linear_star.weight.shape == (C, C)
    assert plain.linear_star is None
    batch = make_batches(n=1)[0]
    with torch.no_grad():
        feats = star.encode(batch.inputs)
        z = star.fusion(feats)
        assert torch.allclose(star.predict(batch).fused, star.linear_star(z), atol=1e-6)
        assert torch.allclose(plain.predict(batch).fused, plain.fusion(plain.encode(batch.inputs)), atol=1e-6)
    with pytest.raises(AssertionError):  # and the window closed WITH L* is not joint training
        joint_beside(AMCoParams(modulation_starts=5), [0, 1, 2], tol=1e-6)


def test_params_are_validated():
    with pytest.raises(ValueError, match="never open"):
        AMCoParams(modulation_starts=5, modulation_ends=4)
    with pytest.raises(ValueError, match="greater than 0"):
        AMCoParams(eps=0)
    for fusion in ("sum", "film", "late"):
        with pytest.raises(ConfigError, match=f"model.fusion='{fusion}' does not split"):
            AMCo(AMCoParams(), setup(fusion=fusion))


def test_flags_reset_at_every_epoch_start():
    method = attached(AMCo(AMCoParams(), setup()))
    outs = steps(method, make_batches(n=6), [1, 1, 1, 2, 2, 2], seed=0)
    assert max(o["dependent.audio"].item() + o["dependent.visual"].item() for o in outs[:3]) == 1.0
    assert outs[3]["dependent.audio"].item() == outs[3]["dependent.visual"].item() == 0.0
    assert outs[3]["mask_ratio"].item() == 0.0  # l_t restarts too


# ---------------------------------------------------------------------- through the harness

HARNESS = ["method.name=amco", "train.epochs=3"]


def test_harness_reports_and_counts_joints_cost(fast_config, tmp_path):
    joint = run(fast_config("method.name=joint", "train.epochs=3"), Store(tmp_path / "joint"))
    on = run(fast_config(*HARNESS, "method.modulation_starts=1"), Store(tmp_path / "on"))
    history = RunDir(on.path).read_metrics()
    assert [r["train"]["modulated"] for r in history] == [0.0, 1.0, 1.0]
    assert set(without_timing(history)[1]["train"]) == {"loss", "loss_total", "mask_ratio", "modulated", *(
        f"{k}.{m}" for k in ("score", "dependent", "masked") for m in AV)}
    assert history[2]["train"]["mask_ratio"] > 0
    assert max(history[2]["train"]["masked.audio"], history[2]["train"]["masked.visual"]) > 0
    for key in ("forward_passes_per_step", "backward_passes_per_step"):  # joint's cost: 1F + 1B
        assert on.summary["cost"][key] == joint.summary["cost"][key] == 1.0


def test_three_modalities_through_the_harness(fast_config, store):
    result = run(fast_config("dataset.name=gaussian3", *HARNESS), store)
    history = RunDir(result.path).read_metrics()
    names = ("audio", "visual", "text")
    assert set(history[-1]["val"]["modality_acc"]) == set(names)
    train = history[-1]["train"]
    assert sum(train[f"score.{m}"] for m in names) == pytest.approx(1.0, abs=1e-5)


def test_resume_is_exact(fast_config, store, tmp_path, monkeypatch):
    # the masks come from numpy's checkpointed RNG; the flags and l_t restart every epoch
    assert_resumes_exactly(fast_config(*HARNESS), store, tmp_path, monkeypatch)


def test_bench_lists_amco_with_joints_pass_counts(tmp_path):
    from mmbalance.bench.cli import main as cli

    out = tmp_path / "bench.json"
    assert cli(["bench", "--quick", "--only", "steps", "--device", "cpu", "--methods", "amco", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["steps"]
    assert [r["method"] for r in rows] == ["joint", "amco"]
    assert rows[1]["forward_passes_per_step"] == rows[1]["backward_passes_per_step"] == 1.0
