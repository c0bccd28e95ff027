"""MBSD: the pair weights and terms by hand; the method beside a transcription of
BalanceBenchmark's MBSDTrainer on identical tiny models, batches and RNG (two and three
modalities); the window; switched-off equivalence with joint training; M >= 4, cost, resume and
bench through the harness."""

from __future__ import annotations

import copy
import json
from functools import partial

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
from mmbalance.methods.mbsd import MBSD, MBSDParams, distillation, pair_terms, pair_weights
from tests.conftest import assert_resumes_exactly, largest_difference, mlp_setup, step_context, without_timing
from tests.test_opm import BBModel  # BalanceBenchmark's BaseClassifierModel, concat fusion

C = 4
B = 16
AV = ("audio", "visual")
AVT = ("audio", "visual", "text")
TOL = 1e-5  # the bound for parameters and reported quantities against released code


def setup(names=AV, fusion="concat", seed=0) -> MethodSetup:
    dims = {m: 6 - k for k, m in enumerate(names)}  # unequal widths: the head's split matters
    return mlp_setup(names, C, dims=dims, fusion=fusion, epochs=10, seed=seed)


def make_batches(names=AV, n=6, seed=1) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [Batch({m: 2 * torch.randn(B, 5, generator=gen) for m in names}, torch.randint(0, C, (B,), generator=gen))
            for _ in range(n)]


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def attached(method):
    method.attach(step_context(lambda: sgd(method.parameters())))
    return method


def steps(method, batches, epochs) -> list[dict]:
    outs = []
    for epoch, batch in zip(epochs, batches):
        method.step_context.epoch = epoch
        outs.append(method.training_step(batch))
    return outs




# ------------------------------------------------------------------------------- by hand


def test_pair_weights_and_terms_by_hand():
    p_i = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8]])
    p_j = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.6, 0.4]])
    y = torch.tensor([0, 0, 1])
    w, ps, pw = pair_weights(p_i, p_j, y)
    # sample 0: i right (0.7 vs 0.5); sample 1: j right (0.9 vs 0.4); sample 2: i right (0.8 vs 0.4)
    assert ps.tolist() == pytest.approx([0.7, 0.9, 0.8]) and pw.tolist() == pytest.approx([0.5, 0.4, 0.4])
    assert w.tolist() == pytest.approx([0.2, 0.5, 0.4])
    # other labels: sample 0 both wrong (j's 0.5/0.5 tie is argmax 0), sample 1 i right, sample 2 j right
    assert pair_weights(p_i, p_j, torch.tensor([1, 1, 0]))[0].tolist() == pytest.approx([0.0, 0.5, 0.4])
    rs, kl = pair_terms(p_i, p_j, w, ps, pw)
    sq = ((p_i - p_j) ** 2).sum(1) / 2
    assert rs.item() == pytest.approx((w * sq).sum().item() / 3, rel=1e-6)
    by_hand = pw * (torch.log(pw) - ps)  # torch's kl_div(input=ps, target=pw): ps read as a log-probability
    assert kl.item() == pytest.approx((w * by_hand).sum().item() / 3, rel=1e-6)


def test_distillation_compares_logits_for_two_branches_and_probabilities_for_three():
    gen = torch.Generator().manual_seed(0)
    z = {m: 3 * torch.randn(8, C, generator=gen) for m in AVT}
    y = torch.randint(0, C, (8,), generator=gen)
    p = {m: F.softmax(v, 1) for m, v in z.items()}
    rs2, kl2, _ = distillation({m: z[m] for m in AV}, y)
    w, ps, pw = pair_weights(p["audio"], p["visual"], y)
    assert rs2.item() == pytest.approx(pair_terms(z["audio"], z["visual"], w, ps, pw)[0].item(), rel=1e-6)
    rs3, kl3, _ = distillation(z, y)
    pairs = [pair_terms(p[i], p[j], *pair_weights(p[i], p[j], y)) for i, j in
             (("audio", "visual"), ("audio", "text"), ("visual", "text"))]
    assert rs3.item() == pytest.approx(sum(t[0].item() for t in pairs) / 3, rel=1e-6)
    assert kl3.item() == pytest.approx(sum(t[1].item() for t in pairs) / 3, rel=1e-6)


# ----------------------------------------------- beside BalanceBenchmark's MBSDTrainer


def bb_training_step(trainer, model, batch, batch_idx):
    """MBSDTrainer.training_step (MBSD_trainer.py @ 4c1482f L96-240) without L131
    (`model.Unimodality_Calculate()`: renamed in the release, an AttributeError at HEAD; forward
    already computed the unimodal logits). Records what the suite reports."""
    criterion = nn.CrossEntropyLoss()
    softmax = nn.Softmax(dim=1)
    modality_list = model.modalitys
    key = list(modality_list)
    m, loss, loss_modality, prediction, y_pred = {}, {}, {}, {}, {}
    model(batch)
    for modality in modality_list:
        m[modality] = model.encoder_result[modality]
    m["out"] = model.encoder_result["output"]
    label = batch["label"]
    device = model.device
    loss["out"] = criterion(m["out"], label)
    for modality in modality_list:
        loss_modality[modality] = criterion(model.unimodal_result[modality], label)
    for modality in modality_list:
        prediction[modality] = softmax(model.unimodal_result[modality])
    n = len(m["out"])
    loss_RS = loss_KL = None
    if trainer.modulation_starts <= trainer.current_epoch <= trainer.modulation_ends:
        for modality in modality_list:
            y_pred[modality] = prediction[modality].argmax(dim=-1)
        if len(modality_list) == 2:
            loss_RS = 1 / model.unimodal_result[key[0]].shape[1] * torch.sum(
                (model.unimodal_result[key[0]] - model.unimodal_result[key[1]]) ** 2, dim=1)
            w = torch.tensor([0.0 for _ in range(n)]).to(device)
            ps = torch.tensor([0.0 for _ in range(n)]).to(device)
            pw = torch.tensor([0.0 for _ in range(n)]).to(device)
            for i in range(n):
                if y_pred[key[0]][i] == label[i] or y_pred[key[1]][i] == label[i]:
                    w[i] = max(prediction[key[0]][i][label[i]], prediction[key[1]][i][label[i]]) - min(
                        prediction[key[0]][i][label[i]], prediction[key[1]][i][label[i]])
                ps[i] = max(prediction[key[0]][i][label[i]], prediction[key[1]][i][label[i]])
                pw[i] = min(prediction[key[0]][i][label[i]], prediction[key[1]][i][label[i]])
            loss_KL = F.kl_div(ps, pw, reduction="none")
            w = w.reshape(1, -1)
            loss_KL = torch.mm(w, loss_KL.reshape(-1, 1)) / n
            loss_RS = torch.mm(w, loss_RS.reshape(-1, 1)) / n
            total_loss = loss["out"] + loss_modality[key[0]] + loss_modality[key[1]] + loss_RS.squeeze() \
                + loss_KL.squeeze()
        else:
            pairs = ((0, 1), (0, 2), (1, 2))  # w1/ps1/pw1 .. w3/ps3/pw3 of L176-211, as one loop
            ws = [torch.tensor([0.0 for _ in range(n)]).to(device) for _ in pairs]
            pss = [torch.tensor([0.0 for _ in range(n)]).to(device) for _ in pairs]
            pws = [torch.tensor([0.0 for _ in range(n)]).to(device) for _ in pairs]
            for i in range(n):
                for k, (a, b) in enumerate(pairs):
                    pa, pb = prediction[key[a]][i][label[i]], prediction[key[b]][i][label[i]]
                    if y_pred[key[a]][i] == label[i] or y_pred[key[b]][i] == label[i]:
                        ws[k][i] = max(pa, pb) - min(pa, pb)
                for k, (a, b) in enumerate(pairs):
                    pa, pb = prediction[key[a]][i][label[i]], prediction[key[b]][i][label[i]]
                    pss[k][i] = max(pa, pb)
                    pws[k][i] = min(pa, pb)
            rs = [1 / model.unimodal_result[key[0]].shape[1] * torch.sum((prediction[key[a]] - prediction[key[b]]) ** 2,
                                                                          dim=1) for a, b in pairs]
            kls = [F.kl_div(pss[k], pws[k], reduction="none") for k in range(3)]
            ws = [w.reshape(1, -1) for w in ws]
            kls = [torch.mm(ws[k], kls[k].reshape(-1, 1)) / n for k in range(3)]
            loss_KL = (kls[0] + kls[1] + kls[2]) / 3
            rs = [torch.mm(ws[k], rs[k].reshape(-1, 1)) / n for k in range(3)]
            loss_RS = (rs[0] + rs[1] + rs[2]) / 3
            total_loss = loss["out"] + loss_modality[key[0]] + loss_modality[key[1]] + loss_modality[key[2]] \
                + loss_KL.squeeze() + loss_RS.squeeze()
    else:
        total_loss = loss["out"]
    total_loss.backward()
    trainer.record = {"loss": total_loss.item(), "fused": loss["out"].item(),
                      "rs": 0.0 if loss_RS is None else loss_RS.item(),
                      "kl": 0.0 if loss_KL is None else loss_KL.item()}
    return total_loss


def released_beside(names, epochs, starts=0, ends=80):
    method = attached(MBSD(MBSDParams(modulation_starts=starts, modulation_ends=ends), setup(names)))
    model = BBModel({m: copy.deepcopy(method.encoders[m]) for m in names}, copy.deepcopy(method.fusion.fc_out))
    trainer = type("Trainer", (), {"modulation_starts": starts, "modulation_ends": ends})()
    optimizer = sgd(model.parameters())
    batches = make_batches(names, n=len(epochs))
    outs = steps(method, batches, epochs)
    refs = []
    for i, (epoch, batch) in enumerate(zip(epochs, batches)):
        trainer.current_epoch = epoch
        optimizer.step(partial(bb_training_step, trainer, model, {**batch.inputs, "label": batch.labels}, i))
        optimizer.zero_grad()
        refs.append(trainer.record)
    pairs = [(method.encoders[m], model.modality_encoder[m]) for m in names] + [
        (method.fusion.fc_out, model.fusion_module.fc_out)]
    return outs, refs, largest_difference(pairs)


@pytest.mark.parametrize("names", [AV, AVT])
def test_equals_balancebenchmark_over_steps_in_and_out_of_its_window(names):
    epochs = [0, 1, 1, 2, 2, 3, 3, 4]  # window 1-3
    outs, refs, diff = released_beside(names, epochs, starts=1, ends=3)
    assert diff <= TOL, diff
    for out, ref, epoch in zip(outs, refs, epochs):
        for ours, theirs in (("loss", "loss"), ("loss_fused", "fused"), ("loss_rs", "rs"), ("loss_kl", "kl")):
            assert out[ours].item() == pytest.approx(ref[theirs], abs=TOL), (epoch, ours)
        assert out["modulated"].item() == float(1 <= epoch <= 3)
    # the distillation terms were live and moved the parameters
    assert min(abs(o["loss_rs"].item()) for o in outs[1:7]) > 0 and min(o["weight"].item() for o in outs[1:7]) > 0


def test_the_equality_fails_when_the_weights_are_wrong(monkeypatch):
    """The comparison can fail: weighting every sample (not only those a branch gets right) is caught."""
    import mmbalance.methods.mbsd as mbsd

    original = mbsd.pair_weights

    def every_sample(probs_i, probs_j, labels):
        _, ps, pw = original(probs_i, probs_j, labels)
        return ps - pw, ps, pw

    monkeypatch.setattr(mbsd, "pair_weights", every_sample)
    *_, diff = released_beside(AV, [0, 0, 0, 0])
    assert diff > 1e-4


# ----------------------------------------------------------- switched-off equivalence


@pytest.mark.parametrize("fusion", ["concat", "sum", "late"])
def test_window_closed_equals_joint_exactly(fusion):
    late = {"late_loss": "fused"} if fusion == "late" else {}
    joint = attached(Joint(JointParams(**late), setup(fusion=fusion, seed=3)))
    mbsd = attached(MBSD(MBSDParams(modulation_starts=5), setup(fusion=fusion, seed=3)))
    batches = make_batches(n=4)
    steps(joint, batches, [0, 1, 2, 3])
    outs = steps(mbsd, batches, [0, 1, 2, 3])
    for key, value in joint.state_dict().items():
        assert torch.equal(mbsd.state_dict()[key], value), key
    assert all(o["modulated"].item() == 0.0 and o["loss"].item() == o["loss_fused"].item() for o in outs)
    # and open, it trains otherwise
    opened = attached(MBSD(MBSDParams(), setup(fusion=fusion, seed=3)))
    steps(opened, batches, [0, 1, 2, 3])
    assert largest_difference([(opened, mbsd)]) > 1e-4


def test_params_are_validated():
    with pytest.raises(ValueError, match="never open"):
        MBSDParams(modulation_starts=5, modulation_ends=4)
    for fusion in ("film", "gated"):
        with pytest.raises(ConfigError, match=f"model.fusion='{fusion}' does not have"):
            MBSD(MBSDParams(), setup(fusion=fusion))


def test_four_modalities_average_every_pair():
    names = ("audio", "visual", "text", "depth")
    method = attached(MBSD(MBSDParams(), setup(names)))
    batch = make_batches(names, n=1)[0]
    with torch.no_grad():
        logits = method.fusion.per_modality(method.encode(batch.inputs))
        p = {m: F.softmax(z, 1) for m, z in logits.items()}
        pairs = [pair_terms(p[i], p[j], *pair_weights(p[i], p[j], batch.labels))
                 for k, i in enumerate(names) for j in names[k + 1:]]
    out = method.training_step(batch)
    assert len(pairs) == 6
    assert out["loss_rs"].item() == pytest.approx(sum(t[0].item() for t in pairs) / 6, rel=1e-5)
    assert out["loss_kl"].item() == pytest.approx(sum(t[1].item() for t in pairs) / 6, rel=1e-5)


# ---------------------------------------------------------------------- through the harness

HARNESS = ["method.name=mbsd", "train.epochs=3"]


def test_harness_reports_and_counts_joints_cost(fast_config, tmp_path):
    joint = run(fast_config("method.name=joint", "train.epochs=3"), Store(tmp_path / "joint"))
    on = run(fast_config(*HARNESS, "method.modulation_starts=1"), Store(tmp_path / "on"))
    history = RunDir(on.path).read_metrics()
    assert [r["train"]["modulated"] for r in history] == [0.0, 1.0, 1.0]
    assert set(without_timing(history)[1]["train"]) == {"loss", "loss_fused", "loss_rs", "loss_kl", "weight",
                                                        "modulated", "conf.audio", "conf.visual"}
    assert history[0]["train"]["loss_rs"] == 0.0 and history[2]["train"]["loss_rs"] > 0
    for key in ("forward_passes_per_step", "backward_passes_per_step"):  # joint's cost: 1F + 1B
        assert on.summary["cost"][key] == joint.summary["cost"][key] == 1.0


def test_three_modalities_through_the_harness(fast_config, store):
    result = run(fast_config("dataset.name=gaussian3", *HARNESS), store)
    history = RunDir(result.path).read_metrics()
    assert set(history[-1]["val"]["modality_acc"]) == set(AVT)
    assert history[-1]["train"]["loss_kl"] != 0.0 and all(history[-1]["train"][f"conf.{m}"] > 0 for m in AVT)


def test_resume_is_exact(fast_config, store, tmp_path, monkeypatch):
    assert_resumes_exactly(fast_config(*HARNESS), store, tmp_path, monkeypatch)


def test_bench_lists_mbsd_with_joints_pass_counts(tmp_path):
    from mmbalance.bench.cli import main as cli

    out = tmp_path / "bench.json"
    assert cli(["bench", "--quick", "--only", "steps", "--device", "cpu", "--methods", "mbsd", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["steps"]
    assert [r["method"] for r in rows] == ["joint", "mbsd"]
    assert rows[1]["forward_passes_per_step"] == rows[1]["backward_passes_per_step"] == 1.0
