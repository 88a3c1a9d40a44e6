"""Raw label names of a source ("kidney_left", "Hippocampus_L") mapped to the vocabulary's canonical terms."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from satseg.errors import SatInputError
from satseg.text import Vocabulary

logger = logging.getLogger(__name__)


def map_label_names(
    classes: Mapping[int, str], vocabulary: Vocabulary, *, source: str = "labels"
) -> tuple[dict[int, str], dict[int, str]]:
    """Resolve each raw name to a canonical term with :meth:`Vocabulary.resolve`.

    Normalisation handles snake_case and trailing sides ("kidney_left" -> "left kidney"); atlas names
    (AAL "Hippocampus_L", SynthSeg's "left hippocampus") resolve as the vocabulary's synonyms. A name that
    does not resolve as written is tried with hyphens as spaces (FreeSurfer's lookup table writes
    "Left-Hippocampus"). A name that still does not resolve is returned in ``unmapped`` and logged as a
    warning naming ``source``: never dropped silently.

    Args:
        classes: label value -> raw name.
        vocabulary: the terms to map to.
        source: what the names belong to, for the warning ("dataset totalseg").

    Returns:
        ``(mapped, unmapped)``: value -> canonical term, and value -> raw name; together they hold every
        value of ``classes``, each in value order. Several values may map to one term.
    """
    mapped: dict[int, str] = {}
    unmapped: dict[int, str] = {}
    for value, name in sorted(classes.items()):
        term = _resolve(name, vocabulary)
        if term is None:
            unmapped[value] = name
        else:
            mapped[value] = term
    if unmapped:
        logger.warning(
            "%s: %d label name(s) not in the vocabulary, kept in the label maps but not used as prompts: %s",
            source,
            len(unmapped),
            ", ".join(f"{value} {name!r}" for value, name in unmapped.items()),
        )
    return mapped, unmapped


def _resolve(name: str, vocabulary: Vocabulary) -> str | None:
    """The term ``name`` names as written, else with hyphens as spaces; ``None`` when neither resolves."""
    # Hyphens only as a fallback: the vocabulary spells some terms with one ("brain-stem").
    for spelling in dict.fromkeys((name, name.replace("-", " "))):
        try:
            return vocabulary.resolve(spelling)
        except SatInputError:
            continue
    return None
