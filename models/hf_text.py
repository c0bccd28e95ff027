"""A BERT-style text encoder through `transformers`, on token ids cached by the prepare.

Input: (B, L) token ids (datasets.text), padded with the model's pad id; the attention mask is
`ids != pad_token_id`. Only the first `max_len` ids are used (default: all L the cache holds).
The feature (`out_dim` = the model's hidden size) is `pooling`:

  pooler  BERT's pooled [CLS]: tanh(Linear(h_[CLS])), `pooler_output` (BalanceBenchmark's text
          encoder feeds it to its head; it passes no attention mask, so its pads are attended)
  cls     the last layer's state at position 0, unpooled
  mean    the mean of the last layer's states over the real (unpadded) tokens

`model` is a Hugging Face hub name found in the local cache (`bert-base-uncased`), or a
directory holding config.json (and the weights, for `pretrained: true`), as `save_pretrained`
writes it. Nothing is downloaded: a model that is not there is a one-line error naming it and
the cache looked in. `pretrained: false` builds the architecture of `model`'s config with random
weights; `config` overrides fields of that config (a tiny BERT for tests: hidden_size 32,
num_hidden_layers 2, num_attention_heads 2, intermediate_size 64). `transformers` is imported
only when the encoder is built (the `text` extra).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from mmbalance.core.errors import ConfigError, DataError
from mmbalance.core.hub import hub_cache, missing_text_extra
from mmbalance.core.params import Strict
from mmbalance.core.registry import ENCODERS
from mmbalance.core.types import Modality


class HFTextParams(Strict):
    model: str = Field("bert-base-uncased", min_length=1)  # hub name in the local cache, or a directory
    pretrained: bool = True
    max_len: int | None = Field(None, ge=1)  # None: every cached token
    pooling: Literal["pooler", "cls", "mean"] = "pooler"
    config: dict[str, Any] = Field(default_factory=dict)  # overrides of the model's config fields


def load_config(params: HFTextParams, where: str) -> Any:
    """The model's config (from the local cache or directory) with `params.config` over it."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise missing_text_extra(f"encoder hf_text ({where})") from None
    try:
        config = AutoConfig.from_pretrained(params.model, local_files_only=True)
    except (OSError, ValueError) as e:
        raise not_found(params, where, e) from None
    unknown = [k for k in params.config if not hasattr(config, k)]
    if unknown:
        raise ConfigError(f"{where}.config: {', '.join(map(repr, unknown))} is no field of {params.model!r}'s "
                          f"{type(config).__name__}")
    for key, value in params.config.items():
        setattr(config, key, value)
    return config


def not_found(params: HFTextParams, where: str, error: Exception) -> ConfigError:
    what = "its weights are" if params.pretrained else "its config.json is"
    return ConfigError(
        f"hf_text model {params.model!r} ({where}.model, pretrained={str(params.pretrained).lower()}): {what} not "
        f"available offline ({type(error).__name__}); looked in {hub_cache()} and in the directory "
        f"{params.model!r}; download it there on a machine with internet (`hf download {params.model}`), or name "
        f"a directory holding config.json{' and the weights' if params.pretrained else ''}"
    )


def create_model(params: HFTextParams, where: str) -> nn.Module:
    from transformers import AutoModel

    config = load_config(params, where)
    pooler = {"add_pooling_layer": params.pooling == "pooler"} if config.model_type == "bert" else {}
    if not params.pretrained:
        return AutoModel.from_config(config, **pooler)
    try:
        return AutoModel.from_pretrained(params.model, config=config, local_files_only=True, **pooler)
    except (OSError, ValueError) as e:
        raise not_found(params, where, e) from None


@ENCODERS.register("hf_text")
class HFTextEncoder(nn.Module):
    """A `transformers` encoder (BERT by default) on (B, L) token ids; pooled as `pooling` says."""

    Params = HFTextParams

    def __init__(self, params: HFTextParams, modality: Modality) -> None:
        super().__init__()
        where = f"model.encoders.{modality.name}"
        if len(modality.shape) != 1:
            raise ConfigError(f"encoder hf_text ({where}) needs (L,) token ids; modality {modality.name!r} has "
                              f"shape {modality.shape} (a text modality prepared with a tokenizer)")
        if params.max_len is not None and params.max_len > modality.shape[0]:
            raise ConfigError(f"{where}.max_len={params.max_len}, but modality {modality.name!r} holds "
                              f"{modality.shape[0]} tokens per sample (the prepare's max_len); allowed: 1 to "
                              f"{modality.shape[0]}, or leave it out")
        self.net = create_model(params, where)
        config = self.net.config
        if params.pooling == "pooler" and getattr(self.net, "pooler", None) is None:
            raise ConfigError(f"{where}.pooling=pooler: {params.model!r} ({config.model_type}) has no pooler; "
                              f"allowed here: cls, mean")
        self.max_len = params.max_len or modality.shape[0]
        self.pooling = params.pooling
        self.pad_id = int(config.pad_token_id or 0)
        self.vocab_size = int(config.vocab_size)
        self.modality = modality.name
        self.out_dim = int(config.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, : self.max_len].long()
        if ids.numel() and int(ids.max()) >= self.vocab_size:
            raise DataError(f"modality {self.modality!r}: token id {int(ids.max())} is outside the text encoder's "
                            f"vocabulary of {self.vocab_size}; prepare the data with this model's tokenizer")
        mask = ids != self.pad_id
        out = self.net(input_ids=ids, attention_mask=mask.long())
        if self.pooling == "pooler":
            return out.pooler_output
        h = out.last_hidden_state
        if self.pooling == "cls":
            return h[:, 0]
        weights = mask.unsqueeze(-1).to(h.dtype)
        return (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
