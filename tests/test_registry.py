"""Registry.create: a registered class built from its config section, as timm's create_model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Strict
from mmbalance.core.registry import METHODS, Registry


class AdderParams(Strict):
    step: int = 1


def test_create_builds_the_named_class_from_its_section_and_the_harness_arguments():
    things: Registry = Registry("thing")

    @things.register("adder")
    class Adder:
        Params = AdderParams

        def __init__(self, params: AdderParams, base: int) -> None:
            self.value = base + params.step

    assert things.create({"name": "adder", "step": 3}, 10).value == 13
    assert things.params_of({"name": "adder"}) == AdderParams(step=1)
    with pytest.raises(ConfigError, match=r"unknown thing 'addr' \(in model\.x\) \(did you mean 'adder'\?\)"):
        things.create({"name": "addr"}, 1, where="model.x")
    with pytest.raises(ValidationError, match="step"):
        things.params_of({"name": "adder", "step": "many"})


def test_params_of_a_built_in_method_are_its_typed_params():
    params = METHODS.params_of({"name": "mie", "epoch_list": [2, 2], "sam": "code"})
    assert type(params).__name__ == "MIEParams" and params.sam == "code" and params.epoch_list == [2, 2]
