"""The node's loop: receive, group, route, segment through Triton, send the DICOM SEG back, and never lose a job.

One thread does the work (segmenting one series at a time keeps a CPU server's memory bounded); the storage
SCP answers in its own threads. Logs name jobs by id only; UIDs appear only with ``verbose``.
"""

from __future__ import annotations

import datetime
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pydicom

from satseg.errors import SatInputError, one_line
from satseg_clients.dicom_node.config import NodeConfig
from satseg_clients.dicom_node.jobs import COMPLETE, SEGMENTED, SEGMENTING, SKIPPED, Job, JobStore
from satseg_clients.dicom_node.metrics import Metrics
from satseg_clients.dicom_node.receive import dicomweb_client, park, pull_new_series, storage_scp
from satseg_clients.dicom_node.routing import route
from satseg_clients.dicom_node.send import DestinationRefused, DestinationUnreachable, send_result
from satseg_clients.dicom_seg import SEG_FILE, result_uids
from satseg_clients.measurement_report import SR_FILE
from satseg_clients.rtstruct import RTSTRUCT_FILE
from satseg_clients.sat_client import SATClient, ServerUnavailable, backoff_delay
from satseg_clients.tasks import task

logger = logging.getLogger("sat-dicom-node")
IDLE_S = 0.5
"""How often an idle node looks for due work."""


@dataclass
class Node:
    """A DICOM node running ``config``. :meth:`run` serves until ``stop`` is set (SIGTERM sets it)."""

    config: NodeConfig
    verbose: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    listening: threading.Event = field(default_factory=threading.Event)
    """Set once the node takes associations and polls (for whoever embeds it, e.g. a test sending at once)."""

    def __post_init__(self) -> None:
        self.data = self.config.data_dir
        self.store = JobStore(self.data / "jobs.sqlite")
        self.incoming = self.data / "incoming"
        self.results = self.data / "results"
        self.metrics = Metrics(self.store, self.config.metrics_port, self.config.metrics_host)
        self._clients: dict[str, SATClient] = {}
        self._dicomweb_counts: dict[str, int] = {}  # instances per series at the last DICOMweb search
        self._waits = 0  # consecutive times a peer was unreachable: the backoff's exponent, never a failure

    def run(self) -> None:
        """Serve until :attr:`stop` is set; the job in hand is finished first."""
        for identifier in self.store.recover():
            logger.info("job %s: was being segmented when the node stopped; segmenting it again", identifier)
        scp = (
            storage_scp(self.config.receive, self.store, self.incoming, self.verbose, self.metrics)
            if self.config.receive.port
            else None
        )
        web = dicomweb_client(self.config.receive.dicomweb) if self.config.receive.dicomweb else None
        next_poll = 0.0
        self.listening.set()
        try:
            while not self.stop.is_set():
                if web is not None and time.monotonic() >= next_poll:
                    self._poll(web)
                    next_poll = time.monotonic() + self.config.receive.poll_s
                for identifier in self.store.complete_settled(self.config.receive.settle_s):
                    logger.info("job %s: complete", identifier)
                job = self.store.next_due()
                if job is None:
                    self.stop.wait(IDLE_S)
                    continue
                self.work(job)
        finally:
            if scp is not None:
                scp.shutdown()
            for client in self._clients.values():
                client.close()
            logger.info("stopped")

    def _poll(self, web: Any) -> None:
        try:
            pull_new_series(
                self.config.receive, self.store, self.incoming, web, datetime.date.today, self._dicomweb_counts
            )
        except Exception as error:  # the DICOMweb source is down or answered badly: try again at the next poll
            logger.warning("DICOMweb source not polled: %s", short(error))

    def work(self, job: Job) -> None:
        """Take one due job one step further: segment a complete one, send a segmented one."""
        started = time.monotonic()
        if job.state == COMPLETE:
            job = self.segment(job)
        if job.state == SEGMENTED:
            self.send(job)
            self.metrics.job_seconds.observe(time.monotonic() - started)

    def segment(self, job: Job) -> Job:
        folder = self.incoming / job.id
        files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
        if not files:
            return self._park(job, "its received files are gone (retention, or removed by hand)")
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        routing = route(header, len(files), self.config.routes)
        if routing.task is None:
            logger.info("job %s: skipped: %s", job.id, routing.reason)
            self.metrics.skipped.inc()
            if self.config.jobs.retention == "delete_when_sent":
                self._retire(job.id)
            return self.store.move(job.id, SKIPPED, reason=routing.reason, finished=time.time())
        chosen = task(routing.task)
        client = self._ready_client()
        if client is None:
            return self._wait(job, COMPLETE, "no Triton server is ready")
        logger.info("job %s: segmenting %d instances, task %s", job.id, len(files), chosen.name)
        job = self.store.move(job.id, SEGMENTING, task=chosen.name, started=time.time())
        try:
            segmentation = client.segment(folder, chosen.prompts, chosen.modality)
            outputs = ["dicom_seg", *(kind for kind in ("rtstruct", "sr") if getattr(self.config.send, kind))]
            segmentation.save(
                self.results / job.id,
                statistics=False,
                output_type=outputs,
                source_series=folder,
                dicom_uids=lambda kind: result_uids(job.series_uid, segmentation.model, kind),
            )
        except SatInputError as error:
            return self._park(job, short(error))
        except ServerUnavailable as error:
            return self._wait(job, COMPLETE, short(error))
        except Exception as error:  # anything else may pass on a retry; N of them park the job
            return self._failed_attempt(job, COMPLETE, f"segmenting failed: {short(error)}")
        self._waits = 0
        logger.info("job %s: segmented", job.id)
        return self.store.move(job.id, SEGMENTED, model=segmentation.model, reason=None)

    def send(self, job: Job) -> Job:
        assert job.model is not None  # set with SEGMENTED
        results = [self.results / job.id / name for name in (SEG_FILE, RTSTRUCT_FILE, SR_FILE)]
        if self.store.was_sent(job.series_uid, job.model):
            logger.info("job %s: already sent for this model; not sent again", job.id)
        else:
            try:
                for path in results:  # each has UIDs of its own that a resend repeats
                    if path.is_file():
                        send_result(path, self.config.send, self.config.receive.ae_title)
            except DestinationUnreachable as error:
                return self._wait(job, SEGMENTED, short(error))
            except (DestinationRefused, OSError) as error:
                return self._failed_attempt(job, SEGMENTED, f"sending failed: {short(error)}")
        self._waits = 0
        self.store.record_sent(job, job.model, result_uids(job.series_uid, job.model)[1])
        self.metrics.sent.inc()
        logger.info("job %s: sent to %s", job.id, self.config.send.kind)
        if self.config.jobs.retention == "delete_when_sent":
            self._retire(job.id)
        return self.store.get(job.id) or job

    def _ready_client(self) -> SATClient | None:
        for url in self.config.segment.triton_urls:
            client = self._clients.get(url)
            if client is None:
                client = SATClient(
                    url,
                    protocol=self.config.segment.protocol,
                    timeout_s=self.config.segment.timeout_s,
                    retry_budget_s=self.config.segment.retry_budget_s,
                )
                self._clients[url] = client
            if client.is_ready():
                return client
        return None

    def _wait(self, job: Job, state: str, why: str) -> Job:
        """A peer is unreachable: the job waits in ``state`` with backoff, its attempts untouched."""
        delay = backoff_delay(self._waits, self.config.jobs.first_backoff_s, self.config.jobs.max_backoff_s)
        self._waits += 1
        logger.warning("job %s: waiting %.0f s: %s", job.id, delay, why)
        return self.store.move(job.id, state, next_attempt=time.time() + delay, reason=why)

    def _failed_attempt(self, job: Job, state: str, why: str) -> Job:
        attempts = job.attempts + 1
        if attempts >= self.config.jobs.max_attempts:
            return self._park(job, f"{why} ({attempts} attempts)", attempts=attempts)
        delay = backoff_delay(attempts - 1, self.config.jobs.first_backoff_s, self.config.jobs.max_backoff_s)
        logger.warning("job %s: attempt %d failed, next in %.0f s: %s", job.id, attempts, delay, why)
        return self.store.move(job.id, state, attempts=attempts, next_attempt=time.time() + delay, reason=why)

    def _park(self, job: Job, why: str, **values: object) -> Job:
        """Park the job with its reason (its files stay for a replay); the node goes on with the next."""
        return park(self.store, self.metrics, job.id, why, **values)

    def _retire(self, identifier: str) -> None:
        """Delete a done job's received files and result (retention ``delete_when_sent``)."""
        for folder in (self.incoming / identifier, self.results / identifier):
            shutil.rmtree(folder, ignore_errors=True)


def short(error: BaseException) -> str:
    """An error as one line of at most 300 characters (messages here hold no PHI: job ids, hosts, statuses)."""
    text = one_line(str(error)) or type(error).__name__
    return text[:300]
