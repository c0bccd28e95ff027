"""ReconBoost: the released train.py / DynamicNet and BalanceBenchmark's trainer transcribed and run
beside the method (two and three modalities, every switch in both positions), the loss by hand,
switched-off equivalence with joint training, the schedule, predict, three modalities, cost and
resume through the harness, and the clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbalance.bench.store import RunDir
from mmbalance.bench.train import run
from mmbalance.core.errors import ConfigError
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Modality
from mmbalance.methods.base import MethodSetup, StepContext
from mmbalance.methods.joint import Joint, JointParams
from mmbalance.methods.reconboost import ReconBoost, ReconBoostParams, boosting_loss, ensemble_members, stage_and_phase
from tests.conftest import BNEncoder, assert_resumes_exactly, step_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")

C = 3
MODS2 = (Modality("audio", "vector", (5,)), Modality("visual", "vector", (4,)))
MODS3 = (*MODS2, Modality("text", "vector", (3,)))
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4  # the code's SGD (momentum 0.9, weight decay 5e-4), a larger lr
TOL = 1e-5


def Enc(d_in: int, d_out: int = 4) -> BNEncoder:
    """BatchNorm makes the ga term's extra forward visible."""
    return BNEncoder(d_in, d_out, bias=False)


def setup(mods=MODS2, seed: int = 0, epochs: int = 100) -> MethodSetup:
    torch.manual_seed(seed)
    encoders = nn.ModuleDict({m.name: Enc(m.shape[0]) for m in mods})
    return MethodSetup(encoders, C, mods, epochs=epochs)


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)


def make(params: ReconBoostParams, mods=MODS2) -> ReconBoost:
    method = ReconBoost(params, setup(mods))
    method.attach(step_context(lambda: sgd(method.parameters())))
    return method


def batches(mods=MODS2, n: int = 2, size: int = 8, seed: int = 1) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, C, (size,), generator=gen)
        inputs = {m.name: torch.randn(size, *m.shape, generator=gen) + (2.0 - i) * labels[:, None].float()
                  for i, m in enumerate(mods)}
        out.append(Batch(inputs, labels))
    return out


def drive(method: ReconBoost, split: list[Batch], epochs: int) -> tuple[list[dict], list[dict]]:
    """As the harness: per epoch on_epoch_start, then the steps. Returns the step outputs and the
    state (parameters and buffers) after every step."""
    ctx, outs, states = method.step_context, [], []
    for epoch in range(epochs):
        ctx.epoch = epoch
        method.train()
        method.on_epoch_start(epoch)
        for i, b in enumerate(split):
            ctx.batch_index = i
            outs.append({k: float(v) for k, v in method.training_step(b).items()})
            states.append({k: v.detach().clone() for k, v in method.state_dict().items() if k != "members"})
    return outs, states


def compare(outs: list[dict], states: list[dict], record: list[dict], keys: tuple[str, ...]) -> float:
    assert len(outs) == len(record)
    worst = 0.0
    for out, state, ref in zip(outs, states, record):
        for k in keys:
            if k in ref:
                worst = max(worst, abs(out[k] - ref[k]))
            else:
                assert k not in out, k
        assert ref["state"].keys() == state.keys()
        for name, value in ref["state"].items():
            # parameters absolutely; batch-norm statistics (variances of tens) relative to their size
            scale = max(1.0, value.abs().max().item()) if name.split(".")[-1] in BUFFERS else 1.0
            worst = max(worst, (state[name] - value).abs().max().item() / scale)
    return worst


BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


KEYS = ("loss", "boost_loss", "ga_loss", "ce_ensemble")


# ------------------------------------------- the released code (huacong/ReconBoost @ 14ab57a)


class Head(nn.Module):  # D:5-15
    def __init__(self, input_dim=512, output_dim=40, hidden=256):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, output_dim)

    def forward(self, x):
        x = self.fc1(x)
        x = self.relu(x)
        x = self.fc2(x)
        return x


class UniNet(nn.Module):
    """The code's AudioNet/VisualNet: a backbone and `fc`, which train.py sets to the shared head."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.net = backbone
        self.fc = None

    def forward(self, x):
        return self.fc(self.net(x))


class DynamicNet:  # D:26-170, the dataset's input map generalised to a dict
    def __init__(self, c0, lr, head):
        self.models, self.models_name = [], []
        self.c0 = c0
        self.boost_rate = nn.Parameter(torch.tensor(lr, requires_grad=True))
        self.head = head

    def add(self, model, model_name):
        item = -1
        for i in range(0, len(self.models_name)):
            if self.models_name[i] == model_name:
                item = i
                break
        if item != -1:
            self.models.pop(item)
            self.models_name.pop(item)
        self.models.append(model)
        self.models_name.append(model_name)

    def parameters(self):  # common_space
        params = []
        for m in self.models:
            for name, param in m.named_parameters():
                if "fc" not in name:
                    params.append(param)
        params.extend(self.head.parameters())
        params.append(self.boost_rate)
        return params

    def forward(self, model_input_map, mask_model=None):
        if len(self.models) == 0:
            return self.c0
        prediction = None
        with torch.no_grad():
            for i in range(0, len(self.models)):
                m = self.models[i]
                m_name = self.models_name[i]
                if m_name == mask_model:
                    continue
                pred = m(model_input_map[m_name])
                prediction = pred if prediction is None else prediction + pred
        return self.boost_rate * prediction

    def forward_grad(self, model_input_map):
        prediction = None
        for i in range(0, len(self.models)):
            pred = self.models[i](model_input_map[self.models_name[i]])
            prediction = pred if prediction is None else prediction + pred
        return self.boost_rate * prediction


def code_head(method: ReconBoost) -> nn.Module:
    """The code's head holding the suite's initial weights (or, for head=linear, a copy of it)."""
    if isinstance(method.head, nn.Linear):
        return copy.deepcopy(method.head)
    head = Head(method.head[0].in_features, C, method.head[0].out_features)
    head.fc1, head.fc2 = copy.deepcopy(method.head[0]), copy.deepcopy(method.head[2])
    return head


def release_state(models: dict[str, UniNet], net: DynamicNet, linear: bool) -> dict[str, torch.Tensor]:
    """The code's parameters and buffers under the suite's names."""
    state = {f"encoders.{m}.{k[len('net.'):]}": v.detach().clone()
             for m, model in models.items() for k, v in model.state_dict().items() if k.startswith("net.")}
    head = {k: v.detach().clone() for k, v in net.head.state_dict().items()}
    if not linear:
        head = {k.replace("fc1", "0").replace("fc2", "2"): v for k, v in head.items()}
    state.update({f"head.{k}": v for k, v in head.items()})
    state["boost_rate"] = net.boost_rate.detach().clone()
    return state


def release_run(method: ReconBoost, split: list[Batch], order: tuple[str, ...], stages: int, args: dict):
    """main() of train.py (R:235-443; train_MSA.py for three modalities), without --use_pretrain,
    with `stages` stages; pre_model is the previous stage's modality (both scripts)."""
    net = DynamicNet(c0=0.37, lr=args["boost_rate"], head=code_head(method))
    models = {m: UniNet(copy.deepcopy(method.encoders[m])) for m in order}
    record = []
    for stage in range(stages):
        model_name = order[stage % len(order)]  # schedule.py fixed_mode
        model, pre_model_name = models[model_name], order[(stage - 1) % len(order)]
        pre_model = models[pre_model_name]
        model.fc = net.head
        for m in models.values():
            m.train(True)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
        for _epoch in range(args["epochs_per_stage"]):
            for b in split:
                model_input_map, lbl = b.inputs, b.labels
                out_join = net.forward(model_input_map, mask_model=model_name)
                if stage == 0:
                    out_join = torch.as_tensor(out_join, dtype=torch.float32).view(-1, 1).expand(len(lbl), 1)
                out_obj = model(model_input_map[model_name])
                target = torch.zeros(len(lbl), C).scatter_(1, lbl.view(-1, 1), 1)
                boosting_loss = - args["weight1"] * (target * out_obj.log_softmax(1)).mean(-1) \
                    + args["weight2"] * (target * out_join.detach().softmax(1) * out_obj.log_softmax(1)).mean(-1)
                model.zero_grad()
                step = {}
                if args["use_ga"]:
                    if stage == 0:
                        loss = boosting_loss
                    else:
                        pre_model.fc = net.head
                        pre_out_obj = pre_model(model_input_map[pre_model_name])
                        ga_loss = F.mse_loss(out_obj.detach().softmax(1), pre_out_obj.detach().softmax(1))
                        step["ga_loss"] = ga_loss.mean().item()
                        loss = boosting_loss + args["alpha"] * ga_loss
                    loss.mean().backward()
                else:
                    loss = boosting_loss
                    boosting_loss.mean().backward()
                optimizer.step()
                record.append({**step, "loss": loss.mean().item(), "boost_loss": boosting_loss.mean().item(),
                               "state": release_state(models, net, args["linear"])})
        net.add(model, model_name)
        optimizer_correct = torch.optim.SGD(net.parameters(), LR, momentum=MOMENTUM, weight_decay=WD)
        for _epoch in range(args["correct_epochs"]):
            for b in split:
                out = net.forward_grad(b.inputs)
                loss = F.cross_entropy(out, b.labels)
                optimizer_correct.zero_grad()
                loss.backward()
                optimizer_correct.step()
                record.append({"loss": loss.item(), "ce_ensemble": loss.item(),
                               "state": release_state(models, net, args["linear"])})
    return record


RELEASE = {"weight1": 5.0, "weight2": 1.0, "alpha": 0.5, "boost_rate": 1.0}


@pytest.mark.parametrize(("mods", "use_ga", "head", "order"), [
    (MODS2, True, "mlp", None),
    (MODS2, False, "mlp", None),
    (MODS2, True, "linear", ("visual", "audio")),
    (MODS3, True, "mlp", ("text", "visual", "audio")),  # train_MSA.py's order
])
def test_release_equals_the_code(mods, use_ga, head, order):
    """Four stages of 2 + 1 epochs x 2 steps: the first phase with an empty ensemble, every
    modality learner and the rectification, the ga term (and its batch-norm side effect)."""
    params = ReconBoostParams(epochs_per_stage=2, correct_epochs=1, use_ga=use_ga, head=head, head_hidden=None
                              if head == "linear" else 6, order=list(order) if order else None)
    method = make(params, mods)
    split = batches(mods)
    names = tuple(order or (m.name for m in mods))
    args = {**RELEASE, "epochs_per_stage": 2, "correct_epochs": 1, "use_ga": use_ga, "linear": head == "linear"}
    record = release_run(method, split, names, stages=4, args=args)
    outs, states = drive(method, split, 4 * 3)
    worst = compare(outs, states, record, KEYS)
    assert worst < TOL, worst
    assert any("ga_loss" in r for r in record) == use_ga


def test_release_resets_momentum_at_each_phase_but_keeps_the_schedule():
    """The reset is what makes the code's fresh SGDs: without it the release would differ."""
    params = ReconBoostParams(epochs_per_stage=1, correct_epochs=1)
    method = make(params)
    method.attach(StepContext(lambda: (sgd(method.parameters()), None), lambda: iter(())))
    split = batches()
    drive(method, split, 1)
    ctx = method.step_context
    assert ctx.optimizer.state  # momentum after phase 1
    ctx.epoch = 1
    method.on_epoch_start(1)
    assert not ctx.optimizer.state
    # a schedule runs on through the reset
    opt = sgd([nn.Parameter(torch.ones(2))])
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    ctx = StepContext(lambda: (opt, sched), lambda: iter(()))
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    ctx.step()
    sched.step()
    ctx.reset_optimizer_state()
    assert not opt.state and opt.param_groups[0]["lr"] == LR / 2 and ctx.optimizer is opt


# --------------------------------------- BalanceBenchmark (ReconBoost_trainer.py @ 4c1482f)


class BBModel(nn.Module):
    """BaseClassifierReconBoostModel (avclassify_model.py:737-829) around the suite's modules."""

    def __init__(self, method: ReconBoost, order: tuple[str, ...]) -> None:
        super().__init__()
        self.modalitys = order
        self.encoders = copy.deepcopy(method.encoders)
        self.fc_out = copy.deepcopy(method.head)
        self.boost_rate = nn.Parameter(method.boost_rate.detach().clone())

    def modality_model(self, batch, modality):
        return self.fc_out(self.encoders[modality](batch[modality]))

    def forward(self, batch, mask_model=None):
        self.unimodal_result = {"output": None}
        with torch.no_grad():
            for modality in self.modalitys:
                if modality == mask_model:
                    continue
                self.unimodal_result[modality] = self.modality_model(batch, modality)
                if self.unimodal_result["output"] is None:
                    self.unimodal_result["output"] = self.unimodal_result[modality]
                else:
                    self.unimodal_result["output"] = self.unimodal_result["output"] + self.unimodal_result[modality]
        self.unimodal_result["output"] = self.boost_rate * self.unimodal_result["output"]

    def forward_grad(self, batch):
        self.unimodal_result = {"output": None}
        for modality in self.modalitys:
            self.unimodal_result[modality] = self.modality_model(batch, modality)
            if self.unimodal_result["output"] is None:
                self.unimodal_result["output"] = self.unimodal_result[modality]
            else:
                self.unimodal_result["output"] = self.unimodal_result["output"] + self.unimodal_result[modality]
        self.unimodal_result["output"] = self.boost_rate * self.unimodal_result["output"]

    def suite_state(self) -> dict[str, torch.Tensor]:
        return {k.replace("fc_out", "head"): v.detach().clone() for k, v in self.state_dict().items()}


def bb_run(method: ReconBoost, split: list[Batch], order: tuple[str, ...], epochs: int, md: dict):
    """fit (B:73-88) and train_loop (B:212-313), its steps training_step1/2 (B:315-382)."""
    model = BBModel(method, order)
    optimizer = sgd(model.parameters())
    record, key = [], list(model.modalitys)
    for current_epoch in range(epochs):
        model.train()
        for modality in model.modalitys:
            i = key.index(modality)
            pre_modality = key[len(key) - 1] if i == 0 else key[i - 1]
            for _ in range(md["T_epochs"]):
                for b in split:
                    batch, label = b.inputs, b.labels
                    model.forward(batch, mask_model=modality)
                    out_join = model.unimodal_result["output"]
                    out_obj = model.modality_model(batch, modality=modality)
                    target = torch.zeros(label.size(0), C).scatter_(1, label.view(-1, 1), 1)
                    boosting_loss = - md["weight1"] * (target * F.log_softmax(out_obj, 1)).mean(-1) \
                        + md["weight2"] * (target * F.softmax(out_join.detach(), 1)
                                           * F.log_softmax(out_obj, 1)).mean(-1)
                    step = {}
                    if current_epoch == 0:
                        loss = boosting_loss
                    else:
                        pre_out_obj = model.modality_model(batch, modality=pre_modality)
                        ga_loss = F.mse_loss(F.softmax(out_obj.detach(), 1), F.softmax(pre_out_obj.detach(), 1))
                        step["ga_loss"] = ga_loss.item()
                        loss = boosting_loss + md["alpha"] * ga_loss
                    loss.mean().backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    record.append({**step, "loss": loss.mean().item(), "boost_loss": boosting_loss.mean().item(),
                                   "state": model.suite_state()})
            for _ in range(md["T_epochs"]):
                for b in split:
                    model.forward_grad(b.inputs)
                    loss = F.cross_entropy(model.unimodal_result["output"], b.labels)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    record.append({"loss": loss.item(), "ce_ensemble": loss.item(), "state": model.suite_state()})
    return record


@pytest.mark.parametrize(("mods", "t_epochs"), [(MODS2, 1), (MODS2, 2), (MODS3, 1)])
def test_balancebenchmark_equals_its_trainer(mods, t_epochs):
    """Two of its epochs (2M stages): the ga term from its second epoch, one optimizer throughout."""
    md = {"alpha": 0.5, "T_epochs": t_epochs, "weight1": 5.0, "weight2": 1.0}
    params = ReconBoostParams(variant="balancebenchmark", epochs_per_stage=t_epochs, correct_epochs=t_epochs)
    method = make(params, mods)
    assert method.boost_rate.item() == pytest.approx(0.01) and isinstance(method.head, nn.Linear)
    split = batches(mods)
    names = tuple(m.name for m in mods)
    record = bb_run(method, split, names, epochs=2, md=md)
    outs, states = drive(method, split, 2 * len(names) * 2 * t_epochs)
    worst = compare(outs, states, record, KEYS)
    assert worst < TOL, worst


# ---------------------------------------------------------------------------- the math by hand


def test_boosting_loss_is_the_weighted_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits, others = torch.randn(6, C, generator=gen), torch.randn(6, C, generator=gen)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    loss, q_y = boosting_loss(logits, others, labels, 5.0, 1.0)
    q = F.softmax(others, 1)[torch.arange(6), labels]
    logp = F.log_softmax(logits, 1)[torch.arange(6), labels]
    assert torch.allclose(q_y, q)
    assert loss.item() == pytest.approx((-(5.0 - q) * logp / C).mean().item(), abs=1e-6)
    # no other member: q = 1; no reconcilement (w2 = 0): w1 / C times the cross-entropy
    empty, ones = boosting_loss(logits, None, labels, 5.0, 1.0)
    assert torch.equal(ones, torch.ones(6))
    assert empty.item() == pytest.approx(4.0 / C * F.cross_entropy(logits, labels).item(), abs=1e-6)
    plain, _ = boosting_loss(logits, others, labels, 5.0, 0.0)
    assert plain.item() == pytest.approx(5.0 / C * F.cross_entropy(logits, labels).item(), abs=1e-6)


def test_the_schedule_and_the_members():
    assert [stage_and_phase(e, 2, 1) for e in range(7)] == [(0, 1), (0, 1), (0, 2), (1, 1), (1, 1), (1, 2), (2, 1)]
    assert [stage_and_phase(e, 0, 2) for e in range(3)] == [(0, 2), (0, 2), (1, 2)]
    order = ("audio", "visual", "text")
    assert ensemble_members(0, 1, order, everyone=False) == ()
    assert ensemble_members(0, 2, order, everyone=False) == ("audio",)
    assert ensemble_members(1, 1, order, everyone=False) == ("audio",)
    assert ensemble_members(2, 2, order, everyone=False) == order
    assert ensemble_members(7, 1, order, everyone=False) == order
    assert ensemble_members(0, 1, order, everyone=True) == order


@pytest.mark.parametrize("select", ["stage_end", "any"])
def test_selectable_epochs(select):
    method = ReconBoost(ReconBoostParams(select=select), setup(epochs=13))  # stages of 8 epochs
    chosen = [e for e in range(13) if method.selectable(e)]
    assert chosen == ([7, 12] if select == "stage_end" else list(range(13)))


def test_predict_sums_the_members_and_leaves_the_method_alone():
    split = batches()
    method = make(ReconBoostParams(epochs_per_stage=1, correct_epochs=1))
    method.eval()
    x = split[0].inputs
    with torch.no_grad():
        first = method.predict(split[0])  # stage 0: audio alone
        assert torch.allclose(first.fused, method.boost_rate * method.learner("audio", x))
        for m in ("audio", "visual"):
            assert torch.equal(first.per_modality[m], method.learner(m, x))
        method.on_epoch_start(2)  # stage 1: both
        both = method.predict(split[0])
        summed = method.learner("audio", x) + method.learner("visual", x)
        assert torch.allclose(both.fused, method.boost_rate * summed)
    bb = make(ReconBoostParams(variant="balancebenchmark"))  # everyone from the start
    with torch.no_grad():
        bb.eval()
        assert torch.allclose(bb.predict(split[0]).fused,
                              bb.boost_rate * (bb.learner("audio", x) + bb.learner("visual", x)))


# ----------------------------------------------------------------- switched off = joint training


class Ensemble(nn.Module):
    """The ensemble as a fusion head for the suite's joint method: boost_rate * sum_m h(f_m)."""

    def __init__(self, head: nn.Module, rate: nn.Parameter) -> None:
        super().__init__()
        self.head, self.rate = head, rate

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.rate * sum(self.head(f) for f in feats.values())


@pytest.mark.parametrize("mods", [MODS2, MODS3])
def test_without_boosting_phases_it_is_joint_training_of_the_ensemble(mods):
    """epochs_per_stage 0 and every modality a member: each epoch is a rectification, i.e. the
    suite's joint method with the ensemble as its fusion head."""
    split = batches(mods)
    method = make(ReconBoostParams(variant="balancebenchmark", epochs_per_stage=0, correct_epochs=1), mods)
    joint = Joint(JointParams(), setup(mods))
    joint.fusion = Ensemble(copy.deepcopy(method.head), nn.Parameter(method.boost_rate.detach().clone()))
    joint.attach(step_context(lambda: sgd(joint.parameters())))
    outs, states = drive(method, split, 3)
    for k, b in enumerate(split * 3):
        loss = joint.training_step(b)["loss"].item()
        assert outs[k]["loss"] == pytest.approx(loss, abs=1e-6)
        theirs = dict(joint.state_dict())
        theirs = {n.replace("fusion.head", "head").replace("fusion.rate", "boost_rate"): v for n, v in theirs.items()}
        for name, value in states[k].items():
            assert (theirs[name] - value).abs().max().item() < 1e-6, name


# ------------------------------------------------------------------------- the method's shell


def test_refusals_are_clear():
    with pytest.raises(ConfigError, match=r"method reconboost alternates between two or more modalities; the datase"):
        ReconBoost(ReconBoostParams(), setup(MODS2[:1]))
    torch.manual_seed(0)
    uneven = MethodSetup(nn.ModuleDict({"audio": Enc(5, 4), "visual": Enc(4, 6)}), C, MODS2)
    with pytest.raises(ConfigError, match=r"every encoder needs the same out_dim; got audio=4, visual=6"):
        ReconBoost(ReconBoostParams(), uneven)
    with pytest.raises(ConfigError, match=r"method.order must name each modality once: audio, visual; got audio"):
        ReconBoost(ReconBoostParams(order=["audio"]), setup())
    for bad, match in [({"epochs_per_stage": 0, "correct_epochs": 0}, "a stage would have no epoch"),
                       ({"head": "linear", "head_hidden": 8}, "head_hidden applies only to head='mlp'"),
                       ({"variant": "balancebenchmark", "head_hidden": 8}, "variant 'balancebenchmark'"),
                       ({"weight1": -1.0}, "greater than or equal to 0")]:
        with pytest.raises(ValueError, match=match):
            ReconBoostParams(**bad)


# --------------------------------------------------------------------------------- the harness


HARNESS = ["method.name=reconboost", "method.epochs_per_stage=1", "method.correct_epochs=1",
           "model.encoders.audio.out_dim=16", "model.encoders.visual.out_dim=16"]


def test_three_modalities_through_the_harness(fast_config, store):
    cfg = fast_config(*HARNESS, "model.encoders.text.out_dim=16", "dataset.name=gaussian3", "train.epochs=6")
    result = run(cfg, store)
    history = RunDir(result.path).read_metrics()
    learners = [[r["train"][f"learner.{m}"] for m in ("audio", "visual", "text")] for r in history]
    # phase 1 trains stage s's modality alone; phase 2 the members so far
    assert learners == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 1, 1]]
    assert [r["train"]["phase"] for r in history] == [1, 2] * 3
    assert "ga_loss" not in history[0]["train"] and history[2]["train"]["ga_loss"] >= 0
    assert [r["selectable"] for r in history] == [False, True] * 3
    assert set(result.summary["probes"]) == {"audio", "visual", "text"}
    assert all(r["method"]["boost_rate"] > 0 for r in history)


def test_passes_per_step_are_counted(fast_config, store):
    """Per encoder: stage 0 phase 1, audio alone (1 of 2); phase 2, audio (1); stage 1 phase 1,
    visual, the audio ensemble and audio again for ga (3); phase 2, both (2)."""
    result = run(fast_config(*HARNESS), store)
    cost = result.summary["cost"]
    assert cost["forward_passes_per_step"] == pytest.approx((1 + 1 + 3 + 2) / 4 / 2)
    assert cost["backward_passes_per_step"] == 1


@pytest.mark.parametrize("at_epoch", [1, 2])
def test_resume_is_exact(fast_config, store, tmp_path, monkeypatch, at_epoch):
    """Stages of 2 + 1 epochs: resumed mid-phase 1 and at a rectification's start (its reset)."""
    cfg = fast_config(*HARNESS, "method.epochs_per_stage=2", "train.epochs=5")
    assert_resumes_exactly(cfg, store, tmp_path, monkeypatch, at_epoch=at_epoch)


def test_registered():
    assert METHODS.get("reconboost", "method.name") is ReconBoost
