"""What is asked of each case: ``--prompts`` (``"liver,kidney=left kidney+right kidney"``) and the ground truth
of each prompt."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from satseg.errors import SatInputError
from satseg.text import Vocabulary
from satseg_training.evaluation.cases import EvaluationCase

LABELLED = "labelled"
"""The ``--prompts`` item that stands for every term labelled in a case."""


@dataclass(frozen=True)
class Prompt:
    """What is asked (``term``, sent to the model) and the label terms whose union is its ground truth."""

    term: str
    truth: tuple[str, ...]


def parse_prompts(text: str, vocabulary: Vocabulary, *, allow_free_text: bool = False) -> list[Prompt]:
    """Prompts from ``"liver,kidney=left kidney+right kidney"`` (see the EPILOG); the item :data:`LABELLED` is
    left out here (:func:`case_prompts` puts each case's labelled terms in its place).

    Raises:
        SatInputError: no prompts, an unknown prompt (unless ``allow_free_text``) or an unknown label term.
    """
    prompts = []
    items = [part.strip() for part in text.split(",")]
    for item in items:
        if not item or item == LABELLED:
            continue
        spoken, _, parts = item.partition("=")
        term = vocabulary.resolve_all([spoken], allow_free_text=allow_free_text)[0]
        truth = tuple(vocabulary.resolve(name) for name in parts.split("+")) if parts else vocabulary.descendants(term)
        prompts.append(Prompt(term, truth))
    if not prompts and LABELLED not in items:
        raise SatInputError('no prompts in --prompts; pass e.g. "liver,kidney=left kidney+right kidney"')
    return prompts


def case_prompts(case: EvaluationCase, text: str | None, asked: Sequence[Prompt]) -> list[Prompt]:
    """What ``case`` is asked: every labelled term without ``--prompts`` (``text``), else the parsed ``asked``,
    after the case's labelled terms where ``text`` names :data:`LABELLED`."""
    if text is None:
        return labelled_prompts(case)
    if LABELLED not in (part.strip() for part in text.split(",")):
        return list(asked)
    labelled = labelled_prompts(case)
    return labelled + [prompt for prompt in asked if prompt.term not in {item.term for item in labelled}]


def labelled_prompts(case: EvaluationCase) -> list[Prompt]:
    """One prompt per term labelled in ``case`` (values absent from its label map are skipped)."""
    present = set(np.unique(case.labels).tolist())
    terms = sorted({term for value, term in case.classes.items() if value in present})
    return [Prompt(term, (term,)) for term in terms]


def truth_mask(case_labels: np.ndarray, classes: Mapping[int, str], truth: Sequence[str]) -> np.ndarray:
    """Boolean mask of the label values whose term is one of ``truth`` (their union)."""
    values = [value for value, term in classes.items() if term in truth]
    return np.isin(case_labels, values)
