"""The vendored split lists (datasets/manifests/lists/) are the exact published lists.

Each file was typed out from a reference repository (see SOURCES.md there). These tests pin the
file hashes and the structural facts that a transcription slip would break: line and character
counts, the id format, per-class counts and the overlap between the two CREMA-D test lists.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

import pytest

LISTS = Path(__file__).resolve().parents[1] / "datasets" / "manifests" / "lists"

# file -> (lines, characters, SHA-256 of the bytes)
PINNED = {
    "cremad_ogmge_test.csv": (744, 14880, "959a667af66a01dc439b12d6ec9dc57b36a88e947f48ad63531a4b91f769394f"),
    "cremad_mla_test.txt": (744, 19478, "348c6ffc707303fa344380c94ec27e7b1f86927efada6ccd67bb74164aad97f9"),
    "ave_val.txt": (402, 13991, "76c3c51b67aacbbacd5708e17aab491638a5e9032f786adad1a13be55d9cb3ca"),
    "ave_test.txt": (402, 13983, "e73c25a509bb38a691c1e08064af66d0512554f2fbc883cddd6d2a51ede8449d"),
}
CLIP = re.compile(r"^\d{4}_[A-Z]{3}_[A-Z]{3}_[A-Z]{2}$")
MLA_LABEL = {"Anger": "ANG", "Disgust": "DIS", "Fear": "FEA", "Happy": "HAP", "Neutral": "NEU", "Sad": "SAD"}
# Per-class line counts of both AVE lists, in the lists' class order.
AVE_CLASS_COUNTS = [18, 17, 17, 18, 18, 17, 17, 18, 17, 16, 18, 13, 10, 9,
                    18, 17, 16, 18, 10, 8, 6, 16, 6, 6, 18, 10, 15, 15]


def _lines(name: str) -> list[str]:
    return (LISTS / name).read_text().splitlines()


@pytest.mark.parametrize("name", sorted(PINNED))
def test_counts_and_hash(name: str) -> None:
    lines, chars, sha = PINNED[name]
    data = (LISTS / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == sha
    assert len(data.decode()) == chars
    assert data.endswith(b"\n") and b"\r" not in data
    assert len(_lines(name)) == lines


def test_sources_md_names_the_same_hashes() -> None:
    text = (LISTS / "SOURCES.md").read_text()
    for name, (lines, _, sha) in PINNED.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"`{sha}`" in row and f"| {lines} |" in row


def test_cremad_ogmge_test_list() -> None:
    rows = [line.split(",") for line in _lines("cremad_ogmge_test.csv")]
    assert all(len(r) == 2 and CLIP.match(r[0]) and r[0].split("_")[2] == r[1] for r in rows)
    assert len({name for name, _ in rows}) == 744
    assert Counter(label for _, label in rows) == {"SAD": 140, "FEA": 133, "DIS": 129, "HAP": 123, "NEU": 114,
                                                   "ANG": 105}
    assert rows[0] == ["1041_TIE_NEU_XX", "NEU"] and rows[-1] == ["1014_TIE_HAP_XX", "HAP"]


def test_cremad_mla_test_list_and_overlap() -> None:
    rows = [line.split(" ") for line in _lines("cremad_mla_test.txt")]
    names = [file.removesuffix(".flv") for file, _ in rows]
    assert all(file.endswith(".flv") for file, _ in rows)
    assert all(CLIP.match(n) and MLA_LABEL[label] == n.split("_")[2] for n, (_, label) in zip(names, rows))
    assert len(set(names)) == 744
    ogmge = {line.split(",")[0] for line in _lines("cremad_ogmge_test.csv")}
    assert len(ogmge & set(names)) == 71


@pytest.mark.parametrize("name", ["ave_val.txt", "ave_test.txt"])
def test_ave_lists(name: str) -> None:
    rows = [line.split("&") for line in _lines(name)]
    assert all(len(r) == 5 and len(r[1]) == 11 and r[2] == "good" for r in rows)
    assert all(0 <= int(r[3]) < int(r[4]) <= 10 for r in rows)
    classes = list(dict.fromkeys(r[0] for r in rows))
    assert len(classes) == 28 and classes[0] == "Church bell" and classes[-1] == "Mandolin"
    counts = Counter(r[0] for r in rows)
    assert [counts[c] for c in classes] == AVE_CLASS_COUNTS


def test_ave_val_and_test_share_class_order_not_videos() -> None:
    val = [line.split("&") for line in _lines("ave_val.txt")]
    test = [line.split("&") for line in _lines("ave_test.txt")]
    assert list(dict.fromkeys(r[0] for r in val)) == list(dict.fromkeys(r[0] for r in test))
    assert not {r[1] for r in val} & {r[1] for r in test}
