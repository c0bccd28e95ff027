"""IEMOCAP from a MulT pickle in the real layout: MLA's vendored split, the pickle's own split,
the 4-emotion labels, and one epoch of three-modality training (joint, MLA)."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from mmbalance.bench.cli import main as cli
from mmbalance.core.errors import DataError
from mmbalance.datasets.cache import Cache
from mmbalance.datasets.iemocap import CLASSES
from mmbalance.datasets.prepare.runner import prepare
from tests.fixtures.mult_pickle import write_iemocap

LISTS = Path(__file__).resolve().parents[1] / "datasets" / "manifests" / "lists"


def mla_list(split: str) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in (LISTS / f"iemocap_mla_{split}.txt").read_text().splitlines()]


def test_vendored_lists_are_mlas():
    # lines, SHA-256, and MLA's class counts (spec A.9: train 1014 / 977 / 685 / 642)
    for split, lines, sha in (("train", 3318, "cf08e211707c4d46eb1f1cb91534a3b8723d6142e00bb7d4afa7909fd204130e"),
                              ("test", 1107, "61f000d08f19d2dd75e4a1832f4b8ec52e2180a08016ce84beef56e0f923a961")):
        assert len(mla_list(split)) == lines
        assert hashlib.sha256((LISTS / f"iemocap_mla_{split}.txt").read_bytes()).hexdigest() == sha
    assert Counter(y for _, y in mla_list("train")) == {"Neutral": 1014, "Happy": 977, "Angry": 685, "Sad": 642}
    assert Counter(y for _, y in mla_list("test")) == {"Neutral": 337, "Happy": 340, "Angry": 200, "Sad": 230}
    assert not {u for u, _ in mla_list("train")} & {u for u, _ in mla_list("test")}


# MLA's labels -> the pickle's emotions (same names); one train utterance labelled otherwise
TRAIN, TEST = mla_list("train")[:6], mla_list("test")[:4]
OTHER = [("Ses01F_impro99_F000", "Sad"), ("Ses02M_script09_1_M001", "Angry")]  # in neither list: MLA's dev


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("iemocap_raw")
    relabelled = {TRAIN[0][0]: "Neutral" if TRAIN[0][1] != "Neutral" else "Sad"}
    # one MLA test utterance absent from the pickle; one row with no emotion present; the pickle's
    # own split scatters the rest
    rows = [(u, relabelled.get(u, y)) for u, y in TRAIN + TEST[:-1] + OTHER]
    write_iemocap(root, {"train": rows[:7] + [("Ses03F_impro01_F002", None)], "valid": rows[7:9],
                         "test": rows[9:]})
    missing = TEST[-1][0]
    return root, missing


@pytest.fixture(scope="module")
def mla_cache(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "mla"
    return out, prepare("iemocap", raw[0], out, workers=1, progress=False)


def test_mla_split_from_the_vendored_lists(raw, mla_cache):
    out, report = mla_cache
    meta = Cache(out).meta
    split_ids = {s: [meta.ids[r] for r in rows] for s, rows in meta.splits.items()}
    assert split_ids["train"] == [u for u, _ in TRAIN]
    assert split_ids["test"] == [u for u, _ in TEST[:-1]]  # the one the pickle lacks is reported
    assert split_ids["val"] == sorted(u for u, _ in OTHER)
    assert report.split_info["splits"]["test"]["published_count"] == 1107
    assert report.split_info["splits"]["train"]["matches_pinned_list"] is False
    assert report.notes == [
        "1 rows of the pickle have no single emotion present and are left out",
        f"3312 of MLA's 3318 train utterances are not labelled rows of the pickle (first {mla_list('train')[6][0]!r})",
        f"1104 of MLA's 1107 test utterances are not labelled rows of the pickle (first {raw[1]!r})",
        f"1 utterances are labelled otherwise in the pickle than in MLA's lists (first {TRAIN[0][0]!r}; MLA counts "
        "excited as Happy); the pickle's labels are used",
    ]


def test_labels_are_the_pickles_in_mlas_class_order(mla_cache):
    out, _ = mla_cache
    meta = Cache(out).meta
    assert meta.classes == list(CLASSES) == ["Neutral", "Angry", "Sad", "Happy"]
    label = dict(zip(meta.ids, meta.labels))
    for u, y in TRAIN[1:] + TEST[:-1] + OTHER:
        assert label[u] == CLASSES.index(y)
    assert label[TRAIN[0][0]] != CLASSES.index(TRAIN[0][1])  # the pickle's, not MLA's list's


def test_the_pickles_own_split(raw, tmp_path):
    report = prepare("iemocap", raw[0], tmp_path / "mult", "mult", workers=1, progress=False)
    assert {s: c["listed"] for s, c in report.counts.items()} == {"train": 7, "val": 2, "test": 2}
    assert report.split_info["splits"]["val"]["published_count"] == 798


def test_mla_split_needs_utterance_ids(tmp_path):
    write_iemocap(tmp_path, {"train": [("utt1", "Sad")], "valid": [("utt2", "Happy")], "test": [("utt3", "Angry")]})
    with pytest.raises(DataError, match=r"no 'id' of .* names one \(first id: 'utt1'\); use the pickle's own split: "
                                        r"--pipeline mult"):
        prepare("iemocap", tmp_path, tmp_path / "out", progress=False)
    report = prepare("iemocap", tmp_path, tmp_path / "out2", "mult", progress=False)
    assert report.counts["test"]["prepared"] == 1


@pytest.mark.parametrize("method", ["joint", "mla"])
def test_one_epoch_with_three_modalities(mla_cache, tmp_path, capsys, method):
    out, _ = mla_cache
    config = tmp_path / "run.yaml"
    config.write_text(f"dataset: {{name: iemocap, root: {out}}}\n")
    code = cli(["--results", str(tmp_path / "results"), "run", str(config), f"method.name={method}",
                "train.epochs=1", "train.batch_size=3", "train.progress=false", "eval.probe_c_grid=[1.0]",
                "model.encoders.audio.kind=gru", "model.encoders.visual.kind=mean"])
    assert code == 0, capsys.readouterr().err
    assert "finished" in capsys.readouterr().out
