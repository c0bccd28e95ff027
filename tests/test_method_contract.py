"""The method contract (methods/base.py): methods use only public names of the harness and of
torch, and step only through the StepContext; the context must be attached before use;
`predict` leaves the method as it found it; the harness averages `Prediction.logs` over a split,
weighted by batch size."""

from __future__ import annotations

import ast
import contextlib
import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mmbalance.bench.evaluate import evaluate
from mmbalance.bench.train import method_record
from mmbalance.core.errors import ConfigError
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Modality, Prediction
from mmbalance.methods.base import FAMILIES, Method, MethodSetup
from mmbalance.methods.di_mml import certainty_weights
from mmbalance.methods.joint import Joint, JointParams
from mmbalance.methods.mla import fusion_weights
from mmbalance.models.small import MLPEncoder, MLPParams

METHOD_FILES = sorted((Path(__file__).parent.parent / "methods").glob("*.py"))


# -------------------------------------------------------------------------- the source checks


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def own_names(tree: ast.AST) -> set[str]:
    """What the file defines: its functions, classes and the attributes it assigns on self/cls."""
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and is_self(node.value):
            own.add(node.attr)
    return own


def is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def foreign_private_names(source: str) -> list[str]:
    """'line: name' for every private name `source` uses that is not its own: an attribute of
    anything but self/cls, or one the file does not define; getattr & co. with such a name; an
    import of or from a private module or name."""
    tree = ast.parse(source)
    own, found = own_names(tree), []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            if not (is_self(node.value) and node.attr in own):
                names.append(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and is_private(node.args[1].value)):
            names.append(node.args[1].value)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if any(map(is_private, a.name.split(".")))]
        elif isinstance(node, ast.ImportFrom):
            if any(map(is_private, (node.module or "").split("."))):
                names.append(node.module)
            names += [a.name for a in node.names if is_private(a.name)]
        found += [f"{node.lineno}: {name}" for name in names]
    return found


# what only the step context may do, and the calls that would do it behind its back
CONTEXT_ONLY = {"backward", "zero_grad", "step", "autocast", "grad"}


def context_bypasses(source: str) -> list[str]:
    """'line: call' for every call of backward/zero_grad/step/autocast/grad that is not made on
    the step context (`self.step_context`, or a name assigned from it in the same function)."""
    found = []
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        aliases = context_aliases(func)
        for node in ast.walk(func):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in CONTEXT_ONLY and not is_context(node.func.value, aliases)):
                found.append(f"{node.lineno}: {ast.unparse(node.func)}")
    return found


def is_context(node: ast.AST, aliases: set[str]) -> bool:
    if isinstance(node, ast.Name):
        return node.id in aliases
    return isinstance(node, ast.Attribute) and node.attr == "step_context" and is_self(node.value)


def context_aliases(func: ast.AST) -> set[str]:
    """Names assigned `self.step_context` in `func`, alone or in a tuple assignment."""
    aliases = set()
    for node in ast.walk(func):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = (zip(target.elts, node.value.elts) if isinstance(target, ast.Tuple)
                         and isinstance(node.value, ast.Tuple) else [(target, node.value)])
                aliases |= {t.id for t, v in pairs if isinstance(t, ast.Name) and is_context(v, set())}
    return aliases


def test_the_private_name_checker_catches_what_it_must():
    assert foreign_private_names("key = b._version") == ["1: _version"]
    assert foreign_private_names("def f(self):\n    return self._h()") == ["2: _h"]
    assert foreign_private_names("x = getattr(t, '_version')") == ["1: _version"]
    assert foreign_private_names("from torch._C import fn") == ["1: torch._C"]
    assert foreign_private_names("import torch._dynamo") == ["1: torch._dynamo"]
    assert foreign_private_names("from torch.nn.modules.module import _IncompatibleKeys") == ["1: _IncompatibleKeys"]
    # its own name on another object is still someone else's
    assert foreign_private_names("self._cache = 1\nother._cache") == ["2: _cache"]
    clean = "class A:\n    def __init__(self):\n        super().__init__()\n        self._cache = 1\n" \
            "    def get(self):\n        return self._cache, type(self).__name__, self._helper()\n" \
            "    def _helper(self):\n        return 0"
    assert foreign_private_names(clean) == []


def test_the_context_checker_catches_steps_behind_its_back():
    assert context_bypasses("def f(self, loss):\n    loss.backward()") == ["2: loss.backward"]
    assert context_bypasses("def f(self):\n    self.zero_grad()") == ["2: self.zero_grad"]
    assert context_bypasses("def f(self):\n    with torch.autocast('cuda'):\n        pass") == ["2: torch.autocast"]
    assert context_bypasses("def f(self, y, x):\n    torch.autograd.grad(y, x)") == ["2: torch.autograd.grad"]
    assert context_bypasses("def f(self):\n    self.opt.step()") == ["2: self.opt.step"]
    # an alias from another function does not count
    assert context_bypasses("def f(self):\n    ctx = self.step_context\ndef g(self, ctx):\n    ctx.step()") == \
        ["4: ctx.step"]
    fine = ("def f(self, loss):\n    ctx, was = self.step_context, self.training\n    ctx.zero_grad()\n"
            "    with ctx.autocast():\n        pass\n    ctx.backward(loss)\n    self.step_context.step()")
    assert context_bypasses(fine) == []


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: p.name)
def test_methods_touch_no_private_name_of_the_harness_or_torch(path):
    assert foreign_private_names(path.read_text()) == [], path


@pytest.mark.parametrize("path", [p for p in METHOD_FILES if p.name != "base.py"], ids=lambda p: p.name)
def test_methods_step_only_through_the_context(path):
    assert context_bypasses(path.read_text()) == [], path


def test_step_context_before_attach_is_a_clear_error():
    method = Joint(JointParams(), setup())
    with pytest.raises(RuntimeError, match=r"Joint.step_context is used before the harness attached one"):
        method.training_step(batch(4))


# ------------------------------------------------------------------- predict has no side effect


MODS = (Modality("audio", "vector", (5,)), Modality("visual", "vector", (3,)))
CLASSES = 3


def setup(epochs: int = 2) -> MethodSetup:
    torch.manual_seed(0)
    encoders = nn.ModuleDict({m.name: MLPEncoder(MLPParams(hidden=8, out_dim=6), m) for m in MODS})
    return MethodSetup(encoders, CLASSES, MODS, epochs=epochs)


def batch(n: int, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return Batch({m.name: torch.randn(n, *m.shape, generator=gen) for m in MODS},
                 torch.randint(0, CLASSES, (n,), generator=gen))


def same(a, b) -> bool:
    """Equal values, tensors compared exactly and modules by everything they hold."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, nn.Module):
        return type(a) is type(b) and same(vars(a), vars(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


DI_MML = {"name": "di_mml", "stage1_epochs": 1, "stage2_epochs": 1, "duc_start_epoch": 0}
SECTIONS = [
    {"name": "joint"},
    {"name": "unimodal", "modality": "visual"},
    {"name": "ogm_ge"},
    {"name": "mla"},
    {"name": "mla", "fusion_mode": "entropy_batch"},
    {"name": "mla", "fusion_mode": "fixed"},
    DI_MML,
    {"name": "mie", "epoch_list": [1, 1]},
    {"name": "opm", "modulation_starts": 0},
    {"name": "pmr"},
    {"name": "agm"},
    {"name": "agm", "variant": "balancebenchmark"},
    {"name": "mmpareto"},
    {"name": "reconboost"},
    {"name": "reconboost", "variant": "balancebenchmark"},
    {"name": "inforeg"},
    {"name": "inforeg", "variant": "first_release"},
    # setup()'s two epochs: the balancebenchmark variant re-initialises after epoch 1 (release: never)
    {"name": "relearning", "variant": "balancebenchmark", "reinit_epoch": 1},
    {"name": "lfm"},
    {"name": "lfm", "variant": "balancebenchmark"},
    {"name": "mmcosine"},
    {"name": "mmcosine", "fused_eval": "cosine"},
    {"name": "cml"},
    {"name": "amco"},
    {"name": "mbsd"},
    # teachers/members trained in the run: this setup hands no required runs (test_umt.py covers `store`)
    {"name": "umt", "teachers": "in_run", "teacher_epochs": 1},
    {"name": "ume", "teachers": "in_run"},
    {"name": "gblending"},
    {"name": "gblending", "variant": "balancebenchmark"},
    {"name": "valuation"},
    {"name": "valuation", "variant": "balancebenchmark"},
    {"name": "greedy"},
    {"name": "greedy", "variant": "balancebenchmark", "rebalance": "random"},
    {"name": "remix", "warmup": 1},
]


def test_every_registered_method_is_checked_for_side_effect_free_predict():
    # the suite's own methods (other tests register throw-away ones in the same registry)
    built_in = {name for name, cls in METHODS.items() if cls.__module__.startswith("mmbalance.methods.")}
    assert {s["name"] for s in SECTIONS} == built_in


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: "-".join(map(str, s.values())))
def test_predict_is_free_of_side_effects(section):
    method = METHODS.create(section, setup()).eval()  # as evaluate() calls it
    stages = [method]
    if section["name"] == "di_mml":
        stage2 = copy.deepcopy(method)
        stage2.start_stage2()
        stages.append(stage2)
    for m in stages:
        before = copy.deepcopy(vars(m))
        with torch.no_grad():
            first, second = m.predict(batch(5)), m.predict(batch(5))
        assert same(vars(m), before), section  # every attribute, parameters, buffers and submodules
        assert same(vars(first), vars(second)), section


def test_predict_logs_of_mla_and_di_mml():
    mla = METHODS.create({"name": "mla"}, setup())
    assert set(mla.predict(batch(4)).logs) == {"fusion_weight.audio", "fusion_weight.visual"}
    di = METHODS.create(DI_MML, setup())
    assert set(di.predict(batch(4)).logs) == {"certainty_weight.audio", "certainty_weight.visual"}
    di.start_stage2()
    assert set(di.predict(batch(4)).logs) == {"certainty_weight.audio", "certainty_weight.visual",
                                              "certainty_weight.fusion"}


# -------------------------------------------------------------------------- logs over a split


SIZES = (5, 3, 1)  # unequal: weighting by size matters


@pytest.mark.parametrize("name", ["mla", "di_mml"])
def test_logs_are_averaged_over_the_split_weighted_by_batch_size(name):
    method = METHODS.create({"name": "mla"} if name == "mla" else DI_MML, setup())
    if name == "di_mml":
        method.start_stage2()
    batches = [batch(n, seed=i) for i, n in enumerate(SIZES)]
    logs = evaluate(method, batches, contextlib.nullcontext).logs
    # by hand: each sample's weight, over the whole split at once
    with torch.no_grad():
        method.eval()
        inputs = {m: torch.cat([b.inputs[m] for b in batches]) for m in ("audio", "visual")}
        feats = method.encode(inputs)
        if name == "mla":
            weights = fusion_weights("entropy", {m: method.head(f) for m, f in feats.items()}, {})
            hand = {f"fusion_weight.{m}": float(w.mean()) for m, w in weights.items()}
        else:
            sources = {m: method.private[m](f) for m, f in feats.items()} | {"fusion": method.fuse(feats)}
            w = certainty_weights(list(sources.values()), method.params.certainty_temperature)
            hand = {f"certainty_weight.{s}": float(w[:, k].mean()) for k, s in enumerate(sources)}
        per_batch = [method.predict(b).logs for b in batches]
    assert logs == pytest.approx(hand, abs=1e-6)
    assert sum(logs.values()) == pytest.approx(1.0, abs=1e-6)
    # an unweighted mean of the batch means would be another number
    unweighted = {k: sum(float(p[k]) for p in per_batch) / len(per_batch) for k in hand}
    assert any(abs(unweighted[k] - hand[k]) > 1e-4 for k in hand)


class VectorLog(Joint):
    def predict(self, batch: Batch) -> Prediction:
        pred = super().predict(batch)
        return Prediction(pred.fused, pred.per_modality, {"margin": pred.fused.max(dim=1).values})


def test_a_log_that_is_not_one_number_per_batch_is_a_clear_error():
    method = VectorLog(JointParams(), setup())
    with pytest.raises(TypeError, match=r"VectorLog.predict: Prediction.logs\['margin'\] is \(4,\); each log is one"):
        evaluate(method, [batch(4)], contextlib.nullcontext)


def test_a_name_in_both_epoch_log_and_prediction_logs_is_refused():
    method = METHODS.create({"name": "mla"}, setup())
    assert method_record(method, {"fusion_weight.audio": 0.5}) == {"p_fro": pytest.approx(6**0.5),
                                                                   "fusion_weight.audio": 0.5}
    with pytest.raises(ValueError, match="'p_fro' both in epoch_log"):
        method_record(method, {"p_fro": 1.0})


def test_every_method_names_its_family_and_one_without_is_refused():
    assert {name: cls.family in FAMILIES for name, cls in METHODS.items()} == dict.fromkeys(METHODS.names(), True)

    class Unnamed(Method):
        pass

    class Misnamed(Joint):
        family = "loss"

    with pytest.raises(ConfigError, match=r"test_method_contract\..*Unnamed does not set `family`; .* one of "
                                          r"baseline, data, feed-forward, objective, optimisation, reference"):
        Unnamed(JointParams(), setup())
    with pytest.raises(ConfigError, match=r"Misnamed sets family = 'loss'"):
        Misnamed(JointParams(), setup())
