"""The OHIF web viewer beside a DICOMweb PACS: its prebuilt files from the pinned npm package, and a small
same-origin front that serves them and proxies ``/dicom-web`` to the PACS (the demo's; production uses nginx,
deploy/k8s/viewer).

Same origin is the point: the browser then needs no CORS from the PACS, and one login proxy in front covers
both. The front tells the PACS its own origin (a ``Forwarded`` header), so the BulkData URLs the PACS writes
point back through it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import tarfile
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from aiohttp import web

from satseg.checkout import VIEWER_DEPLOYMENT
from satseg.errors import one_line
from satseg.server.front import ProxyServer, forwarded_headers, relay

OHIF_PIN = VIEWER_DEPLOYMENT / "ohif.json"
"""The npm package of OHIF's prebuilt viewer: name, version, the registry's integrity of its tarball and the
text replacements that fix its bundles (the viewer's image, deploy/viewer.Dockerfile, reads the same file)."""
APP_CONFIG = VIEWER_DEPLOYMENT / "app-config.js"
NPM_REGISTRY = "https://registry.npmjs.org"
"""npm's default registry; ``npm_config_registry`` (a hospital's mirror) overrides it, as it does for npm."""
DICOMWEB_PATH = "/dicom-web"
"""Where the viewer's config (deploy/k8s/viewer/app-config.js) looks for DICOMweb: its own origin."""
APP_CONFIG_PATH = "/app-config.js"
FETCH_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class NpmPackage:
    """One pinned npm package (``ohif.json``): what is served is exactly what was pinned, with its
    ``replacements`` (``(find, replace)`` pairs, applied to every ``.js`` file of ``dist/``) made."""

    package: str
    version: str
    integrity: str
    replacements: tuple[tuple[str, str], ...] = ()

    @classmethod
    def load(cls, path: Path = OHIF_PIN) -> NpmPackage:
        pin = json.loads(path.read_text())
        patches = pin.pop("patches", {"replacements": []})
        return cls(**pin, replacements=tuple((find, replace) for find, replace in patches["replacements"]))

    @property
    def tarball_url(self) -> str:
        registry = os.environ.get("npm_config_registry") or NPM_REGISTRY  # noqa: SIM112 (npm's own name)
        return f"{registry.rstrip('/')}/{self.package}/-/{self.package.split('/')[-1]}-{self.version}.tgz"

    def cache(self) -> Path:
        """Where its files are kept between runs (``$XDG_CACHE_HOME/satseg``, else ``~/.cache/satseg``)."""
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        patched = hashlib.sha256(json.dumps(self.replacements).encode()).hexdigest()[:8]  # new patches, new folder
        return root / "satseg" / f"{self.package.strip('@').replace('/', '-')}-{self.version}-{patched}"

    def patch(self, dist: Path) -> None:
        """Make every replacement in the ``.js`` files of ``dist``.

        Raises:
            RuntimeError: a replacement's text is in none of them (the bundles are not the ones it was written for).
        """
        bundles = {path: path.read_text(encoding="utf-8") for path in sorted(dist.glob("*.js"))}
        for find, replace in self.replacements:
            hits = [path for path, text in bundles.items() if find in text]
            if not hits:
                raise RuntimeError(f"{self.package}@{self.version}: no bundle holds the patched text {find!r}")
            for path in hits:
                bundles[path] = bundles[path].replace(find, replace)
        for path, text in bundles.items():
            path.write_text(text, encoding="utf-8")


def fetch_viewer(pin: NpmPackage | None = None, cache: Path | None = None) -> Path:
    """The folder of OHIF's prebuilt viewer (``index.html`` and its bundles), fetched once into ``cache``.

    The package's tarball (about 50 MB; 200 MB unpacked) comes from the npm registry and is checked against
    the pinned integrity before anything is unpacked; then the pin's replacements are made (:meth:`NpmPackage.patch`).

    Raises:
        RuntimeError: the registry did not answer, the tarball is not the pinned one, or a replacement found
            nothing to replace (one line).
    """
    pin = pin or NpmPackage.load()
    cache = cache or pin.cache()
    dist = cache / "dist"
    if (dist / "index.html").is_file():
        return dist
    cache.mkdir(parents=True, exist_ok=True)
    algorithm, expected = pin.integrity.split("-", 1)
    digest = hashlib.new(algorithm)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        archive = Path(scratch) / "package.tgz"
        try:
            with urllib.request.urlopen(pin.tarball_url, timeout=FETCH_TIMEOUT_S) as answer, archive.open("wb") as out:
                while chunk := answer.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except OSError as error:
            raise RuntimeError(f"could not fetch {pin.package}@{pin.version}: {one_line(str(error))}") from None
        if base64.b64encode(digest.digest()).decode() != expected:
            raise RuntimeError(f"{pin.tarball_url} is not the pinned {pin.package}@{pin.version} (integrity)")
        unpacked = Path(scratch) / "unpacked"
        with tarfile.open(archive) as tar:
            members = [member for member in tar.getmembers() if member.name.startswith("package/dist/")]
            tar.extractall(unpacked, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        pin.patch(unpacked / "package" / "dist")
        shutil.rmtree(dist, ignore_errors=True)  # a half-unpacked folder from an interrupted run
        (unpacked / "package" / "dist").rename(dist)
    return dist


class ViewerFront(ProxyServer):
    """The viewer's files and a same-origin proxy of a DICOMweb root (a context manager).

    Args:
        dist: the viewer's files (:func:`fetch_viewer`).
        dicomweb_url: the PACS's DICOMweb root, e.g. Orthanc's ``http://127.0.0.1:8042/dicom-web``.
        config: the viewer's ``app-config.js``, served in place of the package's.
        host, port: where to listen; loopback by default (the demo's front has no login), port 0 picks one.
    """

    def __init__(
        self,
        dist: Path,
        dicomweb_url: str,
        config: Path = APP_CONFIG,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(socket.create_server((host, port)), "sat-viewer-front")
        self.dist = dist.resolve()
        self.dicomweb_url = dicomweb_url.rstrip("/")
        self.config = config

    @property
    def url(self) -> str:
        return f"http://{self.listening.getsockname()[0]}:{self.port}"

    def study_url(self, study_uid: str, seg_series_uid: str = "") -> str:
        """The viewer's page for one study, every series of it (SEG, RT Structure Set...) in the study panel;
        with ``seg_series_uid``, that SEG is shown at once, drawn over the series it segments."""
        query = {
            "StudyInstanceUIDs": study_uid,
            **({"initialSeriesInstanceUID": seg_series_uid} if seg_series_uid else {}),
        }
        return f"{self.url}/viewer?{urllib.parse.urlencode(query)}"

    def __enter__(self) -> ViewerFront:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_route("*", DICOMWEB_PATH + "{tail:(/.*)?}", self._proxy)
        router.add_get(APP_CONFIG_PATH, self._config)
        router.add_get("/{tail:.*}", self._static)

    async def _config(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self.config, headers={"Cache-Control": "no-cache"})

    async def _static(self, request: web.Request) -> web.StreamResponse:
        """A file of the viewer, else its ``index.html``: the viewer routes its own paths (``/viewer``...)."""
        path = (self.dist / request.match_info["tail"]).resolve()
        if not path.is_file() or not path.is_relative_to(self.dist):
            path = self.dist / "index.html"
        return web.FileResponse(path)

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        headers = forwarded_headers(request.headers)
        # RFC 7239: the PACS (Orthanc's DICOMweb plugin among others) then writes BulkData URLs on this origin.
        headers["Forwarded"] = f"host={request.host};proto={request.scheme}"
        target = f"{self.dicomweb_url}{request.match_info['tail']}"
        if request.query_string:
            target += f"?{request.query_string}"
        return await relay(
            self.session,
            request,
            target,
            headers,
            b"",
            lambda reason: web.Response(status=502, text=f"the PACS's DICOMweb is not answering ({reason})\n"),
        )
