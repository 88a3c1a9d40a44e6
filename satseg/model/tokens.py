"""Image tokens: multi-scale encoder features pooled to the bottleneck grid, and their positions."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def sinusoidal_position_encoding_3d(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Fixed 3D sine/cosine encoding of a token grid: ``[h * w * d, dim]`` float32, values in [-1, 1].

    Each axis gets ``2 * (dim // 6)`` channels (sin and cos over geometric frequencies, as in
    the Transformer); the remaining ``dim % 6`` channels are zero. Token order is row-major over
    ``(h, w, d)``, matching ``flatten(2)`` of a ``[B, C, h, w, d]`` map.
    """
    frequencies = dim // 6
    inverse_frequency = torch.exp(-math.log(10000.0) * torch.arange(frequencies, dtype=torch.float32) / frequencies)
    axes = torch.meshgrid(*(torch.arange(size, dtype=torch.float32) for size in grid), indexing="ij")
    parts = []
    for positions in axes:
        angles = positions.reshape(-1, 1) * inverse_frequency
        parts += [angles.sin(), angles.cos()]
    encoding = torch.cat(parts, dim=1)
    return F.pad(encoding, (0, dim - encoding.shape[1]))


def interleaved_position_encoding_3d(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """The reference SAT's fixed 3D encoding of a token grid: ``[h * w * d, dim]`` float32.

    Each axis gets ``c = 2 * ceil(dim / 6)`` channels holding ``sin(p * f_k), cos(p * f_k)`` pairs
    with ``f_k = 10000 ** (-2k / c)``; the axes follow each other (h, then w, then d) and the
    concatenation is cut to ``dim`` channels. Token order is row-major over ``(h, w, d)``.
    """
    channels = 2 * math.ceil(dim / 6)
    inverse_frequency = 1.0 / 10000.0 ** (torch.arange(0, channels, 2, dtype=torch.float32) / channels)
    axes = torch.meshgrid(*(torch.arange(size, dtype=torch.float32) for size in grid), indexing="ij")
    parts = []
    for positions in axes:
        angles = positions.reshape(-1, 1) * inverse_frequency
        parts.append(torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1))
    return torch.cat(parts, dim=1)[:, :dim]


POSITION_ENCODERS = {"blocks": sinusoidal_position_encoding_3d, "interleaved": interleaved_position_encoding_3d}


def pool_to_grid(features: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Average-pools ``[B, C, H, W, D]`` to ``[B, C, *grid]`` (each size a multiple of the grid's)."""
    # A fixed kernel = stride (not adaptive pooling) keeps the ONNX graph static and exact.
    kernel = tuple(size // target for size, target in zip(features.shape[2:], grid, strict=True))
    return F.avg_pool3d(features, kernel_size=kernel, stride=kernel)


class ImageTokenizer(nn.Module):
    """Pools every encoder map to the bottleneck grid and maps the concatenation to ``d_model``.

    ``forward(encoder_maps)`` takes the U-Net's encoder maps (``[B, C_i, ...]``, the last being
    the bottleneck) and returns ``tokens [B, T, d_model]`` and ``positions [T, d_model]`` with
    ``T = h * w * d`` of the bottleneck grid. The MLP is ``Linear(sum C_i, hidden), GELU,
    Linear(hidden, d_model)`` (``hidden`` defaults to ``d_model``), plus a GELU if ``final_gelu``;
    ``position_encoding`` names an entry of :data:`POSITION_ENCODERS`.
    """

    def __init__(
        self,
        channels: tuple[int, ...],
        d_model: int,
        hidden: int | None = None,
        final_gelu: bool = False,
        position_encoding: str = "blocks",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.position_encoder = POSITION_ENCODERS[position_encoding]
        hidden = hidden or d_model
        layers = [nn.Linear(sum(channels), hidden), nn.GELU(), nn.Linear(hidden, d_model)]
        self.mlp = nn.Sequential(*layers, *([nn.GELU()] if final_gelu else []))

    def forward(self, encoder_maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        bottleneck = encoder_maps[-1]
        grid = tuple(bottleneck.shape[2:])
        pooled = [pool_to_grid(features, grid) for features in encoder_maps[:-1]]
        stacked = torch.cat([*pooled, bottleneck], dim=1).flatten(2).transpose(1, 2)
        positions = self.position_encoder(grid, self.d_model).to(stacked)  # type: ignore[arg-type]
        return self.mlp(stacked), positions
