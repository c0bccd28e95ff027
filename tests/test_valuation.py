"""Sample-level modality valuation: the release (GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation
@ 7ed12b0) and BalanceBenchmark (@ 4c1482f) transcribed and run beside the method; the switches;
joint training with re-sampling off; three modalities; the harness's epoch items (the same batches
with any number of workers, exact resume, a clear error for bad items)."""

from __future__ import annotations

import copy
import itertools
from math import factorial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbalance.bench.data import SplitLoader, epoch_generator
from mmbalance.bench.perf.steps import variants_named
from mmbalance.bench.train import run
from mmbalance.core.errors import ConfigError, RunFailed
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch
from mmbalance.datasets.base import TensorSplit
from mmbalance.methods.base import MethodSetup, StepContext
from mmbalance.methods.joint import Joint, JointParams
from mmbalance.methods.valuation import (
    Valuation,
    ValuationParams,
    copies,
    epoch_rng,
    modality_level_items,
    sample_level_items,
    shapley,
)
from tests.conftest import assert_resumes_exactly, mlp_setup
from tests.test_data import BatchingSplit, FileLikeSplit

C = 3
N = 24  # training rows
BATCH = 8
LR, MOMENTUM, WD = 0.05, 0.9, 1e-4
AV = ("audio", "visual")
AVT = ("audio", "visual", "text")
CPU = torch.device("cpu")


def sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)


def setup(names=AV, seed=0) -> MethodSetup:
    return mlp_setup(names, C, in_dims={m: 4 + i for i, m in enumerate(names)}, hidden=7, dims=5, seed=seed)


def train_split(names=AV, seed=1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """N rows, every modality weakly informative: some samples right by one modality only."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % C
    inputs = {m: torch.randn(N, 4 + i, generator=gen) + F.pad(F.one_hot(labels, C) * 0.8, (0, 1 + i))
              for i, m in enumerate(names)}
    return inputs, labels


def in_order(split, size=10) -> list[Batch]:
    """The unshuffled evaluation-sized pass (ctx.train_batches()), with rows as ids."""
    inputs, labels = split
    return [Batch({m: x[s : s + size] for m, x in inputs.items()}, labels[s : s + size],
                  torch.arange(s, min(s + size, N))) for s in range(0, N, size)]


def build(split, names=AV, seed=3, **params) -> Valuation:
    method = Valuation(ValuationParams(**params), setup(names))
    method.attach(StepContext(lambda: (sgd(method.parameters()), None), lambda generator=None: iter(in_order(split)),
                              seed=seed))
    method.train()
    return method


def epoch_batches(items: list[int], split, epoch: int) -> list[Batch]:
    """An epoch's batches over `items` as the harness makes them: positions shuffled by the epoch's generator."""
    inputs, labels = split
    order = torch.randperm(len(items), generator=epoch_generator(0, epoch))
    rows = torch.as_tensor(items)[order]
    return [Batch({m: x[rows[s : s + BATCH]] for m, x in inputs.items()}, labels[rows[s : s + BATCH]],
                  order[s : s + BATCH]) for s in range(0, len(items), BATCH)]


# ------------------------------------------------------------- the release, transcribed


class ReleaseAV(nn.Module):
    """code/models/models.py AVClassifier (l.18-86) on the suite's encoders and head: features
    pooled and flattened, a drop flag per sample zeroing them in place (1: audio, 2: visual)."""

    def __init__(self, method: Valuation) -> None:
        super().__init__()
        self.audio_net = copy.deepcopy(method.encoders["audio"])
        self.visual_net = copy.deepcopy(method.encoders["visual"])
        self.fc_out = copy.deepcopy(method.fusion.fc_out)

    def forward(self, audio, visual, drop=None):
        a = torch.flatten(F.adaptive_avg_pool1d(self.audio_net(audio)[:, :, None], 1), 1)
        v = torch.flatten(F.adaptive_avg_pool1d(self.visual_net(visual)[:, :, None], 1), 1)
        if drop is not None:
            for i in range(len(drop)):
                if drop[i] == 1:
                    a[i, :] = 0.0
                elif drop[i] == 2:
                    v[i, :] = 0.0
        out = self.fc_out(torch.cat((a, v), 1))
        return a, v, out

    def exec_drop(self, a, v, drop):
        if drop == "audio":
            ad, vd = torch.zeros_like(a), v
        else:
            ad, vd = a, torch.zeros_like(v)
        return self.fc_out(torch.cat((ad, vd), 1))


def release_contributions(model: ReleaseAV, split) -> tuple[dict[int, tuple[float, float]], float, float]:
    """sample_level.py `execute_modulation` l.75-125 (modality_level.py l.79-129 is the same)."""
    inputs, labels = split
    contribution, cona, conv = {}, 0.0, 0.0
    softmax = nn.Softmax(dim=1)
    with torch.no_grad():
        model.eval()
        for batch in in_order(split):
            spec, image, label, index = batch.inputs["audio"], batch.inputs["visual"], batch.labels, batch.ids
            a, v, out = model(spec.float(), image.float())
            out_v = model.exec_drop(a, v, drop="audio")
            out_a = model.exec_drop(a, v, drop="visual")
            prediction, pred_v, pred_a = softmax(out), softmax(out_v), softmax(out_a)
            for i, _item in enumerate(label):
                index_all = np.argmax(prediction[i].cpu().data.numpy())
                index_v = np.argmax(pred_v[i].cpu().data.numpy())
                index_a = np.argmax(pred_a[i].cpu().data.numpy())
                value_all = 2.0 if index_all == label[i] else 0.0
                value_v = 1.0 if index_v == label[i] else 0.0
                value_a = 1.0 if index_a == label[i] else 0.0
                contrib_a = (value_a + value_all - value_v) / 2.0
                contrib_v = (value_v + value_all - value_a) / 2.0
                cona += contrib_a
                conv += contrib_v
                contribution[int(index[i])] = (contrib_a, contrib_v)
    model.train()
    return contribution, cona / N, conv / N


def release_sample_level(contribution) -> tuple[list[int], list[int]]:
    """datasets/dataloader.py AV_KS_Dataset_sample_level l.139-186: (rows, drop flags)."""
    data, drop = list(range(N)), [0] * N
    for i in range(N):
        contrib_a, contrib_v = contribution[i]
        if 0.4 < contrib_a < 1:
            data += [i]; drop += [2]  # noqa: E702
        elif -0.1 < contrib_a < 0.4:
            data += [i] * 2; drop += [2] * 2  # noqa: E702
        elif contrib_a < -0.1:
            data += [i] * 3; drop += [2] * 3  # noqa: E702
        if 0.4 < contrib_v < 1:
            data += [i]; drop += [1]  # noqa: E702
        elif -0.1 < contrib_v < 0.4:
            data += [i] * 2; drop += [1] * 2  # noqa: E702
        elif contrib_v < -0.1:
            data += [i] * 3; drop += [1] * 3  # noqa: E702
    return data, drop


def release_modality_level(contribution, part_ratio, alpha) -> tuple[list[int], list[int], float]:
    """modality_level.py l.143-161 then AV_KS_Dataset_modality_level l.282-316 (func linear), on
    numpy's global RNG."""
    num = int(N * part_ratio)
    choice = np.random.choice(N, num)
    part_cona = sum(contribution[i][0] for i in choice) / num
    part_conv = sum(contribution[i][1] for i in choice) / num
    gap_a, gap_v = 1.0 - part_cona, 1.0 - part_conv
    difference = (abs(gap_a - gap_v) / 3 * 2) * alpha
    resample_num = int(difference * N)
    sample_choice = np.random.choice(N, resample_num)
    data, drop = list(range(N)), [0] * N
    for i in sample_choice:
        data.append(int(i))
        drop.append(2 if gap_a > gap_v else 1)
    return data, drop, difference


def release_step(model: ReleaseAV, opt, batch: Batch, drop: torch.Tensor) -> float:
    """sample_level.py `train_epoch` l.164-177 (warm-up epochs: drop None, l.192-204)."""
    opt.zero_grad()
    a, v, out = model(batch.inputs["audio"].float(), batch.inputs["visual"].float(), drop)
    loss = nn.CrossEntropyLoss()(out, batch.labels)
    loss.backward()
    opt.step()
    return loss.item()


def drops_of(zeroed: torch.Tensor) -> list[int]:
    """The method's zeroed modalities as the release's flags (audio zeroed: 1, visual: 2)."""
    return [1 if z[0] else 2 if z[1] else 0 for z in zeroed.tolist()]


def max_param_diff(method: Valuation, model: nn.Module, names=AV) -> float:
    ours = [p.detach() for p in itertools.chain(*(method.encoders[m].parameters() for m in names),
                                                method.fusion.parameters())]
    theirs = [p.detach() for p in model.parameters()]
    assert len(ours) == len(theirs)
    return max(float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("strategy", ["sample", "modality"])
def test_release_equals_its_training_loop(strategy):
    """Warm-up epoch 0, then epochs 1 and 2 re-sampled from contributions on the model as each starts."""
    split = train_split()
    method = build(split, strategy=strategy, warmup=1, part_ratio=0.5, alpha=2.0)
    model = ReleaseAV(method)
    opt = sgd(model.parameters())
    worst = 0.0
    for epoch in range(3):
        method.on_epoch_start(epoch)
        if epoch == 0:
            data, drop = list(range(N)), [0] * N
            assert method.epoch_items(0) is None
        else:
            contribution, cona, conv = release_contributions(model, split)
            if strategy == "sample":
                data, drop = release_sample_level(contribution)
                assert method.record["contribution.audio"] == pytest.approx(cona, abs=1e-12)
                assert method.record["contribution.visual"] == pytest.approx(conv, abs=1e-12)
            else:
                np.random.set_state(epoch_rng(3, epoch).get_state())  # the method's stream, as numpy's global one
                data, drop, difference = release_modality_level(contribution, 0.5, 2.0)
                assert method.record["difference"] == pytest.approx(difference, abs=1e-12)
            assert method.epoch_items(epoch) == data
            assert drops_of(method.zeroed) == drop
            assert len(set(drop)) > 1  # the data make the test bite: copies of both kinds or some
        for batch in epoch_batches(data, split, epoch):
            out = method.training_step(batch)
            flags = torch.tensor([drop[p] for p in batch.ids.tolist()])
            loss = release_step(model, opt, batch, flags if epoch else None)
            assert float(out["loss"]) == pytest.approx(loss, abs=1e-6)
            assert float(out["zeroed.audio"]) == pytest.approx(float((flags == 1).float().mean()) if epoch else 0.0)
            worst = max(worst, max_param_diff(method, model))
    assert worst < 1e-5, worst


def test_modality_level_rows_are_the_releases_draws():
    phi = torch.tensor([[1.0, 0.0], [0.5, 1.0], [1.5, 0.5], [-0.5, 0.0]]).repeat(6, 1)
    contribution = {i: tuple(phi[i].tolist()) for i in range(N)}
    np.random.seed(11)
    part = np.random.choice(N, int(N * 0.5))
    np.random.seed(11)
    data, drop, d = release_modality_level(contribution, 0.5, 1.0)
    rng = np.random.RandomState(11)
    assert rng.choice(N, int(N * 0.5)).tolist() == part.tolist()
    items, zeroed, ours = modality_level_items(phi[part], N, 1.0, rng)
    assert (items, drops_of(zeroed), ours) == (data, drop, pytest.approx(d, abs=1e-12))


# ------------------------------------------------------------- BalanceBenchmark, transcribed


def bb_padded(method: Valuation, inputs: dict[str, torch.Tensor], padding) -> torch.Tensor:
    """BaseClassifierModel.forward(batch, padding) (avclassify_model.py): padded modalities'
    inputs replaced by zeros and passed through their encoders; concat head."""
    feats = [method.encoders[m](torch.zeros_like(x) if m in padding else x) for m, x in inputs.items()]
    return method.fusion.fc_out(torch.cat(feats, 1))


def bb_shapley_sample(method: Valuation, batches: list[Batch], names) -> dict[str, dict[int, float]]:
    """evaluation/modalitys.py `Calculate_Shapley_Sample` l.58-103, its cache reset per batch
    (as released it is built once, so later batches reuse the first batch's results: a bug)."""
    n = len(names)
    shap = {m: {} for m in names}
    combos_all = [list(c) for r in range(n + 1) for c in itertools.combinations(names, r)]
    with torch.no_grad():
        for batch in batches:
            res = {}
            for combo in combos_all:
                key = tuple(sorted(combo))
                if not combo:
                    res[key] = torch.zeros(len(batch), dtype=torch.bool)
                else:
                    out = bb_padded(method, batch.inputs, [m for m in names if m not in combo])
                    res[key] = out.argmax(1) == batch.labels
            for i in range(len(batch)):
                idx = int(batch.ids[i])
                for m in names:
                    value = 0.0
                    others = [o for o in names if o != m]
                    for combo in [list(c) for r in range(n) for c in itertools.combinations(others, r)]:
                        w = factorial(len(combo)) * factorial(n - len(combo) - 1) / factorial(n)
                        value += w * (float(res[tuple(sorted([*combo, m]))][i]) - float(res[tuple(sorted(combo))][i]))
                    shap[m][idx] = value
    return shap


def bb_sample_level(contribution, names) -> tuple[list[int], dict[int, list[str]]]:
    """datasets/__init__.py `create_dataset_sample_level` l.153-196 (without its truncation to a
    multiple of 64): (rows, zero_modality_samples)."""
    data, zero = list(range(N)), {}
    for i in range(N):
        for m in names:
            v = contribution[m][i]
            if 0.4 < v < 1:
                k = 1
            elif -0.1 < v < 0.4:
                k = 2
            elif v < -0.1:
                k = 3
            else:
                continue
            for _ in range(k):
                new_idx = len(data)
                data.append(i)
                zero.setdefault(new_idx, [])
                zero[new_idx] += [o for o in names if o != m]
    return data, zero


@pytest.mark.parametrize("names", [AV, AVT], ids=["M2", "M3"])
def test_balancebenchmark_equals_its_trainer(names):
    split = train_split(names)
    method = build(split, names, variant="balancebenchmark", warmup=1)
    ref = copy.deepcopy(method)  # its modules stepped by the transcription
    opt = sgd(ref.parameters())
    worst = 0.0
    for epoch in range(3):
        method.on_epoch_start(epoch)
        data, zero = list(range(N)), {}
        if epoch:
            ref.eval()
            data, zero = bb_sample_level(bb_shapley_sample(ref, in_order(split), names), names)
            ref.train()
            assert method.epoch_items(epoch) == data
            assert {p: [m for j, m in enumerate(names) if z[j]] for p, z in enumerate(method.zeroed.tolist())
                    if any(z)} == zero
        for batch in epoch_batches(data, split, epoch):
            method.training_step(batch)
            # SampleDataset._handle_av_data: the listed modalities' inputs zeroed; Sample_trainer.training_step
            inputs = {m: torch.stack([torch.zeros_like(x[i]) if m in zero.get(int(p), []) else x[i]
                                      for i, p in enumerate(batch.ids)]) for m, x in batch.inputs.items()}
            opt.zero_grad()
            nn.CrossEntropyLoss()(bb_padded(ref, inputs, []), batch.labels).backward()
            opt.step()
            worst = max(worst, max(float((a - b).abs().max()) for a, b in
                                   zip(method.state_dict().values(), ref.state_dict().values(), strict=True)))
    assert worst < 1e-5, worst


# ------------------------------------------------------------- pieces, switches, refusals


def test_shapley_by_hand():
    # audio right alone, visual wrong alone, both right: release phi_a = (1 + 2 - 0) / 2, phi_v = (0 + 2 - 1) / 2
    correct = {(0,): torch.tensor([True]), (1,): torch.tensor([False]), (0, 1): torch.tensor([True])}
    assert shapley(correct, 2, scale_by_size=True).tolist() == [[1.5, 0.5]]
    assert shapley(correct, 2, scale_by_size=False).tolist() == [[1.0, 0.0]]
    # three modalities, only the full set right: each 1/3 of v(full) = 3
    full = {s: torch.tensor([len(s) == 3]) for r in (1, 2, 3) for s in itertools.combinations(range(3), r)}
    assert shapley(full, 3, scale_by_size=True).tolist() == [[1.0, 1.0, 1.0]]


def test_copies_and_items_by_hand():
    assert [copies(p) for p in (-0.5, -0.1, 0.0, 0.4, 0.5, 1.0, 1.5)] == [3, 0, 2, 0, 1, 0, 0]
    items, zeroed = sample_level_items(torch.tensor([[0.5, 1.5], [0.0, -0.5]]))
    assert items == [0, 1, 0, 1, 1, 1, 1, 1]
    assert drops_of(zeroed) == [0, 0, 2, 2, 2, 1, 1, 1]


def test_the_zeroing_is_the_key_line(monkeypatch):
    """Copies trained without their zeroing are not the release's step."""
    import mmbalance.methods.valuation as valuation

    split = train_split()
    method = build(split, warmup=0)
    model = ReleaseAV(method)
    monkeypatch.setattr(valuation, "zero_rows", lambda x, zeroed: x)
    method.on_epoch_start(0)
    data, drop = release_sample_level(release_contributions(model, split)[0])
    batch = next(b for b in epoch_batches(data, split, 0) if any(drop[p] for p in b.ids.tolist()))
    method.training_step(batch)
    release_step(model, sgd(model.parameters()), batch, torch.tensor([drop[p] for p in batch.ids.tolist()]))
    assert max_param_diff(method, model) > 1e-4


@pytest.mark.parametrize("off", [{"resample": False}, {"warmup": 3}])
def test_resampling_off_is_joint_training(off):
    split = train_split()
    method = build(split, **off)
    joint = Joint(JointParams(), setup())
    joint.attach(StepContext(lambda: (sgd(joint.parameters()), None), lambda generator=None: iter(in_order(split))))
    for epoch in range(3):
        method.on_epoch_start(epoch)
        assert method.epoch_items(epoch) is None
        assert ("contribution.audio" in method.epoch_log()) == (off == {"resample": False})
        for batch in epoch_batches(list(range(N)), split, epoch):
            method.training_step(batch)
            joint.training_step(batch)
    assert max(float((a - b).abs().max()) for a, b in zip(method.parameters(), joint.parameters())) < 1e-6


def test_resampling_on_differs_from_joint():
    split = train_split()
    method = build(split, warmup=0)
    method.on_epoch_start(0)
    assert len(method.epoch_items(0)) > N


def test_refusals_are_clear():
    refusal = r"strategy=modality is defined for two modalities \(one gap difference\), this dataset has 3"
    with pytest.raises(ConfigError, match=refusal):
        Valuation(ValuationParams(strategy="modality"), setup(AVT))
    with pytest.raises(ValueError, match="variant=balancebenchmark is offered with strategy=sample only"):
        ValuationParams(variant="balancebenchmark", strategy="modality")
    method = build(train_split(), warmup=0)
    method.on_epoch_start(0)
    with pytest.raises(RuntimeError, match="carries no `ids`"):
        method.training_step(Batch(*train_split()))


# ------------------------------------------------------------- the harness's epoch items


@pytest.mark.parametrize("split", [FileLikeSplit, BatchingSplit])
def test_an_epochs_items_give_the_same_batches_with_any_workers(split):
    items = [0, 3, 3, 5, 7, 7, 7, 11, 2]
    got = []
    for workers in (0, 2):
        loader = SplitLoader(split(12), 4, CPU, workers=workers, finish={"visual": lambda x, draws=None: x})
        got.append([(b.inputs["audio"][:, 0].tolist(), b.inputs["visual"][:, 0].tolist(), b.labels.tolist(),
                     b.ids.tolist()) for b in loader(epoch_generator(5, 1), items=items)])
    assert got[0] == got[1]
    for rows, _, _, ids in got[0]:
        assert rows == [float(items[p]) for p in ids]  # ids: positions in the items list
    positions = [p for *_, ids in got[0] for p in ids]
    assert sorted(positions) == list(range(len(items)))
    sevens = [v for rows, visual, _, _ in got[0] for r, v in zip(rows, visual) if r == 7.0]
    assert len(set(sevens)) == 3  # a repeated row draws augmentations of its own


def test_in_memory_and_item_paths_take_the_same_items():
    items = [1, 1, 4, 0, 9, 9]
    split = FileLikeSplit(10)
    tensors = TensorSplit({"audio": torch.arange(10.0)[:, None].repeat(1, 2)}, torch.arange(10) % 3)
    taken = [[(b.inputs["audio"][:, 0].tolist(), b.ids.tolist()) for b in
              SplitLoader(s, 4, CPU)(epoch_generator(0, 2), items=items)] for s in (split, tensors)]
    assert taken[0] == taken[1]


def test_a_plain_pass_is_unchanged_and_carries_rows():
    loader = SplitLoader(FileLikeSplit(10), 4, CPU)
    plain = list(loader(epoch_generator(1, 0)))
    listed = list(loader(epoch_generator(1, 0), items=list(range(10))))
    assert [b.inputs["audio"].tolist() for b in plain] == [b.inputs["audio"].tolist() for b in listed]
    assert [b.ids.tolist() for b in plain] == [b.inputs["audio"][:, 0].long().tolist() for b in plain]


@pytest.mark.parametrize("strategy", ["sample", "modality"])
def test_resume_is_exact(fast_config, store, tmp_path, monkeypatch, strategy):
    cfg = fast_config("method.name=valuation", "method.warmup=1", f"method.strategy={strategy}")
    assert_resumes_exactly(cfg, store, tmp_path, monkeypatch, at_epoch=2)


def test_the_harness_trains_the_methods_items(fast_config, store, monkeypatch):
    seen = []
    original = Valuation.training_step

    def record(self, batch):
        seen.append((self.step_context.epoch, len(batch), self.step_context.num_batches))
        return original(self, batch)

    monkeypatch.setattr(Valuation, "training_step", record)
    cfg = fast_config("method.name=valuation", "method.warmup=1", "train.epochs=2", "eval.probe=false")
    result = run(cfg, store)
    rows = sum(n for e, n, _ in seen if e == 0)
    resampled = sum(n for e, n, _ in seen if e == 1)
    assert result.state == "finished"
    extra = store.run_dir(cfg.group, cfg.run_id()).read_metrics()[1]["method"]
    assert resampled > rows  # the copies were trained (drop_last may leave a part batch out)
    assert resampled == pytest.approx(rows * (1 + extra["extra.audio"] + extra["extra.visual"]), abs=32)
    assert {b for e, _, b in seen if e == 1} == {sum(1 for e, *_ in seen if e == 1)}


def test_bad_items_are_a_clear_error(fast_config, store, monkeypatch):
    monkeypatch.setattr(Valuation, "epoch_items", lambda self, epoch: [0, 10**6])
    with pytest.raises(RunFailed, match=r"method 'valuation' chose row 1000000 for epoch 0; Method.epoch_items"):
        run(fast_config("method.name=valuation", "train.epochs=1"), store)


def test_three_modalities_through_the_harness(fast_config, store):
    cfg = fast_config("dataset.name=gaussian3", "method.name=valuation", "method.warmup=1", "train.epochs=2",
                      "eval.probe=false")
    run(cfg, store)
    record = store.run_dir(cfg.group, cfg.run_id()).read_metrics()[1]
    names = [k.split(".", 1)[1] for k in record["method"] if k.startswith("contribution.")]
    assert len(names) == 3 and sum(record["method"][f"extra.{m}"] for m in names) > 0
    assert all(f"zeroed.{m}" in record["train"] for m in names)


def test_passes_per_step_are_counted(fast_config, store):
    cfg = fast_config("method.name=valuation", "method.warmup=1", "train.epochs=2", "eval.probe=false")
    cost = run(cfg, store).summary["cost"]
    assert cost["forward_passes_per_step"] == 1.0 and cost["backward_passes_per_step"] == 1.0


def test_registered_and_benched():
    assert METHODS.get("valuation", "method.name") is Valuation and Valuation.family == "data"
    assert variants_named(["valuation"])
