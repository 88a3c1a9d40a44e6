"""The 3D U-Net backbone: encoder stages, decoder stages and their feature maps."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

OUTPUT_CHANNEL_CHUNK = 16
"""Output channels per convolution when :class:`SkipConvBlock` adds a part to its sum in place: the addend is a
quarter of a 64-channel map, at the speed of the whole convolution (benchmarks/RESULTS.md, "SAT-Nano's window
memory")."""


def in_eager_inference() -> bool:
    """True outside autograd and outside tracing for export: where tensors may be overwritten in place."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling())


class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` that, in eager inference, normalises its input in place.

    The stock kernel allocates a second map and returns it channels-first, so a channels-last network
    pays a full-resolution copy per block and its next convolution a reorder (two ``nano`` maps of
    2 GB each per window). In place, the memory format is kept and nothing is allocated. The input
    must be a temporary nobody else reads, as a convolution's output in :class:`ConvBlock` is.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not in_eager_inference():
            return super().forward(features)
        variance, mean = torch.var_mean(features, dim=(2, 3, 4), keepdim=True, correction=0)
        scale = variance.add_(self.eps).rsqrt_().mul_(self.weight.view(1, -1, 1, 1, 1))
        return features.sub_(mean).mul_(scale).add_(self.bias.view(1, -1, 1, 1, 1))


class ConvBlock(nn.Sequential):
    """3x3x3 conv (with bias), affine InstanceNorm (eps 1e-5), LeakyReLU: ``[B, Cin, ...] -> [B, Cout, ...]``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=True),
            InstanceNorm3d(out_channels, eps=1e-5, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


Part = torch.Tensor | Callable[[], torch.Tensor]
"""A map, or a function that makes it when it is needed."""


class SkipConvBlock(ConvBlock):
    """A :class:`ConvBlock` over the channel concatenation of a list of maps, which it empties.

    ``forward(parts [[B, C_1, ...], [B, C_2, ...], ...]) -> [B, Cout, ...]`` equals the block on
    ``torch.cat(parts, 1)``. In eager inference the concatenation is never made: the convolution runs once
    per part over its slice of the weight, parts taken from the last to the first (a callable part called
    only then), each dropped from the list once used so its memory is freed at once, and each later part
    added in place, :data:`OUTPUT_CHANNEL_CHUNK` output channels at a time. At ``nano``'s full resolution,
    with the decoder's upsampled map made after the skip map is used, a window peaks at about two 2 GB maps
    here instead of six.
    The parameters are those of a plain block, so checkpoints match.
    """

    def forward(self, parts: list[Part]) -> torch.Tensor:  # type: ignore[override]
        conv, norm, activation = self
        if not in_eager_inference():
            # Autograd and export: one convolution over the concatenation. OpenVINO ran the split graph 14% slower
            # end to end on nano (benchmarks/RESULTS.md), and autograd keeps the parts alive anyway.
            maps = [part() if callable(part) else part for part in parts]
            parts.clear()
            if sum(map_.shape[1] for map_ in maps) != conv.in_channels:
                raise self.channel_mismatch()
            return activation(norm(conv(torch.cat(maps, dim=1))))
        total: torch.Tensor | None = None
        stop = conv.in_channels
        while parts:
            taken = parts.pop()
            part = taken() if callable(taken) else taken
            del taken
            start = stop - part.shape[1]
            if start < 0:
                break
            weight = conv.weight[:, start:stop]
            if total is None:
                total = F.conv3d(part, weight, conv.bias, conv.stride, conv.padding)
            else:
                for first in range(0, weight.shape[0], OUTPUT_CHANNEL_CHUNK):
                    rows = slice(first, first + OUTPUT_CHANNEL_CHUNK)
                    total[:, rows].add_(F.conv3d(part, weight[rows], None, conv.stride, conv.padding))
            del part
            stop = start
        if total is None or stop != 0:
            raise self.channel_mismatch()
        return activation(norm(total))

    def channel_mismatch(self) -> ValueError:
        return ValueError(f"the parts do not hold the {self[0].in_channels} channels the convolution takes")


def conv_stage(
    in_channels: int, out_channels: int, num_convs: int, stride: int = 1, *, concatenated_input: bool = False
) -> nn.Sequential:
    """``num_convs`` blocks; the first one downsamples by ``stride`` (a strided conv, as in nnU-Net).

    With ``concatenated_input`` the first block is a :class:`SkipConvBlock` and the stage takes a list of maps.
    """
    first = (SkipConvBlock if concatenated_input else ConvBlock)(in_channels, out_channels, stride)
    return nn.Sequential(first, *(ConvBlock(out_channels, out_channels) for _ in range(num_convs - 1)))


class UNet3D(nn.Module):
    """Encoder-decoder with skip connections.

    :meth:`encode` ``(image [B, Cin, H, W, D])`` returns the encoder maps: ``encoder_maps[i]`` is
    ``[B, channels[i], H/s_i, W/s_i, D/s_i]`` for every stage, the last being the bottleneck.
    :meth:`decode` consumes that list and returns the decoder maps: ``decoder_maps[i]`` is the
    decoder output at the scale of ``encoder_maps[i]``, for ``i < num_stages - 1``
    (``decoder_maps[0]`` is full resolution).
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
            conv_stage(2 * channels[i], channels[i], convs_per_stage, concatenated_input=True)
            for i in range(len(channels) - 1)
        )

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        encoder_maps: list[torch.Tensor] = []
        features = image
        for stage in self.encoder:
            features = stage(features)
            encoder_maps.append(features)
        return encoder_maps

    def decode(self, encoder_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """The decoder maps; ``encoder_maps`` is emptied as its maps are used, so each can be freed then."""
        features = encoder_maps.pop()
        decoder_maps: list[torch.Tensor] = []
        for level in reversed(range(len(self.decoder))):
            # Made lazily: the upsampled map comes to exist only after the skip map is used and freed.
            upsampled = functools.partial(self.upsample[level], features)
            features = self.decoder[level]([upsampled, encoder_maps.pop()])
            decoder_maps.append(features)
        decoder_maps.reverse()
        return decoder_maps
