"""SOLOv2's unified mask features: FPN P2-P5 fused at stride 4 into E channels."""

from typing import Sequence
import torch
from torch import nn

from ..layers import ConvGNReLU, coord_features


class MaskFeatureBranch(nn.Module):
    """Each level is brought to stride 4 by (conv + GN + ReLU, x2 bilinear upsampling) stages,
    one per halving of resolution; the coarsest level gets CoordConv inputs. The sum goes through
    a 1x1 conv + GN + ReLU to ``out_channels`` (E) channels.
    """

    def __init__(
        self, in_channels: int, channels: int, out_channels: int, num_levels: int, dcn="none"
    ):
        super().__init__()
        self.levels = nn.ModuleList()
        for level in range(num_levels):
            stages = []
            for stage in range(max(level, 1)):
                in_ch = channels if stage else in_channels + (2 if level == num_levels - 1 else 0)
                stages.append(ConvGNReLU(in_ch, channels, 3, dcn=dcn))
                if level:
                    stages.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.levels.append(nn.Sequential(*stages))
        self.pred = ConvGNReLU(channels, out_channels, 1, dcn=dcn)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        fused = None
        for level, (x, branch) in enumerate(zip(features, self.levels)):
            if level == len(self.levels) - 1:
                x = torch.cat([x, coord_features(x)], dim=1)
            y = branch(x)
            fused = y if fused is None else fused + y
        return self.pred(fused)
