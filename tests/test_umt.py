"""UMT and UME, and the harness's runs that need other runs (Method.requires).

The methods: BalanceBenchmark's UMTTrainer step transcribed and run beside UMT (two and three
modalities, teachers in training and in eval mode, the window's edges), switched-off equivalence
with joint training, the in-run teacher stage, UME's ensemble and its in-run form equal to joint
late fusion. The harness: the plan adds and orders the teachers and shows them; a missing or
failed teacher is a one-line error naming its run; inline and local launches train them first;
the trained teachers are the ones handed over; resume is exact; forward passes are counted;
SLURM's waves and dependency option.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbalance.bench.config import load_config
from mmbalance.bench.launch.plan import format_plan, levels, plan
from mmbalance.bench.requirements import RequirementNotFinished, required_configs, with_requirements
from mmbalance.bench.store import Store
from mmbalance.bench.train import run
from mmbalance.core.errors import ConfigError, RunFailed
from mmbalance.core.types import Batch, Modality
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.joint import Joint, JointParams
from mmbalance.methods.ume import UME, UMEParams, ensemble
from mmbalance.methods.umt import UMT, UMTParams
from mmbalance.methods.unimodal import Unimodal, UnimodalParams
from tests.conftest import FAST, BNEncoder, run_interrupted, step_context, without_timing

pytestmark = pytest.mark.usefixtures("one_torch_thread")

C = 3
MODS2 = (Modality("audio", "vector", (5,)), Modality("visual", "vector", (4,)))
MODS3 = (*MODS2, Modality("text", "vector", (3,)))
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4
TOL = 1e-5


def Enc(d_in: int, d_out: int = 4) -> BNEncoder:
    """BatchNorm makes a teacher's train and eval modes differ."""
    return BNEncoder(d_in, d_out)


def encoders(mods, seed: int) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict({m.name: Enc(m.shape[0]) for m in mods})


def trained_teachers(mods) -> dict[str, Unimodal]:
    """Unimodal models as the harness hands them (frozen, eval mode), with weights of their own
    and BatchNorm running statistics away from their initial ones."""
    teachers = {}
    for i, m in enumerate(mods):
        torch.manual_seed(100 + i)
        t = Unimodal(UnimodalParams(modality=m.name), MethodSetup(encoders(mods, 100 + i), C, mods))
        with torch.no_grad():
            t.encoders[m.name](torch.randn(16, *m.shape) * 2 + 1)  # moves the running statistics
        teachers[m.name] = t.requires_grad_(False).eval()
    return teachers


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)


def batch(mods, seed: int, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch({m.name: torch.randn(n, *m.shape, generator=g) for m in mods}, torch.randint(0, C, (n,), generator=g))


def make_umt(params: UMTParams, mods=MODS2, teachers=None, epochs: int = 100) -> UMT:
    teachers = teachers or trained_teachers(mods)
    required = {m: (lambda t=t: copy.deepcopy(t)) for m, t in teachers.items()}
    method = UMT(params, MethodSetup(encoders(mods, 0), C, mods, epochs=epochs, required=required))
    method.attach(step_context(lambda: sgd(list(method.trainable()))))
    return method


# ------------------------------------------------------------ BalanceBenchmark, transcribed


class BBModel(nn.Module):
    """BalanceBenchmark's BaseClassifierModel with concat fusion: encoder_result[m] per modality and
    'output' = fc_out(cat) (avclassify_model.py L265-282), here on the suite's modules' copies."""

    def __init__(self, method: UMT) -> None:
        super().__init__()
        self.modality_encoder = copy.deepcopy(method.encoders)
        self.fc_out = copy.deepcopy(method.fusion.fc_out)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        result = {m: enc(batch.inputs[m]) for m, enc in self.modality_encoder.items()}
        result["output"] = self.fc_out(torch.cat([result[m] for m in self.modality_encoder], dim=1))
        return result


def bb_training_step(model, loaded_model, batch, optimizer, epoch, scaling, starts, ends) -> dict:
    """UMT_trainer.py @ 4c1482f, training_step L130-145, then the train loop's optimizer.step(closure)
    and optimizer.zero_grad() (L104-108). The teachers (loaded_model) are never put in eval mode there."""
    criterion, mse = nn.CrossEntropyLoss(), nn.MSELoss()
    encoder_result = model(batch)
    loss = criterion(encoder_result["output"], batch.labels)
    distill = {}
    if starts <= epoch <= ends:
        for modality, teacher in loaded_model.items():
            with torch.no_grad():
                out_unimodal = teacher.encoders[modality](batch.inputs[modality])  # teacher encoder_result[m]
            distill[modality] = mse(out_unimodal, encoder_result[modality])
            loss = loss + scaling * distill[modality]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return {"loss": loss.detach(), **{f"distill.{m}": v.detach() for m, v in distill.items()}}


@pytest.mark.parametrize("mods", [MODS2, MODS3], ids=["M2", "M3"])
@pytest.mark.parametrize("teacher_mode", ["train", "eval"])
def test_umt_equals_balancebenchmark_step_by_step(mods, teacher_mode):
    """Four epochs of two steps, window epochs 1-2 (inclusive): parameters and reported
    quantities agree; `eval` is the transcription with teachers switched to eval mode."""
    teachers = trained_teachers(mods)
    method = make_umt(UMTParams(scaling=2.5, modulation_starts=1, modulation_ends=2, teacher_mode=teacher_mode),
                      mods, teachers)
    ref = BBModel(method)
    ref_teachers = {m: copy.deepcopy(t).train(teacher_mode == "train") for m, t in teachers.items()}
    ref_opt = sgd(ref.parameters())
    method.train()
    for epoch in range(4):
        method.step_context.epoch = epoch
        method.on_epoch_start(epoch)
        for i in range(2):
            b = batch(mods, 10 * epoch + i)
            ours = method.training_step(b)
            theirs = bb_training_step(ref, ref_teachers, b, ref_opt, epoch, 2.5, 1, 2)
            assert float(ours["distilling"]) == float(epoch in (1, 2))
            assert float(ours["loss"]) == pytest.approx(float(theirs["loss"]), abs=TOL)
            for m in method.teachers:
                assert float(ours[f"distill.{m}"]) == pytest.approx(float(theirs.get(f"distill.{m}", 0.0)), abs=TOL)
    for (name, p), q in zip(method.encoders.named_parameters(), ref.modality_encoder.parameters()):
        assert torch.allclose(p, q, atol=TOL), name
    assert torch.allclose(method.fusion.fc_out.weight, ref.fc_out.weight, atol=TOL)
    # the teachers stayed frozen; their BatchNorm statistics moved only in training mode
    for m, t in method.teachers.items():
        assert torch.equal(t.encoders[m].net[0].weight, teachers[m].encoders[m].net[0].weight)
        moved = not torch.equal(t.encoders[m].net[1].running_mean, teachers[m].encoders[m].net[1].running_mean)
        assert moved == (teacher_mode == "train")


def test_teacher_modes_distil_towards_different_targets():
    """The switch matters with BatchNorm: batch statistics (train) vs running statistics (eval)."""
    teachers = trained_teachers(MODS2)
    out = {}
    for mode in ("train", "eval"):
        method = make_umt(UMTParams(teacher_mode=mode), teachers=teachers)
        method.train()
        method.on_epoch_start(0)
        out[mode] = method.training_step(batch(MODS2, 0))
    assert abs(float(out["train"]["distill.audio"]) - float(out["eval"]["distill.audio"])) > 1e-3


def test_umt_switched_off_is_joint_training():
    """scaling 0: no teacher is required or run, and the steps are joint training's (1e-6)."""
    assert UMT.requires(UMTParams(scaling=0), ("audio", "visual")) == {}
    assert set(UMT.requires(UMTParams(), ("audio", "visual"))) == {"audio", "visual"}
    method = UMT(UMTParams(scaling=0), MethodSetup(encoders(MODS2, 0), C, MODS2))
    joint = Joint(JointParams(), MethodSetup(encoders(MODS2, 0), C, MODS2))
    for m in (method, joint):
        m.attach(step_context(lambda m=m: sgd(list(m.trainable()))))
        m.train()
    for i in range(4):
        ours, theirs = method.training_step(batch(MODS2, i)), joint.training_step(batch(MODS2, i))
        assert float(ours["loss"]) == pytest.approx(float(theirs["loss"]), abs=1e-6)
    for (name, p), q in zip(method.named_parameters(), joint.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_umt_builds_its_fusion_head_as_joint_training_does():
    """The teachers are built (store) or drawn (in_run) without moving the random stream."""
    joint = Joint(JointParams(), MethodSetup(encoders(MODS2, 0), C, MODS2))
    for params in (UMTParams(), UMTParams(teachers="in_run", teacher_epochs=1)):
        method = make_umt(params)
        assert torch.equal(method.fusion.fc_out.weight, joint.fusion.fc_out.weight)


def test_in_run_teachers_train_as_unimodal_runs_then_distil():
    """Teacher stage: each teacher steps exactly as a unimodal model of this run's initial encoder
    would; then they are frozen, the optimizer starts afresh, and only the UMT epochs are selectable."""
    method = make_umt(UMTParams(teachers="in_run", teacher_epochs=1, modulation_ends=None), epochs=3)
    method.attach(step_context(lambda: sgd(method.param_groups())))
    alone = {}
    for m in MODS2:
        torch.manual_seed(0)
        enc = encoders(MODS2, 0)  # the unimodal run's encoders: the same draw as this run's
        alone[m.name] = Unimodal(UnimodalParams(modality=m.name), MethodSetup(enc, C, MODS2))
        alone[m.name].attach(step_context(lambda u=alone[m.name]: sgd(list(u.trainable()))))
        assert torch.equal(alone[m.name].head.weight, method.teachers[m.name].head.weight)
    method.train()
    student = copy.deepcopy(method.encoders.state_dict())
    method.on_epoch_start(0)
    for i in range(3):
        out = method.training_step(batch(MODS2, i))
        for m, u in alone.items():
            assert float(out[f"teacher.{m}"]) == pytest.approx(float(u.training_step(batch(MODS2, i))["loss"]), abs=TOL)
    for m, u in alone.items():
        for p, q in zip(method.teachers[m].parameters(), u.parameters()):
            assert torch.allclose(p, q, atol=TOL)
    assert all(torch.equal(v, method.encoders.state_dict()[k]) for k, v in student.items())  # untouched
    assert (method.selectable(0), method.selectable(1)) == (False, True)
    first_optimizer = method.step_context.optimizer
    method.step_context.epoch = 1
    method.on_epoch_start(1)
    assert method.step_context.optimizer is not first_optimizer and not method.step_context.optimizer.state
    frozen = [p.clone() for p in method.teachers.parameters()]  # (BatchNorm statistics move: teacher_mode train)
    out = method.training_step(batch(MODS2, 5))
    assert float(out["distilling"]) == 1.0 and float(out["distill.audio"]) > 0
    assert all(torch.equal(p, q) for p, q in zip(frozen, method.teachers.parameters()))


def test_umt_refusals_are_one_line():
    with pytest.raises(ValueError, match="teacher_epochs"):
        UMTParams(teachers="in_run")
    with pytest.raises(ValueError, match="modulation_ends"):
        UMTParams(modulation_starts=5, modulation_ends=2)
    with pytest.raises(ConfigError, match="teacher_epochs=3 leaves no UMT epochs in train.epochs=3"):
        make_umt(UMTParams(teachers="in_run", teacher_epochs=3), epochs=3)
    with pytest.raises(ConfigError, match="requirement 'audio' was not handed"):
        UMT(UMTParams(), MethodSetup(encoders(MODS2, 0), C, MODS2))


# ------------------------------------------------------------------------------------- UME


@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_ume_is_the_mean_of_its_members(combine):
    teachers = trained_teachers(MODS3)
    required = {m: (lambda t=t: copy.deepcopy(t)) for m, t in teachers.items()}
    method = UME(UMEParams(combine=combine), MethodSetup(encoders(MODS3, 0), C, MODS3, required=required))
    method.attach(step_context(lambda: torch.optim.SGD(method.param_groups(), lr=LR)))
    b = batch(MODS3, 1)
    before = copy.deepcopy(method.state_dict())
    assert float(method.training_step(b)["loss"]) == 0.0  # trained in their own runs
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in before.items())
    method.eval()
    pred = method.predict(b)
    logits = {m: t.head(t.encoders[m](b.inputs[m])) for m, t in teachers.items()}
    if combine == "logits":
        expected = sum(logits.values()) / 3
        assert torch.allclose(pred.fused, expected, atol=1e-6)
    else:
        probs = sum(F.softmax(z, dim=-1) for z in logits.values()) / 3
        assert torch.allclose(F.softmax(pred.fused, dim=-1), probs, atol=1e-6)
        assert torch.allclose(ensemble(logits, "probs").exp(), probs, atol=1e-6)
    assert all(torch.allclose(pred.per_modality[m], logits[m]) for m in logits)
    # its probes see the members' encoders
    assert all(torch.equal(f, teachers[m].encoders[m](b.inputs[m])) for m, f in method.features(b).items())


def test_ume_in_run_is_joint_late_fusion_with_unimodal_losses():
    ume = UME(UMEParams(teachers="in_run"), MethodSetup(encoders(MODS2, 0), C, MODS2, fusion="concat"))
    joint = Joint(JointParams(late_loss="unimodal"), MethodSetup(encoders(MODS2, 0), C, MODS2, fusion="late"))
    assert UME.requires(UMEParams(teachers="in_run"), ("audio", "visual")) == {}
    for m in (ume, joint):
        m.attach(step_context(lambda m=m: sgd(m.param_groups())))
        m.train()
    for i in range(4):
        ours, theirs = ume.training_step(batch(MODS2, i)), joint.training_step(batch(MODS2, i))
        assert float(ours["loss"]) == pytest.approx(float(theirs["loss"]), abs=1e-6)
    for (name, p), q in zip(ume.named_parameters(), joint.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    ume.eval(), joint.eval()
    assert torch.allclose(ume.predict(batch(MODS2, 9)).fused, joint.predict(batch(MODS2, 9)).fused, atol=1e-6)


# --------------------------------------------------------------------------------- harness

FASTER = [*FAST, "train.epochs=2", "eval.probe=false"]


def umt_config(*extra: str):
    return load_config(None, [*FASTER, "method.name=umt", "label=umt", "group=g", *extra])


def test_plan_adds_the_teachers_before_their_run_and_shows_them(store):
    """A sweep of only UMT runs still works: its teachers join the plan, per seed, first; a sweep's
    own unimodal cell with the same config is the teacher (run once)."""
    configs = [umt_config("train.seed=0"), umt_config("train.seed=1")]
    planned = plan(configs, store)
    names = [(p.cfg.label, p.cfg.train.seed) for p in planned]
    assert names == [("umt:audio", 0), ("umt:visual", 0), ("umt", 0), ("umt:audio", 1), ("umt:visual", 1), ("umt", 1)]
    teachers = required_configs(configs[0])
    assert teachers["audio"].method == {"name": "unimodal", "modality": "audio"}
    assert teachers["audio"].to_dict() | {"method": None, "label": None} == configs[0].to_dict() | {
        "method": None, "label": None}
    text = format_plan(planned)
    assert f"      needs: umt:audio {teachers['audio'].run_id()}" in text
    assert f"      needs: umt:visual {teachers['visual'].run_id()}" in text
    own = load_config(None, [*FASTER, "method.name=unimodal", "method.modality=audio", "label=audio-only", "group=g"])
    merged = with_requirements([umt_config(), own])
    assert [c.label for c in merged] == ["audio-only", "umt:visual", "umt"]
    # three modalities: three teachers
    three = load_config(None, [*FASTER, "dataset.name=gaussian3", "method.name=umt", "group=g"])
    assert sorted(required_configs(three)) == ["audio", "text", "visual"]


def test_dry_run_shows_the_dependency(tmp_path, capsys):
    from mmbalance.bench.cli import main

    sweep = tmp_path / "s.yaml"
    sweep.write_text("group: g\nbase: {dataset: {name: gaussian}, train: {epochs: 2}}\n"
                     "cells: {umt: {method: {name: umt}}}\n")
    assert main(["--results", str(tmp_path / "r"), "sweep", str(sweep), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 runs: 3 new" in out and out.count("needs: umt:") == 2


def test_a_missing_teacher_is_a_one_line_error_naming_its_run(store):
    cfg = umt_config()
    with pytest.raises(RunFailed) as e:
        run(cfg, store)
    teacher = required_configs(cfg)["audio"]
    message = str(e.value)
    assert "\n" not in message and "requirement 'audio'" in message and "not started" in message
    assert str(store.run_dir("g", teacher.run_id()).path) in message and "unimodal" in message
    assert store.run_dir("g", cfg.run_id()).status()["state"] == "failed"


def test_inline_trains_the_teachers_first_and_hands_over_their_best_weights(store):
    from mmbalance.bench.sweep import run_inline

    cfg = umt_config()
    results = run_inline([cfg], store)
    assert [r.state for r in results] == ["finished"] * 3
    umt_dir = store.run_dir("g", cfg.run_id())
    model = umt_dir.load(umt_dir.best)["model"]
    for m, teacher in required_configs(cfg).items():
        rd = store.run_dir("g", teacher.run_id())
        for key, value in rd.load(rd.best)["model"].items():
            assert torch.equal(model[f"teachers.{m}.{key}"], value), key
    cost = results[-1].summary["cost"]
    assert (cost["forward_passes_per_step"], cost["backward_passes_per_step"]) == (2.0, 1.0)


def test_umt_resumes_exactly(tmp_path, monkeypatch):
    from mmbalance.bench.sweep import run_inline

    cfg = load_config(None, [*FAST, "method.name=umt", "group=g", "eval.probe=false"])
    reference = Store(tmp_path / "ref")
    run_inline([cfg], reference)
    store = Store(tmp_path / "store")
    run_inline(with_requirements([cfg])[:-1], store)  # the teachers
    run_interrupted(cfg, store, monkeypatch, at_epoch=2)
    resumed = run(cfg, store)
    rd, ref = store.run_dir("g", cfg.run_id()), reference.run_dir("g", cfg.run_id())
    assert without_timing(rd.read_metrics()) == without_timing(ref.read_metrics())
    assert resumed.summary["best_val"] == ref.read_summary()["best_val"]


def test_a_failed_teacher_fails_its_run_naming_it(store, monkeypatch):
    from mmbalance.bench.sweep import run_inline
    from mmbalance.methods.unimodal import Unimodal

    def broken(self, batch):
        raise RuntimeError("teacher broke")

    monkeypatch.setattr(Unimodal, "training_step", broken)
    cfg = umt_config()
    with pytest.raises(RunFailed, match="3 of 3 runs failed"):
        run_inline([cfg], store)
    error = store.run_dir("g", cfg.run_id()).status()["error"]
    assert "requirement 'audio'" in error and " is failed;" in error


def test_local_launcher_starts_a_run_once_its_teachers_have_ended(store, monkeypatch):
    """Three workers, two seeds: each UMT run starts once its own teachers have ended (the other
    seed's teachers need not have), the teachers at once."""
    import threading
    import time

    from mmbalance.bench.launch import local
    from mmbalance.bench.launch.options import LauncherConfig

    events, lock = [], threading.Lock()

    def fake_run(p, slots, *args):
        slot = slots.get()
        with lock:
            events.append(("start", p.cfg.label, p.cfg.train.seed))
        time.sleep(0.3 if p.cfg.train.seed == 0 else 0.6)
        with lock:
            events.append(("end", p.cfg.label, p.cfg.train.seed))
        slots.put(slot)
        return "finished", 0.3

    monkeypatch.setattr(local, "run_in_process", fake_run)
    planned = plan([umt_config("train.seed=0"), umt_config("train.seed=1")], store.ensure_writable())
    local.launch_local(planned, LauncherConfig(name="local", workers=3))
    for seed in (0, 1):
        start = events.index(("start", "umt", seed))
        assert {("end", f"umt:{m}", seed) for m in ("audio", "visual")} <= set(events[:start])
    assert events.index(("start", "umt", 0)) < events.index(("end", "umt:audio", 1))  # no wait for seed 1's


def test_local_launch_trains_the_teachers_then_umt(store):
    """Through real run-one processes, all three runs allowed at once: UMT finishes, so it found
    its teachers finished."""
    from mmbalance.bench.launch import launch
    from mmbalance.bench.launch.options import LauncherConfig

    cfg = umt_config()
    assert launch([cfg], store.ensure_writable(), LauncherConfig(name="local", workers=3)) == 0
    assert store.run_dir("g", cfg.run_id()).status()["state"] == "finished"


def test_slurm_waves_and_dependency_option(store):
    from mmbalance.bench.launch.slurm import with_dependency

    planned = plan([umt_config("train.seed=0"), umt_config("train.seed=1")], store)
    waves = levels(planned)
    assert [[p.cfg.label for p in w] for w in waves] == [["umt:audio", "umt:visual"] * 2, ["umt", "umt"]]
    assert with_dependency({}, []) == {}
    assert with_dependency({"mail_type": "END"}, ["12", "13"]) == {"mail_type": "END", "dependency": "afterany:12:13"}
    assert with_dependency({"dependency": "afterok:9"}, ["12"]) == {"dependency": "afterok:9,afterany:12"}


def test_requirement_not_finished_is_raised_before_loading(store):
    from mmbalance.bench.requirements import load_required

    cfg = umt_config()
    teacher = required_configs(cfg)["visual"]
    rd = store.run_dir("g", teacher.run_id())
    rd.path.mkdir(parents=True)
    rd.set_status("running")
    with pytest.raises(RequirementNotFinished, match=r"requirement 'visual'.* is running;"):
        load_required("visual", teacher, lambda c: None, rd, cfg)
