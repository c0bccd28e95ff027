"""Encoders cut into their blocks (models/stages.py): block by block is the encoder's forward, for
images and video; the blocks are stable objects that add no state_dict keys; the harness counts a
pass once however the encoder is run; an encoder without stages is named clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mmbalance.bench.train import PassCounter
from mmbalance.core.errors import ConfigError
from mmbalance.core.params import NoParams
from mmbalance.core.types import Modality
from mmbalance.models.resnet import ResNet18Encoder
from mmbalance.models.small import MLPEncoder, MLPParams, SmallCNNEncoder, SmallCNNParams
from mmbalance.models.stages import entry_module, run_stages, staged_encoders, stages_of


def encoders() -> list[tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    image, video = Modality("v", "image", (3, 16, 16)), Modality("v", "video", (3, 2, 16, 16))
    return [
        (MLPEncoder(MLPParams(hidden=7, out_dim=5), Modality("a", "vector", (2, 3))), (4, 2, 3)),
        (SmallCNNEncoder(SmallCNNParams(), image), (4, 3, 16, 16)),
        (SmallCNNEncoder(SmallCNNParams(), video), (4, 3, 2, 16, 16)),
        (ResNet18Encoder(NoParams(), image), (4, 3, 16, 16)),
        (ResNet18Encoder(NoParams(), video), (4, 3, 2, 16, 16)),
    ]


@pytest.mark.parametrize("index", range(5))
def test_block_by_block_is_the_forward_pass_and_widths_are_the_blocks_outputs(index):
    encoder, shape = encoders()[index]
    encoder.eval()
    x = torch.randn(*shape)
    stages = encoder.stages()
    with torch.no_grad():
        assert torch.equal(run_stages(stages, x), encoder(x))
        h, t = stages.enter(x)
        for block, width in zip(stages.blocks, stages.widths, strict=True):
            h = block(h)
            assert h.shape[1] == width
        assert torch.equal(stages.pool(h, t), encoder(x))
    assert encoder.stages().blocks == stages.blocks  # the same objects at every call


def test_the_blocks_add_no_state_dict_keys():
    mlp, cnn = encoders()[0][0], encoders()[1][0]
    assert list(mlp.state_dict()) == ["net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"]
    assert all(k.startswith("features.") for k in cnn.state_dict())
    resnet = encoders()[3][0]
    assert {k.split(".")[0] for k in resnet.state_dict()} == {"stem", "layers"}


def test_a_pass_counts_once_whether_the_encoder_or_its_blocks_run():
    encoder, shape = encoders()[0]
    counter = PassCounter(nn.ModuleDict({"a": encoder}))
    x = torch.randn(*shape)
    encoder(x)
    run_stages(encoder.stages(), x)
    assert counter.calls == 2
    encoder.eval()
    encoder(x)  # outside a step, evaluation passes are not training cost
    assert counter.calls == 2
    with counter.step():
        encoder(x)
    assert counter.calls == 3
    plain = nn.Linear(2, 2)
    assert entry_module(plain) is plain and entry_module(encoder) is encoder.stages().blocks[0]


def test_an_encoder_without_stages_is_named_with_those_that_have_them():
    assert staged_encoders() == ["mlp", "resnet18", "small_cnn"]
    with pytest.raises(ConfigError, match=r"^method x runs between the encoders' blocks, but encoder 'Linear' "
                                          r"\(model.encoders.audio\) does not expose its stages; encoders that do: "
                                          r"mlp, resnet18, small_cnn$"):
        stages_of(nn.Linear(2, 2), "audio", "method x")
