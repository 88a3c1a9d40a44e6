"""The cohort tables of a folder run, from report entries and case statistics (no server)."""

from __future__ import annotations

import csv
from pathlib import Path

from satseg_clients.tables import finished_cases, statistics_rows, volumes_rows, write_table

LIVER = {"voxels": 10, "volume_ml": 1.5, "intensity_mean": 60.0, "bbox_min_ras_mm": [1.0, -2.0, 3.5]}
EMPTY = {"voxels": 0, "volume_ml": 0.0, "intensity_mean": None, "bbox_min_ras_mm": None}
STATISTICS = {"a": {"liver": LIVER, "spleen": EMPTY}, "b": {"liver": LIVER}, "c": {"liver": LIVER}}
REPORT = [
    {"index": 1, "output": "a", "status": "done"},
    {"index": 2, "output": "b", "status": "failed"},
    {"index": 3, "output": "c", "status": "skipped"},
    {"index": 4, "output": "d", "status": "pending"},
]


def test_only_finished_cases_get_rows_and_a_structure_not_asked_is_empty(tmp_path: Path) -> None:
    cases = finished_cases(REPORT, STATISTICS.get)
    assert [(index, output) for index, output, _ in cases] == [(1, "a"), (3, "c")]
    path = write_table(volumes_rows(cases), tmp_path / "volumes.csv")
    with path.open() as table:
        rows = list(csv.DictReader(table))
    assert rows == [
        {"case_index": "1", "case": "a", "liver": "1.5", "spleen": "0.0"},
        {"case_index": "3", "case": "c", "liver": "1.5", "spleen": ""},
    ]


def test_the_long_table_splits_lists_by_axis_and_leaves_nulls_empty() -> None:
    rows = statistics_rows(finished_cases(REPORT[:1], STATISTICS.get))
    assert rows[0] == ["case_index", "case", "structure", "statistic", "value"]
    assert [1, "a", "liver", "bbox_min_ras_mm_y", -2.0] in rows
    assert [1, "a", "spleen", "intensity_mean", ""] in rows
    assert [1, "a", "spleen", "bbox_min_ras_mm_z", ""] in rows  # an empty mask keeps the same rows, empty
    assert not [row for row in rows if row[3] == "bbox_min_ras_mm"]
