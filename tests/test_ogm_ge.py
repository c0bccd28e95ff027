"""OGM-GE: coefficients by hand, modulated gradients, the window, switched-off equivalence with
joint training, membership by module, FiLM/gated auxiliary heads, three modalities, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbalance.bench.config import load_config
from mmbalance.bench.store import RunDir, Store
from mmbalance.bench.train import run
from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Batch, Modality
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.joint import Joint, JointParams
from mmbalance.methods.ogm_ge import (
    OGMGE,
    OGMGEParams,
    check_order,
    discrepancy_ratios,
    ground_truth_scores,
    modulated_modality,
    modulation_coefficients,
)
from mmbalance.models.small import SmallCNNEncoder, SmallCNNParams
from tests.conftest import assert_resumes_exactly, step_context, step_recording_grads, without_timing

NUM_CLASSES = 3
BATCH = 8


def softmax_row(row: list[float]) -> list[float]:
    exps = [math.exp(x) for x in row]
    return [e / sum(exps) for e in exps]


def score_by_hand(logits: list[list[float]], labels: list[int]) -> float:
    return sum(softmax_row(row)[y] for row, y in zip(logits, labels))


def coefficients_of(logits: dict[str, list[list[float]]], labels: list[int], alpha: float):
    scores = {m: ground_truth_scores(torch.tensor(o), torch.tensor(labels)) for m, o in logits.items()}
    order = check_order(tuple(logits))
    ratios = discrepancy_ratios(scores, order)
    coefs, chosen = modulation_coefficients(ratios, order, alpha), modulated_modality(ratios, order)
    return scores, ratios, coefs, chosen


# ------------------------------------------------------------------------ coefficients by hand


LABELS = [0, 1]
STRONG = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]  # puts most mass on the true classes
WEAK = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]  # uniform, then wrong


def test_scores_are_batch_sums_of_true_class_softmax():
    s = ground_truth_scores(torch.tensor(STRONG), torch.tensor(LABELS))
    e = math.exp
    by_hand = e(2) / (e(2) + 1 + e(-1)) + e(1.5) / (e(0.5) + e(1.5) + 1)
    assert s.item() == pytest.approx(by_hand, rel=1e-6)
    assert s.item() == pytest.approx(score_by_hand(STRONG, LABELS), rel=1e-6)


def test_two_modalities_visual_dominant_branch():
    alpha = 0.8
    scores, ratios, coefs, chosen = coefficients_of({"audio": WEAK, "visual": STRONG}, LABELS, alpha)
    s_a, s_v = score_by_hand(WEAK, LABELS), score_by_hand(STRONG, LABELS)
    rho_v = s_v / s_a
    assert rho_v > 1 and chosen == "visual"
    assert ratios["visual"].item() == pytest.approx(rho_v, rel=1e-6)
    assert ratios["audio"].item() == pytest.approx(1 / rho_v, rel=1e-6)
    assert coefs["visual"].item() == pytest.approx(1 - math.tanh(alpha * rho_v), rel=1e-6)
    assert coefs["audio"].item() == 1.0


def test_two_modalities_audio_dominant_branch():
    alpha = 0.8
    scores, ratios, coefs, chosen = coefficients_of({"audio": STRONG, "visual": WEAK}, LABELS, alpha)
    rho_v = score_by_hand(WEAK, LABELS) / score_by_hand(STRONG, LABELS)
    assert rho_v < 1 and chosen == "audio"
    assert coefs["audio"].item() == pytest.approx(1 - math.tanh(alpha / rho_v), rel=1e-6)
    assert coefs["visual"].item() == 1.0
    # pinned: s_a = e^2/(e^2+1+e^-1) + e^1.5/(e^0.5+e^1.5+1) = 1.472326, s_v = 1/3 + 1/(e+2) = 0.545275,
    # rho_v = 0.370349, k_a = 1 - tanh(0.8 / 0.370349) = 0.026244
    assert scores["audio"].item() == pytest.approx(1.472326, abs=1e-6)
    assert scores["visual"].item() == pytest.approx(0.545275, abs=1e-6)
    assert ratios["visual"].item() == pytest.approx(0.370349, abs=1e-6)
    assert coefs["audio"].item() == pytest.approx(0.026244, abs=1e-6)


def test_equal_scores_modulate_the_first_modality_by_default():
    # rho_v = 1 is not > 1, so audio (the default) gets 1 - tanh(alpha * 1)
    _, ratios, coefs, chosen = coefficients_of({"audio": WEAK, "visual": WEAK}, LABELS, 0.5)
    assert ratios["visual"].item() == 1.0 and chosen == "audio"
    assert coefs["audio"].item() == pytest.approx(1 - math.tanh(0.5), rel=1e-6)
    assert coefs["visual"].item() == 1.0


def pairwise_reference(s_a: torch.Tensor, s_v: torch.Tensor, alpha: float):
    """The reference code's two-modality rule, written as it is there."""
    ratio_v = s_v / s_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        coeff_v = 1 - torch.tanh(alpha * torch.relu(ratio_v))
        coeff_a = torch.ones(())
    else:
        coeff_a = 1 - torch.tanh(alpha * torch.relu(ratio_a))
        coeff_v = torch.ones(())
    return ratio_a, ratio_v, coeff_a, coeff_v


def test_general_rule_reduces_exactly_to_the_pairwise_rule_for_two_modalities():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(2000, 2, generator=gen) * 64
    branches = set()
    for alpha in (0.1, 0.8, 2.6):
        for s_a, s_v in scores:
            order = check_order(("audio", "visual"))
            assert order == ("visual", "audio")
            ratios = discrepancy_ratios({"audio": s_a, "visual": s_v}, order)
            coefs, chosen = modulation_coefficients(ratios, order, alpha), modulated_modality(ratios, order)
            ratio_a, ratio_v, coeff_a, coeff_v = pairwise_reference(s_a, s_v, alpha)
            assert torch.equal(ratios["visual"], ratio_v) and torch.equal(ratios["audio"], ratio_a)
            assert torch.equal(coefs["audio"], coeff_a) and torch.equal(coefs["visual"], coeff_v)
            branches.add(chosen)
    assert branches == {"audio", "visual"}


def test_three_modalities_follow_the_check_order():
    assert check_order(("audio", "visual", "text")) == ("visual", "text", "audio")
    alpha = 0.3
    order = ("visual", "text", "audio")

    def rule(s: dict[str, float]):
        ratios = discrepancy_ratios({m: torch.tensor(v) for m, v in s.items()}, order)
        return ratios, modulation_coefficients(ratios, order, alpha), modulated_modality(ratios, order)

    def by_hand(s, m):
        return s[m] / sum(v for o, v in s.items() if o != m)

    cases = [
        ({"audio": 10.0, "visual": 40.0, "text": 12.0}, "visual"),  # rho_v = 40/22 > 1
        ({"audio": 10.0, "visual": 12.0, "text": 40.0}, "text"),  # rho_t = 40/22 > 1
        ({"audio": 40.0, "visual": 10.0, "text": 12.0}, "audio"),  # dominant audio (the default)
        ({"audio": 10.0, "visual": 10.0, "text": 10.0}, "audio"),  # nobody > 1: audio by default
        ({"audio": 5.0, "visual": 20.0, "text": 15.0}, "audio"),  # rho_v = 1 exactly: not > 1
    ]
    for s, expected in cases:
        ratios, coefs, chosen = rule(s)
        assert chosen == expected, s
        for m in s:
            assert ratios[m].item() == pytest.approx(by_hand(s, m), rel=1e-6)
            k = 1 - math.tanh(alpha * by_hand(s, m)) if m == expected else 1.0
            assert coefs[m].item() == pytest.approx(k, rel=1e-6), (s, m)
    # the all-equal case: rho = 10/20 for everyone, audio modulated with 1 - tanh(0.3 * 0.5)
    _, coefs, _ = rule({"audio": 10.0, "visual": 10.0, "text": 10.0})
    assert coefs["audio"].item() == pytest.approx(1 - math.tanh(0.15), rel=1e-6)


# ------------------------------------------------------------------------- unimodal estimates


def test_training_estimates_concat_sum_late():
    feats = {"audio": torch.tensor([[1.0, 2.0], [0.0, -1.0]]), "visual": torch.tensor([[3.0], [-2.0]])}
    setup = MethodSetup(nn.ModuleDict({"audio": nn.Identity(), "visual": nn.Identity()}), 2,
                        (Modality("audio", "vector", (2,)), Modality("visual", "vector", (1,))))
    setup.encoders["audio"].out_dim, setup.encoders["visual"].out_dim = 2, 1

    concat = OGMGE(OGMGEParams(), setup)
    w = torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.0, -3.0]])
    b = torch.tensor([4.0, -2.0])
    with torch.no_grad():
        concat.fusion.fc_out.weight.copy_(w)
        concat.fusion.fc_out.bias.copy_(b)
    est = concat.unimodal_estimates(feats)
    assert torch.equal(est["audio"], torch.tensor([[1 - 2 + 2.0, 0.5 - 1.0], [0 + 1 + 2.0, 0 - 1.0]]))
    assert torch.equal(est["visual"], torch.tensor([[6 + 2.0, -9 - 1.0], [-4 + 2.0, 6 - 1.0]]))

    # sum: the full bias in training (quirk 5), b/M only in the evaluation view
    setup.fusion = "sum"
    summed = OGMGE(OGMGEParams(), setup)
    with torch.no_grad():
        for m, (wm, bm) in {"audio": (w[:, :2], b), "visual": (w[:, 2:], -b)}.items():
            summed.fusion.heads[m].weight.copy_(wm)
            summed.fusion.heads[m].bias.copy_(bm)
    est = summed.unimodal_estimates(feats)
    assert torch.equal(est["audio"], feats["audio"] @ w[:, :2].t() + b)
    assert torch.equal(est["visual"], feats["visual"] @ w[:, 2:].t() - b)
    assert torch.equal(summed.fusion.per_modality(feats)["audio"], feats["audio"] @ w[:, :2].t() + b / 2)

    setup.fusion = "late"
    late = OGMGE(OGMGEParams(), setup)
    est = late.unimodal_estimates(feats)
    for m in feats:
        assert torch.equal(est[m], late.fusion.heads[m](feats[m]))


# ---------------------------------------------------------------------- modulated gradients


def conv_setup(names=("audio", "visual"), fusion="concat", seed=0) -> MethodSetup:
    torch.manual_seed(seed)
    mods = tuple(Modality(n, "image", (1, 4, 4)) for n in names)
    encoders = nn.ModuleDict(
        {m.name: SmallCNNEncoder(SmallCNNParams(channels=(2, 3), out_dim=4), m) for m in mods}
    )
    return MethodSetup(encoders, NUM_CLASSES, mods, fusion=fusion)


def make_batch(names=("audio", "visual"), seed=1) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return Batch({m: torch.randn(BATCH, 1, 4, 4, generator=gen) for m in names},
                 torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen))


def attach(method, epoch=0, lr=0.1):
    method.attach(step_context(lambda: torch.optim.SGD(method.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4),
                               epoch=epoch))
    return method


def raw_grads_and_coefs(method, batch, alpha):
    """Independently: the un-modulated gradients and, from the weight split, k per modality
    (returned as grads, k, rho_v, fused loss)."""
    ref = copy.deepcopy(method)
    ref.zero_grad()
    feats = ref.encode(batch.inputs)
    loss = F.cross_entropy(ref.fusion(feats), batch.labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    w, b = ref.fusion.fc_out.weight.detach(), ref.fusion.fc_out.bias.detach()
    names = list(feats)
    d = feats[names[0]].shape[1]
    logits = {m: (feats[m].detach() @ w[:, i * d:(i + 1) * d].t() + b / 2).tolist()
              for i, m in enumerate(names)}
    labels = batch.labels.tolist()
    s_a, s_v = (score_by_hand(logits[m], labels) for m in names)
    rho_v = s_v / s_a
    if rho_v > 1:
        k = {names[0]: 1.0, names[1]: 1 - math.tanh(alpha * rho_v)}
    else:
        k = {names[0]: 1 - math.tanh(alpha / rho_v), names[1]: 1.0}
    return grads, k, rho_v, loss.detach()


def audio_dominant_batch(method, names=("audio", "visual")) -> Batch:
    """Labels = argmax of the audio estimate, so the audio score beats the visual one (k_a < 1)."""
    batch = make_batch(names)
    with torch.no_grad():
        est = method.unimodal_estimates(method.encode(batch.inputs))
    return Batch(batch.inputs, est[names[0]].argmax(dim=1))


def is_conv(name: str, grads) -> bool:
    return grads[name].dim() == 4


def test_ogm_scales_only_conv_kernels_by_k():
    alpha = 0.8
    method = attach(OGMGE(OGMGEParams(alpha=alpha, modulation="ogm"), conv_setup()))
    batch = audio_dominant_batch(method)
    raw, k, rho_v, ref_loss = raw_grads_and_coefs(method, batch, alpha)
    out, seen = step_recording_grads(method, batch)
    assert rho_v < 1 and k["visual"] == 1.0 and k["audio"] < 1
    assert out["coef.audio"].item() == pytest.approx(k["audio"], rel=1e-5)
    assert out["coef.visual"].item() == 1.0
    assert out["ratio.visual"].item() == pytest.approx(rho_v, rel=1e-5)
    assert out["modulated"].item() == 1.0
    assert torch.equal(out["loss"], ref_loss)  # the reported loss is the fused cross-entropy
    convs = [n for n in raw if n.startswith("encoders.") and is_conv(n, raw)]
    assert len(convs) == 4  # two conv kernels per encoder
    for name, g in raw.items():
        if name in convs:
            modality = name.split(".")[1]
            assert torch.equal(seen[name], g * out[f"coef.{modality}"]), name
        else:  # BN, the encoders' linear layers, conv biases, the fusion head: untouched
            assert torch.equal(seen[name], g), name
    assert not torch.equal(seen[convs[0]], raw[convs[0]])  # audio's kernels did change


def test_ogm_all_encoder_scales_every_encoder_parameter():
    alpha = 0.8
    params = OGMGEParams(alpha=alpha, modulation="ogm", param_filter="all_encoder")
    method = attach(OGMGE(params, conv_setup()))
    batch = audio_dominant_batch(method)
    raw, k, _, _ = raw_grads_and_coefs(method, batch, alpha)
    out, seen = step_recording_grads(method, batch)
    for name, g in raw.items():
        if name.startswith("encoders."):
            assert torch.equal(seen[name], g * out[f"coef.{name.split('.')[1]}"]), name
        else:
            assert torch.equal(seen[name], g), name
    changed = [n for n in raw if n.startswith("encoders.audio.") and not torch.equal(seen[n], raw[n])]
    assert len(changed) == len([n for n in raw if n.startswith("encoders.audio.")])


def expected_noisy(raw, names_in_order, k, seed):
    """g' = k g + (std(g) + 1e-8) eps, eps drawn here from the same seed in the same order."""
    torch.manual_seed(seed)
    return {n: k[n] * raw[n] + torch.randn_like(raw[n]) * (raw[n].std() + 1e-8) for n in names_in_order}


@pytest.mark.parametrize("param_filter", ["conv_only", "all_encoder"])
def test_ogm_ge_adds_noise_with_the_unmodulated_std_to_both_modalities(param_filter):
    alpha = 0.8
    method = attach(OGMGE(OGMGEParams(alpha=alpha, param_filter=param_filter), conv_setup()))
    batch = audio_dominant_batch(method)
    raw, *_ = raw_grads_and_coefs(method, batch, alpha)
    torch.manual_seed(123)
    out, seen = step_recording_grads(method, batch)
    selected = [n for n, p in method.named_parameters()
                if n.startswith("encoders.") and (param_filter == "all_encoder" or p.dim() == 4)]
    k = {n: out[f"coef.{n.split('.')[1]}"] for n in selected}
    assert k[selected[0]].item() < 1 and k[selected[-1]].item() == 1.0  # audio modulated, visual not
    expected = expected_noisy(raw, selected, k, seed=123)
    for name, g in raw.items():
        if name in expected:
            assert torch.equal(seen[name], expected[name]), name
        else:
            assert torch.equal(seen[name], g), name
    # the k = 1 modality gets noise too ("both", as the code)
    visual = [n for n in selected if n.startswith("encoders.visual.")]
    assert visual and all(not torch.equal(seen[n], raw[n]) for n in visual)


def test_noise_on_modulated_only_leaves_the_k1_modality_untouched():
    alpha = 0.8
    method = attach(OGMGE(OGMGEParams(alpha=alpha, noise_on="modulated_only"), conv_setup()))
    batch = audio_dominant_batch(method)
    raw, *_ = raw_grads_and_coefs(method, batch, alpha)
    torch.manual_seed(7)
    out, seen = step_recording_grads(method, batch)
    assert out["coef.audio"].item() < 1 and out["coef.visual"].item() == 1.0
    audio_convs = [n for n, p in method.named_parameters()
                   if n.startswith("encoders.audio.") and p.dim() == 4]
    expected = expected_noisy(raw, audio_convs, dict.fromkeys(audio_convs, out["coef.audio"]), seed=7)
    for name, g in raw.items():
        if name in expected:
            assert torch.equal(seen[name], expected[name]), name
        else:  # visual (k = 1) and every non-conv tensor: exactly the raw gradient
            assert torch.equal(seen[name], g), name


def test_window_is_inclusive():
    params = OGMGEParams(alpha=0.8, modulation="ogm", modulation_starts=2, modulation_ends=4)
    base = OGMGE(params, conv_setup())
    batch = audio_dominant_batch(base)
    conv = "encoders.audio.features.0.weight"
    for epoch, active in [(0, False), (1, False), (2, True), (3, True), (4, True), (5, False)]:
        method = attach(copy.deepcopy(base), epoch=epoch)
        raw, *_ = raw_grads_and_coefs(method, batch, 0.8)
        out, seen = step_recording_grads(method, batch)
        assert out["modulated"].item() == float(active), epoch
        assert out["coef.audio"].item() < 1  # computed and reported in every epoch
        expected = raw[conv] * out["coef.audio"] if active else raw[conv]
        assert torch.equal(seen[conv], expected), epoch


def test_params_are_validated():
    with pytest.raises(ValueError, match="never open"):
        OGMGEParams(modulation_starts=5, modulation_ends=4)
    with pytest.raises(ValueError, match="applies only to modulation='ogm_ge'"):
        OGMGEParams(modulation="ogm", noise_on="modulated_only")
    with pytest.raises(ConfigError, match="method.param_filter"):
        load_config(None, ["dataset.name=gaussian", "method.name=ogm_ge", "method.param_filter=conv"])


# ---------------------------------------------------------------------- membership by module


def quirk1_selects(named_parameters, modality_tag: str) -> list[str]:
    """The reference code's membership rule: the second token of the name contains the tag."""
    return [n for n, p in named_parameters if modality_tag in n.split(".")[1] and p.dim() == 4]


def test_membership_is_by_module_not_by_name_position():
    # modality names that do not occur where the reference code looks for 'audio'/'visual',
    # and the method wrapped in a container as DataParallel would: the name-position rule finds
    # nothing, module membership finds every conv kernel and modulates it
    names = ("spec", "frames")
    method = attach(OGMGE(OGMGEParams(alpha=0.8, modulation="ogm"), conv_setup(names)))
    wrapped = nn.Sequential(method)
    for tag in ("audio", "visual"):
        assert quirk1_selects(method.named_parameters(), tag) == []
        assert quirk1_selects(wrapped.named_parameters(), tag) == []
    assert not any(n.startswith("module.") for n, _ in method.named_parameters())
    selected = method.modulated_parameters()
    for m in names:
        expected = [p for p in method.encoders[m].parameters() if p.dim() == 4]
        assert len(expected) == 2 and [id(p) for p in selected[m]] == [id(p) for p in expected]

    batch = audio_dominant_batch(method, names)
    raw, *_ = raw_grads_and_coefs(method, batch, 0.8)
    out, seen = step_recording_grads(method, batch)
    assert out["coef.spec"].item() < 1
    for p_name in ("encoders.spec.features.0.weight", "encoders.spec.features.4.weight"):
        assert torch.equal(seen[p_name], raw[p_name] * out["coef.spec"])
        assert not torch.equal(seen[p_name], raw[p_name])


# ----------------------------------------------------------------- switched-off equivalence


def train_steps(method, batches):
    grads = []
    for batch in batches:
        grads.append(step_recording_grads(method, batch)[1])
    return grads


@pytest.mark.parametrize("param_filter", ["conv_only", "all_encoder"])
def test_alpha0_ogm_trains_exactly_like_joint_concat(param_filter):
    joint = attach(Joint(JointParams(), conv_setup(seed=3)))
    params = OGMGEParams(alpha=0.0, modulation="ogm", param_filter=param_filter)
    ogm = attach(OGMGE(params, conv_setup(seed=3)))
    assert ogm.state_dict().keys() == joint.state_dict().keys()
    for key, value in joint.state_dict().items():
        assert torch.equal(ogm.state_dict()[key], value), key
    batches = [make_batch(seed=s) for s in range(5)]
    gj, go = train_steps(joint, batches), train_steps(ogm, batches)
    assert all(g.keys() == h.keys() for g, h in zip(gj, go))
    for key, value in joint.state_dict().items():
        assert torch.equal(ogm.state_dict()[key], value), key
    # it did train, with the coefficient forced to 1
    initial = Joint(JointParams(), conv_setup(seed=3)).state_dict()
    assert not torch.equal(ogm.state_dict()["fusion.fc_out.weight"], initial["fusion.fc_out.weight"])
    assert not torch.equal(ogm.state_dict()["encoders.visual.features.0.weight"],
                           initial["encoders.visual.features.0.weight"])


HARNESS = ["train.epochs=3"]


def test_alpha0_ogm_matches_joint_through_the_harness(fast_config, tmp_path):
    joint = run(fast_config("method.name=joint", *HARNESS), Store(tmp_path / "joint"))
    ogm_cfg = fast_config("method.name=ogm_ge", "method.alpha=0", "method.modulation=ogm",
                          "method.param_filter=all_encoder", *HARNESS)
    ogm = run(ogm_cfg, Store(tmp_path / "ogm"))
    mj, mo = RunDir(joint.path).read_metrics(), RunDir(ogm.path).read_metrics()
    assert len(mj) == len(mo) == 3
    for rj, ro in zip(without_timing(mj), without_timing(mo)):
        assert ro["val"] == rj["val"] and ro["test"] == rj["test"] and ro["lr"] == rj["lr"]
        assert ro["train"]["loss"] == rj["train"]["loss"]
        assert ro["train"]["modulated"] == 1.0
        assert ro["train"]["coef.audio"] == ro["train"]["coef.visual"] == 1.0
        assert set(ro["train"]) == {"loss", "ratio.audio", "ratio.visual", "coef.audio", "coef.visual",
                                    "modulated"}
    for key in ("best_val", "best_test", "last", "probes"):
        assert ogm.summary[key] == joint.summary[key], key
    for key in ("forward_passes_per_step", "backward_passes_per_step"):  # the same cost: 1F + 1B
        assert ogm.summary["cost"][key] == joint.summary["cost"][key] == 1.0
    # and with alpha > 0 the same config trains differently
    on = run(fast_config("method.name=ogm_ge", "method.alpha=0.8", "method.modulation=ogm",
                         "method.param_filter=all_encoder", *HARNESS), Store(tmp_path / "on"))
    first = RunDir(on.path).read_metrics()[0]["train"]
    assert first["loss"] != mj[0]["train"]["loss"]
    assert min(first["coef.audio"], first["coef.visual"]) < 1


# ------------------------------------------------------------------------------ FiLM / gated


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_film_gated_aux_heads_train_without_reaching_encoders(fusion):
    joint = attach(Joint(JointParams(), conv_setup(fusion=fusion, seed=5)))
    ogm = attach(OGMGE(OGMGEParams(alpha=0.0, modulation="ogm", param_filter="all_encoder"),
                       conv_setup(fusion=fusion, seed=5)))
    aux_before = {k: v.clone() for k, v in ogm.aux_heads.state_dict().items()}
    for key, value in joint.state_dict().items():
        assert torch.equal(ogm.state_dict()[key], value), key
    batches = [make_batch(seed=s) for s in range(5)]
    for batch in batches:
        # the ratio comes from the aux heads on the features (checked against a copy)
        ref = copy.deepcopy(ogm)
        with torch.no_grad():
            feats = ref.encode(batch.inputs)
            s = {m: score_by_hand(ref.aux_heads[m](feats[m]).tolist(), batch.labels.tolist()) for m in feats}
        _, gj = step_recording_grads(joint, batch)
        out, go = step_recording_grads(ogm, batch)
        assert out["ratio.visual"].item() == pytest.approx(s["visual"] / s["audio"], rel=1e-5)
        assert out["aux_loss"].item() > 0
        for name, g in gj.items():  # encoders and fusion: the same gradients as joint
            assert torch.equal(go[name], g), name
        assert {n for n in go if n.startswith("aux_heads.")} == {
            f"aux_heads.{m}.{p}" for m in ("audio", "visual") for p in ("weight", "bias")}
    for key, value in joint.state_dict().items():
        assert torch.equal(ogm.state_dict()[key], value), key
    for key, value in ogm.aux_heads.state_dict().items():
        assert not torch.equal(value, aux_before[key]), key
    # predict: the fused logits of the fusion head, the aux heads as the per-modality view
    with torch.no_grad():
        pred, jpred = ogm.predict(batches[0]), joint.predict(batches[0])
        feats = ogm.encode(batches[0].inputs)
    assert torch.equal(pred.fused, jpred.fused)
    for m in ("audio", "visual"):
        assert torch.equal(pred.per_modality[m], ogm.aux_heads[m](feats[m]))


def test_film_with_modulation_changes_encoder_grads():
    ogm = attach(OGMGE(OGMGEParams(alpha=0.8, modulation="ogm"), conv_setup(fusion="film", seed=5)))
    batch = make_batch()
    raw = copy.deepcopy(ogm)
    raw.zero_grad()
    feats = raw.encode(batch.inputs)
    F.cross_entropy(raw.fusion(feats), batch.labels).backward()
    out, seen = step_recording_grads(ogm, batch)
    m = "audio" if out["coef.audio"].item() < 1 else "visual"
    name = f"encoders.{m}.features.0.weight"
    assert torch.equal(seen[name], dict(raw.named_parameters())[name].grad * out[f"coef.{m}"])
    assert out[f"coef.{m}"].item() < 1


# -------------------------------------------------------------------------- three modalities


def test_three_modalities_through_the_harness(fast_config, store):
    cfg = fast_config("dataset.name=gaussian3", "method.name=ogm_ge", "method.param_filter=all_encoder",
                      "train.epochs=2")
    result = run(cfg, store)
    assert result.state == "finished"
    history = RunDir(result.path).read_metrics()
    assert len(history) == 2
    for record in history:
        train = record["train"]
        for m in ("audio", "visual", "text"):
            assert train[f"ratio.{m}"] > 0
            assert 0 < train[f"coef.{m}"] <= 1
        assert train["modulated"] == 1.0
        assert sum(1 - train[f"coef.{m}"] for m in ("audio", "visual", "text")) > 0
        assert set(record["val"]["modality_acc"]) == {"audio", "visual", "text"}
    assert set(result.summary["probes"]) == {"audio", "visual", "text"}


def test_three_modalities_unit_step_modulates_only_the_chosen_one():
    names = ("audio", "visual", "text")
    method = attach(OGMGE(OGMGEParams(alpha=0.8, modulation="ogm"), conv_setup(names)))
    batch = make_batch(names)
    with torch.no_grad():
        feats = method.encode(batch.inputs)
        est = method.unimodal_estimates(feats)
    s = {m: score_by_hand(est[m].tolist(), batch.labels.tolist()) for m in names}
    rho = {m: s[m] / sum(v for o, v in s.items() if o != m) for m in names}
    chosen = next((m for m in ("visual", "text") if rho[m] > 1), "audio")
    ref = copy.deepcopy(method)
    ref.zero_grad()
    F.cross_entropy(ref.fusion(ref.encode(batch.inputs)), batch.labels).backward()
    out, seen = step_recording_grads(method, batch)
    for m in names:
        assert out[f"ratio.{m}"].item() == pytest.approx(rho[m], rel=1e-5)
        k = 1 - math.tanh(0.8 * rho[m]) if m == chosen else 1.0
        assert out[f"coef.{m}"].item() == pytest.approx(k, rel=1e-5)
        name = f"encoders.{m}.features.0.weight"
        assert torch.equal(seen[name], dict(ref.named_parameters())[name].grad * out[f"coef.{m}"])


# ------------------------------------------------------------------------------------ resume


def test_ogm_ge_resume_is_exact(fast_config, store, tmp_path, monkeypatch):
    # all_encoder so that the MLP encoders get GE noise from the global RNG
    cfg = fast_config("method.name=ogm_ge", "method.param_filter=all_encoder")
    assert_resumes_exactly(cfg, store, tmp_path, monkeypatch)


# ---------------------------------------------------- the journal's rule (ratio_rule=tpami)


def bml_pairwise(s_a: torch.Tensor, s_v: torch.Tensor, alpha: float):
    """main.py L119-148 of the BML release (GeWu-Lab/BML_TPAMI2024 @ 4b3aa4f), as written there."""
    radio_1 = s_a / s_v
    radio_2 = s_v / s_a
    if radio_1 > 1:
        coeff_1, coeff_2 = 1 - torch.tanh(alpha * torch.relu(radio_1)), torch.ones(())
    else:
        coeff_1, coeff_2 = torch.ones(()), 1 - torch.tanh(alpha * torch.relu(radio_2))
    return radio_1, radio_2, coeff_1, coeff_2


def rule_of(rule: str, s_a, s_v, alpha):
    order = check_order(("audio", "visual"), rule)
    ratios = discrepancy_ratios({"audio": s_a, "visual": s_v}, order, reciprocal=rule == "cvpr")
    return ratios, modulation_coefficients(ratios, order, alpha), modulated_modality(ratios, order)


def test_tpami_rule_is_the_bml_release_bit_for_bit():
    assert check_order(("audio", "visual"), "tpami") == ("audio", "visual")
    assert check_order(("audio", "visual", "text"), "tpami") == ("audio", "visual", "text")
    gen = torch.Generator().manual_seed(0)
    branches = set()
    for alpha in (0.1, 0.8, 2.6):
        for s_a, s_v in torch.rand(2000, 2, generator=gen) * 64:
            ratios, coefs, chosen = rule_of("tpami", s_a, s_v, alpha)
            radio_1, radio_2, coeff_1, coeff_2 = bml_pairwise(s_a, s_v, alpha)
            assert torch.equal(ratios["audio"], radio_1) and torch.equal(ratios["visual"], radio_2)
            assert torch.equal(coefs["audio"], coeff_1) and torch.equal(coefs["visual"], coeff_2)
            branches.add(chosen)
    assert branches == {"audio", "visual"}


def test_cvpr_and_tpami_rules_differ_only_on_a_tie():
    s = torch.tensor(5.0)
    for rule, chosen in (("cvpr", "audio"), ("tpami", "visual")):
        ratios, coefs, who = rule_of(rule, s, s, 0.8)
        assert who == chosen and coefs[chosen].item() == pytest.approx(1 - math.tanh(0.8), rel=1e-6)
    # off a tie the same modality, the same coefficient up to the last bit of the reciprocal
    for s_a, s_v in ((3.0, 7.0), (7.0, 3.0)):
        (_, kc, wc), (_, kt, wt) = (rule_of(r, torch.tensor(s_a), torch.tensor(s_v), 0.8) for r in ("cvpr", "tpami"))
        assert wc == wt and all(kc[m].item() == pytest.approx(kt[m].item(), rel=1e-6) for m in kc)


def test_tpami_three_modalities_check_in_dataset_order_last_by_default():
    order = check_order(("audio", "visual", "text"), "tpami")
    s = {"audio": torch.tensor(10.0), "visual": torch.tensor(10.0), "text": torch.tensor(10.0)}
    ratios = discrepancy_ratios(s, order, reciprocal=False)
    assert modulated_modality(ratios, order) == "text"  # nobody > 1: the last one
    s["visual"] = torch.tensor(40.0)
    assert modulated_modality(discrepancy_ratios(s, order, reciprocal=False), order) == "visual"


@pytest.mark.parametrize("modulation", ["ogm_ge", "ogm"])
def test_tpami_rule_equals_the_bml_release_over_steps(modulation):
    """The method beside tests/bml_release.py's transcription of main.py L86-171 (OGM branch):
    small conv encoders, SGD with momentum and weight decay, warm-up and modulated epochs; the
    release's hard-coded warm-up (epochs 0-5) is modulation_starts=6."""
    from tests import bml_release as bml

    alpha, epochs = 0.8, [5, 6, 6, 7, 7]
    params = OGMGEParams(alpha=alpha, modulation=modulation, ratio_rule="tpami", modulation_starts=6,
                         modulation_ends=60)
    method = attach(OGMGE(params, conv_setup(seed=4)))
    cfg = bml.bml_config(use_modulation=True, modulation=modulation.upper(), alpha=alpha, modulation_ends=60)
    ref = bml.Classifier(cfg, copy.deepcopy(method.encoders["audio"]), copy.deepcopy(method.encoders["visual"]),
                         copy.deepcopy(method.fusion.fc_out))
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    batches = [make_batch(seed=s) for s in range(len(epochs))]
    torch.manual_seed(9)
    outs = []
    for epoch, batch in zip(epochs, batches):
        method.step_context.epoch = epoch
        outs.append(method.training_step(batch))
    torch.manual_seed(9)
    refs = [bml.train_iteration(cfg, e, ref, optimizer, b.inputs["audio"], b.inputs["visual"], b.labels)
            for e, b in zip(epochs, batches)]
    chosen = set()
    for epoch, out, r in zip(epochs, outs, refs):
        assert out["loss"].item() == pytest.approx(r["loss"].item(), abs=1e-5)
        assert out["modulated"].item() == float(epoch > 5)
        if epoch > 5:
            radio_1, radio_2 = r["radio"]
            assert out["ratio.audio"].item() == pytest.approx(radio_1.item(), abs=1e-5)
            assert out["ratio.visual"].item() == pytest.approx(radio_2.item(), abs=1e-5)
            for m, k in zip(("audio", "visual"), r["coeff"]):
                assert out[f"coef.{m}"].item() == pytest.approx(float(torch.as_tensor(k).detach()), abs=1e-5)
            chosen.add("audio" if out["coef.audio"].item() < 1 else "visual")
    pairs = [(method.encoders["audio"], ref.encoder_1), (method.encoders["visual"], ref.encoder_2),
             (method.fusion.fc_out, ref.fusion_model.fxy)]
    diff = max((a.double() - b.double()).abs().max().item() for x, y in pairs
               for a, b in zip(x.state_dict().values(), y.state_dict().values(), strict=True))
    assert diff <= 1e-5, diff
    assert chosen  # modulation ran
