"""Diagnosing & Re-learning: the released code's training loop, diagnosis and re-initialisation
transcribed and run beside the method (both variants: the release's and BalanceBenchmark's
trainer), k-means' n_init in both positions, the purity by hand, switched-off equivalence with
joint training, three modalities and resume through the harness, and the clear refusals."""

from __future__ import annotations

import copy
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn import preprocessing
from sklearn.cluster import KMeans
from sklearn.metrics import accuracy_score

from mmbalance.bench.train import run
from mmbalance.core.errors import ConfigError
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Modality
from mmbalance.methods.base import MethodSetup, StepContext
from mmbalance.methods.joint import Joint, JointParams
from mmbalance.methods.relearning import (
    Relearning,
    RelearningParams,
    cluster_purity,
    diagnosis_epochs,
    purity,
    reinit_strength,
)
from tests.conftest import BNEncoder, assert_resumes_exactly, step_context

# tiny models: one torch thread (conftest.one_torch_thread); on a shared machine more cost several times the run
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              # the code's np.array(label tensor) (R:113, 115), as written
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

C = 3
MODS2 = (Modality("audio", "vector", (5,)), Modality("visual", "vector", (4,)))
MODS3 = (*MODS2, Modality("text", "vector", (3,)))
LR, MOMENTUM, WD = 0.1, 0.9, 1e-4  # the code's SGD (R:368: momentum 0.9, weight decay 1e-4), a larger lr
EPOCHS = 4
TOL = 1e-5


def Enc(d_in: int, d_out: int = 4) -> BNEncoder:
    """BatchNorm makes the diagnosis pass's eval mode matter."""
    return BNEncoder(d_in, d_out)


def setup(mods=MODS2, seed: int = 0, epochs: int = EPOCHS) -> MethodSetup:
    torch.manual_seed(seed)
    return MethodSetup(nn.ModuleDict({m.name: Enc(m.shape[0]) for m in mods}), C, mods, "concat", epochs=epochs)


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)


def split(n: int, size: int = 12, seed: int = 1, mods=MODS2) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, C, (size,), generator=gen)
        # the class shifts every modality, the first one most (a dominant modality)
        inputs = {m.name: torch.randn(size, *m.shape, generator=gen) + (1.5 - 0.5 * i) * labels[:, None].float()
                  for i, m in enumerate(mods)}
        out.append(Batch(inputs, labels))
    return out


TRAIN, VAL = split(4, seed=1), split(2, seed=2)


def make(cls=Relearning, params=None, mods=MODS2, train=TRAIN, val=VAL, epochs: int = EPOCHS):
    method = cls(params if params is not None else RelearningParams(), setup(mods, epochs=epochs))
    method.attach(step_context(lambda: sgd(method.parameters()), train, val=val))
    return method


def drive(method, train: list[Batch], epochs: int = EPOCHS) -> tuple[list[dict], list[dict]]:
    """As the harness: per epoch on_epoch_start, the steps, on_epoch_end. Returns the parameters
    each epoch is evaluated with and each epoch's `epoch_log`."""
    ctx, evaluated, logs = method.step_context, [], []
    for epoch in range(epochs):
        ctx.epoch = epoch
        method.train()
        method.on_epoch_start(epoch)
        for i, b in enumerate(train):
            ctx.batch_index = i
            method.training_step(b)
        method.on_epoch_end(epoch)
        evaluated.append({k: v.detach().clone() for k, v in method.named_parameters()})
        logs.append(method.epoch_log())
    return evaluated, logs


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --------------------------------------- the released code (Diagnosing_Relearning_ECCV2024 @ 025085e, code/ours.py)


def purity_score(y_true, y_pred):  # R:63-95, verbatim
    y_voted_labels = np.zeros(y_true.shape)
    labels = np.unique(y_true)
    ordered_labels = np.arange(labels.shape[0])
    for k in range(labels.shape[0]):
        y_true[y_true == labels[k]] = ordered_labels[k]
    labels = np.unique(y_true)
    bins = np.concatenate((labels, [np.max(labels) + 1]), axis=0)
    for cluster in np.unique(y_pred):
        hist, _ = np.histogram(y_true[y_pred == cluster], bins=bins)
        winner = np.argmax(hist)
        y_voted_labels[y_pred == cluster] = winner
    return accuracy_score(y_true, y_voted_labels)


def reinit_score(args, train_audio, train_visual, train_label, val_audio, val_visual, val_label):  # R:99-135
    all_feature = [train_audio, val_audio, train_visual, val_visual]
    stages = ["train_audio", "val_audio", "train_visual", "val_visual"]
    all_purity = []
    for idx, fea in enumerate(all_feature):
        result = fea
        scaler = preprocessing.MinMaxScaler(feature_range=(-1, 1))
        result = scaler.fit_transform(result)
        # sklearn's default n_init ('auto': 1 for k-means++) unless the test sets it
        y_pred = KMeans(n_clusters=args.n_classes, random_state=0, **args.kmeans).fit_predict(result)
        if stages[idx][:5] == "train":
            purity = purity_score(np.array(train_label), y_pred)
        else:
            purity = purity_score(np.array(val_label), y_pred)
        all_purity.append(purity)
    purity_gap_audio = np.abs(all_purity[0] - all_purity[1])
    purity_gap_visual = np.abs(all_purity[2] - all_purity[3])
    weight_audio = torch.tanh(torch.tensor(args.move_lambda * purity_gap_audio))
    weight_visual = torch.tanh(torch.tensor(args.move_lambda * purity_gap_visual))
    return weight_audio, weight_visual, all_purity  # the code prints the purities; returned here


def reinit(args, model, checkpoint, weight_audio, weight_visual):  # R:139-169 (.cuda() dropped)
    for name, param in model.named_parameters():
        if "audio_net" in name:
            init_weight = checkpoint[name]
            current_weight = param.data
            new_weight = weight_audio * init_weight + (1 - weight_audio) * current_weight
            param.data = new_weight
        elif "visual_net" in name:
            init_weight = checkpoint[name]
            current_weight = param.data
            new_weight = weight_visual * init_weight + (1 - weight_visual) * current_weight
            param.data = new_weight
    return model


def train_epoch(model, dataloader, optimizer):  # R:172-213
    criterion = nn.CrossEntropyLoss()
    model.train()
    for step, (spec, images, label) in enumerate(dataloader):  # noqa: B007
        optimizer.zero_grad()
        out, _, _, _, _ = model(spec.float(), images.float())
        loss = criterion(out, label)
        loss.backward()
        optimizer.step()


def get_feature(model, dataloader):  # R:300-324
    model.eval()
    all_audio, all_visual, all_label = [], [], []
    with torch.no_grad():
        for step, (spec, images, label) in enumerate(dataloader):  # noqa: B007
            _, _, _, a, v = model(spec.float(), images.float())
            all_audio.append(a.data.cpu())
            all_visual.append(v.data.cpu())
            all_label.append(label.data.cpu())
    return torch.cat(all_audio), torch.cat(all_visual), torch.cat(all_label)


class AVClassifier(nn.Module):
    """The code's model (models/models.py: out, _, _, a, v = model(audio, visual); head on cat(a, v))
    around copies of the suite's encoders and concat head."""

    def __init__(self, method: Relearning) -> None:
        super().__init__()
        self.audio_net = copy.deepcopy(method.encoders["audio"])
        self.visual_net = copy.deepcopy(method.encoders["visual"])
        self.head = copy.deepcopy(method.fusion.fc_out)

    def forward(self, audio, visual):
        a, v = self.audio_net(audio), self.visual_net(visual)
        return self.head(torch.cat((a, v), 1)), None, None, a, v

    def suite_names(self) -> dict[str, torch.Tensor]:
        rename = {"audio_net": "encoders.audio", "visual_net": "encoders.visual", "head": "fusion.fc_out"}
        return {rename[k.split(".")[0]] + k[len(k.split(".")[0]):]: v.detach().clone()
                for k, v in self.named_parameters()}


def loader(batches: list[Batch]) -> list[tuple]:
    return [(b.inputs["audio"], b.inputs["visual"], b.labels) for b in batches]


def release_run(method: Relearning, args) -> tuple[list[dict], dict[int, dict]]:
    """main() (R:329-427): the weights saved before training, the loop, the re-initialisation
    after each scheduled epoch's evaluation. Returns the weights each epoch is evaluated with
    (R:386) and, per re-initialised epoch, the purities and strengths."""
    model = AVClassifier(method)
    checkpoint = copy.deepcopy(model.state_dict())  # R:345-350: torch.save, then torch.load
    optimizer = sgd(model.parameters())
    evaluated, diagnoses, flag_reinit = [], {}, 0
    for epoch in range(args.epochs):
        train_epoch(model, loader(TRAIN), optimizer)
        evaluated.append(model.suite_names())  # valid(...) at R:386 sees these
        if (epoch % args.reinit_epoch == 0) & (epoch > 0):
            flag_reinit += 1
            if flag_reinit <= args.reinit_num:
                train_audio, train_visual, train_label = get_feature(model, loader(TRAIN))
                val_audio, val_visual, val_label = get_feature(model, loader(VAL))
                wa, wv, purities = reinit_score(args, train_audio, train_visual, train_label, val_audio,
                                                val_visual, val_label)
                model = reinit(args, model, checkpoint, wa, wv)
                diagnoses[epoch] = {"purity_train.audio": purities[0], "purity_val.audio": purities[1],
                                    "purity_train.visual": purities[2], "purity_val.visual": purities[3],
                                    "reinit.audio": float(wa), "reinit.visual": float(wv)}
    return evaluated, diagnoses


def release_args(**kw) -> SimpleNamespace:
    base = {"n_classes": C, "move_lambda": 3.0, "reinit_epoch": 1, "reinit_num": 2, "epochs": EPOCHS, "kmeans": {}}
    return SimpleNamespace(**{**base, **kw})


# ------------------------------- BalanceBenchmark @ 4c1482f, balancemm/trainer/ReLearning_trainer.py


class BBModel(nn.Module):
    """BalanceBenchmark's BaseClassifierModel as the trainer uses it: modality_encoder[m],
    fusion_module, encoder_result and unimodal_result['output'] after a forward."""

    def __init__(self, method: Relearning) -> None:
        super().__init__()
        self.modalitys = list(method.modality_names)
        self.n_classes = C
        self.device = torch.device("cpu")
        self.modality_encoder = nn.ModuleDict({m: copy.deepcopy(method.encoders[m]) for m in self.modalitys})
        self.fusion_module = copy.deepcopy(method.fusion)

    def forward(self, batch: Batch) -> None:
        self.encoder_result = {m: self.modality_encoder[m](batch.inputs[m]) for m in self.modalitys}
        self.unimodal_result = {"output": self.fusion_module(self.encoder_result)}

    def suite_names(self) -> dict[str, torch.Tensor]:
        rename = {"modality_encoder": "encoders", "fusion_module": "fusion"}
        return {rename[k.split(".")[0]] + k[len(k.split(".")[0]):]: v.detach().clone()
                for k, v in self.named_parameters()}


class BBTrainer:
    """The trainer's lines that shape the weights: get_feature (B:67-88), reinit_score (B:90-119),
    reinit (B:122-134), fit's loop (B:179-201, validation at B:244-247) and training_step (B:379-397)."""

    def __init__(self, method_dict: dict) -> None:
        self.move_lambda = method_dict["move_lambda"]
        self.reinit_epoch = method_dict["reinit_epoch"]
        self.reinit_num = method_dict["reinit_num"]
        self.init_params = {}

    def get_feature(self, model, data_loader):
        features = {modality: [] for modality in model.modalitys}
        features["label"] = []
        model.eval()
        with torch.no_grad():
            for batch in data_loader:
                label = batch.labels
                model(batch)
                for modality in model.modalitys:
                    features[modality].append(model.encoder_result[modality].data.cpu())
                features["label"].append(label)
            for modality in model.modalitys:
                features[modality] = torch.cat(features[modality])
            features["label"] = torch.cat(features["label"])
        return features

    def reinit_score(self, model, train_features, val_features):
        train_purity, val_purity, weight = {}, {}, {}
        train_features["label"] = train_features["label"].cpu().numpy()
        val_features["label"] = val_features["label"].cpu().numpy()
        for modality in model.modalitys:
            result = preprocessing.MinMaxScaler(feature_range=(-1, 1)).fit_transform(train_features[modality].numpy())
            y_pred = KMeans(n_clusters=model.n_classes, random_state=0).fit_predict(result)
            train_purity[modality] = purity_score(train_features["label"], y_pred)
        for modality in model.modalitys:
            result = preprocessing.MinMaxScaler(feature_range=(-1, 1)).fit_transform(val_features[modality].numpy())
            y_pred = KMeans(n_clusters=model.n_classes, random_state=0).fit_predict(result)
            val_purity[modality] = purity_score(val_features["label"], y_pred)
        for modality in model.modalitys:
            gap = np.abs(train_purity[modality] - val_purity[modality])
            weight[modality] = torch.tanh(torch.tensor(self.move_lambda * gap))
        return weight, train_purity, val_purity  # the trainer returns weight only

    def reinit(self, model, weight):
        for name, param in model.named_parameters():
            for modality in model.modalitys:
                if modality in name:
                    init_weight = self.init_params[name]
                    current_weight = param.data
                    param.data = weight[modality] * init_weight + (1 - weight[modality]) * current_weight
        return model

    def training_step(self, model, batch):
        model(batch)
        loss = nn.CrossEntropyLoss()(model.unimodal_result["output"], batch.labels)
        loss.backward()
        return loss

    def fit(self, model, epochs: int) -> tuple[list[dict], dict[int, dict]]:
        optimizer = sgd(model.parameters())
        for name, param in model.named_parameters():
            self.init_params[name] = param.data.clone()
        evaluated, diagnoses, flag_reinit = [], {}, 0
        for current_epoch in range(epochs):
            model.train()
            for batch in TRAIN:  # train_loop (B:325-377): optimizer.step(closure), then zero_grad
                optimizer.step(partial(self.training_step, model=model, batch=batch))
                optimizer.zero_grad()
            if (current_epoch % self.reinit_epoch == 0) & (current_epoch > 0):
                flag_reinit += 1
                if flag_reinit <= self.reinit_num:
                    model.eval()
                    train_features = self.get_feature(model, TRAIN)
                    val_features = self.get_feature(model, VAL)
                    weight, p_train, p_val = self.reinit_score(model, train_features, val_features)
                    model = self.reinit(model, weight)
                    diagnoses[current_epoch] = {
                        **{f"purity_train.{m}": p for m, p in p_train.items()},
                        **{f"purity_val.{m}": p for m, p in p_val.items()},
                        **{f"reinit.{m}": float(w) for m, w in weight.items()}}
            evaluated.append(model.suite_names())  # val_loop (B:244-247) sees these
        return evaluated, diagnoses


# --------------------------------------------------------------------------------- equality


def test_release_variant_equals_the_released_code():
    method = make(params=RelearningParams(reinit_epoch=1, reinit_num=2))
    ref_evaluated, ref_diagnoses = release_run(method, release_args())
    evaluated, logs = drive(method, TRAIN)
    worst = max(max_diff(a, b) for a, b in zip(evaluated, ref_evaluated))
    assert worst < TOL, worst
    assert sorted(ref_diagnoses) == [1, 2]
    none = {"reinit.audio": 0.0, "reinit.visual": 0.0}
    for epoch in range(EPOCHS):  # the code re-initialises after epoch e's evaluation: here as e + 1 starts
        assert logs[epoch] == pytest.approx(ref_diagnoses.get(epoch - 1, none), abs=TOL)
    # the test bites: both encoders re-initialised, by different strengths
    for d in ref_diagnoses.values():
        assert min(d["reinit.audio"], d["reinit.visual"]) > 0.05
        assert abs(d["reinit.audio"] - d["reinit.visual"]) > 0.05


def test_balancebenchmark_variant_equals_its_trainer():
    method = make(params=RelearningParams(variant="balancebenchmark", reinit_epoch=1, reinit_num=2))
    ref_evaluated, ref_diagnoses = BBTrainer({"move_lambda": 3.0, "reinit_epoch": 1, "reinit_num": 2}).fit(
        BBModel(method), EPOCHS)
    evaluated, logs = drive(method, TRAIN)
    worst = max(max_diff(a, b) for a, b in zip(evaluated, ref_evaluated))
    assert worst < TOL, worst
    assert sorted(ref_diagnoses) == [1, 2]
    none = {"reinit.audio": 0.0, "reinit.visual": 0.0}
    for epoch in range(EPOCHS):  # before epoch e's validation: logged in epoch e
        assert logs[epoch] == pytest.approx(ref_diagnoses.get(epoch, none), abs=TOL)


def test_the_variants_differ_in_the_weights_an_epoch_is_evaluated_with():
    release, _ = drive(make(params=RelearningParams(reinit_epoch=1, reinit_num=2)), TRAIN)
    bb, _ = drive(make(params=RelearningParams(variant="balancebenchmark", reinit_epoch=1, reinit_num=2)), TRAIN)
    assert max_diff(release[0], bb[0]) == 0  # before any re-initialisation
    assert max_diff(release[1], bb[1]) > 1e-2  # epoch 1: trained weights vs re-initialised ones


@pytest.mark.parametrize("n_init", [1, 10])
def test_kmeans_n_init_in_both_positions_equals_the_code(n_init):
    method = make(params=RelearningParams(reinit_epoch=1, reinit_num=2, kmeans_n_init=n_init))
    ref_evaluated, ref_diagnoses = release_run(method, release_args(kmeans={"n_init": n_init}))
    evaluated, logs = drive(method, TRAIN)
    assert max(max_diff(a, b) for a, b in zip(evaluated, ref_evaluated)) < TOL
    for epoch, diagnosis in ref_diagnoses.items():
        assert logs[epoch + 1] == pytest.approx(diagnosis, abs=TOL)


def test_n_init_changes_the_purity_where_the_restarts_disagree():
    # features where one k-means++ start and the best of ten end in different clusterings
    rng = np.random.default_rng(3)
    features = rng.normal(size=(40, 3)).astype(np.float32)
    labels = rng.integers(0, 4, size=40)
    one, ten = cluster_purity(features, labels, 4, 1), cluster_purity(features, labels, 4, 10)
    assert one != ten
    for n_init, mine in ((1, one), (10, ten)):
        scaled = preprocessing.MinMaxScaler(feature_range=(-1, 1)).fit_transform(features)
        clusters = KMeans(n_clusters=4, random_state=0, n_init=n_init).fit_predict(scaled)
        assert mine == purity_score(labels.copy(), clusters)


def test_purity_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 5])
    clusters = np.array([7, 7, 7, 3, 3, 3, 1, 1])
    # cluster 7: {0, 0, 1} -> 2; cluster 3: {1, 2, 2} -> 2; cluster 1: {2, 5} -> 1
    assert purity(labels, clusters) == 5 / 8 == purity_score(labels.copy(), clusters)
    assert reinit_strength(0.9, 0.7, 3.0) == pytest.approx(np.tanh(0.6), abs=1e-15)
    assert reinit_strength(0.7, 0.9, 3.0) == reinit_strength(0.9, 0.7, 3.0)


def test_schedule_as_the_code_and_defaults_by_variant():
    assert diagnosis_epochs(20, 3, 90) == [20, 40, 60]  # ours.sh
    assert diagnosis_epochs(15, 2, 30) == [15]  # BalanceBenchmark: 30 epochs reach one
    assert diagnosis_epochs(1, 0, 10) == []
    release = make(params=RelearningParams(), epochs=90)
    assert (release.every, release.count, release.schedule) == (20, 3, [20, 40, 60])
    # "release" never schedules after the last epoch (it would follow the last evaluation)
    assert make(params=RelearningParams(), epochs=41).schedule == [20]
    bb = make(params=RelearningParams(variant="balancebenchmark"), epochs=31)
    assert (bb.every, bb.count, bb.schedule) == (15, 2, [15, 30])


# ------------------------------------------------------------------- switched-off equivalence


@pytest.mark.parametrize("off", [{"reinit_num": 0}, {"move_lambda": 0.0, "reinit_epoch": 1}],
                         ids=["no-reinit", "lambda-0"])
def test_switched_off_it_is_joint_training(off):
    joint, _ = drive(make(Joint, JointParams()), TRAIN)
    relearning, logs = drive(make(params=RelearningParams(**off)), TRAIN)
    assert max(max_diff(a, b) for a, b in zip(joint, relearning)) < 1e-6
    if "move_lambda" in off:  # diagnosed (eval mode: BatchNorm's statistics untouched), strength 0
        assert logs[2]["purity_train.audio"] > 0 and logs[2]["reinit.audio"] == 0.0


def test_switched_on_it_is_not_joint_training():
    joint, _ = drive(make(Joint, JointParams()), TRAIN)
    relearning, _ = drive(make(params=RelearningParams(reinit_epoch=1)), TRAIN)
    assert max_diff(joint[-1], relearning[-1]) > 1e-2


# ------------------------------------------------------------------------ through the harness


def test_three_modalities_resume_exactly_and_cost_as_joint(fast_config, store, tmp_path, monkeypatch):
    cfg = fast_config("dataset.name=gaussian3", "method.name=relearning", "method.reinit_epoch=1")
    # interrupted as epoch 2 starts: the resumed run diagnoses epoch 1 in on_epoch_start(2)
    assert_resumes_exactly(cfg, store, tmp_path, monkeypatch, at_epoch=2)
    rd = store.run_dir(cfg.group, cfg.run_id())
    records = rd.read_metrics()
    names = ("audio", "visual", "text")
    assert [sorted(r["method"]) for r in records[:2]] == [sorted(f"reinit.{m}" for m in names)] * 2
    for epoch in (2, 3):  # the diagnoses after epochs 1 and 2
        log = records[epoch]["method"]
        assert {f"{k}.{m}" for k in ("purity_train", "purity_val", "reinit") for m in names} == set(log)
        assert all(0 <= log[f"reinit.{m}"] < 1 for m in names)
    # the diagnosis passes (eval mode, outside the steps) are not per-step passes
    cost = run(cfg, store).summary["cost"]
    assert cost["forward_passes_per_step"] == 1.0 == cost["backward_passes_per_step"]


def test_the_harness_lends_the_validation_split_in_order(fast_config, store):
    from mmbalance.bench.train import Trainer

    cfg = fast_config("method.name=relearning", "method.reinit_epoch=1")
    trainer = Trainer(cfg, store.run_dir(cfg.group, cfg.run_id()))
    lent, direct = list(trainer.context.val_batches()), list(trainer.loaders["val"]())
    assert len(lent) == len(direct) > 0
    for a, b in zip(lent, direct):
        assert torch.equal(a.labels, b.labels) and all(torch.equal(a.inputs[m], b.inputs[m]) for m in a.inputs)
    assert sum(len(b) for b in lent) == len(trainer.dataset.split("val"))


# ------------------------------------------------------------------------------- the refusals


def test_clear_refusals():
    one = (Modality("audio", "vector", (5,)),)
    with pytest.raises(ConfigError, match=r"method relearning balances two or more modalities; the dataset has 1"):
        Relearning(RelearningParams(), setup(one))
    with pytest.raises(ConfigError, match=r"re-initialises after epoch 20 \(reinit_epoch, 0-based\), which a run "
                                          r"of train.epochs=20 never follows with another epoch"):
        Relearning(RelearningParams(), setup(epochs=20))
    with pytest.raises(ConfigError, match=r"variant balancebenchmark.*train.epochs=15 never reaches"):
        Relearning(RelearningParams(variant="balancebenchmark"), setup(epochs=15))
    Relearning(RelearningParams(reinit_num=0), setup(epochs=1))  # joint training: nothing to schedule
    tiny_val = [Batch({m.name: torch.zeros(2, *m.shape) for m in MODS2}, torch.zeros(2).long())]
    with pytest.raises(ConfigError, match=r"as many clusters as classes \(3\); the validation split has 2 samples"):
        drive(make(params=RelearningParams(reinit_epoch=1), val=tiny_val), TRAIN)
    method = Relearning(RelearningParams(reinit_epoch=1), setup())
    method.attach(StepContext(lambda: (sgd(method.parameters()), None), lambda: iter(TRAIN)))
    with pytest.raises(RuntimeError, match=r"this StepContext lends no validation pass \(val_batches\)"):
        drive(method, TRAIN)
    with pytest.raises(ValueError, match="reinit_epoch"):
        METHODS.create({"name": "relearning", "reinit_epoch": 0}, setup())
