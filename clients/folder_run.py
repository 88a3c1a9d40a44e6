"""Unattended runs over many cases: resumable, concurrent, one bad case never stops the run.

Each case is written into a hidden work folder inside the output folder and swapped into place only when
every file, and last ``case.json``, is written; a killed run leaves no folder that looks complete. A case is
skipped only when its folder's ``case.json`` records the same request, the same input (its
:func:`~satseg_clients.cases.source_identity`) and the same served model (``MODEL``); every other case is done
again. ``run_report.json`` is rewritten (atomically) after every case; the cohort tables
(:mod:`satseg_clients.tables`) are rebuilt from every finished case folder at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from satseg import contract
from satseg.atomic import remove_stale_parts
from satseg.errors import SatInputError, one_line
from satseg.geometry.volume import choose_modality
from satseg.outputs import WARNINGS_KEY, write_json
from satseg.outputs.run_folder import refuse_existing_file, swap_into_place
from satseg_clients.cases import Case, discover_cases, opened_case, source_identity
from satseg_clients.sat_client import (
    DICOM_OUTPUTS,
    SATClient,
    Segmentation,
    ServerUnavailable,
    needs_series,
    parse_output_types,
)
from satseg_clients.tables import (
    STATISTICS_TABLE,
    VOLUMES_TABLE,
    finished_cases,
    statistics_rows,
    volumes_rows,
    write_table,
)

CASE_FILE = "case.json"
REPORT_FILE = "run_report.json"
WORK_FOLDER = ".sat-work"


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based) of a folder run: the cases whose input name hashes to it.

    By the name's hash, not its position, so a shard keeps its cases when others are added to the folder.
    Shards of one run share the output folder (each case folder is written by one shard alone); each has its
    own report and work folder, so none removes another's files.
    """

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` with ``1 <= I <= N``."""
        found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if found is None or not 1 <= int(found[1]) <= int(found[2]):
            raise SatInputError(f"--shard {text!r} must be I/N with 1 <= I <= N, e.g. 2/4")
        return cls(int(found[1]), int(found[2]))

    def holds(self, case: Case) -> bool:
        return int(case.name_hash, 16) % self.count == self.index - 1

    def _suffix(self) -> str:
        return "" if self.count == 1 else f".shard-{self.index}-of-{self.count}"

    @property
    def report_file(self) -> str:
        return f"{Path(REPORT_FILE).stem}{self._suffix()}.json"

    @property
    def work_folder(self) -> str:
        return WORK_FOLDER + self._suffix()

    def table_file(self, name: str) -> str:
        """``volumes.csv`` of a whole run, ``volumes.shard-2-of-4.csv`` of a shard."""
        return f"{Path(name).stem}{self._suffix()}{Path(name).suffix}"


@dataclass(frozen=True)
class RunRequest:
    """What every case of a run is asked for; a case done for another request is done again."""

    prompts: tuple[str, ...]
    modality: str | None = None
    ml: bool = False
    statistics: bool = False
    preview: bool = False
    output_type: str = "nifti"

    def as_json(self) -> dict[str, Any]:
        """The request as ``case.json`` and the report store it (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @property
    def dicom_outputs(self) -> list[str]:
        """The DICOM output types asked for (each needs a DICOM source series)."""
        return [kind for kind in parse_output_types(self.output_type) if kind in DICOM_OUTPUTS]

    @property
    def server_output(self) -> str:
        """What to ask the server for: masks for files per structure, the label map for ``--ml`` and previews."""
        wants_masks = not self.ml or bool(self.dicom_outputs)
        wants_labelmap = self.ml or self.preview
        if wants_masks and wants_labelmap:
            return contract.OUTPUT_BOTH
        return contract.OUTPUT_MASKS if wants_masks else contract.OUTPUT_LABELMAP


@dataclass
class CaseReport:
    """One line of ``run_report.json``: no names or paths, only the case's index and output folder."""

    index: int
    output: str
    status: str = "pending"
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    shape: list[int] | None = None
    megabytes_sent: float | None = None
    transport: str | None = None
    model: str | None = None
    warnings: list[str] = field(default_factory=list)


def read_record(folder: Path) -> dict[str, Any] | None:
    """The ``case.json`` of ``folder`` as a dict, or ``None`` when there is none or it is unreadable."""
    try:
        record = json.loads((folder / CASE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def case_record(
    request: RunRequest, files: list[Path], segmentation: Segmentation, case: Case, identity: str
) -> dict[str, Any]:
    """What ``case.json`` holds: the request, the files, the model, the model grid and the warnings, and the
    input as hashes (never its name)."""
    return {
        "request": request.as_json(),
        "files": sorted(path.name for path in files),
        "model": segmentation.model,
        "model_grid": list(segmentation.result.model_grid),  # the grid the served spec put the windows on
        WARNINGS_KEY: list(segmentation.warnings),
        "source": {"name_sha256": case.name_hash, "identity": identity},
        # What the cohort tables are rebuilt from, whatever output files the request asked for.
        "statistics": dict(zip(segmentation.result.terms, segmentation.result.statistics, strict=True)),
    }


def case_is_complete(folder: Path, request: RunRequest, identity: str, model: str) -> bool:
    """Whether ``folder`` holds a finished case for exactly ``request``, made from the input whose
    :func:`~satseg_clients.cases.source_identity` is ``identity`` by the served model ``model``."""
    record = read_record(folder)
    if record is None:
        return False
    source = record.get("source")
    return (
        record.get("request") == request.as_json()
        and record.get("model") == model
        and isinstance(source, dict)
        and source.get("identity") == identity
        and isinstance(record.get("statistics"), dict)  # a folder from before the tables is done again
        and all((folder / name).is_file() for name in record.get("files", []))
    )


def holds_another_input(folder: Path, identity: str) -> bool:
    """Whether ``folder``'s record names an input other than the one whose identity is ``identity``."""
    source = (read_record(folder) or {}).get("source")
    recorded = source.get("identity") if isinstance(source, dict) else None
    return isinstance(recorded, str) and recorded != identity


def existing_folders(output: Path) -> tuple[dict[str, str], set[str]]:
    """What an earlier run left in ``output``: input name hash -> the case folder recorded for it, and the
    names a case must not take (files, and the run's own report and work folder)."""
    claims: dict[str, str] = {}
    taken = {REPORT_FILE, WORK_FOLDER, VOLUMES_TABLE, STATISTICS_TABLE}
    if not output.is_dir():
        return claims, taken
    for entry in sorted(output.iterdir()):
        if not entry.is_dir():
            taken.add(entry.name)
            continue
        source = (read_record(entry) or {}).get("source")
        digest = source.get("name_sha256") if isinstance(source, dict) else None
        if isinstance(digest, str):
            claims.setdefault(digest, entry.name)
            taken.add(entry.name)  # a second folder for the same name (copied by hand) is nobody's to take
    return claims, taken


def run_cases(input_path: Path, output: Path) -> list[Case]:
    """The cases of ``input_path``, each given the folder of ``output`` an earlier run recorded for it."""
    refuse_existing_file(output)
    return discover_cases(input_path, *existing_folders(output))


def run_case(
    case: Case,
    client: SATClient,
    request: RunRequest,
    output: Path,
    model: str,
    verbose: bool = False,
    work_folder: str = WORK_FOLDER,
) -> CaseReport:
    """Segment one case into ``output/<case.name>``, unless a complete folder for ``request``, this input and
    the served ``model`` is there.

    Any failure fails this case alone; its message names the case by index, not by path, unless ``verbose``.
    """
    report = CaseReport(case.index, case.name)
    final = output / case.name
    work = output / work_folder
    partial = work / f"{case.name}.partial"
    started = time.perf_counter()
    identity: str | None = None
    try:
        # Before reading the input: a file replaced while it is read gets the old identity and is redone.
        identity = source_identity(case.source)
        report.seconds["identity"] = round(time.perf_counter() - started, 3)
        if case_is_complete(final, request, identity, model):
            report.status, report.model = "skipped", model
            return report
        shutil.rmtree(partial, ignore_errors=True)
        with opened_case(case, work) as (volume, series):
            report.shape = list(volume.shape)
            report.seconds["load"] = round(time.perf_counter() - started, 3)
            if request.dicom_outputs and series is None:
                raise SatInputError(f"{needs_series(request.dicom_outputs)}; this case is NIfTI")
            modality = choose_modality(request.modality, volume.modality)
            sent = time.perf_counter()
            segmentation = client.segment(volume, request.prompts, modality, output=request.server_output)
            report.seconds["segment"] = round(time.perf_counter() - sent, 3)
            report.model = segmentation.model
            report.megabytes_sent = round(segmentation.sent_bytes / 1e6, 1)
            report.transport = client.transport
            written = time.perf_counter()
            files = segmentation.save(
                partial,
                ml=request.ml,
                statistics=request.statistics,
                preview=request.preview,
                output_type=request.output_type,
                source_series=series,
            )
            write_json(case_record(request, files, segmentation, case, identity), partial / CASE_FILE)
            report.warnings = list(segmentation.warnings)
            report.seconds["write"] = round(time.perf_counter() - written, 3)
        # One atomic exchange: the case folder is never missing; the earlier one (another request, input or
        # model) ends up at ``partial``, removed below.
        swap_into_place(partial, final)
        report.status = "done"
    except Exception as error:  # one bad case never stops the run
        report.status = "failed"
        report.error = describe(error, case, verbose)
        if identity is not None and holds_another_input(final, identity):
            shutil.rmtree(final, ignore_errors=True)  # results of a replaced input must not pass for this one's
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return report


def describe(error: Exception, case: Case, verbose: bool) -> str:
    """A one-line error; without ``verbose`` the input's path and name are replaced by the case's index."""
    known = isinstance(error, (SatInputError, ServerUnavailable, PermissionError))
    message = str(error) if known else f"{type(error).__name__}: {error}"
    if not verbose:
        for identifying in (str(case.source.resolve()), str(case.source), case.source.name):
            message = message.replace(identifying, f"<case {case.index}>")
    return one_line(message)


def run_folder(
    cases: list[Case],
    make_client: Callable[[], SATClient],
    request: RunRequest,
    output: Path,
    *,
    jobs: int = 1,
    progress: bool = True,
    verbose: bool = False,
    shard: Shard = Shard(),
) -> dict[str, Any]:
    """Run every case (``jobs`` at a time, one client per worker thread) and return the run report, written to
    ``shard.report_file`` (the caller passes the shard's cases).

    Progress and per-case lines go to stderr and name cases by index (and by input path with ``verbose``).
    """
    output.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(output / shard.report_file)  # a run killed while writing its report left one behind
    local = threading.local()

    first = make_client()
    # Needed before any case is skipped; a prompt the server refuses ends the run here, with its reason.
    model = first.model_hash(request.prompts[0], request.modality)

    def run(case: Case) -> CaseReport:
        if not hasattr(local, "client"):
            local.client = make_client()
        return run_case(case, local.client, request, output, model, verbose, shard.work_folder)

    report: dict[str, Any] = {
        "server_version": first.server_version(),
        "model": model,
        # How the served model was run: spacing, crop, normalisation, window, threshold, trained terms.
        "model_spec": first.model_spec(request.prompts[0], request.modality).to_json(),
        "request": request.as_json(),
        "shard": f"{shard.index}/{shard.count}",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cases": [asdict(CaseReport(case.index, case.name)) for case in cases],
    }
    if verbose:
        for entry, case in zip(report["cases"], cases, strict=True):
            entry["input"] = str(case.source)
    position = {case.index: row for row, case in enumerate(cases)}
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(run, case) for case in cases]
        bar = tqdm(as_completed(futures), total=len(cases), unit="case", disable=not progress, desc="cases")
        for future in bar:
            result = future.result()
            with lock:
                report["cases"][position[result.index]].update(asdict(result))
                write_report(report, output / shard.report_file)
            bar.write(f"case {result.index}: {result.status}" + (f" ({result.error})" if result.error else ""))
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_report(report, output / shard.report_file)
    write_tables(report, output, shard)
    shutil.rmtree(output / shard.work_folder, ignore_errors=True)
    return report


def write_tables(report: dict[str, Any], output: Path, shard: Shard = Shard()) -> None:
    """``volumes.csv`` and ``statistics.csv`` of ``report``'s finished cases, from their folders' ``case.json``."""
    cases = finished_cases(report["cases"], lambda folder: (read_record(output / folder) or {}).get("statistics"))
    write_table(volumes_rows(cases), output / shard.table_file(VOLUMES_TABLE))
    write_table(statistics_rows(cases), output / shard.table_file(STATISTICS_TABLE))


def write_report(report: dict[str, Any], path: Path) -> None:
    statuses = [case["status"] for case in report["cases"]]
    report["summary"] = {status: statuses.count(status) for status in ("done", "skipped", "failed", "pending")}
    report["failed_cases"] = [case["index"] for case in report["cases"] if case["status"] == "failed"]
    write_json(report, path)
