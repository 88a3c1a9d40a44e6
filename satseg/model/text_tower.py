"""The text tower: a Hugging Face encoder, mean pooling, an MLP and a modality embedding."""

from __future__ import annotations

import os

import torch
from torch import nn


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden_states [N, L, H]`` over the tokens where ``attention_mask [N, L]`` is 1: ``[N, H]``."""
    weights = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def load_hf_encoder(path: str | os.PathLike[str], *, pretrained: bool = True) -> nn.Module:
    """A BERT-family encoder from a local Hugging Face folder (never from a hub).

    With ``pretrained=False`` only the architecture is read, for tests and for checkpoints whose
    encoder weights are loaded afterwards.
    """
    from transformers import AutoConfig, AutoModel  # slow import, only needed here
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its per-tensor bar would clutter every CLI run

    if pretrained:
        return AutoModel.from_pretrained(path, local_files_only=True)
    return AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True))


class TextTower(nn.Module):
    """Turns tokenised prompts into decoder queries.

    ``forward(input_ids [N, L] int64, attention_mask [N, L] int64, modality_ids [N] int64)``
    returns ``[N, d_model]`` float: ``MLP(mean_pool(encoder(tokens))) + modality_embedding``.
    """

    def __init__(self, encoder: nn.Module, hidden_size: int, d_model: int, num_modalities: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.projection = nn.Sequential(nn.Linear(hidden_size, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.modality_embedding = nn.Embedding(num_modalities, d_model)
        # Set when knowledge-pretrained top layers replace the base encoder's (satseg.checkpoint).
        self.trained_encoder_prefixes: tuple[str, ...] = ()
        self.base_encoder_sha256: str | None = None

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, modality_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden_states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = mean_pool(hidden_states, attention_mask)
        return self.projection(pooled) + self.modality_embedding(modality_ids)
