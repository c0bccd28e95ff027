"""MIE: flat projection, both SAM variants, the stage schedule, restarts on validation, resume."""

from __future__ import annotations

import copy
import math
import re
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbalance.bench.config import load_config
from mmbalance.bench.store import RunDir, Store
from mmbalance.bench.train import Trainer, run
from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Batch, Modality
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.mie import MIE, MIEParams, flat_projection
from tests.conftest import FAST, run_interrupted, step_context, without_timing

C = 4
MODS = (Modality("audio", "vector", (5,)), Modality("visual", "vector", (3,)))


class Enc(nn.Module):
    """Linear (-> BatchNorm, then without a bias) -> ReLU, `depth` - 1 more Linear(d_out, d_out) ->
    ReLU, or the identity (hand-computable head inputs)."""

    def __init__(self, d_in: int, d_out: int, bn: bool = False, identity: bool = False, depth: int = 1) -> None:
        super().__init__()
        self.out_dim = d_in if identity else d_out
        # no bias before BatchNorm: its gradient would be rounding noise, which the code's per-tensor
        # normalisation blows up to a step of rho in an arbitrary direction
        first = [nn.Linear(d_in, d_out, bias=not bn), *([nn.BatchNorm1d(d_out)] if bn else []), nn.ReLU()]
        more = [layer for _ in range(depth - 1) for layer in (nn.Linear(d_out, d_out), nn.ReLU())]
        self.net = nn.Sequential(*([] if identity else [*first, *more]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make(epochs: int = 2, out=(6, 6), bn: bool = False, identity: bool = False, lr: float = 0.1,
         momentum: float = 0.0, weight_decay: float = 0.0, depth: int = 1, mods=MODS, **params) -> MIE:
    torch.manual_seed(0)
    encs = nn.ModuleDict({m.name: Enc(m.shape[0], d, bn, identity, depth) for m, d in zip(mods, out)})
    params = {"epoch_list": [1] * epochs, "head_hidden": (7, 5), **params}
    method = MIE(MIEParams(**params), MethodSetup(encs, C, mods, epochs=epochs))

    def sgd() -> torch.optim.Optimizer:
        return torch.optim.SGD(method.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    method.attach(step_context(sgd))
    return method


def batch(seed: int = 1, n: int = 6) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return Batch({"audio": torch.randn(n, 5, generator=gen), "visual": torch.randn(n, 3, generator=gen)},
                 torch.tensor([0, 1, 2, 3, 2, 1][:n]))


def path_params(model: MIE, m: str) -> list[nn.Parameter]:
    return [*model.encoders[m].parameters(), *model.heads[m].parameters()]


def plain_ce(model: MIE, m: str, b: Batch) -> torch.Tensor:
    return F.cross_entropy(model.heads[m](model.encoders[m](b.inputs[m])), b.labels)


# ------------------------------------------------------------------------------ flat projection


def test_flat_projection_diagonal_by_hand():
    # singular values 2, 0, 1: scaled to 1, 0, 0.5 of the range, so P = diag(e^-0.4, 1, e^-0.2)
    P = flat_projection(torch.diag(torch.tensor([2.0, 0.0, 1.0])), 0.4)
    assert torch.allclose(P, torch.diag(torch.tensor([math.exp(-0.4), 1.0, math.exp(-0.2)])), atol=1e-6)
    # every direction used equally: nothing to damp
    assert torch.equal(flat_projection(3 * torch.eye(3), 0.4), torch.eye(3))
    assert torch.equal(flat_projection(torch.zeros(2, 2), 0.4), torch.eye(2))


def test_flat_projection_matches_numpy_eigendecomposition():
    B = np.array([[2, 1, 0, 1], [0, 3, 1, 0], [1, 0, 1, 2], [0, 1, 0, 1]], dtype=np.float64)
    A = B @ B.T  # symmetric PSD: singular values = eigenvalues, singular vectors = eigenvectors
    w, Q = np.linalg.eigh(A)
    expected = Q @ np.diag(np.exp(-0.4 * (w - w.min()) / (w.max() - w.min()))) @ Q.T
    P = flat_projection(torch.tensor(A, dtype=torch.float32), 0.4).double().numpy()
    np.testing.assert_allclose(P, expected, atol=1e-5)
    # endpoints: the most-used direction is damped by e^-0.4, the least-used kept
    np.testing.assert_allclose(P @ Q[:, -1], math.exp(-0.4) * Q[:, -1], atol=1e-5)
    np.testing.assert_allclose(P @ Q[:, 0], Q[:, 0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.eigvalsh(P)[[0, -1]], [math.exp(-0.4), 1.0], atol=1e-5)


def set_layer(layer: nn.Linear, w, b) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(w, dtype=torch.float32))
        layer.bias.copy_(torch.tensor(b, dtype=torch.float32))


@pytest.mark.parametrize("chunk, expected0", [
    (12, [[8, 6], [6, 9]]),     # batch means [2, 3] and [2, 0]
    (1, [[14, 14], [14, 20]]),  # rows [1, 2], [3, 4] and [2, 0] each their own chunk
])
def test_accumulation_of_batch_mean_inputs_by_hand(chunk, expected0):
    mods = (Modality("audio", "vector", (2,)), Modality("visual", "vector", (2,)))
    model = make(identity=True, mods=mods, head_hidden=(3, 2), flat_batch_size=chunk)
    head = model.heads["visual"]
    set_layer(head[0], [[1, 0], [0, 1], [1, 1]], [0, 0, 0])  # h = [x1, x2, x1 + x2] (x >= 0)
    set_layer(head[2], [[1, 0, 0], [0, 1, 1]], [0, 1])      # z = [x1, x1 + 2 x2 + 1]
    xs = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[2.0, 0.0]])]
    model.step_context.train_batches = lambda: iter(
        Batch({"visual": x, "audio": torch.zeros(len(x), 2)}, torch.zeros(len(x), dtype=torch.long)) for x in xs)
    model.train()
    acc = model.accumulate_inputs("visual")
    assert sorted(acc) == ["head.0", "head.2", "head.3"]  # the three Linear layers; the ReLU has none
    assert acc["head.0"].tolist() == expected0
    if chunk == 12:
        # layer 2 input means [2, 3, 5] and [2, 0, 2]; layer 3 input means [2, 9] and [2, 3]
        assert acc["head.2"].tolist() == [[8, 6, 14], [6, 9, 15], [14, 15, 29]]
        assert acc["head.3"].tolist() == [[8, 24], [24, 90]]
    assert model.training and not head[0]._forward_hooks  # mode restored, hooks removed


def batches_of(seed: int, count: int = 6, n: int = 6) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [Batch({"audio": torch.randn(n, 5, generator=gen), "visual": torch.randn(n, 3, generator=gen)},
                  torch.randint(0, C, (n,), generator=gen)) for _ in range(count)]


def chunk_mean_sum(xs: list[torch.Tensor]) -> torch.Tensor:
    return sum(x.mean(0, keepdim=True).T @ x.mean(0, keepdim=True) for x in xs)


@pytest.mark.parametrize("project_layers", ["head", "shape_match"])
def test_accumulation_covers_encoder_linear_layers_only_for_the_shape_rule(project_layers):
    model = make(depth=2, project_layers=project_layers)
    data = batches_of(2)
    model.step_context.train_batches = lambda: iter(data)
    acc = model.accumulate_inputs("audio")
    heads = ["head.0", "head.2", "head.3"]
    assert sorted(acc) == (heads if project_layers == "head" else ["encoder.net.0", "encoder.net.2", *heads])
    if project_layers == "shape_match":  # the encoder's first layer sees the raw input
        assert torch.allclose(acc["encoder.net.0"], chunk_mean_sum([b.inputs["audio"] for b in data]), atol=1e-5)


class PositionEnc(nn.Module):
    """A Linear layer applied at every position of (B, T, d) inputs, then the mean over positions."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.out_dim, self.proj = d_out, nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.view(len(x), -1, 1)).mean(1)


def test_accumulation_of_inputs_with_positions_gives_one_row_per_position():
    model = make(project_layers="shape_match")
    model.encoders["audio"] = PositionEnc(1, 6)
    data = batches_of(2, count=3)
    model.step_context.train_batches = lambda: iter(data)
    acc = model.accumulate_inputs("audio")["encoder.proj"]
    xbars = [b.inputs["audio"].mean(0).view(-1, 1) for b in data]  # 5 positions of 1 feature
    assert torch.allclose(acc, sum(x.T @ x for x in xbars), atol=1e-6)


@pytest.mark.parametrize("project_layers", ["head", "shape_match"])
def test_which_previous_layers_project_which_gradients(project_layers):
    # MLP encoders of equal hidden sizes and a head of equal widths: (6, 6) weights in both parts
    model = make(depth=2, head_hidden=(6, 6), project_layers=project_layers, epochs=2)
    data = batches_of(2)
    model.step_context.train_batches = lambda: iter(data)
    model.on_epoch_start(1)  # stage 2: visual, with audio's P's
    P = {n: flat_projection(a, 0.4) for n, a in model.accumulate_inputs("audio").items()}
    if project_layers == "head":  # each head layer its counterpart
        expected = {n: [n] for n in ("head.0", "head.2", "head.3")}
    else:  # every previous layer of the same shape, in module order; visual's first layer (6 x 3) none
        square = ["encoder.net.2", "head.0", "head.2"]
        expected = {"encoder.net.2": square, "head.0": square, "head.2": square, "head.3": ["head.3"]}
    assert {n: len(Ps) for n, Ps in model.proj.items()} == {n: len(ns) for n, ns in expected.items()}
    for name, names in expected.items():
        for got, n in zip(model.proj[name], names):
            assert torch.allclose(got, P[n], atol=1e-6), (name, n)


def test_head_rule_leaves_a_layer_of_another_input_size_unprojected():
    model = make(out=(6, 4), project_layers="head")  # visual's head starts with Linear(4, 7), audio's (6, 7)
    data = batches_of(2)
    model.step_context.train_batches = lambda: iter(data)
    model.on_epoch_start(1)
    assert sorted(model.proj) == ["head.2", "head.3"]


def test_weight_gradients_are_multiplied_by_their_Ps_in_order():
    model = make(out=(6, 4), sam="code", rho=0.0, mixup_alpha=0, flat_ratio=0.0)
    model.step_context.epoch = 1
    gen = torch.Generator().manual_seed(3)
    sym = lambda d: (lambda a: a @ a.T / d)(torch.randn(d, d, generator=gen))  # noqa: E731
    model.proj = {"head.2": [sym(7)], "head.3": [sym(5), sym(5)]}
    ref, b, lr = copy.deepcopy(model), batch(), 0.1
    plain_ce(ref, "visual", b).backward()
    model.training_step(b)
    head, rhead = model.heads["visual"], ref.heads["visual"]
    P2, (P3, P3b) = model.proj["head.2"][0], model.proj["head.3"]
    for i, grad in ((2, rhead[2].weight.grad @ P2), (3, rhead[3].weight.grad @ P3 @ P3b)):
        assert torch.allclose(head[i].weight, rhead[i].weight - lr * grad, atol=1e-6), i
        assert torch.allclose(head[i].bias, rhead[i].bias - lr * rhead[i].bias.grad, atol=1e-7)
    assert torch.allclose(head[0].weight, rhead[0].weight - lr * rhead[0].weight.grad, atol=1e-7)
    for n, p in model.heads["audio"].named_parameters():  # inactive: untouched
        assert torch.equal(p, ref.heads["audio"].get_parameter(n))


# ------------------------------------------------- the released code's step, transcribed (IGM)
# njustkmg/IJCAI25-IGM @ 19aa8e5: models/AudioVideo.py (compute_cov, get_P_matrix, update_cov),
# utils/utils.py (mixup_data), utils/loss.py (mixup_criterion), train_CREMA.py (compute_P_matrix,
# train_withoutP, train_withP), written as there; CPU instead of .cuda(), the suite's draws of lam
# and the permutation passed in, and each step's body taken out of its loop over the loader.


class CodeAV(nn.Module):
    """AVClassifier with the suite's tiny encoders and heads (their weights) in place of ResNet18s."""

    def __init__(self, model: MIE) -> None:
        super().__init__()
        model = copy.deepcopy(model)
        self.audio_encoder, self.video_encoder = model.encoders["audio"], model.encoders["visual"]
        self.cls_a, self.cls_v = model.heads["audio"], model.heads["visual"]
        self.fea_in = defaultdict(dict)
        self.P_matrix = defaultdict(dict)

    def forward(self, input_list):
        audio, video, state = input_list
        if state == 'train_audio':
            a_feature = self.audio_encoder(audio)
            result_a = self.cls_a(a_feature)
            return a_feature, result_a
        elif state == 'train_video':
            v_feature = self.video_encoder(video)
            result_v = self.cls_v(v_feature)
            return v_feature, result_v

    def compute_cov(self, module, fea_in, fea_out):
        if isinstance(module, nn.Linear):
            self.update_cov(torch.mean(fea_in[0], 0, True), module.weight)
        return None

    def get_P_matrix(self, modules, fea_in, config):
        for m in modules:
            if isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d):
                pass
            else:
                continue
            _, eigen_value, eigen_vector = torch.svd(fea_in[m.weight], some=False)
            max_eigen = torch.max(eigen_value)
            min_eigen = torch.min(eigen_value)
            learning_matrix = torch.exp(
                config['train']['temperature1'] * (-(eigen_value - min_eigen) / (max_eigen - min_eigen)))

            learning_matrix = torch.diag(learning_matrix)
            self.P_matrix[m.weight] = eigen_vector @ learning_matrix @ eigen_vector.t()

    def update_cov(self, fea_in, k):
        cov = torch.mm(fea_in.transpose(0, 1), fea_in)
        if len(self.fea_in[k]) == 0:
            self.fea_in[k] = cov
        else:
            self.fea_in[k] = self.fea_in[k] + cov


def code_modules(encoder: nn.Module, cls: nn.Module) -> list[nn.Module]:
    modules = [m for n, m in encoder.named_modules() if hasattr(m, 'weight') and not bool(re.match('last', n))]
    return modules + [m for n, m in cls.named_modules() if hasattr(m, 'weight') and not bool(re.match('last', n))]


def compute_P_matrix(model, train_loader, config, state):
    model.eval()
    if state == 'train_audio':
        modules = code_modules(model.audio_encoder, model.cls_a)
    else:
        modules = code_modules(model.video_encoder, model.cls_v)
    handles = []
    for m in modules:
        handles.append(m.register_forward_hook(hook=model.compute_cov))
    for spectrogram, image, _ in train_loader:
        model.forward([spectrogram, image, state])
    model.get_P_matrix(modules, model.fea_in, config)
    for h in handles:
        h.remove()


def mixup_data(x, y, lam, index):
    mixed_x = lam * x + (1 - lam) * x[index, :]
    y_a, y_b = y, y[index]
    return mixed_x, y_a, y_b, lam


def mixup_criterion(criterion, pred, y_a, y_b, lam):
    return lam * criterion(pred, y_a) + (1 - lam) * criterion(pred, y_b)


def code_step(model, optimizer, spectrogram, image, y, state, cfg, lam, index, with_P, rule="shape"):
    """One iteration of train_withP (train_withoutP without the gradient modification). `rule`:
    "shape" as the code; "head" the paper's rule, each head layer with its counterpart."""
    criterion = nn.CrossEntropyLoss(reduction='none')
    if state == 'train_audio':
        spectrogram, targets_a, targets_b, lam = mixup_data(spectrogram, y, lam, index)
    else:
        image, targets_a, targets_b, lam = mixup_data(image, y, lam, index)
    fea, o = model([spectrogram, image, state])
    loss_ori = mixup_criterion(criterion, o, targets_a, targets_b, lam)
    if state == 'train_audio':
        disturb_params = list(model.audio_encoder.parameters())
        disturb_params_cls = list(model.cls_a.parameters())
    else:
        disturb_params = list(model.video_encoder.parameters())
        disturb_params_cls = list(model.cls_v.parameters())
    grad_list = list(torch.autograd.grad(loss_ori.mean(), disturb_params, retain_graph=True))
    grad_list_cls = list(torch.autograd.grad(loss_ori.mean(), disturb_params_cls, retain_graph=True))
    for params, grads, rho_c in ((disturb_params, grad_list, cfg['train']['noise_ratio']),
                                 (disturb_params_cls, grad_list_cls, cfg['train']['noise_ratio_cls'])):
        for param, grad_c in zip(params, grads):
            if grad_c is not None:
                grad_c_norm = torch.norm(grad_c)
                denominator = grad_c / grad_c_norm
                noise = rho_c * 1.0 * denominator
                param.data = param.data + noise
    o_tmp = model.cls_a(fea) if state == 'train_audio' else model.cls_v(fea)
    loss_list = torch.stack(list(F.cross_entropy(o_tmp, y, reduction='none')))
    loss = (1 - cfg['train']['flat_ratio']) * loss_ori.mean() + cfg['train']['flat_ratio'] * loss_list.mean()
    optimizer.zero_grad()
    loss.backward()
    if with_P:
        modules_video = code_modules(model.video_encoder, model.cls_v)
        modules_audio = code_modules(model.audio_encoder, model.cls_a)
        if state == 'train_audio':
            modules_now, modules_pre = modules_audio, modules_video
        else:
            modules_now, modules_pre = modules_video, modules_audio
        if rule == "shape":
            for m in modules_now:
                if isinstance(m, nn.Linear):
                    for n in modules_pre:
                        if m.weight.shape == n.weight.shape:
                            m.weight.grad = m.weight.grad @ model.P_matrix[n.weight]
        else:
            now, pre = (model.cls_a, model.cls_v) if state == 'train_audio' else (model.cls_v, model.cls_a)
            for m, n in zip(now, pre):
                if isinstance(m, nn.Linear) and m.weight.shape == n.weight.shape:
                    m.weight.grad = m.weight.grad @ model.P_matrix[n.weight]
    optimizer.step()
    return {"loss": loss.item(), "loss_ori": loss_ori.mean().item(), "loss_flat": loss_list.mean().item()}


def recording_draws(model: MIE) -> list[tuple[float, torch.Tensor | None]]:
    """The (lam, permutation) pairs the suite's model draws, in order."""
    draws, draw = [], model.mixup

    def mixup(n: int):
        draws.append(draw(n))
        return draws[-1]

    model.mixup = mixup
    return draws


STATE = {"audio": "train_audio", "visual": "train_video"}


@pytest.mark.parametrize("rho, project_layers, bn", [(1e-2, "shape_match", False), (1e-2, "head", False),
                                                     (None, "shape_match", False), (1e-2, "shape_match", True)])
def test_code_variant_equals_the_released_step_over_three_stages(rho, project_layers, bn):
    # MLP encoders of equal hidden sizes and a head of equal widths: under the code's shape rule,
    # encoder layers are projected and one layer gets several P's. With BatchNorm, whose weight
    # autograd saves as the parameter itself, L_ori's backward reads it at theta + eps, as the code's
    lr, wd, beta, T = 0.05, 1e-4, 0.3, 0.7
    kw = dict(depth=2, head_hidden=(6, 6), epochs=3, lr=lr, momentum=0.9, weight_decay=wd, bn=bn)
    params = dict(sam="code", rho=rho, mixup_alpha=1.0, flat_ratio=beta, temperature=T, flat_batch_size=6,
                  restart_from_best=False)
    model = make(**kw, project_layers=project_layers, **params)
    code = CodeAV(model)
    rho = model.rho
    cfg = {"train": {"noise_ratio": rho, "noise_ratio_cls": rho, "flat_ratio": beta, "temperature1": T}}
    data = batches_of(5)
    model.step_context.train_batches = lambda: iter(data)
    loader = [(b.inputs["audio"], b.inputs["visual"], F.one_hot(b.labels, C).float()) for b in data]
    draws = recording_draws(model)
    optimizer = None
    steps = {0: 6, 1: 12, 2: 6}  # audio, visual (with audio's P's), audio (with visual's)
    for epoch, count in steps.items():
        model.step_context.epoch = epoch
        model.on_epoch_start(epoch)
        m, previous = model.modality_of(epoch), model.modality_of(epoch - 1)
        if epoch > 0:  # the code: P's from the previous modality on a fresh model, a fresh optimizer
            code.fea_in, code.P_matrix = defaultdict(dict), defaultdict(dict)
            with torch.no_grad():
                compute_P_matrix(code, loader, cfg, STATE[previous])
        optimizer = torch.optim.SGD(code.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        code.train()
        for step in range(count):
            spectrogram, image, y = loader[step % len(loader)]
            out = model.training_step(data[step % len(data)])
            lam, index = draws[-1]
            ref = code_step(code, optimizer, spectrogram, image, y, STATE[m], cfg, lam, index, with_P=epoch > 0,
                            rule="shape" if project_layers == "shape_match" else "head")
            for key, value in ref.items():
                assert out[key].item() == pytest.approx(value, abs=1e-5), (epoch, step, key)
    mine = [*model.encoders["audio"].parameters(), *model.encoders["visual"].parameters(),
            *model.heads["audio"].parameters(), *model.heads["visual"].parameters()]
    theirs = [*code.audio_encoder.parameters(), *code.video_encoder.parameters(),
              *code.cls_a.parameters(), *code.cls_v.parameters()]
    assert len(draws) == sum(steps.values()) and all(0 < lam < 1 for lam, _ in draws)
    for p, q in zip(mine, theirs):
        assert torch.allclose(p, q, atol=1e-5)


def train_code_stages(project_layers: str, rho: float) -> list[torch.Tensor]:
    model = make(depth=2, head_hidden=(6, 6), epochs=2, lr=0.05, momentum=0.9, sam="code", rho=rho,
                 mixup_alpha=0.0, flat_batch_size=6, restart_from_best=False, project_layers=project_layers)
    data = batches_of(5)
    model.step_context.train_batches = lambda: iter(data)
    for epoch, count in ((0, 6), (1, 12)):
        model.step_context.epoch = epoch
        model.on_epoch_start(epoch)
        for step in range(count):
            model.training_step(data[step % len(data)])
    return [p.detach().clone() for p in model.parameters()]


def test_the_two_projection_rules_differ_for_mlp_encoders_of_equal_widths():
    gap = max((p - q).abs().max().item() for p, q in zip(train_code_stages("head", 1e-10),
                                                          train_code_stages("shape_match", 1e-10)))
    assert gap > 1e-3  # 8.8e-3 measured


def test_code_sam_rebinds_so_the_mixup_term_keeps_its_gradient_at_theta():
    # lr 0 and flat_ratio 0: the step moves only by the perturbation, and the gradient the backward
    # leaves is L_ori's at theta (Linear layers save W^T, a view the rebinding leaves on theta)
    model = make(depth=2, sam="code", rho=1e-2, mixup_alpha=0, flat_ratio=0.0, lr=0.0)
    ref, b = copy.deepcopy(model), batch()
    g = torch.autograd.grad(plain_ce(ref, "audio", b), path_params(ref, "audio"))
    model.training_step(b)
    for p, x in zip(path_params(model, "audio"), g):
        assert torch.allclose(p.grad, x, atol=1e-7)


# ------------------------------------------------------------------------------------ SAM steps


def mixup_objective(model: MIE, m: str, b: Batch, lam: float, perm: torch.Tensor | None,
                    beta: float = 0.3) -> torch.Tensor:
    """(1 - beta) [lam CE(o, y) + (1 - lam) CE(o, y_perm)] + beta CE(o, y), o of the mixed input."""
    x, y = b.inputs[m], b.labels
    perm = torch.arange(len(y)) if perm is None else perm
    o = model.heads[m](model.encoders[m](lam * x + (1 - lam) * x[perm]))
    return (1 - beta) * (lam * F.cross_entropy(o, y) + (1 - lam) * F.cross_entropy(o, y[perm])) \
        + beta * F.cross_entropy(o, y)


@pytest.mark.parametrize("sam", ["paper", "code"])
def test_the_encoder_receives_the_mixed_input_on_the_cpu(sam):
    model = make(sam=sam, mixup_alpha=1.0)
    draws, seen = recording_draws(model), []
    model.encoders["audio"].register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    b = batch()
    model.training_step(b)
    [(lam, perm)] = draws
    x = b.inputs["audio"]
    assert 0 < lam < 1 and not torch.equal(perm, torch.arange(len(perm)))
    assert len(seen) == (2 if sam == "paper" else 1)  # the paper's SAM re-runs the encoder
    for got in seen:
        assert torch.equal(got, lam * x + (1 - lam) * x[perm])


@pytest.mark.parametrize("mixup_alpha", [0.0, 1.0])
def test_paper_sam_steps_with_the_gradient_at_the_perturbed_point_and_restores_theta(mixup_alpha):
    rho, lr = 0.5, 0.1
    model = make(bn=True, sam="paper", rho=rho, mixup_alpha=mixup_alpha)  # no mixup: 0.7 CE + 0.3 CE = CE
    b, ref = batch(), copy.deepcopy(model)
    draws = recording_draws(model)
    out = model.training_step(b)
    [(lam, perm)] = draws
    assert (perm is None) == (mixup_alpha == 0)
    # by hand on the copy: g at theta, eps = rho g / ||g|| (global), g' at theta + eps
    params = path_params(ref, "audio")
    loss = mixup_objective(ref, "audio", b, lam, perm)
    g = torch.autograd.grad(loss, params)
    stats_after_one_forward = ref.encoders["audio"].net[1].running_mean.clone()
    norm = torch.sqrt(sum((x**2).sum() for x in g))
    theta = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, x in zip(params, g):
            p.add_(rho * x / norm)
    g_pert = torch.autograd.grad(mixup_objective(ref, "audio", b, lam, perm), params)

    assert out["loss"].item() == pytest.approx(loss.item(), abs=1e-6)
    assert model.step_context.backward_passes == 2
    assert out["loss_sam"] > out["loss"]  # the ascent step went uphill
    gap = 0.0
    for p, t, x, e in zip(path_params(model, "audio"), theta, g_pert, g):
        assert torch.allclose(p, t - lr * x, atol=1e-6)
        gap = max(gap, (p - (t + rho * e / norm - lr * x)).abs().max().item())
    assert gap > 0.05  # not left perturbed (the perturbation moves some weight by more than that)
    # BatchNorm statistics: those of the forward at theta only
    assert torch.equal(model.encoders["audio"].net[1].running_mean, stats_after_one_forward)
    for p, q in zip(path_params(model, "visual"), path_params(ref, "visual")):
        assert torch.equal(p, q)


def test_code_sam_moves_each_tensor_by_rho_over_its_own_norm_and_never_back():
    rho = 0.5
    model = make(sam="code", rho=rho, mixup_alpha=0, lr=0.0)  # lr 0: only the perturbation moves
    ref, b = copy.deepcopy(model), batch()
    g = torch.autograd.grad(plain_ce(ref, "audio", b), path_params(ref, "audio"))
    model.training_step(b)
    for p, q, x in zip(path_params(model, "audio"), path_params(ref, "audio"), g):
        assert torch.allclose(p, q + rho * x / x.norm(), atol=1e-6)


@pytest.mark.parametrize("sam", ["paper", "code"])
def test_mechanism_off_is_plain_cross_entropy_training(sam):
    model = make(sam=sam, rho=0.0, mixup_alpha=0, flat_ratio=0.0, momentum=0.9)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for seed in range(3):
        b = batch(seed)
        opt.zero_grad()
        plain_ce(ref, "audio", b).backward()
        opt.step()
        model.training_step(b)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n


def test_code_sam_with_its_rho_is_plain_cross_entropy_up_to_rounding():
    model = make(sam="code", mixup_alpha=0)  # rho 1e-10, flat_ratio 0.3
    assert model.rho == 1e-10
    ref, b = copy.deepcopy(model), batch()
    plain_ce(ref, "audio", b).backward()
    out = model.training_step(b)
    assert out["loss_ori"].item() == pytest.approx(out["loss_flat"].item(), rel=1e-6)
    for p, q in zip(path_params(model, "audio"), path_params(ref, "audio")):
        assert torch.allclose(p, q - 0.1 * q.grad, atol=1e-7)


def test_predict_is_log_of_mean_softmax():
    model = make(epochs=2)
    pred = model.predict(batch())
    pa, pv = (F.softmax(pred.per_modality[m], dim=1) for m in ("audio", "visual"))
    assert torch.allclose(pred.fused.exp(), (pa + pv) / 2, atol=1e-6)


def test_config_errors():
    with pytest.raises(ConfigError, match=r"sums to 7 .* train\.epochs is 6"):
        make(epochs=6, epoch_list=[3, 4])
    with pytest.raises(ConfigError, match="1 stages for 2 modalities"):
        make(epochs=2, epoch_list=[2])
    with pytest.raises(ConfigError, match="allowed: audio, visual"):
        make(modality_order=["audio", "audio"])
    with pytest.raises(ValueError, match="flat_ratio"):
        MIEParams(epoch_list=[1], flat_ratio=1.5)
    # token ids cannot be mixed: a text modality needs mixup off, and then builds
    text = (MODS[0], Modality("text", "text", (3,)))
    with pytest.raises(ConfigError, match=r"mixup_alpha=1.0 mixes .* token ids \(text: text\)"):
        make(mods=text)
    assert make(mods=text, mixup_alpha=0.0).order == ("audio", "text")


# ------------------------------------------------------------------------- through the harness

CFG = ["method.name=mie", "method.head_hidden=[16,8]", "method.flat_batch_size=16", "eval.probe=false"]


def snapshot(model: MIE) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part in ("encoders", "heads")
            for k, v in getattr(model, part).state_dict().items()}


@pytest.fixture
def spy(monkeypatch):
    """Weights after each on_epoch_start (after a restart) and at each epoch's end."""
    seen = {"start": {}, "end": {}}
    start, end = MIE.on_epoch_start, MIE.on_epoch_end

    def on_start(self, epoch):
        start(self, epoch)
        seen["start"][epoch] = snapshot(self)

    def on_end(self, epoch):
        end(self, epoch)
        seen["end"][epoch] = snapshot(self)

    monkeypatch.setattr(MIE, "on_epoch_start", on_start)
    monkeypatch.setattr(MIE, "on_epoch_end", on_end)
    return seen


@pytest.mark.parametrize("dataset, stages, order, expected", [
    ("gaussian", [2, 3, 1], None, ["audio", "audio", "visual", "visual", "visual", "audio"]),
    ("gaussian", [1, 2], ["visual", "audio"], ["visual", "audio", "audio"]),
    ("gaussian3", [1, 1, 1], None, ["audio", "visual", "text"]),
])
def test_stages_train_only_the_active_modality(fast_config, store, spy, dataset, stages, order, expected):
    cfg = fast_config(*CFG, f"dataset.name={dataset}", f"train.epochs={len(expected)}",
                      f"method.epoch_list={stages}".replace(" ", ""),
                      *([f"method.modality_order=[{','.join(order)}]"] if order else []))
    history = RunDir(run(cfg, store).path).read_metrics()
    assert [r["method"]["modality"] for r in history] == expected
    for epoch, m in enumerate(expected):
        before, after = spy["start"][epoch], spy["end"][epoch]
        changed = {k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
        assert changed == {m}, epoch
    starts = np.cumsum([0, *stages[:-1]])
    for s in starts[1:]:  # each restart: the best validation macro-F1 so far (first maximum)
        val = [r["val"]["macro_f1"] for r in history[:s]]
        assert history[s]["method"]["restored_from_epoch"] == int(np.argmax(val))
        assert history[s]["lr"] == 0.05  # a fresh scheduler (StepLR(2) had decayed the old one)


@pytest.mark.parametrize("select_metric, restart, restored", [("macro_f1", True, 0), ("acc", True, 1),
                                                              ("macro_f1", False, None)])
def test_restart_uses_best_validation_epoch_never_test(fast_config, store, spy, monkeypatch, select_metric,
                                                       restart, restored):
    original = Trainer.evaluate
    rigged = {("val", "macro_f1"): [0.9, 0.1, 0.5, 0.5], ("test", "macro_f1"): [0.1, 0.9, 0.5, 0.5],
              ("val", "acc"): [0.1, 0.9, 0.5, 0.5], ("test", "acc"): [0.9, 0.1, 0.5, 0.5]}  # test: the other

    def evaluate(self, split):
        result = original(self, split)
        result.metrics.update({k: rigged[split, k][self.context.epoch] for k in ("macro_f1", "acc")})
        return result

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    cfg = fast_config(*CFG, "method.epoch_list=[2,2]", f"method.select_metric={select_metric}",
                      f"method.restart_from_best={str(restart).lower()}")
    history = RunDir(run(cfg, store).path).read_metrics()
    assert history[2]["method"]["restored_from_epoch"] == restored
    start = spy["start"][2]
    weights = spy["end"][1 if restored is None else restored]  # no restart: the last epoch's weights
    other = spy["end"][1 - (1 if restored is None else restored)]
    assert all(torch.equal(start[k], weights[k]) for k in start)
    assert not all(torch.equal(start[k], other[k]) for k in start)


@pytest.fixture(scope="module", params=["head", "shape_match"])
def reference(request, tmp_path_factory):
    """One uninterrupted two-stage run per projection rule, shared by the resume tests."""
    cfg = load_config(None, [*FAST, *CFG, "method.epoch_list=[2,2]", f"method.project_layers={request.param}"])
    return cfg, run(cfg, Store(tmp_path_factory.mktemp("ref")))


@pytest.mark.parametrize("stop", [2, 3])  # at the stage boundary; mid-stage (P from the checkpoint)
def test_interrupted_run_resumes_to_identical_metrics(reference, store, monkeypatch, stop):
    cfg, ref = reference
    run_interrupted(cfg, store, monkeypatch, at_epoch=stop)
    resumed = run(cfg, store)
    rd, ref_rd = store.run_dir(cfg.group, cfg.run_id()), RunDir(ref.path)
    assert without_timing(rd.read_metrics()) == without_timing(ref_rd.read_metrics())
    assert resumed.summary["best_val"] == ref.summary["best_val"]
    final, ref_final = rd.load(rd.checkpoint)["model"], ref_rd.load(ref_rd.checkpoint)["model"]
    for name, tensor in ref_final.items():
        if name != "_extra_state":
            assert torch.equal(final[name], tensor), name
    ref_proj = ref_final["_extra_state"]["proj"]
    heads = ["head.0", "head.2", "head.3"]  # the MLP encoders: Flatten, then Linear layers 1 and 3
    expected = heads if cfg.method["project_layers"] == "head" else ["encoder.net.1", "encoder.net.3", *heads]
    assert sorted(ref_proj) == expected
    for name, Ps in ref_proj.items():
        assert all(torch.equal(P, Q) for P, Q in zip(final["_extra_state"]["proj"][name], Ps, strict=True)), name
