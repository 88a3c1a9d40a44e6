"""Prompt tokenisation for the text tower: canonical terms to padded token ids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

REFERENCE_RULES_FILE = "satseg_reference_tokenizer.json"
"""In a text encoder folder: tokenise as the reference SAT does (:func:`wrap_and_pad`), not as Hugging Face does.

``export/import_sat.py`` writes it (``{"start": "[CLS]", "end": "[SEP]", "max_length": 256}``) beside
the tokenizer files of an imported encoder, so every :class:`PromptTokenizer` of that folder follows it.
"""


def wrap_and_pad(
    token_ids: Sequence[Sequence[int]], start_id: int, end_id: int, max_length: int
) -> dict[str, torch.Tensor]:
    """The reference SAT's batching of N token-id lists (its tokenizer's own special tokens unused).

    Each list becomes ``[start_id, *ids, end_id]``; the batch is padded with id 0 to the longest
    (at most ``max_length``; a longer one keeps its first ``max_length - 1`` ids and ends with
    ``end_id``). The mask is ``input_ids > 0``, so a real token whose id is 0 is masked too.

    Returns:
        ``input_ids`` and ``attention_mask``, both int64 ``[N, L]``, ``L <= max_length``.
    """
    rows = [[start_id, *ids, end_id] for ids in token_ids]
    length = min(max(len(row) for row in rows), max_length)
    input_ids = torch.zeros(len(rows), length, dtype=torch.int64)
    for index, row in enumerate(rows):
        kept = row if len(row) <= length else [*row[: length - 1], end_id]
        input_ids[index, : len(kept)] = torch.tensor(kept, dtype=torch.int64)
    return {"input_ids": input_ids, "attention_mask": (input_ids > 0).to(torch.int64)}


def write_reference_rules(folder: str | Path, start: str = "[CLS]", end: str = "[SEP]", max_length: int = 256) -> Path:
    """Mark the tokenizer in ``folder`` as one to use with :func:`wrap_and_pad` (the reference SAT's rules)."""
    path = Path(folder) / REFERENCE_RULES_FILE
    path.write_text(json.dumps({"start": start, "end": end, "max_length": max_length}, indent=2) + "\n")
    return path


class PromptTokenizer:
    """The Hugging Face tokenizer of a local text encoder folder, with fixed padding rules.

    A folder holding :data:`REFERENCE_RULES_FILE` (an imported reference SAT encoder) is tokenised
    by those rules instead: literal start and end tokens, pad 0, mask ``ids > 0``, and its
    ``max_length``, which takes the place of the argument.

    Args:
        encoder_path: a folder from :func:`satseg.text.encoder_source.resolve_text_encoder`.
        max_length: longest token sequence kept, special tokens included; longer prompts are cut.
    """

    def __init__(self, encoder_path: str | Path, max_length: int = 64) -> None:
        from transformers import AutoTokenizer  # slow import, only needed here

        rules_path = Path(encoder_path) / REFERENCE_RULES_FILE
        self.reference_rules = json.loads(rules_path.read_text()) if rules_path.is_file() else None
        self.max_length = self.reference_rules["max_length"] if self.reference_rules else max_length
        if self.max_length < 2:
            raise ValueError(f"max_length must leave room for the special tokens, got {self.max_length}")
        self._tokenizer = AutoTokenizer.from_pretrained(str(encoder_path), local_files_only=True)

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids for ``texts`` (N >= 1 prompts).

        Returns:
            ``input_ids`` and ``attention_mask``, both int64 ``[N, L]``, padded to the longest
            prompt and cut at ``max_length`` (L <= max_length); the mask is 1 on real tokens.
        """
        if isinstance(texts, str) or not texts:
            raise ValueError("texts must be a non-empty sequence of strings")
        if self.reference_rules:
            to_ids = self._tokenizer.convert_tokens_to_ids
            return wrap_and_pad(
                [to_ids(self._tokenizer.tokenize(text)) for text in texts],
                to_ids(self.reference_rules["start"]),
                to_ids(self.reference_rules["end"]),
                self.max_length,
            )
        batch = self._tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {key: batch[key].to(torch.int64) for key in ("input_ids", "attention_mask")}

    def save(self, folder: str | Path) -> Path:
        """Write the tokenizer files (``AutoTokenizer.from_pretrained`` reads them back) into ``folder``.

        Reference rules, where this tokenizer has them, go along, so the saved copy tokenises alike.
        """
        folder = Path(folder)
        self._tokenizer.save_pretrained(str(folder))
        if self.reference_rules:
            write_reference_rules(folder, self.reference_rules["start"], self.reference_rules["end"], self.max_length)
        return folder
