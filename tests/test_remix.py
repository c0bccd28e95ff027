"""Data Remixing: the confidence, the assignment and the queues by hand; the method beside a
transcription of the release (MatthewMaxy/Remix_ICML2025 @ 80898aa) on identical tiny models,
batches and optimisers, through warm-up and remixed epochs; switched-off equivalence with joint
training; three modalities, cost, diagnostics, resume and bench through the harness."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbalance.bench.store import RunDir
from mmbalance.bench.train import run
from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Batch
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.joint import Joint, JointParams
from mmbalance.methods.remix import Queue, Remix, RemixParams, assignment, confidence
from tests.conftest import assert_resumes_exactly, mlp_setup, step_context

C = 6  # CREMA-D's classes: the release's KL hard-codes 6 (T:76-77)
B = 8
AV = ("audio", "visual")
TOL = 1e-5  # the bound for parameters and reported quantities against released code


class BNEncoder(nn.Module):
    """Linear -> BatchNorm -> ReLU -> mean over a length-2 axis: running statistics, which the
    release's evaluation-mode scoring reads and its zeroed encoders still update. The axis keeps
    a one-sample batch (a modality's last step may be one) trainable, as ResNet18's feature maps do."""

    def __init__(self, out_dim: int = 6) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.linear, self.norm = nn.Linear(5, 2 * out_dim), nn.BatchNorm1d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.linear(x).view(len(x), self.out_dim, 2))).mean(dim=2)


def setup(names=AV, fusion="concat", epochs=10, seed=0, encoder="mlp") -> MethodSetup:
    return mlp_setup(names, C, fusion=fusion, epochs=epochs, seed=seed,
                     encoder=None if encoder == "mlp" else lambda m: BNEncoder())


def make_batches(names=AV, sizes=(B,) * 4, seed=1) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        inputs = {m: torch.randn(n, 5, generator=gen) for m in names}
        inputs["audio"] = inputs["audio"] * 3  # a louder audio: its head grows confident first
        out.append(Batch(inputs, torch.randint(0, C, (n,), generator=gen)))
    return out


OPTIMISERS = {  # train.py L230-233, the release's two
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, betas=(0.9, 0.999), eps=1e-08, weight_decay=1e-4),
}


def attached(method, optimiser="sgd"):
    method.attach(step_context(lambda: OPTIMISERS[optimiser](method.parameters())))
    return method


def steps(method, epochs: list[list[Batch]]) -> list[list[dict]]:
    """Every epoch's batches in order, the position set and on_epoch_start called as the harness does."""
    ctx, outs = method.step_context, []
    for epoch, batches in enumerate(epochs):
        ctx.epoch, ctx.num_batches = epoch, len(batches)
        method.train()
        method.on_epoch_start(epoch)
        outs.append([])
        for index, batch in enumerate(batches):
            ctx.batch_index = index
            outs[-1].append(method.training_step(batch))
    return outs


# ------------------------------------------------------------------------------- by hand


def kl_divergence(predictions, num_classes):  # train.py L52-57, verbatim
    uniform_distribution = np.full(num_classes, 1.0 / num_classes)
    predictions = np.clip(predictions, 1e-9, 1.0)
    kl_div = np.sum(predictions * np.log2(predictions / uniform_distribution))
    return kl_div


def test_confidence_is_the_releases_kl_from_uniform():
    logits = torch.tensor([[0.0] * C, [30.0, 0, 0, 0, 0, 0], [1.0, 2.0, 0.5, -1.0, 0.0, 3.0]])
    got = confidence(logits, C)
    probs = torch.softmax(logits, dim=1).numpy()
    assert got.tolist() == pytest.approx([kl_divergence(p, C) for p in probs], abs=1e-12)
    assert got[0].item() == pytest.approx(0.0, abs=1e-6)  # uniform (in float32): no confidence
    assert got[1].item() == pytest.approx(np.log2(C), abs=1e-6)  # one-hot: log2 C bits


def test_assignment_picks_the_least_confident_modality_ties_to_the_later():
    a = torch.tensor([0.1, 0.5, 0.3, 0.2])
    v = torch.tensor([0.2, 0.4, 0.3, 0.2])
    assert assignment({"audio": a, "visual": v}).tolist() == [0, 1, 1, 1]  # T:78: `<` for audio
    t = torch.tensor([0.3, 0.1, 0.3, 0.2])
    assert assignment({"audio": a, "visual": v, "text": t}).tolist() == [0, 2, 2, 2]


def test_queue_takes_in_order_and_keeps_the_rest():
    q = Queue()
    first = Batch({"a": torch.arange(3.0)}, torch.arange(3))
    q.put(first)
    q.put(Batch({"a": torch.empty(0)}, torch.empty(0, dtype=torch.long)))  # an empty part is no part
    q.put(Batch({"a": torch.arange(3.0, 7.0)}, torch.arange(3, 7)))
    assert q.size == 7 and len(q.parts) == 2
    taken = q.take(5)
    assert taken.labels.tolist() == [0, 1, 2, 3, 4] and taken.inputs["a"].tolist() == [0, 1, 2, 3, 4]
    assert q.size == 2 and q.take(5).labels.tolist() == [5, 6]
    assert q.size == 0 and q.parts == []


def test_queue_keeps_each_samples_id_through_its_parts():
    q = Queue()
    for start, stop in ((0, 3), (3, 7)):
        ids = torch.arange(10 + start, 10 + stop)
        q.put(Batch({"a": torch.arange(float(start), stop)}, torch.arange(start, stop), ids))
    taken, rest = q.take(5), q.take(5)
    assert taken.ids.tolist() == [10, 11, 12, 13, 14] and rest.ids.tolist() == [15, 16]
    chosen = taken.rows(torch.tensor([True, False, True, False, True]))
    assert chosen.labels.tolist() == [0, 2, 4] and chosen.ids.tolist() == [10, 12, 14]
    q.put(Batch({"a": torch.arange(2.0)}, torch.arange(2)))  # a part without ids: the whole has none
    q.put(Batch({"a": torch.arange(2.0)}, torch.arange(2), torch.arange(2)))
    assert q.take(4).ids is None


# ------------------------------------------------------------------- beside the release


class ReleaseAVClassifier(nn.Module):
    """AVClassifier (models/models.py @ 80898aa, M:14-67) around copies of the suite's encoders and
    heads. The encoders return features: the release's pooling (M:49-53) becomes a pooling over a
    length-1 axis, an identity that, like the release's, hands the zeroing a fresh tensor."""

    def __init__(self, audio_net, visual_net, head, head_audio, head_video) -> None:
        super().__init__()
        self.audio_net, self.visual_net = audio_net, visual_net
        self.head, self.head_audio, self.head_video = head, head_audio, head_video

    def forward(self, audio, visual, mode=None):
        a = self.audio_net(audio)
        v = self.visual_net(visual)
        a = torch.flatten(F.adaptive_avg_pool1d(a.unsqueeze(2), 1), 1)
        v = torch.flatten(F.adaptive_avg_pool1d(v.unsqueeze(2), 1), 1)
        if mode == "video":
            a[:, :] = 0.0
        elif mode == "audio":
            v[:, :] = 0.0
        out = torch.cat((a, v), 1)
        out = self.head(out)
        out_audio = self.head_audio(a)
        out_video = self.head_video(v)
        return out, out_audio, out_video, a, v


class ReleaseRemix:
    """train.py @ 80898aa: `remix` (T:60-99) as the per-sample rule, `train_epoch` (T:101-125) and
    the body of `special_train_epoch`'s loops (T:139-150, 158-169) as steps. The release's CSV
    files and per-modality loaders are replaced by the suite's order of the same samples (see
    `suite_order`)."""

    def __init__(self, model, optimizer, alpha=0.5, beta=0.5, gamma1=1.0, gamma2=1.0):
        self.model, self.optimizer = model, optimizer
        self.alpha, self.beta, self.gamma1, self.gamma2 = alpha, beta, gamma1, gamma2

    def remix(self, batches):
        """Per sample of `batches` (in order): 'audio' or 'video', and its two KLs."""
        softmax = nn.Softmax(dim=1)
        chosen, kls = [], []
        with torch.no_grad():
            self.model.eval()
            for batch in batches:
                out, out_audio, out_video, a, v = self.model(batch.inputs["audio"], batch.inputs["visual"])
                pred_v = softmax(out_video)
                pred_a = softmax(out_audio)
                for i in range(len(batch)):
                    video_pred = pred_v[i].cpu().data.numpy()
                    audio_pred = pred_a[i].cpu().data.numpy()
                    KL_audio = kl_divergence(audio_pred, 6)
                    KL_video = kl_divergence(video_pred, 6)
                    chosen.append("audio" if KL_audio < KL_video else "video")
                    kls.append((KL_audio, KL_video))
        return chosen, kls

    def warmup_step(self, batch):
        criterion = nn.CrossEntropyLoss()
        self.model.train()
        self.optimizer.zero_grad()
        out, out_audio, out_video, a, v = self.model(batch.inputs["audio"], batch.inputs["visual"])
        loss_av = criterion(out, batch.labels)
        loss_a = criterion(out_audio, batch.labels)
        loss_v = criterion(out_video, batch.labels)
        loss = loss_av + self.alpha * loss_a + self.beta * loss_v
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def special_step(self, batch, modality):
        criterion = nn.CrossEntropyLoss()
        self.model.train()
        self.optimizer.zero_grad()
        out, out_audio, out_video, a, v = self.model(batch.inputs["audio"], batch.inputs["visual"], modality)
        loss_av = criterion(out, batch.labels)
        if modality == "video":
            loss = loss_av + self.gamma1 * criterion(out_video, batch.labels)
        else:
            loss = loss_av + self.gamma2 * criterion(out_audio, batch.labels)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def suite_order(chosen_per_batch: list[list[str]], size: int) -> list[tuple[int, str, list[tuple[int, int]]]]:
    """The suite's reassembly, written out: each batch's samples join their modality's queue (audio,
    then video, the dataset's order); a queue holding `size` samples gives a step of its first
    `size`; the last batch empties every queue. (batch it happens at, modality, [(batch, row)])."""
    queues: dict[str, list[tuple[int, int]]] = {"audio": [], "video": []}
    order = []
    for i, chosen in enumerate(chosen_per_batch):
        for r, m in enumerate(chosen):
            queues[m].append((i, r))
        last = i == len(chosen_per_batch) - 1
        for m, queue in queues.items():
            while len(queue) >= size or (last and queue):
                order.append((i, m, queue[:size]))
                del queue[:size]
    return order


def gather(batches: list[Batch], where: list[tuple[int, int]]) -> Batch:
    return Batch({m: torch.stack([batches[i].inputs[m][r] for i, r in where]) for m in AV},
                 torch.stack([batches[i].labels[r] for i, r in where]))


def released_beside(epochs: list[list[Batch]], optimiser="sgd", encoder="mlp", **params):
    """The suite's Remix and the release's transcription through the same epochs; (suite outputs,
    release records, largest parameter and buffer difference)."""
    method = attached(Remix(RemixParams(**params), setup(epochs=len(epochs), encoder=encoder)), optimiser)
    model = ReleaseAVClassifier(copy.deepcopy(method.encoders["audio"]), copy.deepcopy(method.encoders["visual"]),
                                copy.deepcopy(method.fusion.fc_out), copy.deepcopy(method.heads["audio"]),
                                copy.deepcopy(method.heads["visual"]))
    p = RemixParams(**params)
    release = ReleaseRemix(model, OPTIMISERS[optimiser](model.parameters()), p.alpha, p.alpha, p.gamma, p.gamma)
    outs = steps(method, epochs)
    records = []
    for epoch, batches in enumerate(epochs):
        if epoch < p.warmup or not p.remix:
            records.append([{"loss": release.warmup_step(b)} for b in batches])
            continue
        chosen, kls = release.remix(batches)  # T:248, before the epoch's first step
        ends = np.cumsum([len(b) for b in batches]).tolist()
        record = [{"loss": 0.0, "chosen": chosen[end - len(b):end], "kls": kls[end - len(b):end]}
                  for b, end in zip(batches, ends)]
        per_batch = [r["chosen"] for r in record]
        for i, m, where in suite_order(per_batch, len(batches[0])):
            record[i]["loss"] += release.special_step(gather(batches, where), m) * len(where) / len(batches[i])
        records.append(record)
    pairs = [(method.encoders["audio"], model.audio_net), (method.encoders["visual"], model.visual_net),
             (method.fusion.fc_out, model.head), (method.heads["audio"], model.head_audio),
             (method.heads["visual"], model.head_video)]
    diff = max((a.float() - b.float()).abs().max().item() for x, y in pairs
               for a, b in zip(x.state_dict().values(), y.state_dict().values(), strict=True))
    return outs, records, diff


def three_epochs(sizes=(B, B, B, B, 5)) -> list[list[Batch]]:
    return [make_batches(sizes=sizes, seed=s) for s in (1, 2, 3)]


@pytest.mark.parametrize("optimiser", ["sgd", "adam"])
@pytest.mark.parametrize("encoder", ["mlp", "bn"])
def test_equals_the_release_through_warmup_and_remixed_epochs(optimiser, encoder):
    outs, records, diff = released_beside(three_epochs(), optimiser, encoder, warmup=1)
    assert diff <= TOL, diff
    for epoch_outs, epoch_records in zip(outs, records):
        for out, ref in zip(epoch_outs, epoch_records):
            assert out["loss"].item() == pytest.approx(ref["loss"], abs=TOL)
    for out, ref in zip(outs[1] + outs[2], records[1] + records[2]):
        assert out["remixed"].item() == 1.0
        for k, (m, name) in enumerate([("audio", "audio"), ("visual", "video")]):
            assert out[f"share.{m}"].item() == pytest.approx(ref["chosen"].count(name) / len(ref["chosen"]))
            assert out[f"confidence.{m}"].item() == pytest.approx(np.mean([kl[k] for kl in ref["kls"]]), abs=TOL)
    # the run covers both modalities' steps, steps carried over from earlier batches and batches
    # that took no step (their loss 0)
    chosen = [c for r in records[1] + records[2] for c in r["chosen"]]
    assert 0 < chosen.count("audio") < len(chosen)
    assert any(o["loss"].item() == 0.0 for o in outs[1] + outs[2])


def test_equals_the_release_with_other_weights_and_warmup():
    outs, records, diff = released_beside(three_epochs(), warmup=2, alpha=0.2, gamma=2.5)
    assert diff <= TOL, diff
    assert [o["remixed"].item() for e in outs for o in e] == [0.0] * 10 + [1.0] * 5
    outs, records, diff = released_beside(three_epochs(), warmup=0)  # remixing from the first epoch
    assert diff <= TOL, diff


def test_the_equality_fails_when_the_assignment_is_wrong(monkeypatch):
    """The comparison can fail: sending each sample to its MOST confident modality is caught."""
    import mmbalance.methods.remix as remix

    monkeypatch.setattr(remix, "assignment", lambda conf: 1 - assignment(conf))
    *_, diff = released_beside(three_epochs(), warmup=1)
    assert diff > 1e-3


def test_the_equality_fails_when_the_other_modality_is_not_zeroed(monkeypatch):
    import mmbalance.methods.remix as remix

    monkeypatch.setattr(remix, "zero_others", lambda feats, keep: feats)
    *_, diff = released_beside(three_epochs(), warmup=1)
    assert diff > 1e-3


def test_scores_come_from_the_epoch_start_model():
    """A batch's assignment is the epoch-start model's, however far the epoch has trained: the
    scores of a batch seen last equal an evaluation-mode pass of the model as the epoch began."""
    method = attached(Remix(RemixParams(warmup=0), setup(epochs=2, encoder="bn")))
    batches = make_batches(sizes=(B,) * 4)
    start = copy.deepcopy(method).eval()
    outs = steps(method, [batches])[0]
    with torch.no_grad():
        feats = start.encode(batches[-1].inputs)
        expected = {m: confidence(start.heads[m](feats[m]), C).mean().item() for m in AV}
    assert {m: outs[-1][f"confidence.{m}"].item() for m in AV} == pytest.approx(expected, abs=1e-6)
    assert not any(torch.equal(a, b) for a, b in zip(method.parameters(), start.parameters()))


# ----------------------------------------------------------- switched-off equivalence


def test_remix_off_without_unimodal_losses_equals_joint():
    joint = attached(Joint(JointParams(), setup(seed=3, epochs=3)))
    remix = attached(Remix(RemixParams(remix=False, alpha=0.0), setup(seed=3, epochs=3)))
    epochs = three_epochs()
    steps(joint, epochs)
    outs = steps(remix, epochs)
    for key, value in joint.state_dict().items():
        assert torch.allclose(remix.state_dict()[key], value, atol=1e-6, rtol=0), key
    assert all(o["remixed"].item() == 0.0 for e in outs for o in e)


def test_remix_switch_in_both_positions():
    """remix: false is the release's baseline.py (the warm-up step throughout); true remixes after
    the warm-up, and trains other parameters."""
    off = attached(Remix(RemixParams(remix=False, warmup=1), setup(epochs=3)))
    on = attached(Remix(RemixParams(warmup=1), setup(epochs=3)))
    epochs = three_epochs()
    outs_off, outs_on = steps(off, epochs), steps(on, epochs)
    assert [o["remixed"].item() for e in outs_off for o in e] == [0.0] * 15
    assert [o["remixed"].item() for e in outs_on for o in e] == [0.0] * 5 + [1.0] * 10
    assert not torch.allclose(off.fusion.fc_out.weight, on.fusion.fc_out.weight, atol=1e-3)
    _, _, diff = released_beside(epochs, remix=False, warmup=1)  # the baseline equals the release's too
    assert diff <= TOL, diff


def test_params_are_validated():
    with pytest.raises(ConfigError, match=r"method.warmup=3 leaves no remixed epoch in train.epochs=3"):
        Remix(RemixParams(warmup=3), setup(epochs=3))
    Remix(RemixParams(warmup=3, remix=False), setup(epochs=3))  # the baseline needs no remixed epoch
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        RemixParams(gamma=-1)


# ---------------------------------------------------------------------- through the harness

HARNESS = ["method.name=remix", "method.warmup=1", "train.epochs=3"]


def test_harness_reports_the_shares_and_counts_the_cost(fast_config, store):
    result = run(fast_config(*HARNESS), store)
    history = RunDir(result.path).read_metrics()
    assert [r["train"]["remixed"] for r in history] == [0.0, 1.0, 1.0]
    assert {"loss.fused", "loss.audio", "loss.visual"} <= set(history[0]["train"])
    train = history[-1]["train"]
    assert train["share.audio"] + train["share.visual"] == pytest.approx(1.0, abs=1e-6)
    assert train["confidence.audio"] > 0 and train["confidence.visual"] > 0
    assert set(history[-1]["val"]["modality_acc"]) == set(AV)
    # gaussian: 128 training rows, batches of 32 (4 an epoch). A warm-up step is 1F + 1B; a
    # remixed epoch scores every batch (1F) and takes sum_m ceil(N_m / 32) steps, 4 or 5
    cost = result.summary["cost"]
    assert 12 * cost["backward_passes_per_step"] == pytest.approx(4 + 5 + 5)  # neither share a multiple of 32
    assert cost["forward_passes_per_step"] == pytest.approx(cost["backward_passes_per_step"] + 8 / 12)


def test_three_modalities_through_the_harness(fast_config, store):
    result = run(fast_config("dataset.name=gaussian3", *HARNESS), store)
    history = RunDir(result.path).read_metrics()
    names = ("audio", "visual", "text")
    for record in history[1:]:
        assert sum(record["train"][f"share.{m}"] for m in names) == pytest.approx(1.0, abs=1e-6)
    # the first remixed epoch trains every modality; the most confident one (audio, whose classes
    # the generator separates most) gets the fewest samples
    shares = {m: history[1]["train"][f"share.{m}"] for m in names}
    assert min(shares.values()) > 0 and min(shares, key=shares.get) == "audio"
    assert set(history[-1]["val"]["modality_acc"]) == set(names)


def test_resume_is_exact(fast_config, store, tmp_path, monkeypatch):
    # the queues and the snapshot are rebuilt at every epoch start, where the harness resumes
    assert_resumes_exactly(fast_config(*HARNESS, "train.epochs=4"), store, tmp_path, monkeypatch)


def test_bench_lists_remix(tmp_path):
    from mmbalance.bench.cli import main as cli

    out = tmp_path / "bench.json"
    args = ["bench", "--quick", "--only", "steps", "--device", "cpu", "--methods", "remix", "--json", str(out)]
    assert cli(args) == 0
    rows = json.loads(out.read_text())["steps"]
    assert [r["method"] for r in rows] == ["joint", "remix (remixing)"]
    # bench's epoch is one batch, its last: the scores (1F) and a step per modality that has
    # samples (1F + 1B each)
    assert rows[1]["backward_passes_per_step"] in (1.0, 2.0)
    assert rows[1]["forward_passes_per_step"] == rows[1]["backward_passes_per_step"] + 1
