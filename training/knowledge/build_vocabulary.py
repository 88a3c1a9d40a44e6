"""Regenerate ``satseg/text/vocabulary.json`` from the knowledge tree.

The vocabulary holds every concept of ``training/knowledge/anatomy.jsonl`` that can be segmented
(it has modalities): its term, synonyms, children, modalities, region, label source and whether it is
one connected body, in the packaged file's layout, so a regenerated file differs only where the tree
changed::

    python -m satseg_training.knowledge.build_vocabulary           # rewrite the packaged vocabulary
    python -m satseg_training.knowledge.build_vocabulary --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from satseg.atomic import write_bytes_atomically
from satseg.text import vocabulary as vocabulary_module
from satseg_training.knowledge.tree import Concept, KnowledgeTree

PACKAGED_VOCABULARY = Path(vocabulary_module.__file__).with_name("vocabulary.json")
OWN_SOURCE = "satseg"
"""The ``source`` of a vocabulary term with no labels of its own (a parent made of its children)."""


def vocabulary_entry(concept: Concept) -> dict[str, Any]:
    """One ``terms`` entry of the vocabulary file; ``children`` only for parents."""
    entry: dict[str, Any] = {"term": concept.term, "synonyms": sorted(concept.synonyms)}
    if concept.children:
        entry["children"] = list(concept.children)
    entry["modalities"] = list(concept.modalities)
    entry["region"] = concept.region
    entry["source"] = "+".join(concept.label_sources) or OWN_SOURCE
    if concept.single_component:
        entry["single_component"] = True
    return entry


def vocabulary_document(tree: KnowledgeTree) -> dict[str, Any]:
    """The vocabulary file's content: every concept with modalities, sorted by term."""
    terms = [vocabulary_entry(concept) for concept in tree.concepts if concept.modalities]
    return {"version": vocabulary_module.VOCABULARY_FORMAT_VERSION, "terms": terms}


def format_vocabulary(document: dict[str, Any]) -> str:
    """``document`` as the packaged file writes it: one key per line, lists on one line."""
    entries = []
    for entry in document["terms"]:
        fields = ",\n".join(
            f"      {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}" for key, value in entry.items()
        )
        entries.append("    {\n" + fields + "\n    }")
    body = ",\n".join(entries)
    return f'{{\n  "version": {document["version"]},\n  "terms": [\n{body}\n  ]\n}}\n'


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` compare) the vocabulary built from the knowledge tree."""
    parser = argparse.ArgumentParser(
        prog="python -m satseg_training.knowledge.build_vocabulary",
        description="Regenerate satseg/text/vocabulary.json from the knowledge tree, training/knowledge/anatomy.jsonl.",
    )
    parser.add_argument("--tree", type=Path, help="knowledge tree (JSON lines); default: the packaged anatomy.jsonl")
    parser.add_argument("--output", type=Path, default=PACKAGED_VOCABULARY, help="vocabulary file to write")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if --output is out of date")
    args = parser.parse_args(argv)
    tree = KnowledgeTree.load(args.tree)
    text = format_vocabulary(vocabulary_document(tree))
    current = args.output.read_text("utf-8") if args.output.exists() else None
    if args.check:
        if current != text:
            print(f"{args.output} is out of date; run python -m satseg_training.knowledge.build_vocabulary")
            return 1
        print(f"{args.output} is up to date")
        return 0
    if current != text:
        write_bytes_atomically(args.output, text.encode("utf-8"))
    terms = len(vocabulary_document(tree)["terms"])
    print(f"{args.output}: {terms} terms from {len(tree)} concepts ({'rewritten' if current != text else 'unchanged'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
