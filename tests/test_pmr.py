"""PMR: the released code's step and prototypes transcribed and run beside the method (both
fusions, the window in both positions), BalanceBenchmark's trainer for two and three modalities,
the paper's PER written out, the pace rule by hand, switched-off equivalence with joint training,
the subset, three modalities and resume through the harness, and the clear refusals."""

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
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.joint import Joint, JointParams
from mmbalance.methods.pmr import PMR, PMRParams, pace_ratios, pce_weights, subset_mask
from tests.conftest import BNEncoder, assert_resumes_exactly, step_context

# tiny models: one torch thread (conftest.one_torch_thread); on a shared machine more cost several times the run
pytestmark = pytest.mark.usefixtures("one_torch_thread")

C = 3
MODS2 = (Modality("audio", "vector", (5,)), Modality("visual", "vector", (4,)))
MODS3 = (*MODS2, Modality("text", "vector", (3,)))
LR, MOMENTUM, WD = 0.1, 0.9, 1e-4  # the code's SGD (momentum 0.9, weight decay 1e-4), a larger lr
TOL = 1e-5


def Enc(d_in: int, d_out: int = 4) -> BNEncoder:
    """BatchNorm makes the prototype pass's eval mode matter."""
    return BNEncoder(d_in, d_out, bias=False)


def setup(mods=MODS2, fusion: str = "concat", seed: int = 0) -> MethodSetup:
    torch.manual_seed(seed)
    encoders = nn.ModuleDict({m.name: Enc(m.shape[0]) for m in mods})
    return MethodSetup(encoders, C, mods, fusion)


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)


def make(cls=PMR, params=None, mods=MODS2, fusion: str = "concat", split=(), seed: int = 0):
    method = cls(params if params is not None else PMRParams(), setup(mods, fusion, seed))
    method.attach(step_context(lambda: sgd(method.parameters()), split))
    return method


def batches(mods=MODS2, n: int = 3, size: int = 8, seed: int = 1) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, C, (size,), generator=gen)
        # the class shifts every modality, the first one most (a dominant modality)
        inputs = {m.name: torch.randn(size, *m.shape, generator=gen) + (2.0 - i) * labels[:, None].float()
                  for i, m in enumerate(mods)}
        out.append(Batch(inputs, labels))
    return out


def whole(split: list[Batch]) -> Batch:
    """The split as one batch: the code's prototype loop breaks after len(loader) // 10 batches
    (at least one), so a one-batch loader gives it the whole split, as proto_fraction=1 does here."""
    return Batch({m: torch.cat([b.inputs[m] for b in split]) for m in split[0].inputs},
                 torch.cat([b.labels for b in split]))


def drive(method: PMR, split: list[Batch], epochs: int) -> tuple[list[dict], list[dict], list[dict]]:
    """As the harness: per epoch on_epoch_start, the steps, on_epoch_end. Returns the step outputs,
    the parameters after every step and the prototypes after every epoch."""
    ctx, outs, params, protos = method.step_context, [], [], []
    for epoch in range(epochs):
        ctx.epoch = epoch
        method.train()
        method.on_epoch_start(epoch)
        for i, b in enumerate(split):
            ctx.batch_index = i
            outs.append({k: float(v) for k, v in method.training_step(b).items()})
            params.append({k: v.detach().clone() for k, v in method.named_parameters()})
        method.on_epoch_end(epoch)
        protos.append({m: method.prototype(m).clone() for m in method.modality_names})
    return outs, params, protos


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------ the released code (main_Prototype_grad.py, 3615e48)


def EU_dist(x1, x2):  # R:69-75
    d_matrix = torch.zeros(x1.shape[0], x2.shape[0]).to(x1.device)
    for i in range(x1.shape[0]):
        for j in range(x2.shape[0]):
            d = torch.sqrt(torch.dot((x1[i] - x2[j]), (x1[i] - x2[j])))
            d_matrix[i, j] = d
    return d_matrix


class AVClassifier(nn.Module):
    """The code's model (models/basic_model.py AVClassifier: a, v, out = model(spec, image)) around
    copies of the suite's encoders and head; concat: fc_out(cat(a, v)), sum: fc_x(a) + fc_y(v)."""

    def __init__(self, method: PMR, fusion: str) -> None:
        super().__init__()
        self.audio_net = copy.deepcopy(method.encoders["audio"])
        self.visual_net = copy.deepcopy(method.encoders["visual"])
        self.fusion = fusion
        if fusion == "concat":
            self.fc_out = copy.deepcopy(method.fusion.fc_out)
        else:
            self.fc_x = copy.deepcopy(method.fusion.heads["audio"])
            self.fc_y = copy.deepcopy(method.fusion.heads["visual"])

    def forward(self, audio, visual):
        a, v = self.audio_net(audio), self.visual_net(visual)
        out = self.fc_out(torch.cat((a, v), dim=1)) if self.fusion == "concat" else self.fc_x(a) + self.fc_y(v)
        return a, v, out

    def suite_names(self) -> dict[str, nn.Parameter]:
        named = dict(self.named_parameters())
        rename = {"audio_net": "encoders.audio", "visual_net": "encoders.visual", "fc_out": "fusion.fc_out",
                  "fc_x": "fusion.heads.audio", "fc_y": "fusion.heads.visual"}
        return {rename[k.split(".")[0]] + k[len(k.split(".")[0]):]: v for k, v in named.items()}


def calculate_prototype(args, model, dataloader, epoch, a_proto=None, v_proto=None):  # R:383-441
    n_classes = C
    audio_prototypes = torch.zeros(n_classes, args["embed_dim"])
    visual_prototypes = torch.zeros(n_classes, args["embed_dim"])
    count_class = [0 for _ in range(n_classes)]
    model.eval()
    with torch.no_grad():
        sample_count = 0
        all_num = len(dataloader)
        for step, (spec, image, label) in enumerate(dataloader):  # noqa: B007
            a, v, out = model(spec, image)
            for c, l in enumerate(label):  # noqa: E741
                l = l.long()  # noqa: E741
                count_class[l] += 1
                audio_prototypes[l, :] += a[c, :]
                visual_prototypes[l, :] += v[c, :]
            sample_count += 1
            if sample_count >= all_num // 10:
                break
    for c in range(audio_prototypes.shape[0]):
        audio_prototypes[c, :] /= count_class[c]
        visual_prototypes[c, :] /= count_class[c]
    if epoch <= 0:
        audio_prototypes = audio_prototypes
        visual_prototypes = visual_prototypes
    else:
        audio_prototypes = (1 - args["momentum_coef"]) * audio_prototypes + args["momentum_coef"] * a_proto
        visual_prototypes = (1 - args["momentum_coef"]) * visual_prototypes + args["momentum_coef"] * v_proto
    return audio_prototypes, visual_prototypes


def train_epoch(args, epoch, model, dataloader, optimizer, audio_proto, visual_proto, record):  # R:91-288
    criterion = nn.CrossEntropyLoss()
    softmax = nn.Softmax(dim=1)
    model.train()
    for step, (spec, image, label) in enumerate(dataloader):  # noqa: B007
        optimizer.zero_grad()
        a, v, out = model(spec, image)
        audio_sim = -EU_dist(a, audio_proto)
        visual_sim = -EU_dist(v, visual_proto)
        beta = lam = 0
        if args["modulation_starts"] <= epoch <= args["modulation_ends"]:
            score_a_p = sum([softmax(audio_sim)[i][label[i]] for i in range(audio_sim.size(0))])
            score_v_p = sum([softmax(visual_sim)[i][label[i]] for i in range(visual_sim.size(0))])
            ratio_a_p = score_a_p / score_v_p
            loss_proto_a = criterion(audio_sim, label)
            loss_proto_v = criterion(visual_sim, label)
            if ratio_a_p > 1:
                beta = 0
                lam = 1 * args["alpha"]
            elif ratio_a_p < 1:
                beta = 1 * args["alpha"]
                lam = 0
            else:
                beta = 0
                lam = 0
            loss = criterion(out, label) + beta * loss_proto_a + lam * loss_proto_v
        else:
            loss = criterion(out, label)
            loss_proto_v = criterion(visual_sim, label)
            loss_proto_a = criterion(audio_sim, label)
            score_a_p = sum([softmax(audio_sim)[i][label[i]] for i in range(audio_sim.size(0))])
            score_v_p = sum([softmax(visual_sim)[i][label[i]] for i in range(visual_sim.size(0))])
            ratio_a_p = score_a_p / score_v_p
        loss.backward()
        optimizer.step()
        record.append({"loss": loss.item(), "pce.audio": loss_proto_a.item(), "pce.visual": loss_proto_v.item(),
                       "ratio.audio": ratio_a_p.item(), "pce_weight.audio": beta, "pce_weight.visual": lam,
                       "params": {k: v.detach().clone() for k, v in model.suite_names().items()}})


def release_run(method: PMR, split: list[Batch], epochs: int, args: dict):
    """main() (R:444-560): prototypes before the loop, then train_epoch and calculate_prototype."""
    model = AVClassifier(method, args["fusion"])
    optimizer = sgd(model.parameters())
    loader = [(b.inputs["audio"], b.inputs["visual"], b.labels) for b in split]
    one_batch = [(whole(split).inputs["audio"], whole(split).inputs["visual"], whole(split).labels)]
    record, protos = [], []
    audio_proto, visual_proto = calculate_prototype(args, model, one_batch, 0)
    for epoch in range(epochs):
        train_epoch(args, epoch, model, loader, optimizer, audio_proto, visual_proto, record)
        audio_proto, visual_proto = calculate_prototype(args, model, one_batch, epoch, audio_proto, visual_proto)
        protos.append({"audio": audio_proto, "visual": visual_proto})
    return record, protos


def compare(outs, params, protos, ref_steps, ref_protos, keys) -> float:
    worst = 0.0
    for out, got, ref in zip(outs, params, ref_steps):
        for k in keys:
            worst = max(worst, abs(out[k] - ref[k]))
        for name, value in ref["params"].items():
            worst = max(worst, max_diff(got[name], value))
    for got, ref in zip(protos, ref_protos):
        for m, value in ref.items():
            worst = max(worst, max_diff(got[m], value))
    return worst


RELEASE_KEYS = ("loss", "pce.audio", "pce.visual", "ratio.audio", "pce_weight.audio", "pce_weight.visual")


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_release_step_and_prototypes_equal_the_code(fusion):
    """4 epochs x 3 steps; the window is epochs 1-2, so it is off, on, on, off."""
    args = {"alpha": 2.0, "momentum_coef": 0.3, "modulation_starts": 1, "modulation_ends": 2, "embed_dim": 4,
            "fusion": fusion}
    params = PMRParams(alpha=2.0, momentum_coef=0.3, modulation_starts=1, modulation_ends=2, proto_fraction=1.0)
    split = batches()
    method = make(params=params, fusion=fusion, split=[whole(split)])
    ref_steps, ref_protos = release_run(method, split, 4, args)
    outs, got, protos = drive(method, split, 4)
    worst = compare(outs, got, protos, ref_steps, ref_protos, RELEASE_KEYS)
    assert worst < TOL, worst
    # in the window one modality gets alpha (both branches: the test below); off, neither
    assert all(sorted((o["pce_weight.audio"], o["pce_weight.visual"])) == [0.0, 2.0] for o in outs[3:9])
    assert [o["modulated"] for o in outs] == [0.0] * 3 + [1.0] * 6 + [0.0] * 3
    assert all(o["pce_weight.audio"] == o["pce_weight.visual"] == 0 for o in outs[:3] + outs[9:])
    print(f"pmr release ({fusion}) vs the code: largest difference {worst:.2e}")


def test_the_release_rule_takes_both_branches_bit_for_bit():
    """pace_ratios + pce_weights against the code's if/elif/else on random scores, equal ones included."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(3000, 2, generator=gen) * 16
    scores[:50, 1] = scores[:50, 0]  # equal scores: neither modality gets alpha
    branches = set()
    for s_a, s_v in scores:
        ratios = pace_ratios({"audio": s_a, "visual": s_v})
        w = pce_weights(ratios, 2.0)
        ratio_a_p = s_a / s_v
        beta, lam = (0, 2.0) if ratio_a_p > 1 else (2.0, 0) if ratio_a_p < 1 else (0, 0)
        assert torch.equal(ratios["audio"], ratio_a_p)
        assert (w["audio"].item(), w["visual"].item()) == (beta, lam)
        branches.add((beta, lam))
    assert branches == {(0, 2.0), (2.0, 0), (0, 0)}


def test_three_modalities_every_one_behind_the_leader_gets_alpha():
    s = {m: torch.tensor(v) for m, v in {"audio": 9.0, "visual": 4.0, "text": 6.0}.items()}
    ratios = pace_ratios(s)
    assert {m: r.item() for m, r in ratios.items()} == pytest.approx({"audio": 1.5, "visual": 4 / 9, "text": 6 / 9})
    assert {m: w.item() for m, w in pce_weights(ratios, 0.7).items()} == pytest.approx(
        {"audio": 0.0, "visual": 0.7, "text": 0.7})
    tie = pace_ratios({m: torch.tensor(5.0) for m in ("audio", "visual", "text")})
    assert all(w.item() == 0 for w in pce_weights(tie, 0.7).values())


# -------------------------------------------------- BalanceBenchmark's PMRTrainer (PMR_trainer.py, 4c1482f)


class BBModel(nn.Module):
    """BalanceBenchmark's BaseClassifierModel as the trainer uses it: `modality_encoder` (a ModuleDict:
    parameter names contain the modality), `encoder_result`, `Unimodality_Calculate()['output']`."""

    def __init__(self, method: PMR) -> None:
        super().__init__()
        self.modalitys = list(method.modality_names)
        self.modality_encoder = copy.deepcopy(method.encoders)
        self.fusion_module = copy.deepcopy(method.fusion)
        self.n_classes = C
        self.modality_size = dict.fromkeys(self.modalitys, 4)

    def forward(self, batch):
        self.encoder_result = {m: self.modality_encoder[m](batch[m]) for m in self.modalitys}
        self.output = self.fusion_module(self.encoder_result)

    def Unimodality_Calculate(self):  # noqa: N802 (its name)
        return {"output": self.output}

    def suite_names(self) -> dict[str, nn.Parameter]:
        return {k.replace("modality_encoder", "encoders").replace("fusion_module", "fusion"): v
                for k, v in self.named_parameters()}


class BBTrainer:
    """PMRTrainer.train_loop / training_step / calculate_prototype (B:46-251), without Fabric."""

    def __init__(self, method_dict):
        self.alpha = method_dict["alpha"]
        self.modulation_starts = method_dict["modulation_starts"]
        self.modulation_ends = method_dict["modulation_ends"]
        self.momentum_coef = method_dict["momentum_coef"]
        self.eta = method_dict["eta"]
        self.proto = {}
        self.current_epoch = 0

    def train_loop(self, model, optimizer, train_loader, proto_loader, record):
        modality_list = model.modalitys
        if self.current_epoch == 0:
            for modality in modality_list:
                self.proto[modality] = 0
        self.proto = self.calculate_prototype(model, proto_loader, proto0=self.proto)
        record["protos"].append({m: p.clone() for m, p in self.proto.items()})
        model.train()
        for batch_idx, batch in enumerate(train_loader):
            optimizer.zero_grad()  # the closure runs inside optimizer.step; zero_grad follows it
            loss = self.training_step(model, batch, batch_idx, self.proto)
            optimizer.step()
            optimizer.zero_grad()
            record["steps"].append({"loss": loss.item(),
                                    "params": {k: v.detach().clone() for k, v in model.suite_names().items()}})

    def training_step(self, model, batch, batch_idx, proto):
        criterion = nn.CrossEntropyLoss()
        softmax = nn.Softmax(dim=1)
        tanh = nn.Tanh()
        modality_list = model.modalitys
        key = list(modality_list)
        m = {}
        model(batch)
        for modality in modality_list:
            m[modality] = model.encoder_result[modality]
        unimodal_result = model.Unimodality_Calculate()
        label = batch["label"]
        if self.modulation_starts <= self.current_epoch <= self.modulation_ends:
            sim = {}
            for modality in modality_list:
                sim[modality] = -EU_dist(m[modality], proto[modality])
            score_p = {}
            loss_proto = {}
            for modality in modality_list:
                score_p[modality] = sum([softmax(sim[modality])[i][label[i]] for i in range(sim[modality].size(0))])
            if len(modality_list) == 2:
                ratio_a_p = score_p[key[0]] / score_p[key[1]]
            else:
                ratio = {}
                min_score = min(score_p.values())
                for modality in modality_list:
                    ratio[modality] = score_p[modality] / min_score
            for modality in modality_list:
                loss_proto[modality] = criterion(sim[modality], label)
            if len(modality_list) == 2:
                if ratio_a_p > 1:
                    beta = 0
                    lam = 1 * self.alpha
                elif ratio_a_p < 1:
                    beta = 1 * self.alpha
                    lam = 0
                else:
                    beta = 0
                    lam = 0
                loss = criterion(unimodal_result["output"], label) + beta * loss_proto[key[0]] + \
                    lam * loss_proto[key[1]]
                loss.backward()
            else:
                loss = criterion(unimodal_result["output"], label)
                loss.backward()
                k_t = {}
                for modality in modality_list:
                    if ratio[modality] > 1:
                        k_t[modality] = 1 - tanh(self.eta * ratio[modality])
                    else:
                        k_t[modality] = 1
                for name, parms in model.named_parameters():
                    layer = str(name)
                    for modality in modality_list:
                        if modality in layer and len(parms.grad.size()) != 1:
                            parms.grad = parms.grad * k_t[modality] - \
                                torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8)
        else:
            loss = criterion(unimodal_result["output"], label)
            loss.backward()
        return loss

    def calculate_prototype(self, model, dataloader, proto0):
        n_classes = model.n_classes
        proto = {}
        modality_list = model.modalitys
        for modality in modality_list:
            proto[modality] = torch.zeros(n_classes, model.modality_size[modality])
        count_class = [0 for _ in range(n_classes)]
        model.eval()
        with torch.no_grad():
            sample_count = 0
            all_num = len(dataloader)
            m = {}
            for batch_idx, batch in enumerate(dataloader):  # noqa: B007
                model(batch)
                for modality in modality_list:
                    m[modality] = model.encoder_result[modality]
                label = batch["label"]
                for c, l in enumerate(label):  # noqa: E741
                    l = l.long()  # noqa: E741
                    count_class[l] += 1
                    for modality in modality_list:
                        proto[modality][l, :] += m[modality][c, :]
                sample_count += 1
                if sample_count >= all_num // 10:
                    break
            for modality in modality_list:
                for c in range(proto[modality].shape[0]):
                    proto[modality][c, :] /= count_class[c]
            if self.current_epoch <= 0:
                for modality in modality_list:
                    proto[modality] = proto[modality]
            else:
                for modality in modality_list:
                    proto[modality] = (1 - self.momentum_coef) * proto[modality] + self.momentum_coef * proto0[modality]
            return proto


def bb_run(method: PMR, split: list[Batch], epochs: int, method_dict: dict):
    model, trainer = BBModel(method), BBTrainer(method_dict)
    optimizer = sgd(model.parameters())
    as_dict = [{**b.inputs, "label": b.labels} for b in split]
    one_batch = [{**whole(split).inputs, "label": whole(split).labels}]
    record = {"steps": [], "protos": []}
    for epoch in range(epochs):
        trainer.current_epoch = epoch
        trainer.train_loop(model, optimizer, as_dict, one_batch, record)
    return record


def bb_compare(outs, params, protos, record) -> float:
    worst = 0.0
    for out, got, ref in zip(outs, params, record["steps"]):
        worst = max(worst, abs(out["loss"] - ref["loss"]))
        for name, value in ref["params"].items():
            worst = max(worst, max_diff(got[name], value))
    # BalanceBenchmark's prototypes of epoch e+1 are computed from the weights after epoch e, as ours
    for got, ref in zip(protos, record["protos"][1:]):
        for m, value in ref.items():
            worst = max(worst, max_diff(got[m], value))
    return worst


def test_balancebenchmark_two_modalities_equal_its_trainer():
    md = {"alpha": 0.6, "modulation_starts": 0, "modulation_ends": 1, "momentum_coef": 0.3, "eta": 0.01}
    params = PMRParams(alpha=0.6, momentum_coef=0.3, modulation_starts=0, modulation_ends=1, proto_fraction=1.0,
                       variant="balancebenchmark")
    split = batches()
    method = make(params=params, split=[whole(split)])
    record = bb_run(method, split, 3, md)
    outs, got, protos = drive(method, split, 3)
    worst = bb_compare(outs, got, protos, record)
    assert worst < TOL, worst
    assert [o["modulated"] for o in outs] == [1.0] * 6 + [0.0] * 3
    # the variants differ in the EMA's start: BalanceBenchmark's chain includes the initial prototypes
    release = make(params=params.model_copy(update={"variant": "release"}), split=[whole(split)])
    _, _, release_protos = drive(release, split, 3)
    assert max_diff(release_protos[0]["audio"], protos[0]["audio"]) > 1e-3
    print(f"pmr balancebenchmark (M=2) vs its trainer: largest difference {worst:.2e}")


def test_balancebenchmark_three_modalities_equal_its_gradient_rule():
    md = {"alpha": 0.6, "modulation_starts": 0, "modulation_ends": 1, "momentum_coef": 0.3, "eta": 0.5}
    params = PMRParams(momentum_coef=0.3, modulation_starts=0, modulation_ends=1, proto_fraction=1.0,
                       variant="balancebenchmark", eta=0.5)
    split = batches(MODS3)
    method = make(params=params, mods=MODS3, split=[whole(split)])
    torch.manual_seed(7)  # the noise comes from the global RNG, in the same order in both
    record = bb_run(method, split, 3, md)
    torch.manual_seed(7)
    outs, got, protos = drive(method, split, 3)
    worst = bb_compare(outs, got, protos, record)
    assert worst < TOL, worst
    for o in outs[:6]:  # in the window: the leader modulated, its coefficient 1 - tanh(0.5 r) < 1
        coefs = [o[f"grad_coef.{m}"] for m in ("audio", "visual", "text")]
        assert min(coefs) < 1 and max(coefs) == 1.0
        assert "pce_weight.audio" not in o
    print(f"pmr balancebenchmark (M=3) vs its trainer: largest difference {worst:.2e}")


# --------------------------------------------------------------- the paper's PER, written out


def per_reference_step(model: PMR, batch: Batch, opt, alpha: float, mu: float, per_on: bool) -> float:
    """L = CE(fused) + sum_m w_m PCE_m - mu sum_{m dominant} mean_i H(p_m,i), p_m = softmax(-||f - c||),
    w_m = alpha for the modality behind, dominant: the one ahead (r > 1)."""
    opt.zero_grad()
    feats = model.encode(batch.inputs)
    y = batch.labels
    loss = F.cross_entropy(model.fusion(feats), y)
    p = {}
    for m, f in feats.items():
        c = model.prototype(m)
        dist = ((f[:, None, :] - c[None, :, :]) ** 2).sum(-1).sqrt()
        p[m] = torch.softmax(-dist, 1)
    s = {m: p[m][torch.arange(len(y)), y].sum() for m in p}
    a, v = s["audio"].item(), s["visual"].item()
    assert a != v  # the tie (neither term) is the release rule's, tested there
    slow, fast = ("audio", "visual") if a < v else ("visual", "audio")
    loss = loss - alpha * torch.log(p[slow][torch.arange(len(y)), y]).mean()
    if per_on:
        loss = loss - mu * (-(p[fast] * torch.log(p[fast])).sum(1).mean())
    loss.backward()
    opt.step()
    return loss.item()


def test_paper_per_equals_its_formula_and_switches_off_after_entropy_ends():
    params = PMRParams(alpha=1.5, momentum_coef=0.2, proto_fraction=1.0, entropy_weight=0.7, entropy_ends=0)
    split = batches(n=2)
    method = make(params=params, split=[whole(split)])
    ref = copy.deepcopy(method)
    ref_opt = sgd(ref.parameters())
    ctx, worst = method.step_context, 0.0
    for epoch in range(2):
        ctx.epoch = epoch
        method.train()
        method.on_epoch_start(epoch)
        if epoch == 0:
            ref.load_state_dict(method.state_dict())  # the same initial prototypes
        for b in split:
            expected = per_reference_step(ref, b, ref_opt, 1.5, 0.7, per_on=epoch == 0)
            out = method.training_step(b)
            worst = max(worst, abs(out["loss"].item() - expected))
            for value, other in zip(method.parameters(), ref.parameters()):
                worst = max(worst, max_diff(value, other))
            assert ("entropy.audio" in out) == (epoch == 0)
        method.on_epoch_end(epoch)
        for m in method.modality_names:  # the prototypes are shared by construction: copy ours over
            ref.prototype(m).copy_(method.prototype(m))
    assert worst < TOL, worst
    print(f"pmr paper PER vs its formula: largest difference {worst:.2e}")


# ----------------------------------------------------------------- switched off = joint training


@pytest.mark.parametrize("fusion", ["concat", "sum", "late"])
@pytest.mark.parametrize("off", [{"alpha": 0.0}, {"modulation_starts": 5, "modulation_ends": 9}])
def test_switched_off_equals_joint(fusion, off):
    split = batches(n=2)
    method = make(params=PMRParams(proto_fraction=0.5, **off), fusion=fusion, split=split)
    joint = make(Joint, JointParams(), fusion=fusion)
    for (name, value), (other_name, other) in zip(method.named_parameters(), joint.named_parameters()):
        assert name == other_name and torch.equal(value, other)
    outs, params, _ = drive(method, split, 2)
    ctx = joint.step_context
    for epoch in range(2):
        ctx.epoch = epoch
        for i, b in enumerate(split):
            loss = joint.training_step(b)["loss"].item()
            out, state = outs[epoch * 2 + i], params[epoch * 2 + i]
            assert out["loss_task"] == pytest.approx(loss, abs=1e-6) and out["loss"] == pytest.approx(loss, abs=1e-6)
            for name, value in joint.named_parameters():
                assert max_diff(state[name], value) < 1e-6, name


# --------------------------------------------------------------------------------- the subset


def test_subset_keeps_the_first_sample_of_each_class_and_about_the_fraction():
    gen = torch.Generator().manual_seed(0)
    seen = torch.zeros(4, dtype=torch.bool)
    keep, seen = subset_mask(torch.tensor([2, 2, 0, 2]), seen, 1e-9, gen)
    assert keep.tolist() == [True, False, True, False] and seen.tolist() == [True, False, True, False]
    keep, seen = subset_mask(torch.tensor([0, 1, 1, 3, 2]), seen, 1e-9, gen)  # 0 and 2 already seen
    assert keep.tolist() == [False, True, False, True, False] and seen.all()
    keep, _ = subset_mask(torch.tensor([1, 0]), seen, 1.0, gen)
    assert keep.all()
    labels = torch.arange(20000) % 4
    keep, _ = subset_mask(labels, torch.ones(4, dtype=torch.bool), 0.1, torch.Generator().manual_seed(1))
    assert 0.09 < keep.float().mean().item() < 0.11


def test_prototypes_of_a_subset_are_class_means_of_its_kept_samples_and_never_nan():
    split = batches(n=4, size=4)
    method = make(params=PMRParams(proto_fraction=0.1, momentum_coef=0.0), split=split)
    method.train()
    method.on_epoch_start(0)
    assert method.training  # the pass restores the mode
    gen = torch.Generator().manual_seed(method.subset_seed * 1_000_003)
    seen, kept = torch.zeros(C, dtype=torch.bool), []
    for b in split:
        keep, seen = subset_mask(b.labels, seen, 0.1, gen)
        kept.append(Batch({m: x[keep] for m, x in b.inputs.items()}, b.labels[keep]))
    sub = whole(kept)
    method.eval()
    with torch.no_grad():
        feats = method.encode(sub.inputs)
    for m in method.modality_names:
        means = torch.stack([feats[m][sub.labels == k].mean(0) for k in range(C)])
        assert max_diff(method.prototype(m), means) < 1e-6
    assert len(sub.labels) < 16 and set(sub.labels.tolist()) == set(range(C))
    # another epoch's subset is another draw (the seed and the computation's index)
    method.train()
    method.on_epoch_end(0)
    assert not torch.equal(method.prototype("audio"), means)


# ------------------------------------------------------------------------- the method's shell


def test_refusals_are_clear():
    with pytest.raises(ConfigError, match=r"method pmr rebalances two or more modalities; the dataset has 1"):
        PMR(PMRParams(), setup(MODS2[:1]))
    with pytest.raises(ConfigError, match=r"method.eta applies only to variant=balancebenchmark with three"):
        PMR(PMRParams(variant="balancebenchmark", eta=0.1), setup())
    for bad, match in [({"eta": 0.1}, "eta applies only to variant='balancebenchmark'"),
                       ({"entropy_weight": 0.1}, "needs entropy_ends"),
                       ({"entropy_ends": 3}, "entropy_ends applies only with entropy_weight > 0"),
                       ({"entropy_weight": 0.1, "entropy_ends": 3, "variant": "balancebenchmark"}, "in neither"),
                       ({"modulation_starts": 5, "modulation_ends": 2}, "would never open"),
                       ({"proto_fraction": 0.0}, "greater than 0")]:
        with pytest.raises(ValueError, match=match):
            PMRParams(**bad)
    method = make()
    with pytest.raises(RuntimeError, match=r"before its prototypes were computed"):
        method.training_step(batches(n=1)[0])


def test_predict_logs_prototype_accuracy_and_is_free_of_side_effects():
    split = batches(n=2)
    method = make(params=PMRParams(proto_fraction=1.0), split=split)
    assert method.predict(split[0]).logs == {}  # no prototypes yet
    method.on_epoch_start(0)
    method.eval()
    before = copy.deepcopy(method.state_dict())
    with torch.no_grad():
        pred = method.predict(split[0])
        feats = method.encode(split[0].inputs)
    for m in ("audio", "visual"):
        dist = torch.cdist(feats[m], method.prototype(m))
        assert pred.logs[f"proto_acc.{m}"].item() == (dist.argmin(1) == split[0].labels).float().mean().item()
    after = method.state_dict()
    assert after.keys() == before.keys() and after["_extra_state"] == before["_extra_state"]
    for key, value in after.items():
        assert key == "_extra_state" or torch.equal(value, before[key]), key


# --------------------------------------------------------------------------------- the harness


HARNESS = ["method.name=pmr", "train.epochs=3", "method.alpha=1.0", "method.momentum_coef=0.3"]


@pytest.mark.parametrize("variant", ["release", "balancebenchmark"])
def test_three_modalities_through_the_harness(fast_config, store, variant):
    cfg = fast_config(*HARNESS, "dataset.name=gaussian3", f"method.variant={variant}")
    result = run(cfg, store)
    history = RunDir(result.path).read_metrics()
    names = ("audio", "visual", "text")
    for record in history:
        train = record["train"]
        assert all(train[f"ratio.{m}"] > 0 and train[f"pce.{m}"] > 0 for m in names)
        key = "pce_weight" if variant == "release" else "grad_coef"
        assert {f"{key}.{m}" for m in names} <= set(train)
        assert all(0 <= record["method"][f"proto_acc.{m}"] <= 1 for m in names)
    assert set(result.summary["probes"]) == set(names)
    assert result.summary["cost"]["forward_passes_per_step"] == result.summary["cost"]["backward_passes_per_step"] == 1


def test_resume_is_exact(fast_config, store, tmp_path, monkeypatch):
    cfg = fast_config(*HARNESS, "method.proto_fraction=0.5", "train.epochs=4")
    assert_resumes_exactly(cfg, store, tmp_path, monkeypatch)


def test_registered_with_its_diagnostics():
    assert METHODS.get("pmr", "method.name") is PMR
