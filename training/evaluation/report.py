"""The means, comparisons and Markdown report of evaluation rows."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from satseg_training.evaluation.cases import INPUT_GEOMETRY

NO_REGION = "other"
ALL_REGIONS = "all"
CANDIDATE, BASELINE = "candidate", "baseline"
SINGLE_LABEL, UNION = "single label", "union of labels"
"""Prompt kinds: the ground truth is one labelled term ("left thalamus"), or several ("thalamus")."""


def group_means(
    rows: Sequence[dict[str, Any]], key: str, group: Callable[[dict[str, Any]], str]
) -> list[dict[str, Any]]:
    """Mean Dice and NSD per (model, geometry, ``group(row)``), and per (model, geometry) over all (``"all"``).

    Rows whose ground truth is empty are left out (their Dice only says whether anything was predicted).
    Each item holds model, geometry, ``key`` (the group), structures (rows averaged), dice and nsd.
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["truth_voxels"]:
            model = row.get("model", CANDIDATE)
            groups[(model, row["geometry"], group(row))].append(row)
            groups[(model, row["geometry"], ALL_REGIONS)].append(row)
    return [
        {
            "model": model,
            "geometry": geometry,
            key: name,
            "structures": len(members),
            "dice": float(np.mean([row["dice"] for row in members])),
            "nsd": float(np.mean([row["nsd"] for row in members])),
        }
        for (model, geometry, name), members in sorted(groups.items())
    ]


def region_summary(rows: Sequence[dict[str, Any]], regions: Mapping[str, str | None]) -> list[dict[str, Any]]:
    """:func:`group_means` by the vocabulary's region of each structure (``regions``: term -> region)."""
    return group_means(rows, "region", lambda row: regions.get(row["structure"]) or NO_REGION)


def kind_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`group_means` by prompt kind: single-label prompts ("left thalamus") apart from unions ("thalamus")."""
    return group_means(rows, "kind", lambda row: row["kind"])


def structure_means(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (geometry, structure), the mean Dice and NSD over the cases with ground truth, per model.

    Each item: geometry, structure, cases, and ``dice`` / ``nsd`` keyed by model (``candidate``, and
    ``baseline`` when one was evaluated).
    """
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["truth_voxels"]:
            groups[(row["geometry"], row["structure"])][row.get("model", CANDIDATE)].append(row)
    return [
        {
            "geometry": geometry,
            "structure": structure,
            "cases": len(by_model[CANDIDATE]),
            "dice": {model: float(np.mean([row["dice"] for row in members])) for model, members in by_model.items()},
            "nsd": {model: float(np.mean([row["nsd"] for row in members])) for model, members in by_model.items()},
        }
        for (geometry, structure), by_model in groups.items()
    ]


def grid_dependence(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per extra geometry, the candidate's largest ``|Dice - Dice on the input grid|`` over a (case, structure)."""
    candidate = [row for row in rows if row.get("model", CANDIDATE) == CANDIDATE]
    on_input = {(row["case"], row["structure"]): row["dice"] for row in candidate if row["geometry"] == INPUT_GEOMETRY}
    largest: dict[str, float] = {}
    for row in candidate:
        if row["geometry"] != INPUT_GEOMETRY:
            difference = abs(row["dice"] - on_input[(row["case"], row["structure"])])
            largest[row["geometry"]] = max(largest.get(row["geometry"], 0.0), difference)
    return largest


def markdown_report(
    rows: Sequence[dict[str, Any]],
    summaries: Mapping[str, Sequence[dict[str, Any]]],
    dependence: Mapping[str, float],
    settings: Mapping[str, Any],
) -> str:
    """``evaluation.md``: the settings, grid dependence, the summaries (``{"region": ..., "kind": ...}``), the
    per-structure means over cases (each model, and the difference when a baseline was evaluated) and the
    per-case table."""
    tolerance = f"NSD@{settings['tolerance_mm']:g}mm"
    means = structure_means(rows)
    compared = any(BASELINE in item["dice"] for item in means)
    lines = [
        "# SAT evaluation",
        "",
        *(f"- {key}: {value}" for key, value in settings.items()),
        *(
            f"- largest |Dice change| on the {name} grid vs the input grid: {value:.3f}"
            for name, value in dependence.items()
        ),
    ]
    for key, summary in summaries.items():
        lines += [
            "",
            f"## Per {key} (structures with ground truth)",
            "",
            f"| model | geometry | {key} | structures | mean Dice | mean {tolerance} |",
            "|---|---|---|---:|---:|---:|",
            *(
                f"| {item['model']} | {item['geometry']} | {item[key]} | {item['structures']} | {item['dice']:.3f} "
                f"| {item['nsd']:.3f} |"
                for item in summary
            ),
        ]
    lines += ["", "## Per structure, mean over cases", ""]
    if compared:
        lines += [
            f"| geometry | structure | cases | Dice | {tolerance} | baseline Dice | baseline {tolerance} "
            "| Dice change |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {item['geometry']} | {item['structure']} | {item['cases']} | {item['dice'][CANDIDATE]:.3f} "
                f"| {item['nsd'][CANDIDATE]:.3f} | {item['dice'][BASELINE]:.3f} | {item['nsd'][BASELINE]:.3f} "
                f"| {item['dice'][CANDIDATE] - item['dice'][BASELINE]:+.3f} |"
                for item in means
            ),
        ]
    else:
        lines += [
            f"| geometry | structure | cases | Dice | {tolerance} |",
            "|---|---|---:|---:|---:|",
            *(
                f"| {item['geometry']} | {item['structure']} | {item['cases']} | {item['dice'][CANDIDATE]:.3f} "
                f"| {item['nsd'][CANDIDATE]:.3f} |"
                for item in means
            ),
        ]
    lines += [
        "",
        "## Per case",
        "",
        f"| model | case | geometry | structure | Dice | {tolerance} | truth mL | predicted mL |",
        "|---|---|---|---|---:|---:|---:|---:|",
        *(
            f"| {row.get('model', CANDIDATE)} | {row['case']} | {row['geometry']} | {row['structure']} "
            f"| {row['dice']:.3f} | {row['nsd']:.3f} | {row['truth_ml']:.1f} | {row['predicted_ml']:.1f} |"
            for row in rows
        ),
    ]
    return "\n".join(lines) + "\n"
