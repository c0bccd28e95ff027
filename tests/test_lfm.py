"""LFM: the released code's two scripts (fitted and learned weights) transcribed and run beside the
method, BalanceBenchmark's LFMTrainer for two and three modalities, the weight rules by hand,
switched-off equivalence with joint training, three modalities and resume through the harness,
and the clear refusals."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbalance.bench.store import RunDir
from mmbalance.bench.train import run
from mmbalance.core.errors import ConfigError
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Modality
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.joint import Joint, JointParams
from mmbalance.methods.lfm import LFM, LFMParams, alignment, fitted_weights, learned_alignment_weight
from tests.conftest import BNEncoder, assert_resumes_exactly, step_context

# tiny models: one torch thread (conftest.one_torch_thread); on a shared machine more cost several times the run
pytestmark = pytest.mark.usefixtures("one_torch_thread")

C = 3
MODS2 = (Modality("audio", "vector", (5,)), Modality("visual", "vector", (4,)))
MODS3 = (*MODS2, Modality("text", "vector", (3,)))
LR, MOMENTUM, WD = 0.1, 0.9, 1e-4  # the code's SGD (momentum 0.9, weight decay 1e-4), a larger lr
TOL = 1e-5
# the learned weight moves by lr_alpha * g; the codes' 1e-4 barely moves it on tiny models, so the
# comparisons use a step size at which it moves by a few hundredths per epoch, unclipped
LR_ALPHA = 1.0


def Enc(d_in: int, d_out: int = 4) -> BNEncoder:
    """BatchNorm makes the hypergradient pass's mode matter."""
    return BNEncoder(d_in, d_out, bias=False, activation=nn.Tanh)


def setup(mods=MODS2, fusion: str = "late", seed: int = 0) -> MethodSetup:
    torch.manual_seed(seed)
    encoders = nn.ModuleDict({m.name: Enc(m.shape[0]) for m in mods})
    return MethodSetup(encoders, C, mods, fusion)


def sgd(params, lr: float = LR, wd: float = WD) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=wd)


def make(cls=LFM, params=None, mods=MODS2, fusion: str = "late", split=(), lr: float = LR, wd: float = WD):
    method = cls(params if params is not None else LFMParams(), setup(mods, fusion))
    method.attach(step_context(lambda: sgd(method.parameters(), lr, wd), split))
    return method


def batches(mods=MODS2, n: int = 3, size: int = 8, seed: int = 1) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, C, (size,), generator=gen)
        # the class shifts every modality, the first one most (a dominant modality)
        inputs = {m.name: torch.randn(size, *m.shape, generator=gen) + (1.5 - 0.5 * i) * labels[:, None].float()
                  for i, m in enumerate(mods)}
        out.append(Batch(inputs, labels))
    return out


def whole(split: list[Batch]) -> Batch:
    return Batch({m: torch.cat([b.inputs[m] for b in split]) for m in split[0].inputs},
                 torch.cat([b.labels for b in split]))


def drive(method: LFM, split: list[Batch], epochs: int) -> tuple[list[dict], list[dict], list[dict]]:
    """As the harness: per epoch train mode, on_epoch_start, the steps. Returns the step outputs, the
    parameters (and BatchNorm statistics) after every step and the epoch logs."""
    ctx, outs, states, logs = method.step_context, [], [], []
    for epoch in range(epochs):
        ctx.epoch = epoch
        method.train()
        method.on_epoch_start(epoch)
        logs.append(method.epoch_log())
        for i, b in enumerate(split):
            ctx.batch_index = i
            outs.append({k: float(v) for k, v in method.training_step(b).items()})
            states.append({k: v.detach().clone() for k, v in method.state_dict().items()})
    return outs, states, logs


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -------------------------------------------------- the released code (njustkmg/NeurIPS24-LFM, ad44fa0)


def Alignment(p, q):  # Crema_epoch.py:38-45 (= Crema_epoch_learnable.py:37-44)
    p = F.softmax(p, dim=-1)
    q = F.softmax(q, dim=-1)
    m = 0.5 * p + 0.5 * q
    kl_p_m = F.kl_div(p.log(), m, reduction='batchmean')
    kl_q_m = F.kl_div(q.log(), m, reduction='batchmean')
    js_score = 0.5 * (kl_p_m + kl_q_m)
    return js_score


def getAlpha_Learnable_Fitted(epoch):  # Crema_epoch.py:47-53
    coef_alpha1 = [2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11]
    coef_alpha2 = [7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06, -2.23835486e-08, 5.39717505e-11]
    alpha1 = sum(c * (epoch ** i) for i, c in enumerate(coef_alpha1))
    alpha2 = sum(c * (epoch ** i) for i, c in enumerate(coef_alpha2))
    return [alpha1, alpha2]


class AVClassifier(nn.Module):
    """model/AudioVideo.py:46-63 around copies of the suite's encoders and late heads:
    returns result_b, result_a, result_v, a_feature, v_feature."""

    def __init__(self, method: LFM) -> None:
        super().__init__()
        self.audio_encoder = copy.deepcopy(method.encoders["audio"])
        self.video_encoder = copy.deepcopy(method.encoders["visual"])
        self.cls_a = copy.deepcopy(method.fusion.heads["audio"])
        self.cls_v = copy.deepcopy(method.fusion.heads["visual"])

    def forward(self, audio, video):
        a_feature = self.audio_encoder(audio)
        v_feature = self.video_encoder(video)
        result_a = self.cls_a(a_feature)
        result_v = self.cls_v(v_feature)
        result_b = result_v + result_a
        return result_b, result_a, result_v, a_feature, v_feature

    def suite_names(self) -> dict[str, torch.Tensor]:
        rename = {"audio_encoder": "encoders.audio", "video_encoder": "encoders.visual",
                  "cls_a": "fusion.heads.audio", "cls_v": "fusion.heads.visual"}
        out = {}
        for k, v in self.state_dict().items():
            head, rest = k.split(".", 1)
            out[f"{rename[head]}.{rest}"] = v
        return out


def getAlpha_Learnable(epoch, valbatch, model, alpha, lr_alpha=1e-4, halve_every=20):  # Crema_epoch_learnable.py:55-97
    criterion = nn.CrossEntropyLoss(reduction='none')
    spectrogram, image, y = valbatch
    half_size = spectrogram.size(0) // 2
    spectrogram = spectrogram[:half_size]
    image = image[:half_size]
    y = y[:half_size]
    o_b, o_a, o_v, a_f, v_f = model(spectrogram, image)
    loss_alignment = Alignment(o_a, o_v)
    loss_cls = criterion(0.5 * o_v + 0.5 * o_a, y).mean()
    L_total = alpha[0] * loss_cls + alpha[1] * loss_alignment
    theta_grads = torch.autograd.grad(L_total, model.parameters(), create_graph=True)
    cls_grads = torch.autograd.grad(loss_cls, model.parameters(), retain_graph=True, create_graph=True)
    hessian_vector_prod = torch.autograd.grad(
        outputs=theta_grads,
        inputs=model.parameters(),
        grad_outputs=cls_grads,
        retain_graph=True
    )
    with torch.no_grad():
        alpha_grad = hessian_vector_prod[0].mean().item()
        if epoch % halve_every == 0 and epoch != 0:  # the code's 20, a parameter for the test
            lr_alpha = lr_alpha / 2
        alpha[1] -= lr_alpha * alpha_grad
        alpha[1] = max(0.05, min(0.95, alpha[1]))
        alpha[0] = 1.0 - alpha[1]
    return alpha, lr_alpha, alpha_grad


def train_audio_video(train_loader, model, optimizer, cls_k):  # Crema_epoch.py:56-85, the loss lines
    model.train()
    criterion = nn.CrossEntropyLoss(reduction='none')
    out = []
    for spectrogram, image, y in train_loader:
        optimizer.zero_grad()
        o_b, o_a, o_v, a_f, v_f = model(spectrogram, image)
        loss_alignment = Alignment(o_a, o_v)
        loss_cls = criterion(0.5 * o_v + 0.5 * o_a, y).mean()
        loss = 2 * (cls_k[0] * loss_cls + cls_k[1] * loss_alignment)
        loss.backward()
        optimizer.step()
        out.append(({"loss": loss.item(), "ce": loss_cls.item(), "align": loss_alignment.item()},
                    {k: v.detach().clone() for k, v in model.suite_names().items()}))
    return out


def release_run(method: LFM, split: list[Batch], epochs: int, learned: bool, lr_alpha: float = LR_ALPHA,
                halve_every: int = 20):
    """Crema_epoch.py:177-199 (fitted) or Crema_epoch_learnable.py:233-257 (learned): the labels one-hot
    as its loader gives them; val_batch = the split's first 16 samples (the code holds 16 out)."""
    model = AVClassifier(method)
    optimizer = sgd(model.parameters())
    onehot = [(b.inputs["audio"], b.inputs["visual"], F.one_hot(b.labels, C).float()) for b in split]
    val_batch = tuple(t[:16] for t in (whole(split).inputs["audio"], whole(split).inputs["visual"],
                                       F.one_hot(whole(split).labels, C).float()))
    cls_k, steps, grads = [0.05, 0.95], [], []
    for epoch in range(epochs):
        if learned:
            cls_k, lr_alpha, g = getAlpha_Learnable(epoch, val_batch, model, cls_k, lr_alpha, halve_every)
            grads.append((g, lr_alpha))
        else:
            cls_k = getAlpha_Learnable_Fitted(epoch)
        steps += [(out, state, list(cls_k)) for out, state in train_audio_video(onehot, model, optimizer, cls_k)]
        model.eval()  # val(): the code's next getAlpha_Learnable sees the model in eval mode
    return steps, grads


def compare(method_outs, method_states, code_steps) -> float:
    """The largest difference between the method's and the code's losses, weights and state."""
    worst = 0.0
    for out, state, (code_out, code_state, cls_k) in zip(method_outs, method_states, code_steps, strict=True):
        for key in ("loss", "ce", "align"):
            worst = max(worst, abs(out[key] - code_out[key]))
        worst = max(worst, abs(out["weight.cls"] - cls_k[0]), abs(out["weight.align"] - cls_k[1]))
        for name, value in code_state.items():
            worst = max(worst, max_diff(state[name].float(), value.float()))
    return worst


@pytest.mark.parametrize("schedule", ["fitted", "learned"])
def test_release_equals_the_code(schedule):
    split = batches()
    extra = {"lr_alpha": LR_ALPHA} if schedule == "learned" else {}
    method = make(params=LFMParams(schedule=schedule, **extra), split=split)
    steps, grads = release_run(method, split, 3, learned=schedule == "learned")
    outs, states, logs = drive(method, split, 3)
    assert compare(outs, states, steps) < TOL
    if schedule == "learned":
        for log, (g, lr_alpha) in zip(logs, grads, strict=True):
            assert log["hypergrad"] == pytest.approx(g, rel=1e-4, abs=1e-7) and log["lr_alpha"] == lr_alpha
        # the weight moved, unclipped: the learned rule is exercised, not its bounds
        assert 0.06 < outs[-1]["weight.align"] < 0.94 and abs(outs[-1]["weight.align"] - 0.95) > 0.01
    else:
        fitted = [getAlpha_Learnable_Fitted(e)[0] for e in range(3)]
        assert [o["weight.cls"] for o in outs[::3]] == pytest.approx(fitted)
        assert logs == [{}, {}, {}]


def test_release_learned_halves_its_step_size_and_runs_the_pass_in_eval_mode_after_epoch_0():
    split = batches()
    method = make(params=LFMParams(schedule="learned", lr_alpha=LR_ALPHA, halve_every=2), split=split)
    steps, grads = release_run(method, split, 4, learned=True, halve_every=2)
    outs, states, logs = drive(method, split, 4)
    assert compare(outs, states, steps) < TOL
    assert [log["lr_alpha"] for log in logs] == [LR_ALPHA, LR_ALPHA, LR_ALPHA / 2, LR_ALPHA / 2]
    # the other mode (BalanceBenchmark's, training mode throughout) is another run: the mode matters here
    other = make(params=LFMParams(schedule="learned", lr_alpha=LR_ALPHA, halve_every=2), split=split)
    other.params = other.params.model_copy(update={"variant": "balancebenchmark"})
    other_outs, _, _ = drive(other, split, 4)
    assert abs(other_outs[-1]["loss"] - outs[-1]["loss"]) > 1e-4


def test_the_fitted_weights_are_the_codes_polynomial_at_the_raw_epoch():
    for epoch in (0, 1, 39, 100, 180, 199):
        assert fitted_weights(epoch) == tuple(getAlpha_Learnable_Fitted(epoch))
    assert fitted_weights(0)[0] == pytest.approx(0.2046, abs=1e-4) and fitted_weights(180)[0] > 1.0
    assert all(abs(sum(fitted_weights(e)) - 1) < 1e-12 for e in range(200))


def test_the_learned_weight_is_clipped_to_its_bounds():
    assert learned_alignment_weight(0.5, 2.0, 0.1) == pytest.approx(0.3)
    assert learned_alignment_weight(0.5, 100.0, 0.1) == 0.05
    assert learned_alignment_weight(0.5, -100.0, 0.1) == 0.95


def test_alignment_is_the_codes_reversed_kl_form_and_zero_for_equal_predictions():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, C, generator=gen), torch.randn(6, C, generator=gen)
    p, q = a.softmax(1), b.softmax(1)
    r = (p + q) / 2
    by_hand = 0.5 * ((r * (r / p).log()).sum(1).mean() + (r * (r / q).log()).sum(1).mean())
    assert alignment(a, b).item() == pytest.approx(by_hand.item(), abs=1e-7)
    assert alignment(a, b).item() == pytest.approx(Alignment(a, b).item(), abs=1e-7)
    assert alignment(a, a + 5.0).item() == pytest.approx(0.0, abs=1e-7)  # a shift leaves the softmax


# -------------------------------------------------- BalanceBenchmark's LFMTrainer (LFM_trainer.py, 4c1482f)


def manual_combinations(n):  # LFM_trainer.py:24-29
    result = []
    for i in range(0, n - 1):
        for j in range(i + 1, n):
            result.append((i, j))
    return result


class BBModel(nn.Module):
    """BalanceBenchmark's BaseClassifierModel as the trainer uses it: model(batch) leaves
    `unimodal_result` ({modality: fc_out block + bias / M, 'output': fused}, avclassify_model.py:277-301)."""

    def __init__(self, method: LFM) -> None:
        super().__init__()
        self.modalitys = list(method.modality_names)
        self.modality_encoder = copy.deepcopy(method.encoders)
        self.fusion_module = copy.deepcopy(method.fusion)

    def forward(self, batch):
        feats = {m: self.modality_encoder[m](batch[m]) for m in self.modalitys}
        fc = self.fusion_module.fc_out
        self.unimodal_result = {"output": fc(torch.cat([feats[m] for m in self.modalitys], dim=1))}
        now = 0
        for m in self.modalitys:
            self.unimodal_result[m] = feats[m] @ fc.weight[:, now:now + 4].t() + fc.bias / len(self.modalitys)
            now += 4
        return self.unimodal_result["output"]

    def suite_names(self) -> dict[str, torch.Tensor]:
        return {k.replace("modality_encoder", "encoders").replace("fusion_module", "fusion"): v.detach().clone()
                for k, v in self.state_dict().items()}


def bb_getAlpha_Learnable(epoch, valbatch, model, alpha, lr_alpha=1e-4):  # LFM_trainer.py:41-80
    criterion = nn.CrossEntropyLoss(reduction='none')
    half_size = valbatch['label'].size(0) // 4
    new_batch = {key: value[:half_size] for key, value in valbatch.items()}
    model(new_batch)
    modality_num = len(model.modalitys)
    combinations = manual_combinations(modality_num)
    loss_alignment = 0
    modalitys = list(model.modalitys)
    for combination in combinations:
        loss_alignment += Alignment(model.unimodal_result[modalitys[combination[0]]],
                                    model.unimodal_result[modalitys[combination[1]]])
    out = model.unimodal_result['output']
    loss_cls = criterion(out, new_batch['label']).mean()
    L_total = (alpha[0] * loss_cls + alpha[1] * loss_alignment / len(combinations))
    theta_grads = torch.autograd.grad(L_total, model.parameters(), create_graph=True)
    cls_grads = torch.autograd.grad(loss_cls, model.parameters(), retain_graph=True, create_graph=True)
    hessian_vector_prod = torch.autograd.grad(outputs=theta_grads, inputs=model.parameters(),
                                              grad_outputs=cls_grads, retain_graph=True)
    with torch.no_grad():
        alpha_grad = hessian_vector_prod[0].mean().item()
        if epoch % 20 == 0 and epoch != 0:
            lr_alpha = lr_alpha / 2
        alpha[1] -= lr_alpha * alpha_grad
        alpha[1] = max(0.05, min(0.95, alpha[1]))
        alpha[0] = 1.0 - alpha[1]
    return alpha, lr_alpha


def bb_training_step(model, batch, alpha):  # LFM_trainer.py:332-349
    criterion = nn.CrossEntropyLoss()
    label = batch['label']
    model(batch)
    modality_num = len(model.modalitys)
    combinations = manual_combinations(modality_num)
    loss_alignment = 0
    modalitys = list(model.modalitys)
    for combination in combinations:
        loss_alignment += Alignment(model.unimodal_result[modalitys[combination[0]]],
                                    model.unimodal_result[modalitys[combination[1]]])
    out = model.unimodal_result['output']
    loss = criterion(out, label)
    loss = 2 * (alpha[0] * loss + alpha[1] * loss_alignment / len(combinations))
    loss.backward()
    return loss


def bb_run(method: LFM, split: list[Batch], epochs: int, lr_alpha: float, start: float = 0.05):
    """fit (lines 145-152: val_batch once, alpha = {1: 0.05, 0: 0.95}, model.train() then the weights
    each epoch) and train_loop (optimizer.step(closure), then zero_grad). val_batch: the whole split;
    `start` replaces the code's 0.05, where the tiny model's hypergradient would keep it at the bound."""
    model = BBModel(method)
    optimizer = sgd(model.parameters())
    val = whole(split)
    val_batch = {**val.inputs, "label": val.labels}
    alpha, steps = {1: start, 0: 1.0 - start}, []
    for epoch in range(epochs):
        model.train()
        alpha, lr_alpha = bb_getAlpha_Learnable(epoch, val_batch, model, alpha, lr_alpha)
        for b in split:
            batch = {**b.inputs, "label": b.labels}
            holder = {}

            def closure(batch=batch, holder=holder, alpha=alpha):
                holder["loss"] = bb_training_step(model, batch, alpha)
                return holder["loss"]

            optimizer.step(closure)
            optimizer.zero_grad()
            steps.append(({"loss": holder["loss"].item()}, model.suite_names(), [alpha[0], alpha[1]]))
    return steps


@pytest.mark.parametrize(("mods", "lr_alpha"), [(MODS2, LR_ALPHA), (MODS3, 0.05)], ids=["two", "three"])
def test_balancebenchmark_equals_its_trainer(mods, lr_alpha):
    split = batches(mods)
    params = LFMParams(variant="balancebenchmark", lr_alpha=lr_alpha, align_weight=0.5,
                       hyper_samples=len(whole(split)) // 4)
    method = make(params=params, mods=mods, fusion="concat", split=split)
    steps = bb_run(method, split, 3, lr_alpha, start=0.5)
    outs, states, _ = drive(method, split, 3)
    # its trainer returns the loss only; the weights and every parameter and statistic are compared
    code = [({**o, "ce": out["ce"], "align": out["align"]}, s, k) for (o, s, k), out in zip(steps, outs, strict=True)]
    assert compare(outs, states, code) < TOL
    assert 0.06 < outs[-1]["weight.align"] < 0.94 and abs(outs[-1]["weight.align"] - 0.5) > 0.01


def test_the_hypergradient_pass_counts_three_backward_passes_and_leaves_no_gradient():
    split = batches()
    method = make(params=LFMParams(schedule="learned"), split=split)
    method.train()
    method.on_epoch_start(0)
    assert method.step_context.backward_passes == 3 and method.training
    assert all(p.grad is None for p in method.parameters())
    fitted = make(split=split)
    fitted.on_epoch_start(0)
    assert fitted.step_context.backward_passes == 0


# ----------------------------------------------------------------- switched off = joint training


@pytest.mark.parametrize("fusion", ["late", "concat"])
def test_switched_off_equals_joint_at_twice_the_rate_and_half_the_decay(fusion):
    """align_weight 0: loss = 2 L_cls, which SGD steps as L_cls at 2 lr and wd / 2."""
    split = batches(n=2)
    method = make(params=LFMParams(schedule="fixed", align_weight=0.0), fusion=fusion, split=split)
    joint = make(Joint, JointParams(late_loss="fused") if fusion == "late" else JointParams(), fusion=fusion,
                 lr=2 * LR, wd=WD / 2)
    outs, states, _ = drive(method, split, 2)
    ctx = joint.step_context
    for epoch, (i, b) in itertools.product(range(2), enumerate(split)):
        ctx.epoch = epoch
        loss = joint.training_step(b)["loss"].item()
        out, state = outs[epoch * 2 + i], states[epoch * 2 + i]
        assert out["ce"] == pytest.approx(loss, abs=1e-6) and out["loss"] == pytest.approx(2 * loss, abs=1e-6)
        for name, value in joint.state_dict().items():
            assert max_diff(state[name].float(), value.float()) < 1e-6, name
    # and on: the alignment term changes the run
    on = make(params=LFMParams(schedule="fixed", align_weight=0.5), fusion=fusion, split=split)
    on_outs, _, _ = drive(on, split, 2)
    assert on_outs[0]["align"] > 0 and abs(on_outs[-1]["ce"] - outs[-1]["ce"]) > 1e-4


# ------------------------------------------------------------------------- the method's shell


def test_refusals_are_clear():
    with pytest.raises(ConfigError, match=r"method lfm aligns pairs of modalities, so it needs at least 2; .*1: audio"):
        LFM(LFMParams(), setup(MODS2[:1]))
    with pytest.raises(ConfigError, match=r"model.fusion='film' does not give; use late .*, concat .* or sum"):
        LFM(LFMParams(), setup(fusion="film"))
    for bad, match in [({"align_weight": 0.5}, "method.align_weight has no effect with schedule='fitted'"),
                       ({"schedule": "fixed", "hyper_samples": 4}, "hyper_samples has no effect with schedule='fixed'"),
                       ({"variant": "balancebenchmark", "schedule": "fitted"}, "has only the learned schedule"),
                       ({"schedule": "fixed", "align_weight": 1.5}, "less than or equal to 1")]:
        with pytest.raises(ValueError, match=match):
            LFMParams(**bad)


def test_variant_defaults():
    assert LFMParams().model_dump() == {"variant": "release", "schedule": "fitted", "align_weight": 0.95,
                                        "lr_alpha": 1e-4, "halve_every": 20, "hyper_samples": 8}
    bb = LFMParams(variant="balancebenchmark")
    assert (bb.schedule, bb.align_weight, bb.hyper_samples) == ("learned", 0.05, 16)
    method = make(params=LFMParams(schedule="learned"))
    assert method.weights.tolist() == pytest.approx([0.05, 0.95])


def test_predict_gives_the_fused_and_each_modalitys_own_logits_and_changes_nothing():
    split = batches(n=1)
    method = make(split=split).eval()
    before = copy.deepcopy(method.state_dict())
    with torch.no_grad():
        pred = method.predict(split[0])
        feats = method.encode(split[0].inputs)
        heads = {m: method.fusion.heads[m](feats[m]) for m in ("audio", "visual")}
    assert max_diff(pred.fused, (heads["audio"] + heads["visual"]) / 2) < 1e-6
    assert all(max_diff(pred.per_modality[m], heads[m]) < 1e-6 for m in heads)
    assert all(torch.equal(v, before[k]) for k, v in method.state_dict().items())


# --------------------------------------------------------------------------------- the harness


HARNESS = ["method.name=lfm", "train.epochs=3"]


@pytest.mark.parametrize("variant", ["release", "balancebenchmark"])
def test_three_modalities_through_the_harness(fast_config, store, variant):
    fusion = "late" if variant == "release" else "concat"
    cfg = fast_config(*HARNESS, "dataset.name=gaussian3", f"method.variant={variant}", f"model.fusion={fusion}")
    result = run(cfg, store)
    history = RunDir(result.path).read_metrics()
    for record in history:
        train = record["train"]
        assert train["align"] > 0 and train["ce"] > 0
        assert train["weight.cls"] + train["weight.align"] == pytest.approx(1.0, abs=1e-6)
        if variant == "balancebenchmark":
            assert set(record["method"]) >= {"lr_alpha", "hypergrad"}
    assert set(result.summary["probes"]) == {"audio", "visual", "text"}
    cost = result.summary["cost"]
    if variant == "release":  # fitted weights: joint training's cost
        assert cost["forward_passes_per_step"] == cost["backward_passes_per_step"] == 1
    else:  # plus, once an epoch, one forward and three autograd passes on the hypergradient batch
        assert cost["backward_passes_per_step"] > 1 and cost["forward_passes_per_step"] > 1


def test_resume_is_exact(fast_config, store, tmp_path, monkeypatch):
    cfg = fast_config(*HARNESS, "method.schedule=learned", "method.lr_alpha=5.0", "method.halve_every=1",
                      "train.epochs=4")
    assert_resumes_exactly(cfg, store, tmp_path, monkeypatch)


def test_registered_with_its_family():
    assert METHODS.get("lfm", "method.name") is LFM and LFM.family == "objective"
