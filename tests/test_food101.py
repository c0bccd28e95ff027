"""UPMC Food-101: prepare from a fixture download (MLA's MMBT split and BalanceBenchmark's titles),
the cached ids and images, the views, the layout's errors, and one epoch of training."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from mmbalance.core.errors import ConfigError, DataError  # noqa: E402
from mmbalance.datasets.cache import Cache  # noqa: E402
from mmbalance.datasets.food101 import Food101, Food101Params  # noqa: E402
from mmbalance.datasets.prepare.runner import prepare  # noqa: E402
from mmbalance.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tests.fixtures.food101 import CLASSES, colour, image_shape, write_food101  # noqa: E402
from tests.fixtures.text import SPECIALS, WORDS, write_tiny_bert  # noqa: E402
from tests.fixtures.train import train_one_epoch  # noqa: E402

VOCAB = {t: i for i, t in enumerate(SPECIALS + WORDS)}
EMPTY = "ramen_102"  # a train image whose title is " "


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("food_raw")
    names = write_food101(root / "food", empty_title=EMPTY)  # 3 classes x (4 train + 2 test)
    return root / "food", names, write_tiny_bert(root / "bert")


@pytest.fixture(scope="module")
def caches(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("food_cache")
    option = [f"text.tokenizer={raw[2]}"]
    return {pipe: (out / pipe, prepare("food101", raw[0], out / pipe, pipe, workers=w, progress=False, options=option))
            for pipe, w in (("mla", 2), ("balancebench", 1))}


def test_mla_split_is_mmbts_without_empty_titles(raw, caches):
    out, report = caches["mla"]
    names = raw[1]
    assert report.counts["train"] == {"listed": 8, "prepared": 8, "missing": 0, "corrupt": 0}  # 9, one empty
    assert report.counts["val"]["listed"] == 3 and report.counts["test"]["listed"] == 6
    assert report.notes[0] == f"train: 1 sample(s) with an empty title left out ({EMPTY})"
    assert report.split_info["splits"]["test"]["published_count"] == 22714
    meta = Cache(out).meta
    assert meta.classes == sorted(CLASSES)
    assert sorted(meta.ids[r] for r in meta.splits["val"]) == sorted(names["dev"])
    assert sorted(meta.ids[r] for r in meta.splits["test"]) == sorted(names["test"])


def test_cached_tokens_and_images(caches):
    bare = Cache(caches["mla"][0])  # no special tokens, 256 ids, no cleaning
    row = bare.meta.ids.index("sushi_250")
    sushi = ["rt", "tasty", "sushi", "http"]  # then ':' '/' '/' 't' '.' 'co' '/' 'x' '#' 'good'
    assert bare.arrays["text"].shape == (17, 256) and bare.arrays["text"].dtype == "int32"
    assert bare.arrays["text"][row, :4].tolist() == [VOCAB[w] for w in sushi]
    assert bare.arrays["text"][row, 13:].tolist() == [VOCAB["good"]] + [0] * 242
    cleaned = Cache(caches["balancebench"][0])  # [CLS] ... [SEP], 40 ids, URL and '#' removed
    row = cleaned.meta.ids.index("sushi_250")
    assert cleaned.arrays["text"][row].tolist() == [VOCAB[t] for t in ["[CLS]", *sushi[:3], "[SEP]"]] + [0] * 35
    for cache in (bare, cleaned):
        visual = cache.arrays["visual"]
        assert visual.shape == (len(cache.meta.ids), 1, 256, 256, 3)
        for r, sid in enumerate(cache.meta.ids):
            n = int(sid.rsplit("_", 1)[1])
            assert tuple(cache.sources["visual"][r]) == image_shape(n)  # the size the crops are drawn on
            assert abs(visual[r, 0, 128, 128].astype(int) - colour(cache.meta.labels[r])).max() <= 3  # jpeg


def test_balancebench_split_is_the_titles_with_carved_val(raw, caches):
    out, report = caches["balancebench"]
    assert {s: c["listed"] for s, c in report.counts.items()} == {"train": 11, "val": 1, "test": 6}  # 10% of 12
    assert report.split_info["is_published_split"] is None  # no published counts to compare with
    meta = Cache(out).meta
    assert EMPTY in meta.ids  # BalanceBenchmark keeps it: [CLS] [SEP]
    assert meta.classes == sorted(CLASSES)


def test_views(caches):
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    for pipe, length in (("mla", 256), ("balancebench", 40)):
        ds = Food101(Food101Params(root=str(caches[pipe][0]), pipeline=pipe, frame_size=64))
        assert [(m.name, m.kind, m.shape) for m in ds.modalities] == [
            ("text", "text", (length,)), ("visual", "image", (3, 1, 64, 64))]
        for split in ("train", "test"):
            x, y = ds.split(split)[0]
            assert x["text"].dtype == torch.int64 and x["text"].shape == (length,)
            expected = (torch.tensor(colour(y), dtype=torch.float32) / 255 - mean) / std
            assert torch.allclose(x["visual"][:, 0, 32, 32], expected, atol=0.06)


def test_layout_errors(raw, tmp_path):
    food, _, bert = raw
    with pytest.raises(DataError, match="images/"):
        prepare("food101", tmp_path, tmp_path / "c", options=[f"text.tokenizer={bert}"], progress=False)
    copy = tmp_path / "nojsonl"
    write_food101(copy, train_per_class=2, test_per_class=1)
    (copy / "dev.jsonl").unlink()
    with pytest.raises(DataError, match="MMBT's split files.*--pipeline balancebench"):
        prepare("food101", copy, tmp_path / "c", options=[f"text.tokenizer={bert}"], progress=False)
    with pytest.raises(ConfigError, match="'text.max_len=8' .* not allowed; allowed: text.tokenizer"):
        prepare("food101", food, tmp_path / "c", options=["text.max_len=8"], progress=False)
    with pytest.raises(ConfigError, match="tokenizer 'bert-base-uncased' .*not available offline"):
        prepare("food101", food, tmp_path / "c", progress=False)  # nothing in the hub cache here


def test_one_epoch_through_cli(raw, caches, tmp_path, capsys):
    text = ("model.encoders.text.name=hf_text", f"model.encoders.text.model={raw[2]}",
            "model.encoders.text.pretrained=false", "model.encoders.text.max_len=16")
    code = train_one_epoch(tmp_path, "food101", caches["mla"][0], ("visual",), "mla", batch_size=4, extra=text)
    assert code == 0, capsys.readouterr().err
    assert "finished" in capsys.readouterr().out
