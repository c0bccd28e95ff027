"""AV-Digits' text modality (noisy captions of the digit) and the `text` encoder: the captions are
pinned by the manifest and describe their digit, the noise has its rate, the two-modality presets
are exactly what they were, and a three-modality run trains end to end."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from mmbalance.bench.config import load_config
from mmbalance.bench.store import Store
from mmbalance.bench.train import run
from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Modality
from mmbalance.datasets.avdigits import AVDigits, AVDigitsParams
from mmbalance.datasets.prepare import avdigits_captions as cap
from mmbalance.datasets.prepare import avdigits_generate as gen
from mmbalance.models.text import TextEncoder, TextParams

TEXT = Modality("text", "text", (cap.CAPTION_LENGTH,))


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return gen.load_cache()["labels"]


@pytest.fixture(scope="module")
def three() -> AVDigits:
    return AVDigits(AVDigitsParams(preset="three-modality"))


def candidates(words: list[str]) -> set[int]:
    """The digits every clue phrase of a clean caption fits (fillers say nothing)."""
    fits = set(range(10))
    for d in range(10):
        phrases = cap.clues(d)
        for i, w in enumerate(words):
            if w in cap.FILLERS or (i > 0 and words[i - 1] in ("after", "before")):
                continue
            phrase = (w, words[i + 1]) if w in ("after", "before") else (w,)
            if phrase not in phrases:
                fits.discard(d)
    return fits


def test_captions_are_pinned_by_the_manifest_and_describe_their_digit(labels):
    manifest = json.loads(gen.DEFAULT_MANIFEST.read_text())
    captions = cap.draw_captions(labels)
    assert captions.shape == (gen.N_SAMPLES, cap.CAPTION_LENGTH) and captions.dtype == np.int64
    assert cap.captions_sha256(captions) == manifest["captions_sha256"]
    assert manifest["vocab"] == list(cap.VOCAB) and len(cap.VOCAB) == 33
    assert captions.min() >= 1 and captions.max() < len(cap.VOCAB)  # never the padding
    for i in range(0, gen.N_SAMPLES, 7):
        words = cap.decode(captions[i]).split()
        assert int(labels[i]) in candidates(words), (labels[i], words)
    # two clues do not always name the digit: some clean captions fit several digits
    ambiguous = sum(len(candidates(cap.decode(c).split())) > 1 for c in captions[:300])
    assert 20 < ambiguous < 150
    # a caption depends on its index and label only, not on the rest of the array
    assert np.array_equal(cap.draw_captions(labels[:5]), captions[:5])


def test_token_noise_replaces_at_its_rate():
    rng = np.random.default_rng(0)
    clean = np.ones((4000, cap.CAPTION_LENGTH), dtype=np.int64)
    assert np.array_equal(cap.add_token_noise(clean, 0.0, rng), clean)
    noisy = cap.add_token_noise(clean, 0.4, rng)
    # a replacement draws one of the 32 words, so 1/32 of them redraw the clean one
    assert abs((noisy != clean).mean() - 0.4 * 31 / 32) < 0.01
    assert noisy.min() >= 1 and noisy.max() < len(cap.VOCAB)


def test_two_modality_presets_are_as_before_text(three):
    """Same config (no text_noise key: same run ids), same modalities, and audio/visual tensors
    equal to the three-modality preset's, which adds text only."""
    p = AVDigitsParams(preset="audio-dominant")
    assert "text_noise" not in p.model_dump() and AVDigits.modality_names(p) == ("audio", "visual")
    assert AVDigits.modality_names(three.params) == ("audio", "visual", "text")
    assert (three.params.audio_snr_db, three.params.image_noise_sigma, three.params.text_noise) == (0.0, 0.6, 0.1)
    two = AVDigits(p)
    assert [m.name for m in two.modalities] == ["audio", "visual"]
    assert [(m.name, m.kind, m.shape) for m in three.modalities][2] == ("text", "text", (8,))
    for split in ("train", "test"):
        assert set(two.split(split).inputs) == {"audio", "visual"}
        for m in ("audio", "visual"):
            assert torch.equal(two.split(split).inputs[m], three.split(split).inputs[m])
    # the audio-dominant data as main had it before the text modality (sha256 of its tensors)
    digest = hashlib.sha256()
    for m in ("audio", "visual"):
        digest.update(two.split("train").inputs[m].numpy().tobytes())
    assert digest.hexdigest() == AUDIO_DOMINANT_TRAIN_SHA256


# sha256 of the audio-dominant preset's train audio then visual float32 bytes, computed with the
# code of main at 1eda13b (before the text modality existed)
AUDIO_DOMINANT_TRAIN_SHA256 = "575502391c409f022adec1ddfdf386ce64f7917c89e5fc137a28aef5c9e25093"


def test_text_noise_makes_captions_differ_per_preset(three, labels):
    text = three.split("train").inputs["text"]
    assert text.dtype == torch.int64 and text.shape == (1197, cap.CAPTION_LENGTH)
    clean = torch.from_numpy(cap.draw_captions(labels)[gen.load_cache()["train_idx"]])
    assert abs((text != clean).float().mean().item() - 0.1 * 31 / 32) < 0.01
    again = AVDigits(AVDigitsParams(preset="three-modality"))
    assert torch.equal(again.split("train").inputs["text"], text)  # fixed per sample
    other = AVDigits(AVDigitsParams(preset="audio-dominant", text_noise=0.1, noise_seed=1))
    assert not torch.equal(other.split("train").inputs["text"], text)


def test_text_on_a_two_modality_preset_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="dataset 'avdigits' has no modality 'text'"):
        load_config(None, ["model.encoders.text.name=text"])
    cfg = load_config(None, ["dataset.preset=three-modality"])
    assert cfg.model.encoders["text"] == {"name": "text", "vocab_size": 33, "embed_dim": 32, "pool": "mean",
                                          "hidden": 64, "out_dim": 64}


def test_text_encoder_pools_as_documented():
    torch.manual_seed(0)
    mean = TextEncoder(TextParams(vocab_size=33, out_dim=16), TEXT)
    x = torch.tensor([[5, 7, 0, 0, 0, 0, 0, 0], [7, 5, 0, 0, 0, 0, 0, 0], [5, 7, 5, 7, 0, 0, 0, 0]])
    out = mean(x)
    assert out.shape == (3, 16) and mean.out_dim == 16
    # a bag of words: order and repetition do not matter, padding is left out
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[0], out[2])
    blank = mean(torch.zeros(1, 8, dtype=torch.long))
    assert torch.allclose(blank, mean.head(torch.zeros(1, 32)))  # all padding pools to zeros
    gru = TextEncoder(TextParams(vocab_size=33, pool="gru", hidden=12, out_dim=16), TEXT)
    g = gru(x)
    assert g.shape == (3, 16) and not torch.allclose(g[0], g[1])  # the GRU reads the order
    with pytest.raises(ConfigError, match="reads token ids of shape"):
        TextEncoder(TextParams(vocab_size=33), Modality("audio", "audio", (1, 24, 32)))


def test_one_epoch_on_three_modalities(tmp_path):
    cfg = load_config(None, ["dataset.preset=three-modality", "train.epochs=1", "train.progress=false",
                             "model.encoders.text.pool=gru", "eval.probe_c_grid=[1.0]"])
    summary = run(cfg, Store(tmp_path)).summary
    assert set(summary["probes"]) == {"audio", "visual", "text"}
    assert set(summary["best_val"]["test"]["modality_acc"]) == {"audio", "visual", "text"}
    assert summary["probes"]["text"]["test_acc"] > 0.2  # 0.1 would be chance
