"""The anatomy knowledge tree: definitions, synonyms and kind/part links of every term.

``anatomy.jsonl`` beside this module is the source of truth, one concept per line, sorted by
term, with the keys of :class:`Concept`. It covers every term of the serving vocabulary
(``satseg/text/vocabulary.json`` is generated from it by :mod:`satseg_training.knowledge.build_vocabulary`),
the parents that make whole-structure prompts work ("kidney" is the union of "left kidney" and
"right kidney"), and knowledge-only categories ("organ", "frontal lobe") that have no masks.

Sources say where a concept comes from: the label sets that have masks of it
(:data:`LABEL_SOURCES`), ``wordnet`` where its definition paraphrases a Princeton WordNet gloss,
and ``satseg`` where this project added the concept itself (parents and categories). Definitions
are written for this project.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from satseg.geometry.volume import MODALITIES
from satseg.text import Term, Vocabulary, normalize_prompt
from satseg.text.vocabulary import expand_to_trained

KNOWLEDGE_FILE = Path(__file__).with_name("anatomy.jsonl")
LABEL_SOURCES: tuple[str, ...] = ("totalsegmentator", "synthseg", "aal116")
"""Label sets with masks of a concept, in the order the vocabulary's ``source`` field joins them."""
SOURCES: tuple[str, ...] = (*LABEL_SOURCES, "wordnet", "satseg")
PAIR_KINDS: tuple[str, ...] = ("definition", "synonym", "is_a", "part_of")
_LIST_FIELDS = ("synonyms", "is_a", "part_of", "modalities", "children", "sources")
_FIELDS = ("term", "definition", "region", *_LIST_FIELDS)
_OPTIONAL_FIELDS = ("single_component",)


@dataclass(frozen=True)
class Concept:
    """One anatomy concept of the tree.

    Attributes:
        term: canonical name, normalised as :func:`satseg.text.normalize_prompt` gives it.
        synonyms: other spellings of the term (normalised).
        definition: one or two sentences saying what the structure is.
        is_a: terms this concept is a kind of ("left kidney" is a "kidney").
        part_of: terms this concept is part of ("liver" is part of the "digestive system").
        modalities: where it can be segmented: its own labels' modalities plus its children's;
            empty for a knowledge-only category.
        region: body region ("abdomen", "brain", ...), or None for categories that span regions.
        children: terms whose union IS this structure; empty for a leaf. Never used for mere
            categories ("organ" has no children).
        sources: where it comes from, a subset of :data:`SOURCES`.
        single_component: the structure is one connected body (a liver, one kidney, one vertebra), so its
            mask keeps only its largest connected piece. Written only where true; never for a structure that
            is often seen in pieces (bowel, ribs as a group, vessels that leave the field of view).
    """

    term: str
    synonyms: tuple[str, ...]
    definition: str
    is_a: tuple[str, ...]
    part_of: tuple[str, ...]
    modalities: tuple[str, ...]
    region: str | None
    children: tuple[str, ...]
    sources: tuple[str, ...]
    single_component: bool = False

    @property
    def label_sources(self) -> tuple[str, ...]:
        """The :data:`LABEL_SOURCES` with masks of this concept itself, in that order."""
        return tuple(source for source in LABEL_SOURCES if source in self.sources)


class Pair(NamedTuple):
    """A contrastive training pair: a term and a text that describes it."""

    anchor: str
    positive: str
    kind: str
    """One of :data:`PAIR_KINDS`."""


def relation_sentence(kind: str, target: str) -> str:
    """The text a kind/part link becomes in a training pair: "a kind of organ", "part of the heart"."""
    return f"a kind of {target}" if kind == "is_a" else f"part of the {target}"


def concept_from_json(entry: Any, where: str) -> Concept:
    """A :class:`Concept` from one parsed line of ``anatomy.jsonl``, its fields' types checked.

    Raises:
        ValueError: a field is missing, unexpected or of the wrong type (the message names ``where``).
    """
    if not isinstance(entry, dict) or not set(_FIELDS) <= set(entry) <= {*_FIELDS, *_OPTIONAL_FIELDS}:
        found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(
            f"{where}: expected an object with the keys {', '.join(_FIELDS)} (optionally "
            f"{', '.join(_OPTIONAL_FIELDS)}), got {found}"
        )
    if entry.get("single_component", True) is not True:
        raise ValueError(f'{where}: "single_component" is written only where it is true')
    for name in _LIST_FIELDS:
        if not (isinstance(entry[name], list) and all(isinstance(item, str) for item in entry[name])):
            raise ValueError(f'{where}: "{name}" must be a list of strings')
    if not (isinstance(entry["term"], str) and isinstance(entry["definition"], str) and entry["definition"].strip()):
        raise ValueError(f'{where}: "term" and "definition" must be non-empty strings')
    if entry["region"] is not None and not isinstance(entry["region"], str):
        raise ValueError(f'{where}: "region" must be a string or null')
    lists = {name: tuple(entry[name]) for name in _LIST_FIELDS}
    return Concept(
        term=entry["term"],
        definition=entry["definition"],
        region=entry["region"],
        single_component="single_component" in entry,
        **lists,
    )


class KnowledgeTree:
    """Anatomy concepts with their links, checked for consistency when built.

    ``len(tree)`` counts concepts; ``term in tree`` is true for canonical terms.
    """

    def __init__(self, concepts: Iterable[Concept], *, source: str = "<memory>") -> None:
        """Index and check ``concepts``.

        Raises:
            ValueError: a term or synonym is not normalised, a spelling names two concepts
                (``SatInputError``, a ``ValueError``), a link names an unknown term, the children
                form a cycle, a modality or source is unknown, or a parent's modalities miss
                (or, without labels of its own, exceed) the union of its children's.
        """
        concepts = tuple(concepts)
        self._source = source
        # The vocabulary index refuses a term listed twice or a spelling naming two concepts, and resolves.
        self._index = Vocabulary(
            (Term(c.term, c.synonyms, c.modalities, c.region, c.children, c.single_component) for c in concepts),
            source=source,
        )
        self._concepts = {concept.term: concept for concept in concepts}
        for concept in self._concepts.values():
            self._check(concept)
        for term in self._concepts:
            self._check_acyclic(term, ())

    def _check(self, concept: Concept) -> None:
        where = f'{self._source}: "{concept.term}"'
        for spelling in (concept.term, *concept.synonyms):
            if normalize_prompt(spelling) != spelling:
                raise ValueError(f'{where}: "{spelling}" must be written as normalize_prompt gives it')
        for field in ("is_a", "part_of", "children"):
            unknown = [t for t in getattr(concept, field) if t not in self._concepts or t == concept.term]
            if unknown:
                raise ValueError(f"{where}: {field} names unknown terms or itself: {', '.join(unknown)}")
        if not set(concept.modalities) <= set(MODALITIES):
            raise ValueError(f"{where}: modalities must be among {', '.join(MODALITIES)}")
        if not concept.sources or not set(concept.sources) <= set(SOURCES):
            raise ValueError(f"{where}: sources must be a non-empty subset of {', '.join(SOURCES)}")
        if concept.children:
            union = {m for child in concept.children for m in self._concepts[child].modalities}
            own = set(concept.modalities)
            if not union <= own or (not concept.label_sources and own != union):
                raise ValueError(
                    f"{where}: modalities {sorted(own)} must be its children's {sorted(union)}, "
                    "plus those of its own labels"
                )

    def _check_acyclic(self, term: str, path: tuple[str, ...]) -> None:
        if term in path:
            raise ValueError(f"{self._source}: children form a cycle: {' > '.join((*path, term))}")
        for child in self._concepts[term].children:
            self._check_acyclic(child, (*path, term))

    @classmethod
    def load(cls, path: str | Path | None = None) -> KnowledgeTree:
        """The tree in ``path`` (JSON lines sorted by term), by default ``anatomy.jsonl`` beside this module.

        Raises:
            OSError: the file cannot be read.
            ValueError: a line is not a valid concept, the lines are not sorted by term, or the
                concepts are inconsistent (see :meth:`__init__`).
        """
        path = KNOWLEDGE_FILE if path is None else Path(path)
        concepts = []
        for number, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
            where = f"{path.name}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON: {exc}") from exc
            concepts.append(concept_from_json(entry, where))
        terms = [concept.term for concept in concepts]
        if terms != sorted(terms):
            raise ValueError(f"{path.name}: lines must be sorted by term")
        return cls(concepts, source=path.name)

    @property
    def concepts(self) -> tuple[Concept, ...]:
        """All concepts, sorted by term."""
        return tuple(self._concepts[term] for term in sorted(self._concepts))

    def __len__(self) -> int:
        return len(self._concepts)

    def __contains__(self, term: object) -> bool:
        return term in self._concepts

    def __getitem__(self, term: str) -> Concept:
        """The concept whose canonical term is ``term``.

        Raises:
            KeyError: ``term`` is not a canonical term of the tree.
        """
        try:
            return self._concepts[term]
        except KeyError:
            raise KeyError(f'"{term}" is not a term of the knowledge tree') from None

    def resolve(self, spelling: str) -> str:
        """The canonical term ``spelling`` names, as a term or synonym after normalisation.

        Raises:
            SatInputError: empty or unknown spelling (the message lists the closest terms).
        """
        return self._index.resolve(spelling)

    def children_of(self, term: str) -> tuple[str, ...]:
        """Terms whose union is ``term``; empty for a leaf.

        Raises:
            KeyError: ``term`` is not a canonical term.
        """
        return self[term].children

    def expand(self, term: str, trained_terms: Collection[str]) -> list[str]:
        """The terms a model trained on ``trained_terms`` segments to answer a prompt for ``term``.

        ``[term]`` when the model was trained on ``term`` itself. Otherwise the children stand in
        for it, each by the same rule, recursively ("lung" → "left lung" → its lobes), provided
        every one of them can be covered; the result lists the trained terms whose union is
        ``term``, in the tree's order, once each. When some part cannot be covered, ``[term]``:
        the prompt goes to the model as it is. The serving side applies the same rule to the
        vocabulary built from this tree (:meth:`satseg.text.Vocabulary.expand`).

        Raises:
            KeyError: ``term`` is not a canonical term.
        """
        self[term]  # raises KeyError for an unknown term, which the shared rule would take for a leaf
        return expand_to_trained(term, self.children_of, trained_terms)

    def pairs(self) -> list[Pair]:
        """Contrastive pairs, term first: its definition, each synonym, and each kind/part link as a sentence.

        Relations become :func:`relation_sentence` texts ("a kind of kidney", "part of the heart").
        Concepts in term order; within a concept, in :data:`PAIR_KINDS` order.
        """
        pairs: list[Pair] = []
        for concept in self.concepts:
            pairs.append(Pair(concept.term, concept.definition, "definition"))
            pairs.extend(Pair(concept.term, synonym, "synonym") for synonym in concept.synonyms)
            for kind in ("is_a", "part_of"):
                pairs.extend(Pair(concept.term, relation_sentence(kind, t), kind) for t in getattr(concept, kind))
        return pairs
