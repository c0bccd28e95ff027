"""The ResNet18 encoder of the reference repos (OGM-GE, MLA, DI-MML), trained from scratch.

No avgpool or fc inside: the layer4 map is mean-pooled here (over space for (B, C, H, W) input;
over time and space for video (B, C, T, H, W), whose frames run through the 2-D network one by
one, so BatchNorm sees B*T frames). Init as after OGM-GE's `weight_init`: kaiming-normal
(fan_out, relu) convs, BatchNorm weight 1 and bias 0 -- which is torchvision's own init.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mmbalance.core.params import NoParams
from mmbalance.core.registry import ENCODERS
from mmbalance.core.types import Modality
from mmbalance.models.frames import fold_time, mean_over_time, require_image_shape
from mmbalance.models.stages import Stages, run_stages


@ENCODERS.register("resnet18")
class ResNet18Encoder(nn.Module):
    Params = NoParams

    def __init__(self, params: NoParams, modality: Modality) -> None:
        super().__init__()
        require_image_shape("resnet18", modality)
        # late: importing torchvision loads torch._dynamo (~1.5 s), which `mmbalance list` need not pay
        from torchvision.models.resnet import BasicBlock, ResNet

        net = ResNet(BasicBlock, [2, 2, 2, 2])
        in_channels = modality.shape[0]
        if in_channels != 3:  # audio: 1 channel; optical flow: 2
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)
        self.out_dim = 512

    def stages(self) -> Stages:
        """stem (conv1, bn1, relu, maxpool), layer1, ..., layer4; pooled over space, then frames."""
        return Stages((self.stem, *self.layers), (64, 64, 128, 256, 512), fold_time, pool_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages(), x)


def pool_map(h: torch.Tensor, t: int) -> torch.Tensor:
    # mean over space, then over frames: with equal-sized frames this is the reference code's
    # adaptive_avg_pool3d over (T, h, w)
    return mean_over_time(h.mean(dim=(2, 3)), t)
