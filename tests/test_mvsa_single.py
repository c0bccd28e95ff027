"""MVSA-Single: prepare from a fixture download (MLA's lists and MMBT's jsonl), the vendored MLA
lists, texts read from data/<id>.txt, and one epoch of joint, OGM-GE and MLA on image + text."""

from __future__ import annotations

import hashlib
import shutil

import pytest

pytest.importorskip("transformers")

from mmbalance.datasets.cache import Cache  # noqa: E402
from mmbalance.datasets.mvsa_single import PIPELINES, MvsaSingle  # noqa: E402
from mmbalance.datasets.prepare.runner import prepare  # noqa: E402
from mmbalance.datasets.splits import MANIFEST_DIR, load_manifest, read_pinned_list  # noqa: E402
from mmbalance.datasets.text import token_ids  # noqa: E402
from tests.fixtures.mvsa_single import SENTIMENTS, TEXTS, write_mvsa  # noqa: E402
from tests.fixtures.text import write_tiny_bert  # noqa: E402
from tests.fixtures.train import train_one_epoch  # noqa: E402


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvsa_raw")
    return root / "mvsa", write_mvsa(root / "mvsa"), write_tiny_bert(root / "bert")


@pytest.fixture(scope="module")
def caches(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("mvsa_cache")
    option = [f"text.tokenizer={raw[2]}"]
    return {pipe: (out / pipe, prepare("mvsa_single", raw[0], out / pipe, pipe, workers=1, progress=False,
                                       options=option)) for pipe in ("mla", "mmbt")}


def test_splits(raw, caches):
    ids = raw[1]
    mla = Cache(caches["mla"][0]).meta
    split = {s: sorted(mla.ids[r] for r in rows) for s, rows in mla.splits.items()}
    # MLA's test holds a dev tweet (as its real list holds 32): val is the rest of dev
    assert split == {"train": sorted(ids["mla_train"]), "test": sorted(ids["mla_test"]),
                     "val": sorted(set(ids["dev"]) - set(ids["mla_test"]))}
    assert caches["mla"][1].split_info["splits"]["test"]["published_count"] == 519
    mmbt = Cache(caches["mmbt"][0]).meta
    assert {s: sorted(mmbt.ids[r] for r in rows) for s, rows in mmbt.splits.items()} == {
        s: sorted(ids[k]) for s, k in (("train", "train"), ("val", "dev"), ("test", "test"))}
    for meta in (mla, mmbt):
        assert meta.classes == list(SENTIMENTS)
        for row, sid in enumerate(meta.ids):
            cache = Cache(caches["mla" if meta is mla else "mmbt"][0])
            label = SENTIMENTS[meta.labels[row]]
            expected = token_ids(TEXTS[label], PIPELINES["mla"].text.model_copy(update={"tokenizer": str(raw[2])}))
            assert cache.arrays["text"][row].tolist() == expected.tolist(), sid


def test_vendored_mla_lists_are_used_without_the_raw_ones(raw, tmp_path):
    copy = tmp_path / "mvsa"
    shutil.copytree(raw[0], copy, ignore=shutil.ignore_patterns("my_*_mvsa.txt", "*.jpg"))
    plan = MvsaSingle.plan(copy, PIPELINES["mla"])
    flavour = load_manifest("mvsa_single").flavour("mla")
    assert plan.splits["train"] == read_pinned_list(flavour, "train")
    assert plan.splits["test"] == read_pinned_list(flavour, "test")
    assert (len(plan.splits["train"]), len(plan.splits["test"])) == (1555, 519)
    # a listed tweet with no jsonl row: its text is the release's data/<id>.txt
    sample = next(s for s in plan.samples if s.id == "477")
    assert sample.files == {"visual": copy / "data" / "477.jpg", "text": copy / "data" / "477.txt"}
    assert sample.label == SENTIMENTS.index("positive")
    for split, (lines, sha) in {"train": (1555, "ca899aed"), "test": (519, "c05f79e7")}.items():
        data = (MANIFEST_DIR / flavour.lists[split]["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest().startswith(sha) and data.count(b"\n") == lines


def test_text_from_the_release_file(raw, tmp_path):
    copy = tmp_path / "mvsa"
    shutil.copytree(raw[0], copy)
    (copy / "data" / "99.txt").write_text("RT happy day\n")
    (copy / "data" / "99.jpg").write_bytes((copy / "data" / "1.jpg").read_bytes())
    with open(copy / "my_train_mvsa.txt", "a") as f:
        f.write("99.jpg positive\n")
    report = prepare("mvsa_single", copy, tmp_path / "c", workers=1, progress=False,
                     options=[f"text.tokenizer={raw[2]}"])
    assert report.counts["train"]["prepared"] == len(raw[1]["mla_train"]) + 1
    cache = Cache(tmp_path / "c")
    row = cache.meta.ids.index("99")
    tok = PIPELINES["mla"].text.model_copy(update={"tokenizer": str(raw[2])})
    assert cache.arrays["text"][row].tolist() == token_ids("RT happy day", tok).tolist()


@pytest.mark.parametrize("method", [
    ("method.name=joint",),
    ("method.name=ogm_ge", "method.param_filter=all_encoder"),  # the text encoder has no conv kernel
    ("method.name=mla", "model.encoders.visual.out_dim=32"),  # one shared head: the text's width
], ids=lambda m: m[0].split("=")[1])
def test_one_epoch_of_each_method(raw, caches, tmp_path, capsys, method):
    text = ("model.encoders.text.name=hf_text", f"model.encoders.text.model={raw[2]}",
            "model.encoders.text.pretrained=false", "model.encoders.text.max_len=8", "model.encoders.text.pooling=mean")
    code = train_one_epoch(tmp_path, "mvsa_single", caches["mla"][0], ("visual",), "mla", batch_size=4,
                           extra=(*text, *method))
    assert code == 0, capsys.readouterr().err
    assert "finished" in capsys.readouterr().out
