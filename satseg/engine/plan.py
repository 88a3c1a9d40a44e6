"""The prompt plan: which query rows the model is asked for, per prompt, and what the answer must be read with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from satseg.spec import ModelSpec
from satseg.text.vocabulary import Vocabulary, untrained_warning


@dataclass(frozen=True)
class PromptPlan:
    """How the answer to ``terms`` is put together from the model's query rows.

    Attributes:
        terms: the resolved prompts, in order.
        counts: per term, how many consecutive query rows it is the union of (a parent "kidney" the model was not
            trained on is its trained children, "left kidney" and "right kidney").
        single_component: per query row, whether its mask keeps only its largest connected piece.
        warnings: one line each that the answer must be read with (prompts outside the trained terms).
    """

    terms: tuple[str, ...]
    counts: tuple[int, ...]
    single_component: tuple[bool, ...]
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.terms) or sum(self.counts) != len(self.single_component):
            raise ValueError(
                f"a plan of {len(self.terms)} terms needs one count each and one flag per row, got "
                f"{len(self.counts)} counts summing to {sum(self.counts)} and {len(self.single_component)} flags"
            )


def plan_prompts(
    terms: Sequence[str],
    vocabulary: Vocabulary,
    spec: ModelSpec,
    *,
    keep_largest_component: bool = True,
    flag_untrained: bool = True,
) -> tuple[PromptPlan, list[str]]:
    """The plan for resolved ``terms`` under ``spec``, and the term of each query row to embed.

    Args:
        keep_largest_component: apply the spec's single-component rule (``False``: keep every piece).
        flag_untrained: warn about terms outside the spec's trained terms (``False`` for untrained weights,
            whose every answer is meaningless anyway).
    """
    trained = frozenset(spec.trained_terms) if spec.trained_terms is not None else None
    components = [vocabulary.expand(term, trained) for term in terms]
    rows = [row for parts in components for row in parts]
    single = spec.single_component(rows) if keep_largest_component else [False] * len(rows)
    unknown = vocabulary.untrained(terms, trained) if flag_untrained else []
    plan = PromptPlan(
        terms=tuple(terms),
        counts=tuple(len(parts) for parts in components),
        single_component=tuple(single),
        warnings=(untrained_warning(unknown),) if unknown else (),
    )
    return plan, rows
