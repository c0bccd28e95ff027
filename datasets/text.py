"""Text as a cached modality: a tokenizer applied once at prepare time, token ids stored as int32.

A dataset with a text column declares a `Tokenization` in its pipeline (which tokenizer, how
long, with or without the tokenizer's special tokens, which cleaning), calls `token_ids()` in its
`load_sample()` and reads the rows back through `TokenView`. Each cached row is `max_len` int32
ids padded with the tokenizer's pad id; the attention mask is `ids != pad id`, which the text
encoder derives (models/hf_text.py), so nothing else is stored.

Tokenizers come from `transformers` and only from this machine: a Hugging Face hub name found in
the local cache (`bert-base-uncased`), or a directory holding the tokenizer's files (vocab.txt
and tokenizer_config.json, as `save_pretrained` writes them). Nothing is downloaded; a tokenizer
that is not there is a one-line error naming it and the places looked in. `transformers` is
imported only here, when a tokenizer is built (the `text` extra).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mmbalance.core.errors import ConfigError, DataError
from mmbalance.core.hub import hub_cache, missing_text_extra
from mmbalance.datasets.transforms import BatchedView, Empty

Cleaning = Literal["none", "tweet"]


class Tokenization(BaseModel):
    """How a text column becomes token ids at prepare time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokenizer: str = Field(min_length=1)  # a hub name in the local cache, or a directory
    max_len: int = Field(ge=1)  # ids per row: truncated or padded to this
    special_tokens: bool = True  # [CLS] ... [SEP] (BERT-style), as `add_special_tokens`
    clean: Cleaning = "none"  # "tweet": BalanceBenchmark's clean_text (leading RT, URLs, '#')


@lru_cache(maxsize=4)  # one tokenizer per process (prepare workers build their own)
def load_tokenizer(name: str, where: str = "text.tokenizer") -> Any:
    """The tokenizer `name` from the local Hugging Face cache or a directory, or a ConfigError."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise missing_text_extra(f"tokenizer {name!r} ({where})") from None
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:  # not cached / not a tokenizer directory
        looked = f"the directory {str(Path(name).expanduser())!r}" if _is_path(name) else hub_cache()
        raise ConfigError(
            f"tokenizer {name!r} ({where}) is not available offline: looked in {looked} "
            f"({type(e).__name__}); download it there on a machine with internet "
            f"(`hf download {name}`), or name a directory holding its files (vocab.txt, tokenizer_config.json)"
        ) from None


def _is_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().is_dir()


def clean_text(text: str, how: Cleaning) -> str:
    """BalanceBenchmark's FOOD101Dataset.clean_text for "tweet": drop a leading "RT ", everything
    from a URL to the end of its line, and '#'."""
    if how == "none":
        return text
    text = re.sub(r"^RT[\s]+", "", text)
    text = re.sub(r"https?:\/\/.*[\r\n]*", "", text)
    return re.sub(r"#", "", text)


def token_ids(text: str, tok: Tokenization) -> np.ndarray:
    """`text` as (max_len,) int32 ids: cleaned, tokenized, truncated and padded with the pad id."""
    tokenizer = load_tokenizer(tok.tokenizer)
    encoded = tokenizer(clean_text(text, tok.clean), padding="max_length", truncation=True,
                        max_length=tok.max_len, add_special_tokens=tok.special_tokens)
    return np.asarray(encoded["input_ids"], dtype=np.int32)


def read_text_file(path: Path) -> str:
    """A text file's content; bytes that are not UTF-8 (tweets saved in a legacy code page) become
    U+FFFD rather than failing the sample."""
    if not path.is_file():
        raise DataError(f"text file {str(path)!r} does not exist")
    return path.read_bytes().decode("utf-8", errors="replace").strip()


def is_empty(text: str, tok: Tokenization) -> bool:
    """Whether `text` gives no token at all (only padding) under `tok`'s cleaning."""
    return not clean_text(text, tok.clean).strip()


@dataclass(frozen=True)
class TokenView(BatchedView):
    """Cached (L,) int32 ids -> (L,) int64 ids, unchanged in training and at test."""

    def shape(self, stored: Sequence[int]) -> tuple[int, ...]:
        return tuple(stored)

    def draw(self, arr: np.ndarray, count: int | None = None, source: tuple[int, int] | None = None) -> None:
        return None

    def gather(self, arrs: Sequence[np.ndarray], draws: Sequence[None], empty: Empty = np.empty) -> torch.Tensor:
        out = empty((len(arrs), *arrs[0].shape), np.int64)
        for o, a in zip(out, arrs):
            o[...] = a
        return torch.from_numpy(out)
