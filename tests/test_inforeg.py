"""InfoReg: the window, the coefficients and the trace by hand; the method beside a transcription of
both releases' training epoch on identical tiny models, batches and optimiser, over several epochs
(so that the window is decided from the traces, and closes); every switch in both positions;
switched-off equivalence with joint training; three modalities, cost and resume through the harness."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from mmbalance.bench.store import RunDir, Store
from mmbalance.bench.train import run
from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Batch
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.inforeg import (
    InfoReg,
    InfoRegParams,
    acquisition_rate,
    fisher_trace,
    regulation_coefficients,
)
from mmbalance.methods.joint import Joint, JointParams
from tests.conftest import assert_resumes_exactly, largest_difference, mlp_setup, step_context, without_timing

C = 3
B = 16
D = 6  # feature size of each encoder
AV = ("audio", "visual")
TOL = 1e-5  # the bound for parameters and reported quantities against released code


def setup(names=AV, fusion="concat", seed=0) -> MethodSetup:
    return mlp_setup(names, C, dims=D, fusion=fusion, epochs=10, seed=seed)


def make_batches(names=AV, n=3, seed=1) -> list[Batch]:
    """Batch i carries the label in modality i % M (plus noise), so that the lead changes hands."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n):
        labels = torch.randint(0, C, (B,), generator=gen)
        signal = 1.5 * nn.functional.one_hot(labels, 5).float()
        inputs = {m: torch.randn(B, 5, generator=gen) + (signal if k == i % len(names) else 0)
                  for k, m in enumerate(names)}
        batches.append(Batch(inputs, labels))
    return batches


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)  # R:714's momentum and decay


def attached(method):
    method.attach(step_context(lambda: sgd(method.parameters())))
    return method


def train_epochs(method, epochs: int, batches) -> list[list[dict]]:
    """The harness's order: on_epoch_start, the steps, on_epoch_end; each epoch's step outputs."""
    outs = []
    for epoch in range(epochs):
        method.step_context.epoch = epoch
        method.on_epoch_start(epoch)
        outs.append([method.training_step(b) for b in batches])
        method.on_epoch_end(epoch)
    return outs




# ------------------------------------------------------------------------------- by hand


def test_acquisition_rate_by_hand():
    assert acquisition_rate([], 10) == 1.0  # epoch 0 (R:237-238)
    assert acquisition_rate([4.0], 10) == 1.0  # tr2 = mean of the padding zeros
    assert acquisition_rate([4.0, 1.0], 10) == pytest.approx((0.5 - 0.4) / 0.5)
    # N = 2: tr1 = (t1 + t2) / 2, tr2 = (t0 + t1) / 2
    assert acquisition_rate([3.0, 2.0, 1.0], 2) == pytest.approx((1.5 - 2.5) / 1.5)
    assert acquisition_rate([0.0, 0.0], 10) == 0.0  # the code divides by zero here: closed


def test_regulation_coefficients_by_hand():
    s = {"audio": torch.tensor(10.0), "visual": torch.tensor(9.5)}
    beta = regulation_coefficients(s, {"audio": 0.95, "visual": 0.1})
    assert beta["audio"].item() == pytest.approx(0.95 * math.exp(math.tanh(0.5)), rel=1e-6)
    assert beta["visual"].item() == 0.0
    tie = regulation_coefficients({"audio": torch.tensor(3.0), "visual": torch.tensor(3.0)}, {"audio": 1, "visual": 1})
    assert tie["audio"].item() == tie["visual"].item() == 0.0  # the code's else branch
    three = {"audio": torch.tensor(2.0), "visual": torch.tensor(7.0), "text": torch.tensor(6.0)}
    beta3 = regulation_coefficients(three, dict.fromkeys(three, 0.5))
    assert beta3["visual"].item() == pytest.approx(0.5 * math.exp(math.tanh(1.0)), rel=1e-6)  # against the runner-up
    assert beta3["audio"].item() == beta3["text"].item() == 0.0


def test_fisher_trace_is_a_sum_of_layer_means():
    assert fisher_trace([torch.tensor([[1.0, 3.0]]), torch.tensor([6.0])]) == pytest.approx(2.0 + 6.0)


# ---------------------------------------------------- beside the releases' training epoch


class RefModel(nn.Module):
    """AVClassifier (models/basic_model.py @ 939b2ed L7-80; the first release's @ 4df625a) around
    copies of the suite's encoders: audio_net, visual_net, head = Linear(2D, C); the first
    release's head_audio/head_video (R's are unused, have no gradient and are left out)."""

    def __init__(self, audio, visual, head, heads=None) -> None:
        super().__init__()
        self.audio_net, self.visual_net, self.head = audio, visual, head
        if heads is not None:
            self.head_audio, self.head_video = heads["audio"], heads["visual"]

    def forward(self, audio, visual):
        a, v = self.audio_net(audio), self.visual_net(visual)
        out = self.head(torch.cat((a, v), 1))
        heads = hasattr(self, "head_audio")
        return a, v, self.head_audio(a) if heads else None, self.head_video(v) if heads else None, out


def release_train_epoch(epoch, model, optimizer, batches, audio_trace_list, visual_trace_list, *,
                        first_release=False, window=10, threshold=None, window_list=None, unimodal_loss=True):
    """train_epoch's update, R:231-604 (V1:58-350 with first_release), without its logging.
    Parameters not in the code (the code's literals are their defaults): `window` (its 10),
    `threshold` (0.05, V1 0.04), `window_list` (its audio_trace_list), `unimodal_loss` (True).
    Departures: no DataParallel (`model.module.` dropped); batches are the suite's feature
    vectors (no spec.unsqueeze(1)); the whole-model FIM loop R:501-505 is left out (it raises a
    TypeError on the unused fusion_module's None gradient, and is never used)."""
    threshold = (0.04 if first_release else 0.05) if threshold is None else threshold
    window_list = audio_trace_list if window_list is None else window_list
    if epoch == 0:  # R:237-243
        k = 1
    else:
        tr1 = sum(window_list[-window:]) / window
        tr2 = sum(window_list[-window - 1:-1]) / window
        k = (tr1 - tr2) / tr1
    criterion = nn.CrossEntropyLoss()
    softmax = nn.Softmax(dim=1)
    tanh = nn.Tanh()
    global_model = copy.deepcopy(model)  # R:259
    model.train()
    fim_audio, fim_visual = {}, {}
    for name, module in model.named_modules():  # R:303-310
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if "audio_net" in name:
                if module.weight.requires_grad:
                    fim_audio[name] = torch.zeros_like(module.weight)
            elif "visual_net" in name:
                if module.weight.requires_grad:
                    fim_visual[name] = torch.zeros_like(module.weight)
    records = []
    for batch in batches:
        spec, image, label = batch.inputs["audio"], batch.inputs["visual"], batch.labels
        optimizer.zero_grad()
        if first_release:  # V1:139
            a, v, out_a, out_v, out = model(spec, image)
        else:  # R:359-363
            a, v, _, _, out = model(spec, image)
            out_v = torch.mm(v, torch.transpose(model.head.weight[:, D:], 0, 1)) + model.head.bias / 2
            out_a = torch.mm(a, torch.transpose(model.head.weight[:, :D], 0, 1)) + model.head.bias / 2
        loss = criterion(out, label)
        loss_out_v = criterion(out_v, label)
        loss_out_a = criterion(out_a, label)
        for loss_tem in [loss, loss_out_a, loss_out_v]:  # R:406-453: gradients only logged, then zeroed
            loss_tem.backward(retain_graph=True)
            optimizer.zero_grad()
        if unimodal_loss:
            loss_out_v.backward(retain_graph=True)  # R:456-458
            loss_out_a.backward(retain_graph=True)
        loss.backward()
        score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])  # R:460-461
        score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])
        if first_release:  # V1:222-234, the elif's condition repeating the if's
            if (score_a > score_v) and k > threshold:
                gap = tanh(score_a - score_v)
                beta = 0.95 * torch.exp(gap)
                beta2 = 0
            elif (score_v < score_a) and k > threshold:
                gap = tanh(score_v - score_a)
                beta2 = 0.1 * torch.exp(gap)
                beta = 0
            else:
                beta = 0
                beta2 = 0
        elif (score_a > score_v) and k > threshold:  # R:465-485
            gap = tanh(score_a - score_v)
            beta = 0.95 * torch.exp(gap)
            beta2 = 0
        elif (score_a < score_v) and k > threshold:
            gap = tanh(score_v - score_a)
            beta2 = 0.1 * torch.exp(gap)
            beta = 0
        else:
            beta = 0
            beta2 = 0
        for model_param, global_model_param in zip(model.parameters(), global_model.parameters()):  # R:489-495
            if model_param.requires_grad and any(model_param is param for param in model.audio_net.parameters()):
                model_param.grad += beta * (model_param - global_model_param)
            if model_param.requires_grad and any(model_param is param for param in model.visual_net.parameters()):
                model_param.grad += beta2 * (model_param - global_model_param)
        for name, module in model.named_modules():  # R:507-514
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                if "audio_net" in name and module.weight.requires_grad:
                    fim_audio[name] += (module.weight.grad * module.weight.grad)
                    fim_audio[name].detach_()
                elif "visual_net" in name and module.weight.requires_grad:
                    fim_visual[name] += (module.weight.grad * module.weight.grad)
                    fim_visual[name].detach_()
        optimizer.step()
        records.append({"loss": loss.item(), "score_a": float(score_a.detach()), "score_v": float(score_v.detach()),
                        "beta": float(torch.as_tensor(beta).detach()), "beta2": float(torch.as_tensor(beta2).detach())})
    fim_trace_audio = 0  # R:569-577
    for name in fim_audio:
        fim_audio[name] = fim_audio[name].mean().item()
        fim_trace_audio += fim_audio[name]
    fim_trace_visual = 0
    for name in fim_visual:
        fim_visual[name] = fim_visual[name].mean().item()
        fim_trace_visual += fim_visual[name]
    visual_trace_list.append(fim_trace_visual)  # R:594-595
    audio_trace_list.append(fim_trace_audio)
    return records, k


def release_beside(params: InfoRegParams, epochs=4, first_release=False, **ref_kwargs):
    """The suite's method and the transcription on the same models, batches and optimiser."""
    method = attached(InfoReg(params, setup()))
    heads = None if method.unimodal_heads is None else copy.deepcopy(method.unimodal_heads)
    ref = RefModel(copy.deepcopy(method.encoders["audio"]), copy.deepcopy(method.encoders["visual"]),
                   copy.deepcopy(method.fusion.fc_out), heads)
    optimizer = sgd(ref.parameters())
    batches = make_batches()
    outs = train_epochs(method, epochs, batches)
    audio_trace_list, visual_trace_list = [0] * 10, [0] * 10  # R:693-694
    if ref_kwargs.get("window_list") == "visual":
        ref_kwargs["window_list"] = visual_trace_list
    refs, ks = [], []
    for epoch in range(epochs):
        records, k = release_train_epoch(epoch, ref, optimizer, batches, audio_trace_list, visual_trace_list,
                                         first_release=first_release, **ref_kwargs)
        refs.append(records)
        ks.append(k)
    for epoch in range(epochs):
        for out, rec in zip(outs[epoch], refs[epoch]):
            assert out["loss_fused" if params.unimodal_loss else "loss"].item() == pytest.approx(rec["loss"], abs=TOL)
            assert out["score.audio"].item() == pytest.approx(rec["score_a"], abs=TOL)
            assert out["score.visual"].item() == pytest.approx(rec["score_v"], abs=TOL)
            assert out["beta.audio"].item() == pytest.approx(rec["beta"], abs=TOL)
            assert out["beta.visual"].item() == pytest.approx(rec["beta2"], abs=TOL)
    assert method.traces["audio"] == pytest.approx(audio_trace_list[10:], abs=TOL)
    assert method.traces["visual"] == pytest.approx(visual_trace_list[10:], abs=TOL)
    pairs = [(method.encoders["audio"], ref.audio_net), (method.encoders["visual"], ref.visual_net),
             (method.fusion.fc_out, ref.head)]
    if heads is not None:
        pairs += [(method.unimodal_heads["audio"], ref.head_audio), (method.unimodal_heads["visual"], ref.head_video)]
    return outs, ks, largest_difference(pairs)


def regulated_epochs(outs, m) -> list[bool]:
    return [any(o[f"beta.{m}"].item() > 0 for o in epoch) for epoch in outs]


def test_release_equals_its_code_over_epochs_with_the_window_open():
    outs, ks, diff = release_beside(InfoRegParams())
    assert diff <= TOL, diff
    assert all(k > 0.05 for k in ks)  # N = 10 over 4 epochs: the window stays open
    # both modalities lead on some step, each regulated with its own coefficient
    assert all(regulated_epochs(outs, "audio")) and any(regulated_epochs(outs, "visual"))


def test_release_equals_its_code_as_the_window_closes():
    """N = 2 and threshold 0.2 (the code's literals as parameters): the window closes and the
    regulation stops, in both."""
    params = InfoRegParams(window_epochs=2, window_threshold=0.2)
    outs, ks, diff = release_beside(params, epochs=5, window=2, threshold=0.2)
    assert diff <= TOL, diff
    open_ = [k > 0.2 for k in ks]
    assert open_[0] and False in open_, ks
    for epoch, is_open in enumerate(open_):
        assert all(o["regulated"].item() == float(is_open) for o in outs[epoch])
        if not is_open:
            assert not regulated_epochs(outs, "audio")[epoch] and not regulated_epochs(outs, "visual")[epoch]


def test_window_from_the_visual_trace_equals_the_code_reading_that_list():
    params = InfoRegParams(window_epochs=2, window_threshold=0.2, window_trace="visual")
    _, ks, diff = release_beside(params, epochs=5, window=2, threshold=0.2, window_list="visual")
    assert diff <= TOL, diff
    _, ks_audio, _ = release_beside(InfoRegParams(window_epochs=2, window_threshold=0.2), epochs=5, window=2,
                                    threshold=0.2)
    assert ks != pytest.approx(ks_audio)  # the switch changes the window


def test_window_from_every_encoder_reads_the_summed_traces():
    """window_trace=all (not in the code): k from the sum of the per-modality traces."""
    params = InfoRegParams(window_epochs=2, window_threshold=0.2, window_trace="all")
    method = attached(InfoReg(params, setup()))
    outs = train_epochs(method, 4, make_batches())
    summed = [a + v for a, v in zip(method.traces["audio"], method.traces["visual"])]
    rates = [acquisition_rate(summed[:e], 2) for e in range(4)]
    assert method.rate == pytest.approx(rates[-1], rel=1e-12)
    assert [o[0]["regulated"].item() for o in outs] == [float(k > 0.2) for k in rates]
    assert rates != pytest.approx([acquisition_rate(method.traces["audio"][:e], 2) for e in range(4)])


def test_first_release_equals_its_code_and_never_regulates_visual():
    outs, ks, diff = release_beside(InfoRegParams(variant="first_release"), first_release=True)
    assert diff <= TOL, diff
    assert any(regulated_epochs(outs, "audio")) and not any(regulated_epochs(outs, "visual"))
    # visual leads on some steps, unregulated (V1's unreachable elif)
    assert any(o["score.visual"].item() > o["score.audio"].item() for epoch in outs for o in epoch)


def test_without_the_unimodal_loss_equals_the_code_without_its_two_backward_passes():
    outs, _, diff = release_beside(InfoRegParams(unimodal_loss=False), unimodal_loss=False)
    assert diff <= TOL, diff
    assert "loss_fused" not in outs[0][0] and any(regulated_epochs(outs, "audio"))


def test_the_equality_fails_when_the_anchor_is_wrong(monkeypatch):
    """The comparison can fail: pulling towards zero (weight decay) instead of the epoch's start."""
    import mmbalance.methods.inforeg as inforeg

    original = inforeg.regulate_
    monkeypatch.setattr(inforeg, "regulate_", lambda params, anchors, beta: original(
        params, [torch.zeros_like(a) for a in anchors], beta))
    with pytest.raises(AssertionError):
        release_beside(InfoRegParams())


def test_a_single_number_alpha_applies_to_every_modality():
    method = attached(InfoReg(InfoRegParams(alpha=0.5), setup()))
    outs = train_epochs(method, 1, make_batches())[0]
    for o in outs:
        lead, other = sorted(AV, key=lambda m: -o[f"score.{m}"].item())
        gap = o[f"score.{lead}"].item() - o[f"score.{other}"].item()
        assert o[f"beta.{lead}"].item() == pytest.approx(0.5 * math.exp(math.tanh(gap)), rel=1e-5)
        assert o[f"beta.{other}"].item() == 0.0


# ----------------------------------------------------------- switched-off equivalence


def joint_beside(params: InfoRegParams, fusion="concat", epochs=3):
    late = {"late_loss": "fused"} if fusion == "late" else {}
    joint = attached(Joint(JointParams(**late), setup(fusion=fusion, seed=3)))
    method = attached(InfoReg(params, setup(fusion=fusion, seed=3)))
    batches = make_batches()
    for epoch in range(epochs):
        joint.step_context.epoch = epoch
        for b in batches:
            joint.training_step(b)
    outs = train_epochs(method, epochs, batches)
    for key, value in joint.state_dict().items():
        assert torch.allclose(method.state_dict()[key], value, atol=1e-6, rtol=0), key
    return outs


@pytest.mark.parametrize("fusion", ["concat", "sum", "late"])
def test_alpha_0_without_the_unimodal_loss_equals_joint(fusion):
    outs = joint_beside(InfoRegParams(alpha=0.0, unimodal_loss=False), fusion)
    assert all(o["regulated"].item() == 1.0 for epoch in outs for o in epoch)  # inside the window, beta = 0


def test_a_closed_window_without_the_unimodal_loss_equals_joint():
    outs = joint_beside(InfoRegParams(window_threshold=1.0, unimodal_loss=False))  # k <= 1 always
    assert all(o["regulated"].item() == 0.0 for epoch in outs for o in epoch)


def test_the_switches_change_the_training():
    def final(**kw):
        method = attached(InfoReg(InfoRegParams(**kw), setup()))
        train_epochs(method, 2, make_batches())
        return method.encoders["audio"].state_dict()

    base = final()
    for kw in ({"alpha": 0.0}, {"unimodal_loss": False}, {"variant": "first_release"}, {"window_threshold": 1.0}):
        assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(base.values(), final(**kw).values())), kw


# ------------------------------------------------------------------------- errors and views


def test_params_and_setups_are_validated():
    with pytest.raises(ValueError, match="must be >= 0"):
        InfoRegParams(alpha={"audio": -1.0, "visual": 0.1})
    with pytest.raises(ValueError, match="only the unimodal loss trains"):
        InfoRegParams(variant="first_release", unimodal_loss=False)
    with pytest.raises(ConfigError, match=r"variant's alpha .* missing \['text'\]"):
        InfoReg(InfoRegParams(), setup(("audio", "visual", "text")))
    with pytest.raises(ConfigError, match=r"method.alpha .* unknown \['video'\]"):
        InfoReg(InfoRegParams(alpha={"audio": 1.0, "visual": 1.0, "video": 1.0}), setup())
    with pytest.raises(ConfigError, match="window_trace='text' is not a modality"):
        InfoReg(InfoRegParams(window_trace="text"), setup())
    with pytest.raises(ConfigError, match="model.fusion='film'"):
        InfoReg(InfoRegParams(), setup(fusion="film"))
    InfoReg(InfoRegParams(variant="first_release"), setup(fusion="film"))  # private heads: any fusion
    with pytest.raises(ConfigError, match="regulates one modality against the others"):
        InfoReg(InfoRegParams(alpha=1.0), setup(("audio",)))
    with pytest.raises(RuntimeError, match="before on_epoch_start"):
        attached(InfoReg(InfoRegParams(), setup())).training_step(make_batches(n=1)[0])


@pytest.mark.parametrize("variant", ["release", "first_release"])
def test_predict_gives_the_unimodal_logits_the_scores_use(variant):
    method = InfoReg(InfoRegParams(variant=variant), setup()).eval()
    batch = make_batches(n=1)[0]
    with torch.no_grad():
        pred = method.predict(batch)
        feats = method.encode(batch.inputs)
    own = (method.fusion.per_modality(feats) if variant == "release"
           else {m: method.unimodal_heads[m](feats[m]) for m in AV})
    assert all(torch.equal(pred.per_modality[m], own[m]) for m in AV)


# ---------------------------------------------------------------------- through the harness

HARNESS = ["method.name=inforeg", "train.epochs=3"]


def test_harness_off_equals_joint_and_on_reports_the_regulation(fast_config, tmp_path):
    joint = run(fast_config("method.name=joint", "train.epochs=3"), Store(tmp_path / "joint"))
    off = run(fast_config(*HARNESS, "method.alpha=0", "method.unimodal_loss=false"), Store(tmp_path / "off"))
    mj, mo = RunDir(joint.path).read_metrics(), RunDir(off.path).read_metrics()
    for rj, ro in zip(without_timing(mj), without_timing(mo)):
        assert ro["val"] == rj["val"] and ro["test"] == rj["test"] and ro["train"]["loss"] == rj["train"]["loss"]
    on = run(fast_config(*HARNESS), Store(tmp_path / "on"))
    history = RunDir(on.path).read_metrics()
    assert set(without_timing(history)[0]["train"]) == {"loss", "loss_fused", "regulated", *(
        f"{k}.{m}" for k in ("loss_unimodal", "score", "beta") for m in AV)}
    assert [r["method"]["acquisition_rate"] for r in history][:2] == [1.0, 1.0]  # epoch 0, then tr2 = 0
    assert all(r["method"]["trace.audio"] > 0 and r["method"]["trace.visual"] > 0 for r in history)
    assert history[0]["train"]["regulated"] == 1.0 and history[0]["train"]["beta.audio"] > 0
    for key in ("forward_passes_per_step", "backward_passes_per_step"):  # joint's cost: 1F + 1B
        assert on.summary["cost"][key] == joint.summary["cost"][key] == 1.0


def test_three_modalities_through_the_harness(fast_config, store):
    alpha = "method.alpha={audio: 0.95, visual: 0.1, text: 0.5}"
    result = run(fast_config("dataset.name=gaussian3", *HARNESS, alpha), store)
    history = RunDir(result.path).read_metrics()
    names = ("audio", "visual", "text")
    assert set(history[-1]["val"]["modality_acc"]) == set(names)
    first = history[0]
    assert all(first["method"][f"trace.{m}"] > 0 for m in names)
    assert sum(first["train"][f"beta.{m}"] > 0 for m in names) >= 1


def test_resume_is_exact(fast_config, store, tmp_path, monkeypatch):
    # the traces (and so the window) come back from the checkpoint; the anchors are the epoch's start
    cfg = fast_config("method.name=inforeg", "method.window_epochs=2", "method.window_threshold=0.2")
    assert_resumes_exactly(cfg, store, tmp_path, monkeypatch)


def test_bench_times_inforeg(tmp_path):
    from mmbalance.bench.cli import main as cli

    out = tmp_path / "bench.json"
    args = ["bench", "--quick", "--only", "steps", "--device", "cpu", "--methods", "inforeg", "--json", str(out)]
    assert cli(args) == 0
    rows = json.loads(out.read_text())["steps"]
    assert [r["method"] for r in rows] == ["joint", "inforeg"]
    assert rows[1]["forward_passes_per_step"] == rows[1]["backward_passes_per_step"] == 1.0
