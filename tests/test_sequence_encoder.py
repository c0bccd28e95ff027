"""The `seq` encoder: BalanceBenchmark's MOSEI transformer transcribed, padding masking, bad params."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError

from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Modality
from mmbalance.models.sequence import SequenceEncoder, SequenceParams, real_frames

T, D = 9, 7
MOD = Modality("audio", "audio", (T, D))


class BalanceBenchTransformer(nn.Module):
    """BalanceBenchmark balancemm/encoders/VisionTransformer_encoder.py (Transformer_Encoder), as released."""

    def __init__(self, input_dim: int, dim: int, n_head: int, n_layers: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(input_dim, dim, kernel_size=1, padding=0, bias=False)
        layer = nn.TransformerEncoderLayer(d_model=dim, nhead=n_head)
        self.transformer = nn.TransformerEncoder(layer, num_layers=n_layers, enable_nested_tensor=False)  # no warning

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.permute([0, 2, 1]))
        x = x.permute([2, 0, 1])
        return self.transformer(x)[-1]


def padded(x: torch.Tensor, front: int) -> torch.Tensor:
    """`x` with `front` all-zero frames before it (the unaligned pickles' padding)."""
    return torch.cat([torch.zeros(x.shape[0], front, x.shape[2]), x], dim=1)


def test_transformer_is_balancebenchmarks_with_mask_off():
    torch.manual_seed(0)
    ref = BalanceBenchTransformer(D, 16, 4, 2)
    ours = SequenceEncoder(SequenceParams(out_dim=16, heads=4, layers=2, ff=2048, mask_padding=False), MOD)
    ours.proj.weight.data.copy_(ref.conv.weight.data[:, :, 0])
    for a, b in zip(ours.net.layers, ref.transformer.layers):
        a.load_state_dict(b.state_dict())
    x = padded(torch.randn(5, T - 3, D), 3)
    # at evaluation (dropout off: in training the two draw their masks over differently laid out
    # tensors, batch-first here and sequence-first there)
    ref.eval()
    ours.eval()
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


@pytest.mark.parametrize("kind,pool", [("transformer", "last"), ("transformer", "mean"), ("gru", "last"),
                                       ("lstm", "last"), ("mean", "last")])
def test_masked_padding_does_not_change_the_feature(kind, pool):
    torch.manual_seed(0)
    enc = SequenceEncoder(SequenceParams(kind=kind, pool=pool, out_dim=8, heads=2), Modality("a", "audio", (T, D)))
    enc.eval()
    x = torch.randn(3, 5, D)
    short = padded(x, T - 5)  # T frames, 4 of them padding
    longer = SequenceEncoder(SequenceParams(kind=kind, pool=pool, out_dim=8, heads=2),
                             Modality("a", "audio", (T + 6, D)))
    longer.load_state_dict(enc.state_dict())
    longer.eval()
    assert torch.allclose(enc(short), longer(padded(x, T + 1)), atol=1e-5)
    # without the mask the padding does change it (the switch's other position)
    enc.params = enc.params.model_copy(update={"mask_padding": False})
    longer.params = longer.params.model_copy(update={"mask_padding": False})
    assert not torch.allclose(enc(short), longer(padded(x, T + 1)), atol=1e-4)


def test_recurrent_nets_see_the_real_frames_in_order():
    torch.manual_seed(0)
    enc = SequenceEncoder(SequenceParams(kind="gru", out_dim=6), MOD)
    x = torch.randn(2, 4, D)
    _, h = enc.net(x)
    assert torch.allclose(enc(padded(x, T - 4)), h[-1], atol=1e-6)


def test_a_row_of_padding_only_is_kept_whole():
    x = torch.zeros(2, T, D)
    x[1, 3] = 1.0
    real = real_frames(x)
    assert real[0].all() and real[1].tolist() == [i == 3 for i in range(T)]
    for kind in ("transformer", "gru", "mean"):
        out = SequenceEncoder(SequenceParams(kind=kind, out_dim=8, heads=2), MOD)(x)
        assert torch.isfinite(out).all()


def test_bad_params_and_shapes_are_refused():
    with pytest.raises(ValidationError, match="multiple of heads"):
        SequenceParams(out_dim=10, heads=4)
    with pytest.raises(ValidationError, match="kind"):
        SequenceParams(kind="conv")
    with pytest.raises(ConfigError, match=r"\(T, D\) feature sequences; modality 'visual' has shape \(3, 32, 32\)"):
        SequenceEncoder(SequenceParams(), Modality("visual", "image", (3, 32, 32)))
