"""Mask heads: per-prompt embeddings dotted with per-voxel features."""

from __future__ import annotations

import torch
from torch import nn


class MaskHead(nn.Module):
    """Maps decoded queries to a mask embedding and takes its dot product with every voxel.

    ``forward(queries [B, N, d], features [B, C, H, W, D]) -> logits [B, N, H, W, D]`` (unbounded
    reals; a sigmoid per prompt gives independent, possibly overlapping masks). The MLP is
    ``Linear(d, hidden), GELU, Linear(hidden, C)`` (``hidden`` defaults to ``d``), plus a GELU if
    ``final_gelu``.
    """

    def __init__(self, d_model: int, channels: int, hidden: int | None = None, final_gelu: bool = False) -> None:
        super().__init__()
        hidden = hidden or d_model
        layers = [nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, channels)]
        self.mlp = nn.Sequential(*layers, *([nn.GELU()] if final_gelu else []))

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bnc,bchwd->bnhwd", self.mlp(queries), features)
