"""The ResNet18 encoder of the reference repos (OGM-GE, MLA, DI-MML), trained from scratch.

No avgpool or fc inside: the layer4 map is mean-pooled here (over space for (B, C, H, W) input;
over time and space for video (B, C, T, H, W), whose frames run through the 2-D network one by
one, so BatchNorm sees B*T frames). Init as after OGM-GE's `weight_init`: kaiming-normal
(fan_out, relu) convs, BatchNorm weight 1 and bias 0 -- which is torchvision's own init.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, ResNet

from bench.config import NoParams
from bench.errors import ConfigError
from bench.registry import ENCODERS
from datasets.base import Modality


@ENCODERS.register("resnet18")
class ResNet18Encoder(nn.Module):
    Params = NoParams

    def __init__(self, params: NoParams, modality: Modality) -> None:
        super().__init__()
        if len(modality.shape) not in (3, 4):
            raise ConfigError(
                f"encoder resnet18 needs (C, H, W) or (C, T, H, W) input; modality "
                f"{modality.name!r} has shape {modality.shape}"
            )
        net = ResNet(BasicBlock, [2, 2, 2, 2])
        in_channels = modality.shape[0]
        if in_channels != 3:  # audio: 1 channel; optical flow: 2
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)
        self.out_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            b, c, t, h, w = x.shape
            maps = self.layers(self.stem(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)))
            # (B*T, 512, h, w) -> mean over frames and space, like adaptive_avg_pool3d on (B, 512, T, h, w)
            return maps.view(b, t, *maps.shape[1:]).mean(dim=(1, 3, 4))
        return self.layers(self.stem(x)).mean(dim=(2, 3))
