"""AV-Digits' text modality: a short caption of each digit from a fixed vocabulary, as token ids.

A clean caption is ``CAPTION_LENGTH`` tokens: ``N_CLUES`` clue phrases about the digit, drawn
without replacement from the digit's own (its name; "odd"/"even"; "small" (0-4)/"large" (5-9);
"after <d-1>"; "before <d+1>"; one of "prime", "square", "perfect", "cube"), shuffled among filler
words ("a", "the", "number", ...). Two clues do not always name the digit: "odd large" fits 5, 7
and 9, so even clean text is not a perfect modality, and "after six" needs the word order (or at
least the pair) to be read as seven. Clean captions are drawn once per sample from a seed of their
own, like the utterances' speakers; they are a pure function of the labels, computed when the
dataset loads (milliseconds) and checked against `captions_sha256` in the shipped manifest.

Noise (`add_token_noise`) replaces each token independently with probability `noise` by a word
drawn uniformly from the whole vocabulary (digit names and clues included, so noise also
misleads); the dataset draws it per sample and preset, as it draws the audio and image noise.
"""

from __future__ import annotations

import hashlib

import numpy as np

CAPTION_SEED = 0
CAPTION_LENGTH = 8
N_CLUES = 2
PAD = "<pad>"  # id 0; a caption never contains it, a method's zeroed input is all of it

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
KIND = ("square", "square", "prime", "prime", "square", "prime", "perfect", "prime", "cube", "square")
CLUE_WORDS = ("odd", "even", "small", "large", "after", "before", "prime", "square", "perfect", "cube")
FILLERS = ("a", "the", "number", "digit", "is", "this", "shows", "written", "here", "looks", "like", "maybe")
VOCAB: tuple[str, ...] = (PAD, *NAMES, *CLUE_WORDS, *FILLERS)
TOKEN_ID = {word: i for i, word in enumerate(VOCAB)}


def clues(digit: int) -> list[tuple[str, ...]]:
    """Every clue phrase that describes `digit` (5 or 6 of them)."""
    phrases = [(NAMES[digit],), ("odd",) if digit % 2 else ("even",), ("small",) if digit < 5 else ("large",)]
    if digit > 0:
        phrases.append(("after", NAMES[digit - 1]))
    if digit < 9:
        phrases.append(("before", NAMES[digit + 1]))
    phrases.append((KIND[digit],))
    return phrases


def caption_words(digit: int, rng: np.random.Generator) -> list[str]:
    """One clean caption of `digit`: N_CLUES of its clues and fillers, in a random order."""
    options = clues(digit)
    chosen = [options[i] for i in rng.choice(len(options), size=N_CLUES, replace=False)]
    n_fill = CAPTION_LENGTH - sum(len(c) for c in chosen)
    chunks = chosen + [(FILLERS[i],) for i in rng.integers(len(FILLERS), size=n_fill)]
    return [word for k in rng.permutation(len(chunks)) for word in chunks[k]]


def draw_captions(labels: np.ndarray, seed: int = CAPTION_SEED) -> np.ndarray:
    """Clean captions of every sample as token ids, int64 (N, CAPTION_LENGTH); sample i's caption
    depends only on (seed, i, its label)."""
    return np.array([[TOKEN_ID[w] for w in caption_words(int(d), np.random.default_rng([seed, i]))]
                     for i, d in enumerate(labels)], dtype=np.int64)


def add_token_noise(tokens: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """`tokens` with each replaced, with probability `noise`, by a uniform word of the vocabulary
    (never the pad)."""
    replace = rng.random(tokens.shape) < noise
    random_words = rng.integers(1, len(VOCAB), size=tokens.shape)
    return np.where(replace, random_words, tokens)


def captions_sha256(captions: np.ndarray) -> str:
    """sha256 of the little-endian int64 token ids."""
    return hashlib.sha256(np.ascontiguousarray(captions, dtype="<i8").tobytes()).hexdigest()


def decode(tokens: np.ndarray) -> str:
    """A caption as words (for reading and tests)."""
    return " ".join(VOCAB[int(t)] for t in tokens)
