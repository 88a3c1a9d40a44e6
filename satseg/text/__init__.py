"""Text prompts: the anatomy vocabulary, the text encoder's files, tokenisation and embedding cache.

The vocabulary is plain Python; the tokenizer and the cache (torch, transformers) are imported when first used.
"""

from satseg.lazy import lazy_exports
from satseg.text.encoder_source import DEFAULT_TEXT_ENCODER, resolve_text_encoder
from satseg.text.vocabulary import (
    ALL_TRAINED,
    Term,
    Vocabulary,
    asks_all_trained,
    check_prompts,
    normalize_prompt,
    parse_prompt_list,
    untrained_warning,
)

__getattr__ = lazy_exports(
    __name__,
    {"CacheStats": "cache", "EmbeddingCache": "cache", "tensor_sha256": "cache", "PromptTokenizer": "tokenize"},
)

__all__ = [
    "ALL_TRAINED",
    "DEFAULT_TEXT_ENCODER",
    "CacheStats",
    "EmbeddingCache",
    "PromptTokenizer",
    "Term",
    "Vocabulary",
    "asks_all_trained",
    "check_prompts",
    "normalize_prompt",
    "parse_prompt_list",
    "resolve_text_encoder",
    "tensor_sha256",
    "untrained_warning",
]
