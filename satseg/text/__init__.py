"""Text prompts: the anatomy vocabulary, the text encoder's files, tokenisation and embedding cache."""

from satseg.text.cache import CacheStats, EmbeddingCache, tensor_sha256
from satseg.text.encoder_source import DEFAULT_TEXT_ENCODER, resolve_text_encoder
from satseg.text.tokenize import PromptTokenizer
from satseg.text.vocabulary import (
    Term,
    Vocabulary,
    check_prompts,
    normalize_prompt,
    parse_prompt_list,
    untrained_warning,
)

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "CacheStats",
    "EmbeddingCache",
    "PromptTokenizer",
    "Term",
    "Vocabulary",
    "check_prompts",
    "normalize_prompt",
    "parse_prompt_list",
    "resolve_text_encoder",
    "tensor_sha256",
    "untrained_warning",
]
