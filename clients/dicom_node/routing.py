"""Which task a complete series goes to, or why it is skipped: the node's rules over one header of the series."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import pydicom

from satseg_clients.dicom_node.config import Route

NOT_VOLUME_SOP_CLASS_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "a structured report (SR, dose report)",
    "1.2.840.10008.5.1.4.1.1.7": "a secondary capture",
    "1.2.840.10008.5.1.4.1.1.66": "a segmentation or registration",
    "1.2.840.10008.5.1.4.1.1.481.": "an RT object",
    "1.2.840.10008.5.1.4.1.1.11.": "a presentation state",
    "1.2.840.10008.5.1.4.1.1.104.": "an encapsulated document",
}
"""SOP classes that are never a volume, by UID prefix (PS3.4 Annex B), with what to call them in a log."""
SCOUT_IMAGE_TYPES = frozenset({"LOCALIZER", "SCOUT", "SCANOGRAM"})


@dataclass(frozen=True)
class Routing:
    """The decision for one series: the task to run, or ``None`` and the reason it is skipped (without the word
    "skipped", which the job's state already says)."""

    task: str | None
    reason: str


def route(header: pydicom.Dataset, instances: int, routes: Sequence[Route]) -> Routing:
    """Route a series by one of its headers and its instance count (first matching rule wins)."""
    sop_class = str(header.get("SOPClassUID", ""))
    for prefix, kind in NOT_VOLUME_SOP_CLASS_PREFIXES.items():
        if sop_class.startswith(prefix):
            return Routing(None, f"{kind}, not an image volume")
    values = header.get("ImageType", [])
    image_type = {str(value).upper() for value in ([values] if isinstance(values, str) else values)}  # VM 1: a str
    if image_type & SCOUT_IMAGE_TYPES:
        return Routing(None, f"a {'/'.join(sorted(image_type & SCOUT_IMAGE_TYPES)).lower()} series")
    for index, rule in enumerate(routes, 1):
        if matches(rule, header, instances):
            if rule.skip:
                return Routing(None, f"route {index} skips it")
            return Routing(rule.task, f"route {index}: task {rule.task}")
    return Routing(None, "no route matches")


def matches(rule: Route, header: pydicom.Dataset, instances: int) -> bool:
    modality = str(header.get("Modality", ""))
    body_part = str(header.get("BodyPartExamined", ""))
    description = str(header.get("SeriesDescription", ""))
    return (
        (not rule.modality or rule.modality.upper() == modality.upper())
        and (not rule.body_part or rule.body_part.upper() == body_part.upper())
        and (not rule.series_description or re.search(rule.series_description, description, re.I) is not None)
        and instances >= rule.min_slices
    )
