"""A real local Orthanc DICOM server (Debian's ``orthanc`` 1.10 with its DICOMweb plugin) for the PACS demo and tests.

:class:`Orthanc` writes a config under its folder, runs ``Orthanc`` there on free ports, and speaks its REST API
with ``urllib`` only. Orthanc 1.10 has no option to bind one address: it listens on all interfaces, refuses
non-loopback HTTP (``RemoteAccessAllowed: false``) and accepts C-STORE from any AE (``DicomAlwaysAllowStore``),
which suits a demo or test server, not a clinical one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from satseg.server.triton import free_ports, terminate

ORTHANC_BINARY = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PACKAGES = ("orthanc", "orthanc-dicomweb")
INSTALL_HINT = f"apt-get install -y {' '.join(PACKAGES)}"
SBIN = ("/usr/sbin", "/usr/local/sbin")  # where Debian puts Orthanc; often missing from a user's PATH
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 2.0  # a readiness probe must not hang on whatever else took the port


def orthanc_binary() -> str | None:
    """The path of the ``Orthanc`` executable on ``PATH`` or in the sbin folders, or None."""
    return shutil.which(ORTHANC_BINARY, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def orthanc_available() -> str:
    """``""`` when the Orthanc binary and its DICOMweb plugin are installed, else a one-line reason."""
    if orthanc_binary() is None:
        return f"no {ORTHANC_BINARY} binary (install it: {INSTALL_HINT})"
    if not DICOMWEB_PLUGIN.is_file():
        return f"no Orthanc DICOMweb plugin at {DICOMWEB_PLUGIN} (install it: {INSTALL_HINT})"
    return ""


def apt_install(packages: Sequence[str], hint: str) -> None:
    """``apt-get install`` ``packages`` as root, non-interactively; ``hint`` is the command a user would run.

    Raises:
        RuntimeError: not root, no apt-get, or apt failed (one line: its last output line).
    """
    if os.geteuid() != 0:
        raise RuntimeError(f"installing {' '.join(packages)} needs root; run: sudo {hint}")
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"no apt-get to install {' '.join(packages)} with; install it some other way ({hint})")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
        done = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit code {done.returncode}"]
            raise RuntimeError(f"`{' '.join(command)}` failed: {lines[-1]}")


def install_orthanc() -> None:
    """Install Orthanc and its DICOMweb plugin with apt (as root, non-interactively).

    Raises:
        RuntimeError: not root, no apt-get, or apt failed (one line: its last output line).
    """
    apt_install(PACKAGES, INSTALL_HINT)
    if reason := orthanc_available():
        raise RuntimeError(f"apt installed {' '.join(PACKAGES)} but still {reason}")


@dataclass
class Orthanc:
    """A local Orthanc: config ``orthanc.json``, storage and log ``orthanc.log`` under ``folder``.

    ``modalities`` (name -> (AE title, host, port)) are the DICOM peers Orthanc may C-STORE to; set them before
    :meth:`start`. Ports left at 0 are chosen free at the first start and kept, so ``start()`` after ``stop()``
    comes back on the same URL with the same stored instances.
    """

    folder: Path
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    host: str = "127.0.0.1"
    http_port: int = 0
    dicom_port: int = 0
    stable_age_s: int = 2
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        """The REST API's base URL."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS and STOW-RS under it)."""
        return f"{self.url}/dicom-web"

    @property
    def config_path(self) -> Path:
        return self.folder / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.folder / "orthanc.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config(self) -> dict[str, Any]:
        """The Orthanc configuration :meth:`start` writes."""
        storage = self.folder / "storage"
        return {
            "Name": f"satseg-{self.aet}",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomModalities": {name: list(peer) for name, peer in self.modalities.items()},
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "OverwriteInstances": False,
            "StableAge": self.stable_age_s,
            "WebDavEnabled": False,
            "HttpThreadsCount": 8,
        }

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> Orthanc:
        """Write the config and run Orthanc; return once ``GET /system`` answers (a no-op when running).

        Raises:
            RuntimeError: Orthanc is not installed, exited, or did not answer in ``timeout_s`` (with the log tail).
        """
        if self.running:
            return self
        binary, reason = orthanc_binary(), orthanc_available()
        if binary is None or reason:
            raise RuntimeError(reason)
        http_port, dicom_port = free_ports(2, self.host)
        self.http_port, self.dicom_port = self.http_port or http_port, self.dicom_port or dicom_port
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                [binary, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._process = process
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                raise RuntimeError(f"Orthanc exited (code {process.returncode}) before it answered:\n{self.log_tail()}")
            try:
                self.request("GET", "/system", timeout_s=PROBE_TIMEOUT_S)
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer at {self.url} after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM Orthanc, SIGKILL after ``timeout_s``; its exit code, or None when it was not started."""
        if self._process is None:
            return None
        code = terminate(self._process, timeout_s)
        self._process = None
        return code

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` of Orthanc's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no log at {self.log_path})"

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "",
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> bytes:
        """The body of Orthanc's answer to ``method path``.

        Raises:
            urllib.error.HTTPError: Orthanc refused; its message and details are in the error's ``msg``.
        """
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            raise urllib.error.HTTPError(
                error.url, error.code, f"{error.reason}: {error_details(error.read())}", error.headers, None
            ) from None

    def get(self, path: str) -> Any:
        """``GET path`` as JSON (``path`` starts with ``/``)."""
        return json.loads(self.request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        """``POST path`` with a JSON body; the answer as JSON."""
        return json.loads(self.request("POST", path, json.dumps(payload).encode(), "application/json"))

    def upload(self, path: Path) -> dict[str, Any]:
        """Store one DICOM file (``POST /instances``): Orthanc's answer (``ID``, ``ParentSeries``, ``Status``...).

        Raises:
            urllib.error.HTTPError: Orthanc refused it (400 for a non-DICOM file or an empty study, series or
                SOP instance UID).
        """
        return json.loads(self.request("POST", "/instances", path.read_bytes(), "application/dicom"))

    def upload_folder(self, folder: Path) -> list[str]:
        """Store every file under ``folder`` (recursively); the Orthanc ids of their series, in upload order."""
        series: dict[str, None] = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            series[self.upload(path)["ParentSeries"]] = None
        return list(series)

    def series(self) -> list[dict[str, Any]]:
        """Every stored series, expanded (``ID``, ``MainDicomTags``, ``Instances``, ``IsStable``...)."""
        return self.get("/series?expand")

    def series_of_modality(self, modality: str) -> list[dict[str, Any]]:
        """The stored series whose Modality is ``modality`` (e.g. ``"SEG"``)."""
        return [s for s in self.series() if s.get("MainDicomTags", {}).get("Modality") == modality]

    def wait_for_series(self, modality: str, count: int = 1, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """The series of ``modality`` once there are at least ``count`` (what a peer C-STOREs arrives late).

        Raises:
            TimeoutError: fewer than ``count`` after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while len(found := self.series_of_modality(modality)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)} {modality} series in Orthanc after {timeout_s:.0f} s, wanted {count}")
            time.sleep(0.2)
        return found

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of an instance (Orthanc id)."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def store_to(self, modality: str, resource_ids: list[str]) -> dict[str, Any]:
        """C-STORE resources (Orthanc ids of patients, studies, series or instances) to a configured modality,
        waiting until it is done; Orthanc's job summary.

        Raises:
            urllib.error.HTTPError: the modality is unknown or the transfer failed.
        """
        return self.post(f"/modalities/{modality}/store", {"Resources": resource_ids, "Synchronous": True})


def error_details(body: bytes) -> str:
    """Orthanc's error message and details from an error answer's body (``HttpDescribeErrors`` is on)."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:300]
    if not isinstance(answer, dict):
        return str(answer)[:300]
    return "; ".join(str(answer[key]) for key in ("Message", "Details", "OrthancError") if answer.get(key))
