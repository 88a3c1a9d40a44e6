"""The query decoder: prompts attend to image tokens; prompts never attend to each other."""

from __future__ import annotations

import torch
from torch import nn


class QueryDecoderLayer(nn.Module):
    """Pre-norm cross-attention then FFN, each with a residual: ``queries [B, N, d] -> [B, N, d]``.

    There is deliberately no self-attention between queries, so each prompt's output depends on
    that prompt alone: splitting the prompt list into chunks gives the same result.
    """

    def __init__(self, d_model: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(d_model)
        self.cross_attention = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.ReLU(inplace=True), nn.Linear(ffn, d_model))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        attended, _ = self.cross_attention(self.norm_attention(queries), tokens + positions, tokens, need_weights=False)
        queries = queries + attended
        return queries + self.ffn(self.norm_ffn(queries))


class QueryDecoder(nn.Module):
    """A stack of :class:`QueryDecoderLayer` and a final LayerNorm.

    ``forward(queries [B, N, d], tokens [B, T, d], positions [T, d]) -> [B, N, d]``; positions are
    added to the keys only.
    """

    def __init__(self, d_model: int, heads: int, ffn: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(QueryDecoderLayer(d_model, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            queries = layer(queries, tokens, positions)
        return self.norm(queries)
