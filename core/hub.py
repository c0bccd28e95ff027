"""Where Hugging Face files are looked for, and the error for a missing `text` extra: shared by
the tokenizers of the prepare (datasets.text) and the text encoder (models.hf_text)."""

from __future__ import annotations

from mmbalance.core.errors import ConfigError


def hub_cache() -> str:
    """The local Hugging Face hub cache, as error messages name it."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return f"{HF_HUB_CACHE} (set by HF_HOME / HF_HUB_CACHE)"


def missing_text_extra(what: str) -> ConfigError:
    return ConfigError(f"{what} needs the `transformers` package, which is not installed: "
                       f"pip install 'mmbalance[text]'")
