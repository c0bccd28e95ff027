"""The files the suite ships: run configs, paper recipes, sweeps (`configs/`) and the published
numbers (`results/paper_tables.csv`).

They are package data (`mmbalance.configs`, `mmbalance.results`) found through
`importlib.resources`, so that `mmbalance quickstart`, the recipes and the report's paper-vs-ours
work the same from a checkout, an editable install and a wheel. A user's own files stay paths:
a command's config argument is a file when one exists there, else the name of a shipped config
(`quickstart`, `recipes/mla_cremad.yaml`, `configs/sweeps/ogmge.yaml`; `.yaml` and a leading
`configs/` may be left out).
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from mmbalance.core.errors import ConfigError

log = logging.getLogger(__name__)


def _on_disk(package: str, name: str | None = None) -> Path:
    """A package's folder, or a file in it, as a path (`results/` is a namespace package:
    importlib.resources answers a MultiplexedPath whose `joinpath` is the file's path)."""
    node = resources.files(package)
    if name is not None:
        node = node.joinpath(name)
    if not isinstance(node, Path):  # a zip import; pip never installs the suite that way
        raise ConfigError(f"{package} is not a folder on disk ({node}); install mmbalance with pip")
    return node


def configs_dir() -> Path:
    return _on_disk("mmbalance.configs")


def paper_tables_csv() -> Path:
    """Published numbers, one row per (paper, table, dataset, method, metric)."""
    return _on_disk("mmbalance.results", "paper_tables.csv")


def quickstart_config() -> Path:
    return configs_dir() / "quickstart.yaml"


def shipped_configs() -> list[str]:
    """Every shipped config by the name a command accepts ('quickstart.yaml', 'recipes/x.yaml', ...)."""
    root = configs_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))


def shipped_config(name: str) -> Path | None:
    """The shipped config `name` refers to, if any."""
    name = name.removeprefix("./").removeprefix("configs/")
    for candidate in (name, f"{name}.yaml"):
        path = configs_dir() / candidate
        if candidate.endswith(".yaml") and path.is_file():
            return path
    return None


def config_path(arg: str | Path) -> Path:
    """A command's config argument: the file when it exists, else the shipped config of that
    name; neither is an error naming both places."""
    path = Path(arg)
    if path.is_file():
        return path
    shipped = shipped_config(str(arg))
    if shipped is not None:
        log.debug(f"config {str(arg)!r}: no such file here, the shipped {shipped}")
        return shipped
    raise ConfigError(f"config file {str(arg)!r} does not exist here ({Path.cwd()}) and is not a shipped "
                      f"config; shipped: {', '.join(shipped_configs())}")
