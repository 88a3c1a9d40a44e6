"""``sat-loadtest-dicom-node``: N series pushed from M concurrent associations into a real ``sat-dicom-node``.

The node runs in its own process against the served model (a CPU server started here unless ``--url`` names
one) and sends each result by C-STORE to a destination SCP in this process, which counts the SEGs per source
series. The report gives series per minute, the time to drain, the node's peak RSS and the spool's peak
bytes, and reconciles exactly-once delivery three ways: what the destination received, the node's job
database and its Prometheus metrics. Exit status 1 when they disagree or a series did not come back once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from satseg.checkout import BUNDLED_CHECKPOINT, DEFAULT_REPOSITORY
from satseg.cli.common import cli_parser, run_cli
from satseg.server.triton import free_ports
from satseg_clients.dicom_node.demo import scanner_axial, write_dicom_series
from satseg_loadtest.run import RESULTS, served
from satseg_loadtest.scenarios import SCENARIOS

PROG = "sat-loadtest-dicom-node"
SENDER_AE, DESTINATION_AE, NODE_AE = "LOADTEST", "LOADDEST", "SATNODE"
TASK = "demo_abdomen"
TRANSFER_SYNTAXES = {
    "explicit": "ExplicitVRLittleEndian",
    "jpeg2000": "JPEG2000Lossless",
    "jpegls": "JPEGLSLossless",
    "rle": "RLELossless",
}
"""``--transfer-syntax`` choices: pydicom's UID names; the compressed ones are encoded by pydicom's encoders."""
SAMPLE_S = 0.25
"""How often the node's RSS and the spool's bytes are sampled."""

EPILOG = """examples:
  sat-loadtest-dicom-node                                  # 12 series from 4 associations, ct_small
  sat-loadtest-dicom-node --series 40 --senders 8 --settle-s 5
  sat-loadtest-dicom-node --transfer-syntax jpeg2000       # as many PACS send CT: compressed
  sat-loadtest-dicom-node --url 127.0.0.1:8001             # a running Triton server (gRPC)

Each series is a synthetic torso CT written as a DICOM series (the scenario's shape); the node is
'sat-dicom-node run' with the shipped limits, its data in the results folder. Results go to
loadtest/results/<timestamp>-dicom-node/: summary.md and report.json.
"""


@dataclass(frozen=True)
class Report:
    """One run's numbers and its reconciliation."""

    series: int
    senders: int
    transfer_syntax: str
    slices_per_series: int
    bytes_per_series: int
    store_failures: int
    send_seconds: float
    drain_seconds: float
    series_per_minute: float
    node_peak_rss_mb: float
    spool_peak_bytes: int
    segs_per_series: dict[str, int]
    database: dict[str, int]
    metrics: dict[str, float]
    exactly_once: bool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser(PROG, "Load-test sat-dicom-node: many series from concurrent associations.", EPILOG)
    parser.add_argument("--series", type=int, default=12, help="series to push (default 12)")
    parser.add_argument("--senders", type=int, default=4, help="concurrent associations (default 4)")
    parser.add_argument("--scenario", choices=("ct_small", "ct_large"), default="ct_small", help="the CT sent")
    parser.add_argument(
        "--transfer-syntax", choices=sorted(TRANSFER_SYNTAXES), default="explicit", help="how slices are sent"
    )
    parser.add_argument("--settle-s", type=float, default=2.0, help="the node's settle time (default 2 s)")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="give up draining after this (default)")
    parser.add_argument("--url", help="gRPC host:port of a running Triton server (default: start one)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results root (default loadtest/results)")
    parser.add_argument("--checkpoint", type=Path, default=BUNDLED_CHECKPOINT, help="served when no --url")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="served when no --url")
    args = parser.parse_args(argv)
    args.protocol, args.metrics_url = "grpc", None  # what run.served() reads
    return args


class Destination:
    """A storage SCP that takes SEGs and counts them by the source series they reference."""

    def __init__(self, port: int) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import SegmentationStorage

        self.segs: Counter[str] = Counter()
        self._instances: set[str] = set()
        self._lock = threading.Lock()
        ae = AE(ae_title=DESTINATION_AE)
        ae.add_supported_context(SegmentationStorage)
        self._server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on)])

    def _on(self, event: Any) -> int:
        dataset = event.dataset
        source = str(dataset.ReferencedSeriesSequence[0].SeriesInstanceUID)
        with self._lock:
            if str(dataset.SOPInstanceUID) not in self._instances:  # the same SEG again is one result
                self._instances.add(str(dataset.SOPInstanceUID))
                self.segs[source] += 1
        return 0x0000

    def shutdown(self) -> None:
        self._server.shutdown()


def write_series(count: int, scenario: str, syntax: str, folder: Path) -> list[Path]:
    """``count`` synthetic CTs of the scenario's kind (one seed each) as DICOM series under ``folder``, in the
    transfer syntax ``syntax`` (a pydicom UID name)."""
    import pydicom
    from pydicom import uid

    [(_, kind)] = SCENARIOS[scenario]
    written = []
    for index in range(count):
        series = write_dicom_series(scanner_axial(kind.volume(seed=index)), folder / f"series{index:03d}", "load test")
        if getattr(uid, syntax).is_compressed:
            for path in series.iterdir():
                dataset = pydicom.dcmread(path)
                dataset.compress(getattr(uid, syntax))
                dataset.save_as(path, enforce_file_format=True)
        written.append(series)
    return written


def node_config(
    folder: Path, node_port: int, destination_port: int, metrics_port: int, url: str, settle: float
) -> Path:
    """The node's TOML: the shipped limits, DIMSE in from the senders, C-STORE out to the destination."""
    path = folder / "node.toml"
    path.write_text(
        f'data_dir = "node"\nmetrics_port = {metrics_port}\n'
        f'[receive]\nae_title = "{NODE_AE}"\nport = {node_port}\nallowed_calling_ae_titles = ["{SENDER_AE}"]\n'
        f"settle_s = {settle}\n"
        f'[segment]\ntriton_urls = ["{url}"]\n'
        f'[send]\nae_title = "{DESTINATION_AE}"\nport = {destination_port}\n'
        f'[[route]]\nmodality = "CT"\ntask = "{TASK}"\n'
    )
    return path


def push(series: list[Path], port: int, syntax: str) -> int:
    """C-STORE each series' slices over one association, in the transfer syntax ``syntax`` (a pydicom UID name);
    returns how many stores did not succeed."""
    import pydicom
    from pydicom import uid
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(CTImageStorage, [getattr(uid, syntax)])
    association = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not association.is_established:
        return sum(len(list(folder.iterdir())) for folder in series)
    failures = 0
    for folder in series:
        for path in sorted(folder.iterdir()):
            status = association.send_c_store(pydicom.dcmread(path))
            failures += int(getattr(status, "Status", -1) != 0x0000)
    association.release()
    return failures


def node_metrics(port: int) -> dict[str, float]:
    """The node's own metrics (``sat_dicom_node_*``), labelled ones summed."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("sat_dicom_node_") and not sample.name.endswith(("_created", "_bucket")):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


class Sampler(threading.Thread):
    """The node's peak RSS (its VmHWM) and the spool folder's peak bytes, sampled until stopped."""

    def __init__(self, pid: int, spool: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.spool = pid, spool
        self.peak_rss_mb, self.peak_spool_bytes = 0.0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                self.peak_rss_mb = max(self.peak_rss_mb, int(line.split()[1]) / 1024)
        self.peak_spool_bytes = max(self.peak_spool_bytes, folder_bytes(self.spool))


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under ``folder`` (a file renamed or deleted while it is walked counts 0)."""
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size if path.is_file() else 0
    return total


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout_s:.0f} s")
        time.sleep(SAMPLE_S)


def summary(report: Report) -> str:
    once = sum(count == 1 for count in report.segs_per_series.values())
    lines = [
        f"# DICOM node load test: {report.series} series from {report.senders} concurrent associations",
        "",
        f"Each series: {report.slices_per_series} slices, {report.bytes_per_series / 1e6:.1f} MB, sent as "
        f"{report.transfer_syntax}.",
        "",
        "| series/min | pushed in | drained in | node peak RSS | spool peak | failed stores |",
        "|---|---|---|---|---|---|",
        f"| {report.series_per_minute:.2f} | {report.send_seconds:.1f} s | {report.drain_seconds:.1f} s | "
        f"{report.node_peak_rss_mb:.0f} MB | {report.spool_peak_bytes / 1e6:.1f} MB | {report.store_failures} |",
        "",
        f"- Destination: {len(report.segs_per_series)} source series with a SEG, {once} of them exactly once.",
        f"- Node database: {report.database}.",
        f"- Node metrics: sent {report.metrics.get('sat_dicom_node_series_sent_total', 0):.0f}, failed "
        f"{report.metrics.get('sat_dicom_node_series_failed_total', 0):.0f}, instances on record "
        f"{report.metrics.get('sat_dicom_node_instances_received', 0):.0f}, refused "
        f"{report.metrics.get('sat_dicom_node_instances_refused_total', 0):.0f}.",
        "- Exactly once, reconciled across the three: " + ("**yes**." if report.exactly_once else "**no**."),
    ]
    return "\n".join(lines) + "\n"


def load_test(args: argparse.Namespace) -> int:
    from satseg_clients.dicom_node.jobs import SENT, JobStore

    folder = args.output / f"{time.strftime('%Y%m%d-%H%M%S')}-dicom-node"
    folder.mkdir(parents=True, exist_ok=True)
    syntax = TRANSFER_SYNTAXES[args.transfer_syntax]
    series = write_series(args.series, args.scenario, syntax, folder / "series")
    slices = len(list(series[0].iterdir()))
    series_bytes = sum(path.stat().st_size for path in series[0].iterdir())
    node_port, destination_port, metrics_port = free_ports(3)
    destination = Destination(destination_port)
    try:
        with served(args, folder) as (url, _):
            config = node_config(folder, node_port, destination_port, metrics_port, url, args.settle_s)
            with open(folder / "node.log", "ab") as log:
                node = subprocess.Popen(
                    [sys.executable, "-m", "satseg_clients.dicom_node.cli", "run", "--config", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            sampler = Sampler(node.pid, folder / "node" / "incoming")
            try:
                wait_until(lambda: node_answers(node_port), 120, "the node did not answer a C-ECHO")
                sampler.start()
                started = time.monotonic()
                shares = [series[index :: args.senders] for index in range(args.senders)]
                with ThreadPoolExecutor(args.senders) as pool:
                    failures = sum(pool.map(lambda share: push(share, node_port, syntax), shares))
                pushed = time.monotonic() - started
                wait_until(
                    lambda: node_metrics(metrics_port).get("sat_dicom_node_series_sent_total", 0) >= args.series,
                    args.timeout_s,
                    "the node had not sent every result",
                )
                drained = time.monotonic() - started
                wait_until(lambda: len(destination.segs) >= args.series, 60, "the destination lacks results")
                metrics = node_metrics(metrics_port)
                sampler.sample()
            finally:
                sampler.done.set()
                node.send_signal(signal.SIGTERM)
                node.wait(timeout=60)
    finally:
        destination.shutdown()
    database = {state: count for state, count in JobStore(folder / "node" / "jobs.sqlite").counts().items() if count}
    segs = dict(destination.segs)
    exactly_once = (
        failures == 0
        and sorted(segs) == sorted(str(_series_uid(path)) for path in series)
        and set(segs.values()) == {1}
        and database == {SENT: args.series}
        and metrics.get("sat_dicom_node_series_sent_total") == args.series
        and metrics.get("sat_dicom_node_series_failed_total", 0) == 0
        and metrics.get("sat_dicom_node_instances_received") == args.series * slices
    )
    report = Report(
        series=args.series,
        senders=args.senders,
        transfer_syntax=syntax,
        slices_per_series=slices,
        bytes_per_series=series_bytes,
        store_failures=failures,
        send_seconds=round(pushed, 2),
        drain_seconds=round(drained, 2),
        series_per_minute=round(args.series / drained * 60, 2),
        node_peak_rss_mb=round(sampler.peak_rss_mb, 1),
        spool_peak_bytes=sampler.peak_spool_bytes,
        segs_per_series=segs,
        database=database,
        metrics=metrics,
        exactly_once=exactly_once,
    )
    (folder / "report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    (folder / "summary.md").write_text(text := summary(report))
    shutil.rmtree(folder / "series")  # regenerated from seeds; the node's data stays for inspection
    print(text)
    print(f"{PROG}: results in {folder}")
    return 0 if exactly_once else 1


def node_answers(port: int) -> bool:
    """Whether the node's storage SCP takes an association and answers a C-ECHO."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not association.is_established:
        return False
    answered = getattr(association.send_c_echo(), "Status", -1) == 0x0000
    association.release()
    return answered


def _series_uid(folder: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: load_test(args))


if __name__ == "__main__":
    raise SystemExit(main())
