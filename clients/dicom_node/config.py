"""The node's TOML config: where it listens, which Triton servers segment, where results go, and the routes.

Every key has a default except the routes, and an unknown key is an error naming the known ones, so a typo
never silently turns a feature off. ``deploy/dicom_node.toml`` is the documented example.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from satseg.errors import SatInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no tomllib; tomli is the same parser
    import tomli as tomllib

SEND_KINDS = ("dimse", "dicomweb")
RETENTIONS = ("delete_when_sent", "keep")


@dataclass(frozen=True)
class Tls:
    """TLS for DIMSE: this side's certificate and key, and the CA that signs the peers' (mutual TLS when set)."""

    certificate: Path
    key: Path
    ca: Path | None = None

    def context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        context = ssl.create_default_context(purpose, cafile=str(self.ca) if self.ca else None)
        context.load_cert_chain(self.certificate, self.key)
        if purpose is ssl.Purpose.CLIENT_AUTH and self.ca:
            context.verify_mode = ssl.CERT_REQUIRED
        return context


@dataclass(frozen=True)
class DicomWeb:
    """A DICOMweb server: its base URL (QIDO-RS, WADO-RS and STOW-RS under it), a bearer token read from the
    environment variable ``token_env`` (never from the file), and a CA bundle for HTTPS."""

    url: str
    token_env: str = ""
    ca_bundle: Path | None = None

    def headers(self) -> dict[str, str]:
        if not self.token_env:
            return {}
        token = os.environ.get(self.token_env, "")
        if not token:
            raise SatInputError(f"the DICOMweb token variable ${self.token_env} named in the config is not set")
        return {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class Receive:
    """How series arrive: a DIMSE storage SCP (``port`` > 0), a watched DICOMweb server, or both.

    Attributes:
        ae_title: this node's AE title (register it in the PACS).
        host: the address the SCP binds (loopback unless opened on purpose).
        port: the SCP's port; 0 turns the SCP off.
        allowed_calling_ae_titles: only these may associate; anyone else is refused at association.
        settle_s: a series is complete once no instance has come for this long (or its count is known).
        max_instance_bytes: a larger instance is refused (a memory bomb, or not an image slice).
        max_open_series: a new series is refused (status A700, which a PACS retries later) while this many are
            received and not yet done; instances of series already taken are still accepted.
        max_spool_bytes: instances are refused (A700) while the series received and not yet done hold this many
            bytes on disk (about 120 CTs of 500 slices at the default).
        min_free_bytes: instances are refused (A700) while the data folder's disk has less free space than
            this plus the instance.
        max_instances_per_series: a series with more instances is refused from the one past this on (C000) and
            parked, never segmented incomplete (a whole-body CT at 0.6 mm has about 3,000 slices).
        dicomweb: the DICOMweb server to watch for new series, or ``None``.
        poll_s: seconds between two QIDO-RS searches of it.
        lookback_days: search only studies of the last this many days (0: every study).
    """

    ae_title: str = "SATNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_ae_titles: tuple[str, ...] = ()
    settle_s: float = 30.0
    max_instance_bytes: int = 256 << 20
    max_open_series: int = 100
    max_spool_bytes: int = 32 << 30
    min_free_bytes: int = 2 << 30
    max_instances_per_series: int = 4000
    tls: Tls | None = None
    dicomweb: DicomWeb | None = None
    poll_s: float = 30.0
    lookback_days: int = 1


@dataclass(frozen=True)
class Segment:
    """The Triton servers that segment (tried in order), and the client's settings."""

    triton_urls: tuple[str, ...] = ("127.0.0.1:8001",)
    protocol: str = "grpc"
    timeout_s: float = 3600.0
    retry_budget_s: float = 30.0


@dataclass(frozen=True)
class Send:
    """Where results go: C-STORE to a DICOM AE (``kind = "dimse"``) or STOW-RS to DICOMweb. The DICOM SEG always
    goes; ``rtstruct`` also sends an RT Structure Set of the same result (for radiotherapy systems), ``sr`` a
    measurement report of its volumes (TID 1500, referencing the SEG's segments)."""

    kind: str = "dimse"
    ae_title: str = "ORTHANC"
    host: str = "127.0.0.1"
    port: int = 4242
    tls: Tls | None = None
    dicomweb: DicomWeb | None = None
    rtstruct: bool = False
    sr: bool = False


@dataclass(frozen=True)
class Jobs:
    """Retries and retention.

    Attributes:
        max_attempts: a series whose segmentation or sending fails this many times is parked with its reason
            (waiting for an unreachable server or PACS is not a failure: it waits without counting).
        first_backoff_s: the first wait after a failure or an unreachable peer; it doubles up to ``max_backoff_s``.
        retention: ``delete_when_sent`` (the received files and the result go once sent) or ``keep``.
    """

    max_attempts: int = 3
    first_backoff_s: float = 5.0
    max_backoff_s: float = 300.0
    retention: str = "delete_when_sent"


@dataclass(frozen=True)
class Route:
    """One routing rule. A series matches when every criterion given matches; the first matching rule wins.

    Attributes:
        task: the ``clients/tasks.json`` task to run, or ``""`` with ``skip`` set.
        skip: a matching series is skipped (logged with the rule's index).
        modality: DICOM Modality (CT, MR, PT), exactly.
        body_part: BodyPartExamined, case-insensitive; "" matches any.
        series_description: a regular expression searched in SeriesDescription (case-insensitive).
        min_slices: fewer instances than this do not match.
    """

    task: str = ""
    skip: bool = False
    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    min_slices: int = 1


@dataclass(frozen=True)
class NodeConfig:
    """The whole config. ``data_dir`` holds the job database, the received files and the results."""

    data_dir: Path
    receive: Receive = field(default_factory=Receive)
    segment: Segment = field(default_factory=Segment)
    send: Send = field(default_factory=Send)
    jobs: Jobs = field(default_factory=Jobs)
    routes: tuple[Route, ...] = ()
    metrics_port: int = 0
    """Prometheus metrics on ``metrics_host:metrics_port`` (0: off)."""
    metrics_host: str = "127.0.0.1"

    @classmethod
    def load(cls, path: Path) -> NodeConfig:
        """Read ``path``; relative paths in it are relative to the file's folder."""
        try:
            document = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as error:
            raise SatInputError(f"{path} is not valid TOML: {error}") from None
        return from_document(document, Path(path).resolve().parent)


def from_document(document: dict[str, Any], base: Path) -> NodeConfig:
    """The config a parsed TOML document describes (``base`` anchors relative paths)."""
    document = dict(document)
    routes = tuple(_build(Route, rule, f"route {index}") for index, rule in enumerate(document.pop("route", []), 1))
    sections = {name: document.pop(name, {}) for name in ("receive", "segment", "send", "jobs")}
    if "data_dir" not in document:
        raise SatInputError("the config names no data_dir (the folder for the job database and received files)")
    config = _build(NodeConfig, {**document, "data_dir": base / document["data_dir"]}, "the config")
    config = dataclasses.replace(
        config,
        receive=_build(Receive, _nested(sections["receive"], base), "[receive]"),
        segment=_build(Segment, sections["segment"], "[segment]"),
        send=_build(Send, _nested(sections["send"], base), "[send]"),
        jobs=_build(Jobs, sections["jobs"], "[jobs]"),
        routes=routes,
    )
    check(config)
    return config


def _nested(section: dict[str, Any], base: Path) -> dict[str, Any]:
    """``tls`` and ``dicomweb`` sub-tables as their dataclasses, with paths anchored at ``base``."""
    section = dict(section)
    if "tls" in section:
        paths = {key: base / value for key, value in section["tls"].items()}
        section["tls"] = _build(Tls, paths, "[tls]")
    if "dicomweb" in section:
        web = dict(section["dicomweb"])
        if "ca_bundle" in web:
            web["ca_bundle"] = base / web["ca_bundle"]
        section["dicomweb"] = _build(DicomWeb, web, "[dicomweb]")
    return section


def _build(kind: type, values: dict[str, Any], where: str) -> Any:
    known = {item.name for item in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SatInputError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}
    return kind(**values)


def check(config: NodeConfig) -> None:
    """Refuse a config that cannot work, one line saying why."""
    from satseg_clients.tasks import task

    if config.send.kind not in SEND_KINDS:
        raise SatInputError(f"[send] kind {config.send.kind!r} is not one of {', '.join(SEND_KINDS)}")
    for option in ("rtstruct", "sr"):
        if not isinstance(value := getattr(config.send, option), bool):
            raise SatInputError(f"[send] {option} {value!r} is not accepted; it must be true or false")
    if config.send.kind == "dicomweb" and config.send.dicomweb is None:
        raise SatInputError('[send] kind = "dicomweb" needs a [send.dicomweb] table with its url')
    if config.jobs.retention not in RETENTIONS:
        raise SatInputError(f"[jobs] retention {config.jobs.retention!r} is not one of {', '.join(RETENTIONS)}")
    if config.receive.port <= 0 and config.receive.dicomweb is None:
        raise SatInputError("nothing to receive from: set [receive] port for DIMSE or [receive.dicomweb] url")
    if config.receive.port > 0 and not config.receive.allowed_calling_ae_titles:
        raise SatInputError("[receive] allowed_calling_ae_titles is empty: list the AE titles that may send")
    if not config.routes:
        raise SatInputError("the config has no [[route]]: add one naming a task (see deploy/dicom_node.toml)")
    for index, route in enumerate(config.routes, 1):
        if route.skip == bool(route.task):
            raise SatInputError(f"route {index}: give either a task or skip = true")
        if route.task:
            task(route.task)
