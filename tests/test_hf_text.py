"""Text as a modality: the prepare's tokenization (datasets.text) and the hf_text encoder, on a
tiny BERT written offline (tests/fixtures/text.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from mmbalance.core.errors import ConfigError, DataError  # noqa: E402
from mmbalance.core.registry import ENCODERS  # noqa: E402
from mmbalance.core.types import Modality  # noqa: E402
from mmbalance.datasets.text import Tokenization, TokenView, load_tokenizer, token_ids  # noqa: E402
from mmbalance.models.hf_text import HFTextEncoder  # noqa: E402
from tests.fixtures.text import SPECIALS, WORDS, write_tiny_bert  # noqa: E402

VOCAB = {t: i for i, t in enumerate(SPECIALS + WORDS)}
PAD, UNK, CLS, SEP = (VOCAB[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), weights=True)


def encoder(model: Path | str, length: int = 12, **params) -> HFTextEncoder:
    torch.manual_seed(0)
    section = {"name": "hf_text", "model": str(model), "pretrained": False, **params}
    return ENCODERS.create(section, Modality("text", "text", (length,)))


def ids(*words: str, length: int = 12) -> torch.Tensor:
    row = [CLS, *(VOCAB[w] for w in words), SEP]
    return torch.tensor(row + [PAD] * (length - len(row)))


# ---- the prepare's tokenization ---------------------------------------------------------------


def test_token_ids_as_the_pipelines_ask(bert):
    tok = Tokenization(tokenizer=str(bert), max_len=8)
    assert token_ids("Apple pies", tok).tolist() == [CLS, VOCAB["apple"], VOCAB["pie"], VOCAB["##s"], SEP, 0, 0, 0]
    bare = Tokenization(tokenizer=str(bert), max_len=4, special_tokens=False)  # MLA: no [CLS]/[SEP]
    assert token_ids("apple pie tasty recipe love", bare).tolist() == [VOCAB[w] for w in WORDS[:2]] + [
        VOCAB["tasty"], VOCAB["recipe"]]  # truncated to max_len
    assert token_ids("", bare).tolist() == [PAD] * 4
    tweet = Tokenization(tokenizer=str(bert), max_len=6, clean="tweet")  # BalanceBenchmark's cleaning
    assert token_ids("RT #good day http://t.co/x sad", tweet).tolist() == [CLS, VOCAB["good"], VOCAB["day"], SEP, 0, 0]
    assert token_ids("RT #good", Tokenization(tokenizer=str(bert), max_len=5)).tolist() == [
        CLS, VOCAB["rt"], UNK, VOCAB["good"], SEP]  # '#' is no word of the tiny vocabulary


def test_token_view_gives_int64_rows():
    rows = [np.array([2, 5, 3, 0], np.int32), np.array([2, 6, 7, 3], np.int32)]
    view = TokenView()
    assert view.shape((4,)) == (4,)
    batch = view.gather(rows, [view.draw(r) for r in rows])
    assert batch.dtype == torch.int64 and batch.tolist() == [[2, 5, 3, 0], [2, 6, 7, 3]]


def test_a_missing_tokenizer_is_one_line_naming_it(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_tokenizer("no-such-org/no-such-bert")
    message = str(e.value)
    assert "'no-such-org/no-such-bert'" in message and "hub" in message and "\n" not in message
    with pytest.raises(ConfigError, match=f"directory '{tmp_path}'"):
        load_tokenizer(str(tmp_path))  # a folder without a tokenizer


# ---- the encoder ------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean"])
def test_padding_does_not_change_the_feature(bert, pooling):
    """The attention mask comes from the pad id: more padding, the same feature."""
    short, long = encoder(bert, 6, pooling=pooling), encoder(bert, 12, pooling=pooling)
    long.load_state_dict(short.state_dict())
    short.eval(), long.eval()
    x = torch.stack([ids("apple", "pie", length=12), ids("sad", "day", "bad", length=12)])
    assert short.out_dim == 32
    torch.testing.assert_close(short(x[:, :6]), long(x), atol=1e-5, rtol=0)
    masked = long.net(input_ids=x, attention_mask=(x != PAD).long()).last_hidden_state
    unmasked = long.net(input_ids=x).last_hidden_state  # pads attended: another feature
    assert not torch.allclose(unmasked[:, 0], masked[:, 0])


def test_mean_pooling_averages_the_real_tokens(bert):
    enc = encoder(bert, 12, pooling="mean").eval()
    x = ids("love", "this", length=12)[None]
    h = enc.net(input_ids=x, attention_mask=(x != PAD).long()).last_hidden_state
    torch.testing.assert_close(enc(x), h[:, :4].mean(1))
    cls = encoder(bert, 12, pooling="cls").eval()
    cls.load_state_dict(enc.state_dict(), strict=False)
    torch.testing.assert_close(cls(x), h[:, 0])


def test_max_len_keeps_the_first_tokens(bert):
    enc = encoder(bert, 12, max_len=4, pooling="mean").eval()
    x = torch.stack([ids("apple", "pie", "tasty", "recipe", "love", length=12)])
    h = enc.net(input_ids=x[:, :4], attention_mask=torch.ones(1, 4, dtype=torch.long)).last_hidden_state
    torch.testing.assert_close(enc(x), h.mean(1))
    with pytest.raises(ConfigError, match=r"max_len=13.*holds 12 tokens"):
        encoder(bert, 12, max_len=13)


def test_pretrained_loads_the_saved_weights(bert):
    from transformers import BertModel

    torch.manual_seed(1)  # a random init would differ from the saved weights
    enc = ENCODERS.create({"name": "hf_text", "model": str(bert), "pretrained": True},
                          Modality("text", "text", (12,)))
    saved = BertModel.from_pretrained(bert).state_dict()
    mine = enc.net.state_dict()
    assert set(saved) == set(mine)
    assert all(torch.equal(saved[k], mine[k]) for k in saved)


def test_missing_weights_are_one_line_naming_the_model_and_cache(bert, tmp_path):
    with pytest.raises(ConfigError) as e:
        ENCODERS.create({"name": "hf_text", "model": "no-such-org/no-such-bert"}, Modality("text", "text", (8,)))
    message = str(e.value)
    assert "'no-such-org/no-such-bert'" in message and "pretrained=true" in message and "\n" not in message
    assert "HF_HUB_CACHE" in message and "hf download" in message
    config_only = write_tiny_bert(tmp_path / "config_only")  # no weights: pretrained must fail, random init not
    with pytest.raises(ConfigError, match="its weights are not available offline"):
        ENCODERS.create({"name": "hf_text", "model": str(config_only)}, Modality("text", "text", (8,)))
    assert encoder(config_only, 8).out_dim == 32


def test_config_overrides_and_their_errors(bert):
    enc = encoder(bert, 8, config={"hidden_size": 16, "num_hidden_layers": 1})
    assert enc.out_dim == 16 and len(enc.net.encoder.layer) == 1
    with pytest.raises(ConfigError, match="'hidden_sise' is no field"):
        encoder(bert, 8, config={"hidden_sise": 16})
    with pytest.raises(ConfigError, match=r"needs \(L,\) token ids"):
        ENCODERS.create({"name": "hf_text", "model": str(bert), "pretrained": False}, Modality("v", "image", (3, 8, 8)))


def test_a_token_outside_the_vocabulary_is_a_data_error(bert):
    enc = encoder(bert, 4)
    with pytest.raises(DataError, match="token id 26 is outside the text encoder's vocabulary of 26"):
        enc(torch.tensor([[2, 26, 3, 0]]))

