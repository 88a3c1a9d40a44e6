"""How series reach the node: a DIMSE storage SCP (pynetdicom) and a DICOMweb watcher (dicomweb-client).

Both write each instance to ``incoming/<job id>/`` atomically and record it in the job database before
it counts as received: the SCP answers a C-STORE only after both, so an acknowledged instance is on disk.
"""

from __future__ import annotations

import datetime
import io
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom import uid

from satseg.atomic import atomic_file, write_bytes_atomically
from satseg.geometry.io import pixel_data_shortfall
from satseg_clients.dicom_node.config import DicomWeb, Receive
from satseg_clients.dicom_node.jobs import (
    COMPLETE,
    DONE,
    FAILED,
    RECEIVED,
    SEGMENTED,
    SEGMENTING,
    SENT,
    SKIPPED,
    Job,
    JobStore,
    job_id,
    uid_hash,
)
from satseg_clients.dicom_node.metrics import Metrics
from satseg_clients.dicom_seg import SOURCE_UIDS, empty_uid_reason, missing_uid

logger = logging.getLogger("sat-dicom-node")

ACCEPTED_TRANSFER_SYNTAXES = [
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    # Compressed, as many PACS send CT: decoded by pydicom with pylibjpeg's openjpeg and libjpeg plugins (the
    # pacs extra) and pydicom's own RLE decoder.
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.RLELossless,
]
"""Every transfer syntax the storage SCP accepts, the same for each SOP class."""
STORAGE_SOP_CLASSES = (
    "CTImageStorage",
    "MRImageStorage",
    "PositronEmissionTomographyImageStorage",
    "EnhancedCTImageStorage",
    "EnhancedMRImageStorage",
    "EnhancedPETImageStorage",
    # Accepted only to be skipped with a logged reason, so a modality that sends everything is not refused.
    "SecondaryCaptureImageStorage",
    "BasicTextSRStorage",
    "EnhancedSRStorage",
    "ComprehensiveSRStorage",
    "XRayRadiationDoseSRStorage",
)
DEFER_BYTES = 64 << 10
"""Values larger than this are not read when an instance's header is checked (Pixel Data among them)."""
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
"""C-STORE statuses (PS3.4 GG.4): success, refused for a limit the PACS may retry past, refused as unusable."""
NOT_IMAGE_MODALITIES = frozenset({"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "PR", "KO", "DOC", "REG", "OT"})
"""Modalities a DICOMweb series is skipped for without pulling it (the node's own SEG results among them)."""


AGAIN = {
    SENT: "its result was sent; its instances are dropped",
    SKIPPED: "it was skipped; its instances are dropped (`sat-dicom-node replay <job>` takes it again)",
    FAILED: "it is parked; its instances are dropped (`sat-dicom-node replay <job>` takes it again)",
    SEGMENTING: "it is being segmented; its instances are dropped",
    SEGMENTED: "its result is being sent; its instances are dropped",
}
"""What happens to the instances of a series that arrive once its job is past receiving, by the job's state."""


class ConflictingInstance(Exception):
    """An instance whose SOP Instance UID the job already holds, with other content."""

    def __init__(self, job: str) -> None:
        super().__init__(job)
        self.job = job


def instance_path(incoming: Path, identifier: str, instance_uid: str) -> Path:
    return incoming / identifier / f"{uid_hash(instance_uid)}.dcm"


def keep_instance(
    store: JobStore,
    incoming: Path,
    dataset: pydicom.Dataset,
    data: bytes | Path,
    origin: str,
    expected: int | None = None,
    told: set[tuple[str, str]] | None = None,
) -> str:
    """Write one instance (its encoded file: ``data``, or the file at that path, copied) and record it; returns
    its job id (``dataset`` needs only its header).

    The file goes to disk before the database row, so a row always has its file; an instance of a job that is
    past receiving is dropped, which is how a resent series is not segmented twice. That is logged once per
    job, state and process (``told`` holds those already logged), with what to do about it. An instance whose
    SOP Instance UID the job already holds is kept once if its content is the same.

    Raises:
        ConflictingInstance: the job holds that SOP Instance UID with other content (the first is kept).
    """
    series, study, instance = (
        str(dataset.get(name)) for name in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID")
    )
    identifier = job_id(series)
    job = store.get(identifier)
    if job is not None and job.state not in (RECEIVED, COMPLETE):
        if told is None or (identifier, job.state) not in told:
            logger.info("job %s: the series came again after it was taken; %s", identifier, AGAIN[job.state])
            if told is not None:
                told.add((identifier, job.state))
        return identifier
    path = instance_path(incoming, identifier, instance)
    if path.is_file():  # the same SOP Instance UID again: the same instance, or another under its name
        again = pydicom.dcmread(data if isinstance(data, Path) else io.BytesIO(data))
        if pydicom.dcmread(path) != again:
            raise ConflictingInstance(identifier)
        if told is None or (identifier, "duplicate") not in told:
            logger.info("job %s: an instance came again with the same content; kept once", identifier)
            if told is not None:
                told.add((identifier, "duplicate"))
        return identifier
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Path):
        with atomic_file(path) as file, data.open("rb") as source:
            shutil.copyfileobj(source, file)
    else:
        write_bytes_atomically(path, data)
    job, new = store.add_instance(series, study, instance, origin, expected, path.stat().st_size)
    if new and job.instances == 1:
        logger.info("job %s: first instance, from %s", identifier, origin)
    return identifier


def storage_scp(
    config: Receive, store: JobStore, incoming: Path, verbose: bool = False, metrics: Metrics | None = None
) -> Any:
    """Start the storage SCP in its own threads; returns the server (``.shutdown()`` stops it)."""
    from pynetdicom import AE, _config, evt, sop_class

    # Each received data set goes to a temporary file as its fragments arrive, so an instance is never held
    # whole in memory (a 200 MB one peaked the node at 982 MB); handle_store reads its header only.
    _config.STORE_RECV_CHUNKED_DATASET = True

    ae = AE(ae_title=config.ae_title)
    ae.require_calling_aet = list(config.allowed_calling_ae_titles)
    ae.require_called_aet = True  # a peer that addresses another AE title was set up for another node
    for name in STORAGE_SOP_CLASSES:
        ae.add_supported_context(getattr(sop_class, name), ACCEPTED_TRANSFER_SYNTAXES)
    ae.add_supported_context(sop_class.Verification)

    told: set[tuple[str, str]] = set()  # (job, state) whose late instances were already logged

    def on_store(event: Any) -> int:
        return handle_store(event, config, store, incoming, verbose, told, metrics)

    ssl_context = None
    if config.tls is not None:
        import ssl

        ssl_context = config.tls.context(ssl.Purpose.CLIENT_AUTH)
    handlers = [(evt.EVT_C_STORE, on_store), (evt.EVT_REJECTED, lambda event: log_rejected(event, config))]
    server = ae.start_server((config.host, config.port), block=False, evt_handlers=handlers, ssl_context=ssl_context)
    logger.info("storage SCP %s listening on %s:%d", config.ae_title, config.host, config.port)
    return server


def log_rejected(event: Any, config: Receive) -> None:
    """One line per refused association: who called, from where, and why (AE titles and addresses only)."""
    requestor = event.assoc.requestor
    calling, called = (str(title).strip() for title in (requestor.ae_title, requestor.primitive.called_ae_title))
    if calling not in config.allowed_calling_ae_titles:
        reason = f"calling AE title {calling!r} is not in allowed_calling_ae_titles"
    elif called != config.ae_title:
        reason = f"it called AE title {called!r}, not this node's {config.ae_title!r}"
    else:
        reason = "pynetdicom refused it (see --verbose)"
    logger.warning("refused an association from %s:%s: %s", requestor.address, requestor.port, reason)


def spool_full(config: Receive, store: JobStore, incoming: Path, job: Job | None, size: int) -> tuple[str, str] | None:
    """Why the spool cannot take an instance of ``size`` bytes of ``job`` (``None``: a new series) now: the
    limit's name and one line, or None."""
    folder = incoming if incoming.is_dir() else incoming.parent
    free = shutil.disk_usage(folder).free
    if free - size < config.min_free_bytes:
        floor = config.min_free_bytes >> 20
        return "free_disk", f"{free >> 20} MiB free under the data folder, min_free_bytes is {floor} MiB"
    spooled = store.spool_bytes()
    if spooled + size > config.max_spool_bytes:
        limit = config.max_spool_bytes >> 20
        return "spool_bytes", f"series not yet done hold {spooled >> 20} MiB, max_spool_bytes is {limit} MiB"
    if job is None:
        open_series = sum(count for state, count in store.counts().items() if state not in DONE)
        if open_series >= config.max_open_series:
            limit = config.max_open_series
            return "open_series", f"{open_series} series received and not yet done, max_open_series is {limit}"
    return None


def park(store: JobStore, metrics: Metrics | None, identifier: str, why: str, **values: object) -> Job:
    """Park a job with its reason; the node goes on with the next."""
    logger.error("job %s: parked: %s", identifier, why)
    if metrics is not None:
        metrics.failed.inc()
    return store.move(identifier, FAILED, reason=why, finished=time.time(), **values)


def past_series_cap(config: Receive, store: JobStore, incoming: Path, job: Job | None, metrics: Metrics | None) -> bool:
    """Whether ``job`` already holds ``max_instances_per_series`` instances, so this one is refused: the first
    time, the job is parked and its files deleted (an incomplete series must never be segmented)."""
    cap = config.max_instances_per_series
    if job is None or job.instances < cap or job.state not in (RECEIVED, COMPLETE, FAILED):
        return False
    if job.state != FAILED:
        why = (
            f"the series has more than max_instances_per_series ({cap}) instances; the rest are refused (to take "
            f"it: raise the limit, `sat-dicom-node replay {job.id}`, and send it again)"
        )
        park(store, metrics, job.id, why)
        shutil.rmtree(incoming / job.id, ignore_errors=True)
    refused(metrics, "series_instances")
    return True


def refused(metrics: Metrics | None, limit: str) -> None:
    if metrics is not None:
        metrics.refused.labels(limit).inc()


def handle_store(
    event: Any,
    config: Receive,
    store: JobStore,
    incoming: Path,
    verbose: bool,
    told: set[tuple[str, str]] | None = None,
    metrics: Metrics | None = None,
) -> int:
    """One C-STORE: refuse what cannot be filed (one logged line), else keep it and answer success."""
    calling = event.assoc.requestor.ae_title
    received: Path = event.dataset_path  # on disk as it arrived (STORE_RECV_CHUNKED_DATASET), never whole in memory
    size = received.stat().st_size
    if size > config.max_instance_bytes:
        logger.warning(
            "refused an instance from %s: %d bytes, more than max_instance_bytes %d",
            calling,
            size,
            config.max_instance_bytes,
        )
        refused(metrics, "instance_size")
        return OUT_OF_RESOURCES
    try:  # the header, all the checks need; Pixel Data and other large values stay on disk
        dataset = pydicom.dcmread(received, defer_size=DEFER_BYTES)
    except Exception as error:  # any decoding failure: the peer sent something unreadable
        logger.warning("refused an instance from %s: it does not decode (%s)", calling, type(error).__name__)
        return CANNOT_UNDERSTAND
    if not any(keyword in dataset for keyword in ("SOPClassUID", *SOURCE_UIDS)):
        logger.warning("refused an instance from %s: it is not a DICOM data set (no SOP Class UID, no UIDs)", calling)
        return CANNOT_UNDERSTAND
    missing = missing_uid(dataset)
    if missing:
        logger.warning("refused an instance from %s: %s", calling, empty_uid_reason(missing))
        return CANNOT_UNDERSTAND
    identifier = job_id(str(dataset.SeriesInstanceUID))
    if shortfall := pixel_data_shortfall(received, dataset):
        logger.warning("job %s: refused an instance from %s: %s", identifier, calling, shortfall)
        return CANNOT_UNDERSTAND
    job = store.get(identifier)
    if past_series_cap(config, store, incoming, job, metrics):
        if told is None or (identifier, "cap") not in told:
            logger.warning("job %s: refused an instance from %s: past max_instances_per_series", identifier, calling)
            if told is not None:
                told.add((identifier, "cap"))
        return CANNOT_UNDERSTAND
    if reason := spool_full(config, store, incoming, job, size):
        limit, line = reason
        logger.warning("refused an instance from %s (status A700, the PACS retries later): %s", calling, line)
        refused(metrics, limit)
        return OUT_OF_RESOURCES
    try:
        keep_instance(store, incoming, dataset, received, f"dimse:{calling}", told=told)
    except ConflictingInstance as conflict:
        logger.warning(
            "job %s: an instance came again under a SOP Instance UID it already holds, with other content; "
            "the first is kept and this one refused (the sender reuses UIDs: fix it there)",
            conflict.job,
        )
        return CANNOT_UNDERSTAND
    if verbose:
        logger.debug("job %s: instance %s of series %s", identifier, dataset.SOPInstanceUID, dataset.SeriesInstanceUID)
    return SUCCESS


def dicomweb_client(server: DicomWeb) -> Any:
    """A ``DICOMwebClient`` for ``server``, with its token header and CA bundle."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if server.ca_bundle is not None:
        session.verify = str(server.ca_bundle)
    return DICOMwebClient(server.url, session=session, headers=server.headers())


def pull_new_series(
    config: Receive,
    store: JobStore,
    incoming: Path,
    client: Any,
    today: Callable[[], datetime.date],
    last_counts: dict[str, int],
) -> int:
    """One QIDO-RS search for series, then WADO-RS pulls of those not pulled yet; returns how many were pulled.

    A series is pulled only once the server reports the same number of instances as at the previous search
    (``last_counts``, series UID -> count, replaced by this search's): a series still arriving in the PACS
    would otherwise be taken with the slices it had so far. A series whose modality is never a volume (a SEG,
    our own results among them) gets a skipped job at once.
    """
    filters = {}
    if config.lookback_days > 0:
        filters["StudyDate"] = f"{(today() - datetime.timedelta(days=config.lookback_days)):%Y%m%d}-"
    found = client.search_for_series(
        fields=["NumberOfSeriesRelatedInstances", "Modality"], search_filters=filters, get_remaining=True
    )
    pulled, previous_counts = 0, dict(last_counts)
    last_counts.clear()
    for item in found:
        header = pydicom.Dataset.from_json(item)
        series, study = str(header.get("SeriesInstanceUID", "")), str(header.get("StudyInstanceUID", ""))
        if not series or not study:
            continue
        job = store.get(job_id(series))
        expected = int(header.get("NumberOfSeriesRelatedInstances", 0)) or None
        if job is not None and (job.state != RECEIVED or (expected and job.instances >= expected)):
            continue
        modality = str(header.get("Modality", "")).upper()
        if modality in NOT_IMAGE_MODALITIES:
            store.skip_series(series, study, "dicomweb", f"a {modality} series, not an image volume")
            continue
        if expected and expected > config.max_instances_per_series:
            cap = config.max_instances_per_series
            store.skip_series(series, study, "dicomweb", f"{expected} instances, max_instances_per_series is {cap}")
            continue
        last_counts[series] = expected or 0
        if previous_counts.get(series) != last_counts[series]:
            continue  # new, or still growing: looked at again at the next search
        for dataset in client.iter_series(study, series):
            if missing_uid(dataset) or store.has_instance(job_id(series), str(dataset.SOPInstanceUID)):
                continue
            keep_instance(store, incoming, dataset, encoded(dataset), "dicomweb", expected)
        pulled += 1
    return pulled


def encoded(dataset: pydicom.Dataset) -> bytes:
    """A dataset as a DICOM file's bytes (preamble, file meta, data set)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
