"""A folder run's cohort tables, rebuilt from every finished case folder after each run.

- ``volumes.csv``: one row per case, one column per structure (mL), as TotalSegmentator's users asked for;
- ``statistics.csv``: every statistic of every structure of every case, one per row (long format; a world
  point, a bounding-box corner, becomes one row per axis, ``_x``, ``_y``, ``_z``).

Rows come from each case's ``case.json`` (the statistics the server measured), so a rerun that skips finished
cases still writes the whole table. A failed case has no row, never a row of zeros: ``run_report.json`` lists
it with its reason. Cases are named by their output folder and index, as the report names them.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from satseg.atomic import write_bytes_atomically
from satseg.outputs.statistics import WORLD_POINT_FIELDS

VOLUMES_TABLE = "volumes.csv"
STATISTICS_TABLE = "statistics.csv"
FINISHED = ("done", "skipped")
"""Report statuses whose case folder holds a result of this run's request and model."""
AXES = ("x", "y", "z")

CaseStatistics = tuple[int, str, Mapping[str, Mapping[str, Any]]]
"""A finished case: its index, its output folder, and term -> that structure's statistics."""


def finished_cases(
    cases: Iterable[Mapping[str, Any]], statistics_of: Callable[[str], Mapping[str, Any] | None]
) -> list[CaseStatistics]:
    """``(index, output, statistics)`` of each finished report entry of ``cases``, in report order;
    ``statistics_of(output)`` reads a case folder's statistics (``None`` where it holds none)."""
    rows = []
    for case in cases:
        if case["status"] in FINISHED and (statistics := statistics_of(case["output"])) is not None:
            rows.append((case["index"], case["output"], statistics))
    return rows


def volumes_rows(cases: Sequence[CaseStatistics]) -> list[list[Any]]:
    """The header (``case_index``, ``case``, each structure in first-seen order) and one row per case; a
    structure a case was not asked for is left empty."""
    structures = list(dict.fromkeys(term for _, _, statistics in cases for term in statistics))
    rows: list[list[Any]] = [["case_index", "case", *structures]]
    for index, output, statistics in cases:
        rows.append([index, output, *(statistics.get(term, {}).get("volume_ml", "") for term in structures)])
    return rows


def statistics_rows(cases: Sequence[CaseStatistics]) -> list[list[Any]]:
    """The header and one row per (case, structure, statistic); a JSON null (an empty mask's mean) is empty."""
    rows: list[list[Any]] = [["case_index", "case", "structure", "statistic", "value"]]
    for index, output, statistics in cases:
        for term, entry in statistics.items():
            for name, value in entry.items():
                if name in WORLD_POINT_FIELDS:  # an empty mask's point (None) keeps its three rows, empty
                    point = value or [None] * len(AXES)
                    rows += [
                        [index, output, term, f"{name}_{axis}", cell(item)]
                        for axis, item in zip(AXES, point, strict=True)
                    ]
                else:
                    rows.append([index, output, term, name, cell(value)])
    return rows


def cell(value: Any) -> Any:
    """A CSV cell: JSON null (a statistic an empty mask has no value for) is left empty."""
    return "" if value is None else value


def write_table(rows: Sequence[Sequence[Any]], path: Path) -> Path:
    """``rows`` as a UTF-8 CSV file, written atomically."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return write_bytes_atomically(path, text.getvalue().encode("utf-8"))
