"""``sat-client``: segment one volume or a whole folder of them through a SAT Triton server."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from satseg.cli.common import cli_parser, run_cli
from satseg.errors import SatInputError
from satseg.geometry import MODALITIES
from satseg.text import ALL_TRAINED, asks_all_trained, parse_prompt_list
from satseg_clients.folder_run import RunRequest, Shard, run_cases, run_folder
from satseg_clients.sat_client import (
    DEFAULT_PORTS,
    DEFAULT_RETRY_BUDGET_S,
    OUTPUT_TYPES,
    PROTOCOLS,
    SHARED_MEMORY_MODES,
    SATClient,
    ServerUnavailable,
    parse_output_types,
)
from satseg_clients.tables import STATISTICS_TABLE, VOLUMES_TABLE
from satseg_clients.tasks import load_tasks, task

PROG = "sat-client"


def output_types_argument(text: str) -> str:
    """``--output-type``: the types named, in their canonical order, comma-joined (what ``case.json`` records)."""
    try:
        return ",".join(parse_output_types(text))
    except SatInputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def epilog() -> str:
    tasks = "\n".join(f"  {item.name:<18} {item.description} ({item.modality})" for item in load_tasks().values())
    return f"""examples:
  sat-client -i ct.nii.gz -o out/ --prompts "liver,spleen,left kidney" --statistics --preview
  sat-client -i cases/ -o out/ --task abdomen_organs --jobs 2          # a folder: one sub-folder per case
  sat-client -i series/ -o out/ --task brain_structures --output-type dicom_seg --url pacs-ai:8001
  sat-client -i series/ -o out/ --task abdomen_organs --output-type nifti,dicom_seg,rtstruct

input (-i): a .nii/.nii.gz file, a folder holding one DICOM series, a .zip of one, or a folder of those.
outputs per case (in OUT/<case>/, on the input's grid with its affine):
  <term>.nii.gz or labelmap.nii.gz (--ml), labels.json, statistics.json (--statistics),
  preview.png (--preview), segmentation.dcm (dicom_seg), rtstruct.dcm (rtstruct), case.json (last)
OUT/run_report.json lists every case: status, error, timings, size, server version and model;
OUT/volumes.csv (a row per case, a column per structure, mL) and OUT/statistics.csv (long format).

A run is resumable: a case is skipped only when its folder is complete for the same request, the
same input (size, mtime and a hash of its first and last MiB; for DICOM, of every file's header)
and the same served model; any other case is done again. A folder stays its input's: a new file
whose name would collide with an earlier case's gets a suffixed folder. Outputs appear only when
whole, so an interrupted run loses and duplicates nothing. Exit status: 0 when every case
succeeded, 1 when any failed (the report says which), 2 for bad options.
Logs name cases by index only; --verbose adds input paths (they may hold patient names).

tasks (--task):
{tasks}

Not for clinical use.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser(PROG, "Segment volumes named by text prompts through a SAT Triton server.", epilog())
    parser.add_argument("-i", "--input", type=Path, required=True, help="NIfTI file, DICOM folder, zip, or a folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder (created)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--prompts",
        help=f'comma-separated anatomy terms, e.g. "liver,left kidney"; {ALL_TRAINED} (with --modality): every '
        "term the served model was trained on for the modality",
    )
    what.add_argument("--task", help="a named prompt set (listed below)")
    parser.add_argument(
        "--modality", choices=MODALITIES, help="default: the task's, else the DICOM header's; required for NIfTI"
    )
    parser.add_argument("--url", help="server host:port (default 127.0.0.1:8001 for gRPC, :8000 for HTTP)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="default grpc")
    parser.add_argument("--ml", action="store_true", help="one merged label map instead of a mask per structure")
    parser.add_argument("--statistics", action="store_true", help="statistics.json: mL and voxels per structure")
    parser.add_argument("--preview", action="store_true", help="preview.png: three slices with coloured overlays")
    parser.add_argument(
        "--output-type",
        type=output_types_argument,
        default="nifti",
        help=f"one or more of {', '.join(OUTPUT_TYPES)}, comma-separated, each written from the same result "
        "(default nifti); the DICOM ones need a DICOM source series",
    )
    parser.add_argument("--jobs", type=int, default=1, help="cases in flight at once (default 1)")
    parser.add_argument(
        "--shard",
        type=Shard.parse,
        default=Shard(),
        metavar="I/N",
        help="run only shard I of N of the cases (by input name; N runs with I = 1..N together cover each case "
        "once, into one output folder; each writes run_report.shard-I-of-N.json)",
    )
    parser.add_argument(
        "--shared-memory",
        choices=SHARED_MEMORY_MODES,
        default="auto",
        help="system shared memory with a server on this host (auto: when $SAT_ADMIN_KEY lets it register one)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    parser.add_argument(
        "--retry-budget",
        type=float,
        default=DEFAULT_RETRY_BUDGET_S,
        metavar="SECONDS",
        help="how long to keep retrying an unavailable server, e.g. through a restart "
        f"(default {DEFAULT_RETRY_BUDGET_S:g}; 0: never)",
    )
    parser.add_argument("--verbose", action="store_true", help="name inputs by path in logs and the report")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def run_request(args: argparse.Namespace) -> RunRequest:
    if args.task:
        chosen = task(args.task)
        prompts, modality = tuple(parse_prompt_list(chosen.prompts)), args.modality or chosen.modality
    else:
        prompts, modality = tuple(parse_prompt_list(args.prompts)), args.modality
    if asks_all_trained(prompts) and modality is None:
        raise SatInputError(f"--prompts {ALL_TRAINED} needs --modality: a model's trained terms differ by modality")
    if args.jobs < 1:
        raise SatInputError(f"--jobs {args.jobs} must be at least 1")
    if args.retry_budget < 0:
        raise SatInputError(f"--retry-budget {args.retry_budget:g} must be 0 or more seconds")
    return RunRequest(prompts, modality, args.ml, args.statistics, args.preview, args.output_type)


def run(args: argparse.Namespace) -> int:
    request = run_request(args)
    cases = [case for case in run_cases(args.input, args.output) if args.shard.holds(case)]
    url = args.url or f"127.0.0.1:{DEFAULT_PORTS[args.protocol]}"

    def make_client() -> SATClient:
        return SATClient(
            url,
            args.protocol,
            timeout_s=args.timeout,
            retry_budget_s=args.retry_budget,
            shared_memory=args.shared_memory,
        )

    probe = make_client()
    if not probe.is_ready():
        print(f"{PROG}: waiting up to {args.retry_budget:g} s for a ready server at {url}", file=sys.stderr)
        if not probe.wait_ready():
            raise ServerUnavailable(
                f"no ready SAT server at {url} ({args.protocol}) within {args.retry_budget:g} s; "
                "start one with `just serve`"
            )
    if asks_all_trained(request.prompts):
        assert request.modality is not None  # run_request refuses all-trained without one
        request = replace(request, prompts=tuple(probe.trained_terms(request.modality)))
    print(f"{PROG}: {len(cases)} case(s), {len(request.prompts)} prompt(s), server {url}", file=sys.stderr)
    report = run_folder(
        cases,
        make_client,
        request,
        args.output,
        jobs=args.jobs,
        progress=not args.quiet,
        verbose=args.verbose,
        shard=args.shard,
    )
    summary = report["summary"]
    print(
        f"{PROG}: {summary['done']} done, {summary['skipped']} skipped, {summary['failed']} failed; "
        f"report: {args.output / args.shard.report_file}; tables: {args.shard.table_file(VOLUMES_TABLE)}, "
        f"{args.shard.table_file(STATISTICS_TABLE)}",
        file=sys.stderr,
    )
    return 1 if summary["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        try:
            return run(args)
        except ServerUnavailable as error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return 1

    return run_cli(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
