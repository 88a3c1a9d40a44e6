"""Prompt tokenisation for the text tower: canonical terms to padded token ids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


class PromptTokenizer:
    """The Hugging Face tokenizer of a local text encoder folder, with fixed padding rules.

    Args:
        encoder_path: a folder from :func:`satseg.text.encoder_source.resolve_text_encoder`.
        max_length: longest token sequence kept, special tokens included; longer prompts are cut.
    """

    def __init__(self, encoder_path: str | Path, max_length: int = 64) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the special tokens, got {max_length}")
        from transformers import AutoTokenizer  # slow import, only needed here

        self.max_length = max_length
        self._tokenizer = AutoTokenizer.from_pretrained(str(encoder_path), local_files_only=True)

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids for ``texts`` (N >= 1 prompts).

        Returns:
            ``input_ids`` and ``attention_mask``, both int64 ``[N, L]``, padded to the longest
            prompt and cut at ``max_length`` (L <= max_length); the mask is 1 on real tokens.
        """
        if isinstance(texts, str) or not texts:
            raise ValueError("texts must be a non-empty sequence of strings")
        batch = self._tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {key: batch[key].to(torch.int64) for key in ("input_ids", "attention_mask")}

    def save(self, folder: str | Path) -> Path:
        """Write the tokenizer files (``AutoTokenizer.from_pretrained`` reads them back) into ``folder``."""
        folder = Path(folder)
        self._tokenizer.save_pretrained(str(folder))
        return folder
