"""The OHIF viewer driven in a headless Chromium (Playwright): open a study, wait until its SEG is drawn, read
what the viewer loaded, and take screenshots; what ``sat-pacs-demo --screenshot`` and the browser test use.

Playwright drives the system's Chromium (Debian's ``chromium``); it never downloads a browser of its own.
WebGL2 (Cornerstone3D's renderer) runs there on SwiftShader, the CPU rasteriser.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_INSTALL_HINT = "apt-get install -y chromium"
CHROMIUM_FLAGS = (
    "--no-sandbox",  # root in a container has no user namespaces for Chromium's sandbox
    "--use-angle=swiftshader",  # WebGL2 on the CPU: servers and CI machines have no GPU
    "--enable-unsafe-swiftshader",
    # Closed hospital and CI networks: no background calls home, each of which would be refused.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
)
LOAD_TIMEOUT_S = 120.0
ACKNOWLEDGED = """
    sessionStorage.setItem('investigationalUseDialog', 'hidden');
    localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
"""
"""What OHIF stores once a user has confirmed its investigational-use notice and seen its first-visit tour:
set before the page loads, so neither covers the image in a screenshot (a person still sees both)."""

_VIEWPORT = "window.cornerstone.getRenderingEngines()[0].getViewports()[0]"
_SEGMENTATION = "window.services.segmentationService"
_FRAME = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"
_DRAWN = f"""() => {{
    const engine = window.cornerstone && window.cornerstone.getRenderingEngines()[0];
    const viewport = engine && engine.getViewports()[0];
    const loaded = window.services && {_SEGMENTATION}.getSegmentations()[0];
    return Boolean(viewport && loaded && {_SEGMENTATION}.getSegmentationRepresentations(
        viewport.id, {{segmentationId: loaded.segmentationId}}).length);
}}"""


def chromium_executable() -> str | None:
    """Chromium's path: ``SAT_CHROMIUM``, else the first of :data:`CHROMIUM_NAMES` on ``PATH``; or None."""
    if configured := os.environ.get("SAT_CHROMIUM"):
        return configured
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


class ViewerBrowser:
    """One headless Chromium page on the viewer (a context manager).

    Args:
        executable: Chromium's path (:func:`chromium_executable`).
        width, height: the page's size in CSS pixels (screenshots are this size: one device pixel each).
    """

    def __init__(self, executable: str, width: int = 1400, height: int = 900) -> None:
        from playwright.sync_api import sync_playwright  # the dev extra; only the browser test and --screenshot

        self._playwright = sync_playwright().start()
        try:
            self._browser = self._playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_FLAGS))
        except Exception:
            self._playwright.stop()
            raise
        self.page = self._browser.new_page(viewport={"width": width, "height": height})
        self.page.add_init_script(ACKNOWLEDGED)
        self.failed_requests: list[str] = []
        self.page.on("response", lambda answer: answer.status >= 400 and self.failed_requests.append(answer.url))

    def __enter__(self) -> ViewerBrowser:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._browser.close()
        self._playwright.stop()

    def open(self, url: str, timeout_s: float = LOAD_TIMEOUT_S) -> list[str]:
        """Open ``url`` (a study with its SEG, :meth:`ViewerFront.study_url`) and wait until the viewer has
        loaded a segmentation and drawn it. The loaded segments' labels.

        Raises:
            playwright.sync_api.TimeoutError: no segmentation after ``timeout_s``.
        """
        self.page.goto(url)
        # Loaded is not drawn: OHIF replaces the SEG's viewport by its source series' while it hydrates the SEG,
        # so wait for a viewport that shows the segmentation (seen missing once on a loaded 2-core CI host).
        self.page.wait_for_function(_DRAWN, timeout=timeout_s * 1000)
        self.page.evaluate(_FRAME)
        return self.segment_labels()

    def segment_labels(self) -> list[str]:
        """The labels of the first loaded segmentation's segments, in segment-number order."""
        return [label for label, _ in self.segments()]

    def segments(self) -> list[tuple[str, tuple[int, int, int]]]:
        """The first loaded segmentation's segments as the viewport draws them: (label, 8-bit RGB colour), in
        segment-number order."""
        found = self.page.evaluate(
            f"""() => {{
                const viewport = {_VIEWPORT};
                const segmentation = {_SEGMENTATION}.getSegmentations()[0];
                const drawn = {_SEGMENTATION}.getSegmentationRepresentations(
                    viewport.id, {{segmentationId: segmentation.segmentationId}})[0].segments;
                return Object.keys(segmentation.segments).map(Number).sort((a, b) => a - b)
                    .map(n => [segmentation.segments[n].label, drawn[n].color.slice(0, 3)]);
            }}"""
        )
        return [(label, (int(red), int(green), int(blue))) for label, (red, green, blue) in found]

    def series_modalities(self) -> list[str]:
        """The Modality of every series the viewer lists for the open study (one entry each, sorted)."""
        return sorted(
            self.page.evaluate("() => window.services.displaySetService.getActiveDisplaySets().map(d => d.Modality)")
        )

    def show_slice_at(self, world_lps: Sequence[float]) -> float:
        """Scroll the viewport to the image nearest ``world_lps`` (mm, DICOM patient coordinates); the distance
        in mm from that image's plane to the point."""
        distance = self.page.evaluate(
            f"""async point => {{
                const viewport = {_VIEWPORT};
                const ids = viewport.getImageIds();
                let best = 0, nearest = Infinity;
                ids.forEach((id, index) => {{
                    const plane = window.cornerstone.metaData.get('imagePlaneModule', id);
                    const [r, c, p] = [plane.rowCosines, plane.columnCosines, plane.imagePositionPatient];
                    const normal = [r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]];
                    const along = Math.abs(normal.reduce((sum, n, i) => sum + n * (point[i] - p[i]), 0));
                    if (along < nearest) {{ nearest = along; best = index; }}
                }});
                await viewport.setImageIdIndex(best);
                viewport.render();
                return nearest;
            }}""",
            [float(value) for value in world_lps],
        )
        self._settle()
        return float(distance)

    def page_point(self, world_lps: Sequence[float]) -> tuple[float, float]:
        """Where ``world_lps`` lies on the page (CSS pixels from its top left), by the viewport's own camera."""
        x, y = self.page.evaluate(
            f"""point => {{
                const viewport = {_VIEWPORT};
                const [x, y] = viewport.worldToCanvas(point);
                const box = viewport.canvas.getBoundingClientRect();
                return [box.left + x, box.top + y];
            }}""",
            [float(value) for value in world_lps],
        )
        return float(x), float(y)

    def set_segmentation_visible(self, visible: bool) -> None:
        """Show or hide every segment of the loaded segmentation in the viewport."""
        self.page.evaluate(
            f"""visible => {{
                const viewport = {_VIEWPORT};
                const segmentation = {_SEGMENTATION}.getSegmentations()[0];
                for (const index of Object.keys(segmentation.segments).map(Number)) {{
                    {_SEGMENTATION}.setSegmentVisibility(
                        viewport.id, segmentation.segmentationId, index, visible);
                }}
                viewport.render();
            }}""",
            visible,
        )
        self._settle()

    def screenshot(self, path: Path | None = None) -> np.ndarray:
        """The page as ``[height, width, 3]`` uint8 RGB; also written to ``path`` as PNG when given."""
        from PIL import Image  # matplotlib's dependency

        png = self.page.screenshot(path=str(path) if path is not None else None)
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def _settle(self) -> None:
        """Two animation frames and a short pause: Cornerstone draws the labelmap after the image."""
        self.page.evaluate(_FRAME)
        self.page.wait_for_timeout(500)
        self.page.evaluate(_FRAME)
