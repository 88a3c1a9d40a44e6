"""The 3D U-Net backbone: encoder stages, decoder stages and their feature maps."""

from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Sequential):
    """3x3x3 conv (with bias), affine InstanceNorm (eps 1e-5), LeakyReLU: ``[B, Cin, ...] -> [B, Cout, ...]``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=True),
            nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


def conv_stage(in_channels: int, out_channels: int, num_convs: int, stride: int = 1) -> nn.Sequential:
    """``num_convs`` blocks; the first one downsamples by ``stride`` (a strided conv, as in nnU-Net)."""
    blocks = [ConvBlock(in_channels, out_channels, stride)]
    blocks += [ConvBlock(out_channels, out_channels) for _ in range(num_convs - 1)]
    return nn.Sequential(*blocks)


class UNet3D(nn.Module):
    """Encoder-decoder with skip connections.

    ``forward(image [B, Cin, H, W, D])`` returns ``(encoder_maps, decoder_maps)``:
    ``encoder_maps[i]`` is ``[B, channels[i], H/s_i, W/s_i, D/s_i]`` for every stage (the last is
    the bottleneck) and ``decoder_maps[i]`` the decoder output at the same scale as
    ``encoder_maps[i]``, for ``i < num_stages - 1`` (``decoder_maps[0]`` is full resolution).
    """

    def __init__(
        self, in_channels: int, channels: tuple[int, ...], strides: tuple[int, ...], convs_per_stage: int
    ) -> None:
        super().__init__()
        inputs = (in_channels, *channels[:-1])
        self.encoder = nn.ModuleList(
            conv_stage(cin, cout, convs_per_stage, stride)
            for cin, cout, stride in zip(inputs, channels, strides, strict=True)
        )
        self.upsample = nn.ModuleList(
            nn.ConvTranspose3d(channels[i + 1], channels[i], kernel_size=strides[i + 1], stride=strides[i + 1])
            for i in range(len(channels) - 1)
        )
        self.decoder = nn.ModuleList(
            conv_stage(2 * channels[i], channels[i], convs_per_stage) for i in range(len(channels) - 1)
        )

    def forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        encoder_maps: list[torch.Tensor] = []
        features = image
        for stage in self.encoder:
            features = stage(features)
            encoder_maps.append(features)
        decoder_maps: list[torch.Tensor] = []
        for level in reversed(range(len(self.decoder))):
            upsampled = self.upsample[level](features)
            features = self.decoder[level](torch.cat([upsampled, encoder_maps[level]], dim=1))
            decoder_maps.append(features)
        decoder_maps.reverse()
        return encoder_maps, decoder_maps
