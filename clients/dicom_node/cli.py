"""``sat-dicom-node``: the DICOM node between a PACS and the SAT Triton server (run, status, replay)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from satseg.cli.common import cli_parser, run_cli
from satseg.errors import SatInputError
from satseg_clients.dicom_node.config import NodeConfig
from satseg_clients.dicom_node.jobs import FAILED, SEGMENTING, SKIPPED, STATES, JobStore

PROG = "sat-dicom-node"
LAST_ERRORS = 5
EPILOG = """examples:
  sat-dicom-node run --config dicom_node.toml            # receive, segment, send back; SIGTERM stops it
  sat-dicom-node status --config dicom_node.toml         # the queue, parked series, the last errors
  sat-dicom-node replay --config dicom_node.toml 3fa2c1d0e9b84a77   # send a parked series through again

Series arrive by C-STORE (the node's storage SCP) or from a watched DICOMweb server; each complete series
goes through the config's [[route]] rules to a task of clients/tasks.json, is segmented by the Triton
server and goes back as a DICOM SEG (C-STORE or STOW-RS). Jobs live in <data_dir>/jobs.sqlite: a
kill -9 loses nothing and sends nothing twice. Logs name jobs by id; --verbose adds UIDs.
The config is documented in deploy/dicom_node.toml. Not for clinical use.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser(PROG, "Connect a PACS to a SAT Triton server: DICOM in, DICOM SEG back.", EPILOG)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "serve until SIGTERM"), ("status", "print the queue"), ("replay", "requeue")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", type=Path, required=True, help="the node's TOML config")
        if name == "run":
            command.add_argument("--verbose", action="store_true", help="log UIDs too (they identify patients)")
        if name == "replay":
            command.add_argument("job", help="the job id status shows")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: COMMANDS[args.command](args))


def run(args: argparse.Namespace) -> int:
    from satseg_clients.dicom_node.node import Node

    # Only the node's own lines, unless --verbose: pynetdicom's, highdicom's and pydicom's (warnings included)
    # quote UIDs and header values, which identify patients.
    # A library that sets its own logger's level (pydicom does) reaches the root handler whatever the root's
    # level, so the handler itself lets only the node's lines through.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not args.verbose:
        handler.addFilter(lambda record: record.name.split(".")[0] == "sat-dicom-node")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR, handlers=[handler])
    logging.captureWarnings(True)
    logging.getLogger("sat-dicom-node").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    node = Node(NodeConfig.load(args.config), verbose=args.verbose)
    signal.signal(signal.SIGTERM, lambda *_: node.stop.set())
    node.run()
    return 0


def status(args: argparse.Namespace) -> int:
    config = NodeConfig.load(args.config)
    database = config.data_dir / "jobs.sqlite"
    if not database.is_file():
        raise SatInputError(f"no job database at {database}: the node has not run with this config")
    store = JobStore(database)
    counts = store.counts()
    print("jobs: " + ", ".join(f"{state} {counts[state]}" for state in STATES))
    now = time.time()
    for job in store.jobs((FAILED,)):
        print(f"parked  {job.id}  {job.instances} instances  attempts {job.attempts}  {job.reason}")
    waiting = [job for job in store.jobs() if job.state not in (FAILED, SKIPPED) and job.next_attempt > now]
    for job in waiting:
        print(f"waiting {job.id}  {job.state}, next try in {job.next_attempt - now:.0f} s: {job.reason}")
    for job in store.jobs((SEGMENTING,)):
        print(f"busy    {job.id}  segmenting for {now - (job.started or now):.0f} s")
    errors = sorted((job for job in store.jobs() if job.reason), key=lambda job: job.updated)[-LAST_ERRORS:]
    for job in errors:
        print(f"last    {job.id}  {job.state}: {job.reason}")
    return 0


def replay(args: argparse.Namespace) -> int:
    config = NodeConfig.load(args.config)
    store = JobStore(config.data_dir / "jobs.sqlite")
    job = store.get(args.job)
    if job is None:
        raise SatInputError(f"no job {args.job!r}; sat-dicom-node status lists them")
    if job.state not in (FAILED, SKIPPED):
        raise SatInputError(f"job {job.id} is {job.state}; only failed (parked) or skipped jobs are replayed")
    if not (config.data_dir / "incoming" / job.id).is_dir():
        store.forget(job.id)
        print(f"job {job.id}: its received files are gone, so it is forgotten; send the series to the node again")
        return 0
    store.replay(job.id)
    print(f"job {job.id}: requeued; a running node takes it next")
    return 0


COMMANDS = {"run": run, "status": status, "replay": replay}

if __name__ == "__main__":
    sys.exit(main())
