"""The anatomy vocabulary: canonical terms, their synonyms, and prompt resolution.

``vocabulary.json`` beside this module is the source of truth. Prompts are normalised
(:func:`normalize_prompt`) and then looked up among terms and synonyms, so "Kidney_Left",
"left kidney" and "left renal" all resolve to the canonical term "left kidney", which is the
text the encoder sees.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from satseg.contract import MAX_PROMPT_CHARS
from satseg.errors import SatInputError, one_line, quoted
from satseg.geometry.volume import MODALITIES, check_modality

VOCABULARY_FORMAT_VERSION = 1
_PACKAGED_VOCABULARY = "vocabulary.json"
_SIDES = ("left", "right")
_EDGE_PUNCTUATION = re.compile(r"^[\W_]+|[\W_]+$")
_MAX_SUGGESTIONS = 5
_NO_PROMPTS = 'no prompts given; pass one or more anatomy terms, e.g. --prompts "liver,spleen"'
ALL_TRAINED = "all-trained"
"""The prompt list that asks for every term the model was trained on, among those of the volume's modality."""


def normalize_prompt(text: str) -> str:
    """The lookup form of a prompt.

    NFKC, lower case, underscores and whitespace runs become one space, punctuation and symbols
    at either end are dropped, and a trailing side moves to the front (TotalSegmentator's
    snake_case names put it last). Internal punctuation stays ("brain-stem", "heschl's gyrus").

    >>> normalize_prompt("kidney_left")
    'left kidney'
    >>> normalize_prompt("  Adrenal   gland RIGHT. ")
    'right adrenal gland'
    >>> normalize_prompt("ＬＩＶＥＲ")
    'liver'
    >>> normalize_prompt("rib_left_3")
    'rib left 3'
    """
    text = unicodedata.normalize("NFKC", text).lower().replace("_", " ")
    words = _EDGE_PUNCTUATION.sub("", " ".join(text.split())).split()
    if len(words) > 1 and words[-1] in _SIDES and words[0] not in _SIDES:
        words = [words[-1], *words[:-1]]
    return " ".join(words)


def check_prompts(items: Sequence[str], max_prompts: int | None = None) -> list[str]:
    """The one rule every entry point applies to a list of prompts: each stripped, none blank, none longer
    than :data:`MAX_PROMPT_CHARS`, at least one and at most ``max_prompts``.

    Raises:
        SatInputError: naming the first offending item by its position (and a short quotation of it).
    """
    prompts = [item.strip() for item in items]
    if not any(prompts):
        raise SatInputError(_NO_PROMPTS)
    for position, prompt in enumerate(prompts, start=1):
        if not prompt:
            raise SatInputError(
                f"prompt {position} of {len(prompts)} is blank; every item must name an anatomy term, "
                'e.g. "liver,spleen" (no empty items between commas)'
            )
        if len(prompt) > MAX_PROMPT_CHARS:
            raise SatInputError(
                f"prompt {position} ({quoted(prompt)}) is longer than {MAX_PROMPT_CHARS} characters; "
                'pass an anatomy term such as "left kidney"'
            )
    if max_prompts is not None and len(prompts) > max_prompts:
        raise SatInputError(f"{len(prompts)} prompts were sent; at most {max_prompts} per request")
    return prompts


def asks_all_trained(text: str | Sequence[str]) -> bool:
    """Whether a prompt list is :data:`ALL_TRAINED` alone."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return [normalize_prompt(item) for item in items] == [ALL_TRAINED]


def parse_prompt_list(text: str | Sequence[str]) -> list[str]:
    """Prompts from ``"liver, spleen"`` or ``["liver", "spleen"]``, checked by :func:`check_prompts`.

    A string is split on commas; list items are taken whole. Later items that normalise like an earlier one
    are dropped (order kept): a term is segmented once.

    Raises:
        SatInputError: no prompts, a blank or over-long item.
    """
    items = text.split(",") if isinstance(text, str) else text
    prompts: dict[str, str] = {}
    for prompt in check_prompts(items):
        prompts.setdefault(normalize_prompt(prompt), prompt)
    return list(prompts.values())


def untrained_warning(terms: Sequence[str]) -> str:
    """The one-line warning every entry point gives for prompts outside what the weights were trained on."""
    which = "this term" if len(terms) == 1 else "these terms"
    return (
        f"not trained on {', '.join(quoted(term) for term in terms)}: the model runs, but its masks for {which} "
        "are unreliable (sat-checkpoint info lists the known terms)"
    )


def expand_to_trained(
    term: str, children_of: Callable[[str], Sequence[str]], trained_terms: Collection[str]
) -> list[str]:
    """The terms a model trained on ``trained_terms`` is asked for to segment ``term``.

    ``[term]`` when the model was trained on ``term`` itself. Otherwise its children stand in for
    it, each by the same rule, recursively ("lung" -> "left lung" -> its lobes), provided every
    one of them can be covered: the result lists trained terms whose union is ``term``, in
    children order, once each. When some part was never trained, ``[term]``: the prompt goes to
    the model as it is. ``children_of`` gives a term's children (empty for a leaf).
    """
    trained = frozenset(trained_terms)

    def cover(name: str) -> list[str] | None:
        if name in trained:
            return [name]
        children = children_of(name)
        if not children:
            return None
        leaves: list[str] = []
        for child in children:
            part = cover(child)
            if part is None:
                return None
            leaves.extend(part)
        return leaves

    found = cover(term)
    # A leaf reachable through two children (a shared part) is segmented once.
    return [term] if found is None else list(dict.fromkeys(found))


@dataclass(frozen=True)
class Term:
    """One canonical anatomy term.

    Attributes:
        name: the canonical term, normalised, the text the encoder sees ("left kidney").
        synonyms: other spellings that resolve to ``name`` (matched after normalisation).
        modalities: the :data:`MODALITIES` the term can be segmented in: those it has training
            labels in, plus its children's.
        region: body region ("abdomen", "brain", ...), informative only.
        children: terms whose union is this structure ("kidney": "left kidney", "right kidney"),
            so a model not trained on the term itself can segment it from them; empty for a leaf.
        single_component: one connected body, so a mask keeps only its largest connected piece.
    """

    name: str
    synonyms: tuple[str, ...]
    modalities: tuple[str, ...]
    region: str | None
    children: tuple[str, ...] = ()
    single_component: bool = False


def _term_from_json(entry: Any, source: str) -> Term:
    """A :class:`Term` from one ``terms`` entry of a vocabulary file, checked."""
    if not isinstance(entry, dict) or not isinstance(entry.get("term"), str):
        raise SatInputError(f'vocabulary {source}: every entry needs a "term" string, got {entry!r:.80}')
    name = entry["term"]
    if normalize_prompt(name) != name:
        raise SatInputError(
            f'vocabulary {source}: term "{name}" must be written as normalize_prompt gives it, '
            f'"{normalize_prompt(name)}"'
        )
    synonyms = entry.get("synonyms", [])
    modalities = entry.get("modalities", [])
    region = entry.get("region")
    children = entry.get("children", [])
    single_component = entry.get("single_component", False)
    if not (isinstance(synonyms, list) and all(isinstance(s, str) for s in synonyms)):
        raise SatInputError(f'vocabulary {source}: "synonyms" of "{name}" must be a list of strings')
    if not (isinstance(modalities, list) and modalities and set(modalities) <= set(MODALITIES)):
        raise SatInputError(
            f'vocabulary {source}: "modalities" of "{name}" must be a non-empty list of {", ".join(MODALITIES)}'
        )
    if region is not None and not isinstance(region, str):
        raise SatInputError(f'vocabulary {source}: "region" of "{name}" must be a string or null')
    if not (isinstance(children, list) and all(isinstance(c, str) for c in children)):
        raise SatInputError(f'vocabulary {source}: "children" of "{name}" must be a list of strings')
    if not isinstance(single_component, bool):
        raise SatInputError(f'vocabulary {source}: "single_component" of "{name}" must be true or false')
    return Term(name, tuple(synonyms), tuple(modalities), region, tuple(children), single_component)


class Vocabulary:
    """Canonical anatomy terms and the index that resolves prompts to them.

    ``len(vocabulary)`` counts terms; ``prompt in vocabulary`` is true when the prompt resolves
    (as a term or a synonym, after normalisation).
    """

    def __init__(self, terms: Iterable[Term], *, source: str = "<memory>") -> None:
        """Index ``terms``.

        Raises:
            SatInputError: a term is given twice, a term or synonym names two terms, or a child is
                not a term.
        """
        self._terms = tuple(sorted(terms, key=lambda term: term.name))
        self._index: dict[str, str] = {}
        for term in self._terms:
            self._add_key(term.name, term.name, source, is_term=True)
            for synonym in term.synonyms:
                self._add_key(synonym, term.name, source, is_term=False)
        self._by_name = {term.name: term for term in self._terms}
        for term in self._terms:
            unknown = [child for child in term.children if child not in self._by_name]
            if unknown:
                raise SatInputError(
                    f'vocabulary {source}: children of "{term.name}" are not terms: {", ".join(unknown)}'
                )

    def _add_key(self, spelling: str, name: str, source: str, *, is_term: bool) -> None:
        key = normalize_prompt(spelling)
        if not key:
            raise SatInputError(f'vocabulary {source}: "{name}" has an empty term or synonym')
        known = self._index.get(key)
        if is_term and known == name:
            raise SatInputError(f'vocabulary {source}: term "{name}" is listed twice; merge the entries')
        if known is not None and known != name:
            raise SatInputError(
                f'vocabulary {source}: "{spelling}" names both "{known}" and "{name}"; '
                "a term or synonym must name one term"
            )
        self._index[key] = name

    @classmethod
    def load(cls, path: str | Path | None = None) -> Vocabulary:
        """The vocabulary in ``path``, by default the one packaged with satseg.

        Raises:
            SatInputError: the file is missing, is not JSON, or does not follow the format of the
                packaged ``vocabulary.json``.
        """
        if path is None:
            source = _PACKAGED_VOCABULARY
            text = resources.files("satseg.text").joinpath(_PACKAGED_VOCABULARY).read_text("utf-8")
        else:
            source = str(path)
            try:
                text = Path(path).read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise SatInputError(
                    f"cannot read vocabulary {source}: {one_line(str(exc))}; pass a UTF-8 JSON file "
                    "in the format of satseg/text/vocabulary.json"
                ) from exc
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SatInputError(f"vocabulary {source} is not valid JSON: {exc}") from exc
        if not isinstance(document, dict) or document.get("version") != VOCABULARY_FORMAT_VERSION:
            raise SatInputError(
                f"vocabulary {source}: expected a JSON object with "
                f'"version": {VOCABULARY_FORMAT_VERSION} and a "terms" list'
            )
        entries = document.get("terms")
        if not isinstance(entries, list):
            raise SatInputError(f'vocabulary {source}: "terms" must be a list')
        return cls((_term_from_json(entry, source) for entry in entries), source=source)

    @property
    def terms(self) -> tuple[Term, ...]:
        """All terms, sorted by name."""
        return self._terms

    def __len__(self) -> int:
        return len(self._terms)

    def __contains__(self, prompt: object) -> bool:
        return isinstance(prompt, str) and normalize_prompt(prompt) in self._index

    @cached_property
    def sha256(self) -> str:
        """Hex sha256 of the content in canonical form (terms sorted, synonyms and modalities sorted).

        Independent of the file's formatting and entry order; any change to a term, synonym,
        modality, region or child changes it. Checkpoints record it to pair with their vocabulary.
        ``single_component`` is left out: it shapes masks after the model, not what a checkpoint learned.
        """
        canonical = [
            {
                "term": term.name,
                "synonyms": sorted(term.synonyms),
                "modalities": sorted(term.modalities),
                "region": term.region,
                # Only where present, so vocabularies without children keep the hashes they had.
                **({"children": sorted(term.children)} if term.children else {}),
            }
            for term in self._terms
        ]
        document = {"version": VOCABULARY_FORMAT_VERSION, "terms": canonical}
        encoded = json.dumps(document, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(encoded.encode("utf-8")).hexdigest()

    def resolve(self, prompt: str, *, allow_free_text: bool = False) -> str:
        """The canonical term that ``prompt`` names (as a term or synonym, after normalisation).

        With ``allow_free_text`` an unknown prompt is returned normalised, to be sent to the
        encoder as it is.

        Raises:
            SatInputError: the prompt is empty, or unknown without ``allow_free_text`` (the message
                lists up to five closest known terms).
        """
        key = normalize_prompt(prompt)
        if not key:
            raise SatInputError('empty prompt; pass an anatomy term such as "liver" or "left kidney"')
        name = self._index.get(key)
        if name is not None:
            return name
        if allow_free_text:
            return key
        closest = self._closest_terms(key)
        known = (
            f"closest known terms: {', '.join(closest)}"
            if closest
            else "no known term is close (known terms are in satseg/text/vocabulary.json)"
        )
        raise SatInputError(
            f"unknown prompt {quoted(prompt)}; {known}; "
            "pass allow_free_text (--allow-free-text) to send free text to the encoder"
        )

    def resolve_all(self, prompts: str | Sequence[str], *, allow_free_text: bool = False) -> list[str]:
        """Canonical terms for ``prompts`` (parsed by :func:`parse_prompt_list`), duplicates removed.

        Raises:
            SatInputError: no prompts, or a prompt :meth:`resolve` refuses.
        """
        resolved = (self.resolve(p, allow_free_text=allow_free_text) for p in parse_prompt_list(prompts))
        return list(dict.fromkeys(resolved))

    def children_of(self, term: str) -> tuple[str, ...]:
        """The children of the term ``term`` names (a term or synonym): terms whose union it is.

        Empty for a leaf.

        Raises:
            SatInputError: ``term`` is empty or unknown.
        """
        return self._by_name[self.resolve(term)].children

    def descendants(self, term: str) -> tuple[str, ...]:
        """``term`` and every term below it through the children, each once, in the order walked (just
        ``term`` for free text)."""
        found = [term]
        pending = [term]
        while pending:
            current = pending.pop()
            for child in self.children_of(current) if current in self else ():
                if child not in found:
                    found.append(child)
                    pending.append(child)
        return tuple(found)

    def is_single_component(self, term: str) -> bool:
        """Whether ``term`` (a canonical term; free text is not) is one connected body, see :class:`Term`."""
        return term in self._by_name and self._by_name[term].single_component

    def expand(self, term: str, trained_terms: Collection[str] | None) -> list[str]:
        """The terms a model trained on ``trained_terms`` is asked for to segment the resolved ``term``.

        See :func:`expand_to_trained`. ``[term]`` for free text (not a term) and when the trained
        terms are not known (``None``).
        """
        if trained_terms is None:
            return [term]
        by_name = self._by_name
        return expand_to_trained(term, lambda name: by_name[name].children if name in by_name else (), trained_terms)

    def untrained(self, terms: Sequence[str], trained_terms: Collection[str] | None) -> list[str]:
        """The resolved ``terms`` a model trained on ``trained_terms`` does not know: neither trained on them nor
        on every child that makes them up (a parent whose children were trained counts as known). ``[]`` when
        the trained terms are not recorded (``None``): nothing can be said then.
        """
        if trained_terms is None:
            return []
        trained = frozenset(trained_terms)
        return [term for term in terms if not set(self.expand(term, trained)) <= trained]

    def known_terms(self, trained_terms: Collection[str]) -> list[str]:
        """Every vocabulary term a model trained on ``trained_terms`` knows (trained, or all its parts), sorted."""
        names = [term.name for term in self._terms]
        return sorted(set(names) - set(self.untrained(names, trained_terms)))

    def trained_for(self, trained_terms: Collection[str] | None, modality: str) -> list[str]:
        """What :data:`ALL_TRAINED` asks for: the terms usable with ``modality`` that a model trained on
        ``trained_terms`` was trained on, sorted (every term usable with it where they are not recorded).

        Raises:
            SatInputError: the model was trained on none of them.
        """
        usable = self.for_modality(modality)
        terms = usable if trained_terms is None else sorted(set(usable) & set(trained_terms))
        if not terms:
            raise SatInputError(f"--prompts {ALL_TRAINED}: the model was trained on no {modality} term")
        return terms

    def for_modality(self, modality: str) -> list[str]:
        """Canonical terms usable with ``modality``, sorted.

        Raises:
            SatInputError: ``modality`` is not one of :data:`MODALITIES`.
        """
        name = check_modality(modality)
        return [term.name for term in self._terms if name in term.modalities]

    def _closest_terms(self, key: str) -> list[str]:
        """Up to five canonical terms whose term or synonym spellings look most like ``key``."""
        # Ask for more spellings than needed: several may be synonyms of the same term.
        matches = difflib.get_close_matches(key, self._index, n=4 * _MAX_SUGGESTIONS, cutoff=0.6)
        return list(dict.fromkeys(self._index[match] for match in matches))[:_MAX_SUGGESTIONS]
