"""The anatomy knowledge tree (``anatomy.jsonl``) and what is built from it: the serving vocabulary, text pairs."""

from satseg_training.knowledge.tree import KNOWLEDGE_FILE, PAIR_KINDS, Concept, KnowledgeTree, Pair

__all__ = ["KNOWLEDGE_FILE", "PAIR_KINDS", "Concept", "KnowledgeTree", "Pair"]
