"""Prepare and load throughput of every real dataset, measured on its test fixture.

    .venv/bin/python benchmarks/prepare_fixtures.py [--workers 1 2] [--scale 2]

For each dataset and pipeline: write the fixture download (tests/fixtures), run the prepare
(workers as given), then iterate the train split once through the harness's batching (after one
warm-up pass). Prints cache bytes per sample, prepare samples/s and load samples/s, and the
ratio of 2-worker to 1-worker prepare speed. Fixture clips are short and small (48x64 frames,
a few seconds), so absolute prepare speeds are upper bounds for real downloads; bytes per
sample are exact for the cached shapes, which do not depend on the raw resolution.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmbalance.bench.data import SplitLoader  # noqa: E402
from mmbalance.core.registry import DATASETS  # noqa: E402
from mmbalance.datasets.prepare.runner import prepare  # noqa: E402
from tests.fixtures.ave import write_ave  # noqa: E402
from tests.fixtures.cremad import write_cremad  # noqa: E402
from tests.fixtures.food101 import write_food101  # noqa: E402
from tests.fixtures.kinetics_sounds import write_kinetics_sounds  # noqa: E402
from tests.fixtures.manifest import write_audio_image  # noqa: E402
from tests.fixtures.modelnet40 import write_modelnet40  # noqa: E402
from tests.fixtures.mult_pickle import write_iemocap_mla, write_mosei  # noqa: E402
from tests.fixtures.mvsa_single import write_mvsa  # noqa: E402
from tests.fixtures.text import write_tiny_bert  # noqa: E402
from tests.fixtures.ucf101 import write_ucf101  # noqa: E402
from tests.fixtures.vggsound import write_vggsound  # noqa: E402


def fixtures(scale: int) -> dict[str, tuple[Callable[[Path], object], list[str], str]]:
    """dataset -> (fixture writer, pipelines, what --raw is relative to the fixture root)."""
    return {
        "cremad": (lambda r: write_cremad(r, train_per_class=3 * scale), ["ogmge", "mla", "dimml"], ""),
        "kinetics_sounds": (lambda r: write_kinetics_sounds(r, train_per_class=4 * scale), ["ogmge", "mla"], ""),
        "vggsound": (lambda r: write_vggsound(r, train_per_class=4 * scale), ["ogmge"], ""),
        "ave": (lambda r: write_ave(r), ["dimml", "ogmge"], ""),
        "ucf101": (lambda r: write_ucf101(r, train_per_class=3 * scale), ["dimml", "balancebench"], ""),
        "modelnet40": (lambda r: write_modelnet40(r, train_per_class=3 * scale), ["dimml"], ""),
        "manifest": (lambda r: write_audio_image(r, per_class=4 * scale), ["default", "small"], "manifest.csv"),
        # feature sequences of the MulT pickles, at the fixture's short lengths (audio 20, vision 16, text 12)
        "cmu_mosei": (lambda r: write_mosei(r, sizes=(40 * scale, 16, 16)), ["binary", "seven"], ""),
        "iemocap": (lambda r: write_iemocap_mla(r, LISTS, 32 * scale, 16, 16), ["mla", "mult"], ""),
        # the image-text sets tokenize with a tiny BERT written beside the download (TEXT_OPTION)
        "food101": (lambda r: write_food101(r, train_per_class=4 * scale), ["mla", "balancebench"], ""),
        "mvsa_single": (lambda r: write_mvsa(r, {"train": 3 * scale, "dev": 2, "test": 2}), ["mla", "mmbt"], ""),
    }


LISTS = Path(__file__).resolve().parents[1] / "datasets" / "manifests" / "lists"


TEXT_DATASETS = ("food101", "mvsa_single")


def text_options(name: str, raw_root: Path) -> list[str]:
    """`--set text.tokenizer=DIR` with a tiny BERT tokenizer for the image-text sets, else nothing."""
    return [f"text.tokenizer={write_tiny_bert(raw_root.parent / 'bert')}"] if name in TEXT_DATASETS else []


def cache_bytes_per_row(root: Path) -> float:
    from mmbalance.datasets.cache import Cache

    specs = Cache(root).specs  # rows are fixed-size: frame stacks are padded to their T slots
    return sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in specs.values())


def load_rate(name: str, root: Path, pipeline: str) -> float:
    cls = DATASETS.get(name)
    ds = cls(cls.Params.model_validate({"root": str(root), "pipeline": pipeline}))
    loader = SplitLoader(ds.split("train"), 8, torch.device("cpu"))
    for _ in loader(torch.Generator().manual_seed(0)):  # warm-up: page cache, lazy imports
        pass
    start = time.perf_counter()
    n = sum(len(b.labels) for b in loader(torch.Generator().manual_seed(1)))
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--scale", type=int, default=1, help="multiply the fixtures' samples per class")
    parser.add_argument("--only", nargs="*", default=None, help="dataset names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'dataset/pipeline':28s} {'rows':>5s} {'bytes/sample':>13s} "
          + " ".join(f"{'prep w=' + str(w):>10s}" for w in args.workers) + f" {'ratio':>6s} {'load/s':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (write, pipelines, raw_rel) in fixtures(args.scale).items():
            if args.only and name not in args.only:
                continue
            raw_root = Path(tmp) / name / "raw"
            write(raw_root)
            raw = raw_root / raw_rel if raw_rel else raw_root
            options = text_options(name, raw_root)
            for pipe in pipelines:
                rates = []
                for w in args.workers:
                    out = Path(tmp) / name / f"{pipe}-w{w}"
                    report = prepare(name, raw, out, pipe, workers=w, progress=False, options=options)
                    rates.append(report.samples_per_s)
                ratio = rates[-1] / rates[0] if rates[0] else float("nan")
                load = load_rate(name, out, pipe)
                rows = len(report.counts) and sum(c["prepared"] for c in report.counts.values())
                print(f"{name + '/' + pipe:28s} {rows:5d} {cache_bytes_per_row(out):13,.0f} "
                      + " ".join(f"{r:10.1f}" for r in rates) + f" {ratio:6.2f} {load:8.1f}")


if __name__ == "__main__":
    main()
