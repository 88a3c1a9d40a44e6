"""Mask heads: per-prompt embeddings dotted with per-voxel features."""

from __future__ import annotations

import torch
from torch import nn


class MaskHead(nn.Module):
    """Maps decoded queries to a mask embedding and takes its dot product with every voxel.

    ``forward(queries [B, N, d], features [B, C, H, W, D]) -> logits [B, N, H, W, D]`` (unbounded
    reals; a sigmoid per prompt gives independent, possibly overlapping masks).
    """

    def __init__(self, d_model: int, channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, channels))

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bnc,bchwd->bnhwd", self.mlp(queries), features)
