"""`mmbalance bench --quick`: every method and every measurement reported, every number positive
and finite. No timing assertions: the ratios themselves are what the command is for."""

from __future__ import annotations

import json
import math

from mmbalance.bench.cli import main as cli
from mmbalance.bench.perf.bench import SHAPE_NAMES
from mmbalance.bench.perf.steps import SHAPES, VARIANTS


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_bench_reports_every_method_loader_and_the_data_path(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli(["bench", "--quick", "--device", "cpu", "--data-path", "on", "--workers", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    rows = results["steps"]
    assert [r["method"] for r in rows] == [v.label for v in VARIANTS]
    for r in rows:
        for key in ("step_s", "ratio_to_joint", "samples_per_s", "peak_mb", "forward_passes_per_step",
                    "backward_passes_per_step"):
            assert positive_finite(r[key]), (r["method"], key, r[key])
        assert r["method"] in printed
    assert rows[0]["ratio_to_joint"] == 1.0
    by_method = {r["method"]: r for r in rows}
    # pass counts are exact: MIE trains one of two encoders, paper SAM twice per step, code SAM once
    # with two backward passes; MLA one backward per modality; the rest one of each
    assert by_method["mie (paper SAM, stage 2)"]["forward_passes_per_step"] == 1.0
    assert by_method["mie (code SAM, stage 2)"]["forward_passes_per_step"] == 0.5
    assert by_method["mla"]["backward_passes_per_step"] == 2.0
    assert by_method["ogm_ge"]["backward_passes_per_step"] == 1.0
    loaders = results["loaders"]
    assert len(loaders) == 4 and all(positive_finite(r["samples_per_s_per_core"]) for r in loaders)
    assert loaders[0]["vs_decode"] == 1.0
    check = results["data_path"]
    assert all(positive_finite(check[k]) for k in ("resident_step_s", "loaded_step_s", "loaded_vs_resident"))
    for heading in ("Training step", "Loader", "Data path"):
        assert heading in printed


def test_shape_choices_match_the_presets():
    assert sorted(SHAPE_NAMES) == sorted(SHAPES)


def test_unknown_method_is_refused_with_the_allowed_ones(capsys):
    assert cli(["bench", "--quick", "--methods", "ogm_ge,nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "ogm_ge" in err


def test_methods_select_built_in_variants_and_any_registered_method():
    from mmbalance.bench.perf.steps import variants_named

    chosen = variants_named(["mie", "unimodal"])
    assert [v.label for v in chosen] == ["joint", "mie (paper SAM, stage 2)", "mie (code SAM, stage 2)", "unimodal"]
    assert chosen[-1].method == {"name": "unimodal"} and chosen[-1].target is None


def test_a_method_without_default_parameters_is_refused_by_name(capsys):
    assert cli(["bench", "--quick", "--methods", "unimodal"]) == 2
    err = capsys.readouterr().err
    assert "'unimodal'" in err and "modality" in err and "default parameters" in err
