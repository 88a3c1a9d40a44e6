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


def pool_to_grid(features: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Average-pools ``[B, C, H, W, D]`` to ``[B, C, *grid]`` (each size a multiple of the grid's)."""
    # A fixed kernel = stride (not adaptive pooling) keeps the ONNX graph static and exact.
    kernel = tuple(size // target for size, target in zip(features.shape[2:], grid, strict=True))
    return F.avg_pool3d(features, kernel_size=kernel, stride=kernel)


class ImageTokenizer(nn.Module):
    """Pools every encoder map to the bottleneck grid and maps the concatenation to ``d_model``.

    ``forward(encoder_maps)`` takes the U-Net's encoder maps (``[B, C_i, ...]``, the last being
    the bottleneck) and returns ``tokens [B, T, d_model]`` and ``positions [T, d_model]`` with
    ``T = h * w * d`` of the bottleneck grid.
    """

    def __init__(self, channels: tuple[int, ...], d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.mlp = nn.Sequential(nn.Linear(sum(channels), d_model), nn.GELU(), nn.Linear(d_model, d_model))

    def forward(self, encoder_maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        bottleneck = encoder_maps[-1]
        grid = tuple(bottleneck.shape[2:])
        pooled = [pool_to_grid(features, grid) for features in encoder_maps[:-1]]
        stacked = torch.cat([*pooled, bottleneck], dim=1).flatten(2).transpose(1, 2)
        positions = sinusoidal_position_encoding_3d(grid, self.d_model).to(stacked)  # type: ignore[arg-type]
        return self.mlp(stacked), positions
