"""mmbalance: a benchmark suite for multimodal learning under modality imbalance.

The code lives in folders at the top of the checkout, one per layer: `core/` (shared types,
params, errors, registries), `datasets/`, `models/` (encoders, fusion), `methods/` and `bench/`
(the harness), installed under this one import namespace as `mmbalance.core`,
`mmbalance.datasets`, ... (pyproject's `package-dir` mapping), so that the suite coexists with
HuggingFace's `datasets` and any other top-level `bench` or `methods`.
The files the commands need (`configs/`, `results/paper_tables.csv`) ship as package data
(`mmbalance.configs`, `mmbalance.results`), read through `importlib.resources`.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def _source_checkout_path() -> None:
    """Run from a source checkout that is not installed (`python -m pytest` in a fresh clone or a
    git worktree), the subpackages sit beside this folder rather than inside it: add the checkout
    to this package's search path. Installed (editable or wheel), nothing changes: the wheel holds
    them inside, and the editable finder maps them."""
    here = Path(__file__).resolve().parent
    checkout = here.parent
    if not (here / "bench").is_dir() and (checkout / "pyproject.toml").is_file() \
            and (checkout / "bench" / "__init__.py").is_file():
        __path__.append(str(checkout))  # noqa: F821 (the package's own __path__)


_source_checkout_path()
