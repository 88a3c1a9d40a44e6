"""Prompt queries during segmentation training, with the text encoder frozen.

The encoder's pooled output for each term never changes while it is frozen, so it is computed once per
term (:func:`pooled_term_features`) and kept as a table; every step then maps the rows it needs through
the trainable part of the text tower: ``projection(pooled) + modality_embedding(modality)``, exactly what
:class:`satseg.model.TextTower` computes after the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from satseg.model import SAT
from satseg.model.text_tower import TextTower, mean_pool
from satseg.text import PromptTokenizer, resolve_text_encoder

TERMS_PER_ENCODER_PASS = 64


@torch.no_grad()
def pooled_term_features(
    text: TextTower, tokenizer: PromptTokenizer, terms: Sequence[str], chunk: int = TERMS_PER_ENCODER_PASS
) -> torch.Tensor:
    """Mean-pooled encoder output of each term: float32 ``[len(terms), hidden]``, one encoder pass per term.

    The encoder runs in eval mode (no dropout) on its current device; the result is on the CPU.
    """
    was_training = text.encoder.training
    text.encoder.eval()
    device = next(text.encoder.parameters()).device
    rows = []
    for start in range(0, len(terms), chunk):
        tokens = {key: value.to(device) for key, value in tokenizer(terms[start : start + chunk]).items()}
        hidden = text.encoder(**tokens).last_hidden_state
        rows.append(mean_pool(hidden, tokens["attention_mask"]).float().cpu())
    text.encoder.train(was_training)
    return torch.cat(rows)


class PromptedSegmentation(nn.Module):
    """The trainable part of SAT: ``(image, term ids, modality ids) -> logits``, the text encoder frozen outside it.

    Holds ``sat``'s vision network, projection MLP and modality embedding (the same module objects, so
    training them trains ``sat``) and a non-persistent buffer of the frozen encoder's pooled features of
    ``terms``. The encoder itself is not a submodule: it gets ``requires_grad = False``, is neither in the
    optimizer nor in training states (it is rebuilt identically on resume), and is exported with ``sat``.
    Deep supervision is switched on (it only acts in training mode).
    """

    def __init__(self, sat: SAT, terms: Sequence[str], tokenizer: PromptTokenizer | None = None) -> None:
        super().__init__()
        self.terms = list(terms)
        self.vision = sat.vision
        self.projection = sat.text.projection
        self.modality_embedding = sat.text.modality_embedding
        self.vision.deep_supervision = True
        sat.text.encoder.requires_grad_(False)
        tokenizer = tokenizer or PromptTokenizer(resolve_text_encoder(sat.config.text_encoder))
        self.register_buffer("pooled", pooled_term_features(sat.text, tokenizer, self.terms), persistent=False)

    def queries(self, term_ids: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        """``term_ids [B, N]`` (rows of ``terms``) and ``modality_ids [B]`` -> queries ``[B, N, d_model]``."""
        return self.projection(self.pooled[term_ids]) + self.modality_embedding(modality_ids)[:, None, :]

    def forward(
        self, image: torch.Tensor, term_ids: torch.Tensor, modality_ids: torch.Tensor
    ) -> torch.Tensor | list[torch.Tensor]:
        """``image [B, 1, H, W, D]`` -> logits ``[B, N, H, W, D]`` (a list with deep supervision in training)."""
        return self.vision(image, self.queries(term_ids, modality_ids))
