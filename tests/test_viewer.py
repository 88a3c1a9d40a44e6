"""The deployment's OHIF viewer in a real headless Chromium: a real Orthanc, the served demo model, the node as
``just pacs-demo`` configures it and the viewer's front. An oblique CT series uploaded into Orthanc, as a user
would, comes back as a SEG and an RT Structure Set; the viewer opens the study at the URL the demo prints, and
its screenshots show the SEG drawn over the organ exactly where the SEG, read by our own reader, puts it.

The screenshots are kept in test_artifacts/viewer/."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from string import Template

import numpy as np
import pydicom
import pytest
from dicom_readers import seg_masks
from dicom_series import write_series
from scipy import ndimage
from served import phantom

from satseg.checkout import VIEWER_DEPLOYMENT
from satseg.geometry import load_volume
from satseg.outputs.preview import term_colour
from satseg.server.triton import TritonServer, free_ports
from satseg_clients.dicom_node.demo import NODE_AET, demo_node
from satseg_clients.dicom_node.orthanc import Orthanc
from satseg_clients.viewer import APP_CONFIG, NpmPackage, ViewerFront, fetch_viewer
from satseg_clients.viewer_browser import ViewerBrowser

ARTIFACTS = Path(__file__).resolve().parents[1] / "test_artifacts" / "viewer"
WAIT_S = 240.0
SLICE_GAP_MM = 8.0
LPS = np.array([-1.0, -1.0, 1.0])
SHAPE = (49, 41, 25)
PATCH = 3
"""Half the side of the square of screen pixels compared around a point."""


def lps_of(volume_affine: np.ndarray, voxel: tuple[int, int, int]) -> np.ndarray:
    return LPS * (volume_affine @ [*voxel, 1.0])[:3]


def patch_change(shown: np.ndarray, hidden: np.ndarray, point: tuple[float, float]) -> float:
    """The mean absolute difference of the two screenshots' pixels around a page point (0-255)."""
    x, y = round(point[0]), round(point[1])
    window = np.s_[y - PATCH : y + PATCH + 1, x - PATCH : x + PATCH + 1]
    return float(np.abs(shown[window].astype(float) - hidden[window].astype(float)).mean())


def test_the_viewer_draws_the_seg_over_the_organ_where_the_seg_puts_it(
    orthanc_ready: None, triton_server: TritonServer, chromium: str, tmp_path: Path
) -> None:
    series = tmp_path / "series"
    # Rows x columns not a multiple of 8, and 6 segments x 25 slices: the SEG's bit-packed frames do not start on
    # byte boundaries and its pixel data ends in a pad byte, which OHIF 3.13's reader misread (ohif.json's patches).
    write_series(
        series,
        np.clip(phantom(seed=3, shape=SHAPE).array, -1024, None),
        pixel_spacing=(5.0, 5.0),
        slice_gap=SLICE_GAP_MM,
    )
    [node_port] = free_ports(1)
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"sat": (NODE_AET, "127.0.0.1", node_port)})
    with orthanc, ViewerFront(fetch_viewer(), orthanc.dicomweb_url) as front:
        node = demo_node(tmp_path, orthanc, node_port, triton_server.grpc_url)
        thread = threading.Thread(target=node.run, daemon=True)
        thread.start()
        try:
            orthanc.upload_folder(series)  # as a user would: the node finds it over Orthanc's DICOMweb
            [seg_series] = orthanc.wait_for_series("SEG", timeout_s=WAIT_S)
            orthanc.wait_for_series("RTSTRUCT", timeout_s=WAIT_S)
        finally:
            node.stop.set()
            thread.join(timeout=60)
            for handler in logging.getLogger("sat-dicom-node").handlers[:]:  # demo_node's file handler
                logging.getLogger("sat-dicom-node").removeHandler(handler)
        seg = pydicom.dcmread(io.BytesIO(orthanc.instance_file(seg_series["Instances"][0])))
        labels = [str(segment.SegmentLabel) for segment in seg.SegmentSequence]
        volume = load_volume(series)
        liver = seg_masks(seg, volume)[labels.index("liver")].astype(bool)
        assert liver.sum() > 100
        # The liver's deepest voxel, and on its slice the voxel in the body farthest from every segment.
        inside = np.unravel_index(np.argmax(ndimage.distance_transform_edt(liver)), liver.shape)
        k = inside[2]
        # And voxels spread over the liver on that slice, each at least 2 voxels from its edge.
        interior = np.argwhere(ndimage.distance_transform_edt(liver[:, :, k]) >= 2)
        spread = [(*interior[n], k) for n in np.linspace(0, len(interior) - 1, min(8, len(interior))).astype(int)]
        clear = ndimage.distance_transform_edt(~seg_masks(seg, volume).any(axis=0)[:, :, k])
        clear[volume.array[:, :, k] < -500] = 0  # in the body, not in the air around it
        outside = (*np.unravel_index(np.argmax(clear), clear.shape), k)
        liver_lps, outside_lps = lps_of(volume.affine, inside), lps_of(volume.affine, outside)

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with ViewerBrowser(chromium) as browser:
            assert browser.open(front.study_url(seg.StudyInstanceUID, seg.SeriesInstanceUID)) == labels
            assert browser.series_modalities() == ["CT", "RTSTRUCT", "SEG"]
            for label, colour in browser.segments():  # the SEG's recommended colours, the RTSTRUCT's too
                assert np.abs(np.subtract(colour, term_colour(label))).max() <= 2, label
            assert browser.show_slice_at(liver_lps) < 0.5
            shown = browser.screenshot(ARTIFACTS / "seg_shown.png")
            browser.set_segmentation_visible(False)
            hidden = browser.screenshot(ARTIFACTS / "seg_hidden.png")
            liver_point, outside_point = browser.page_point(liver_lps), browser.page_point(outside_lps)
            spread_points = [browser.page_point(lps_of(volume.affine, voxel)) for voxel in spread]
            # Radiological layout: the patient's right (-x in LPS) on the screen's left, anterior (-y) up.
            right = browser.page_point(liver_lps + np.array([-20.0, 0.0, 0.0]))
            anterior = browser.page_point(liver_lps + np.array([0.0, -20.0, 0.0]))
            assert browser.failed_requests == []
    assert patch_change(shown, hidden, liver_point) > 10, "the liver is not drawn where the SEG puts it"
    assert patch_change(shown, hidden, outside_point) < 1, "something is drawn where no segment is"
    undrawn = [
        voxel for voxel, point in zip(spread, spread_points, strict=True) if patch_change(shown, hidden, point) <= 10
    ]
    assert not undrawn, f"the liver is not drawn at {undrawn} of {spread}"
    assert right[0] < liver_point[0] and anterior[1] < liver_point[1]


@pytest.fixture(scope="module")
def nginx() -> str:
    """Debian's nginx, for the production site's config: installed here as root (CI), else skipped."""
    from satseg_clients.dicom_node.orthanc import SBIN, apt_install

    def found() -> str | None:
        return shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))

    if found() is None and os.geteuid() == 0:
        apt_install(["nginx"], "apt-get install -y nginx")
    if (binary := found()) is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    return binary


def production_site(dist: Path, port: int, pacs_dicomweb_url: str, folder: Path) -> Path:
    """deploy/k8s/viewer's nginx site as the nginx image renders it (its envsubst step replaces only the
    variables set in the environment), in a main config of its own; the port and the files' folder are this
    host's instead of the container's."""
    site = Template((VIEWER_DEPLOYMENT / "default.conf.template").read_text()).safe_substitute(
        PACS_DICOMWEB_URL=pacs_dicomweb_url, PACS_AUTHORIZATION=""
    )
    assert "listen 8080;" in site and "root /usr/share/nginx/html;" in site
    site = site.replace("listen 8080;", f"listen 127.0.0.1:{port};").replace("/usr/share/nginx/html", str(dist))
    site = site.replace("location = /app-config.js {", f"location = /app-config.js {{\n        alias {APP_CONFIG};")
    (folder / "site.conf").write_text(site)
    main = folder / "nginx.conf"
    # As root, nginx's workers would run as www-data: one user reads the files, as in the container.
    user = "user root;\n" if os.geteuid() == 0 else ""
    main.write_text(
        f"{user}daemon off; worker_processes 1; pid {folder}/nginx.pid; error_log {folder}/error.log;\n"
        "events {}\n"
        f"http {{ include /etc/nginx/mime.types; access_log off; client_body_temp_path {folder}/body;\n"
        f"  proxy_temp_path {folder}/proxy; fastcgi_temp_path {folder}/fastcgi; uwsgi_temp_path {folder}/uwsgi;\n"
        f"  scgi_temp_path {folder}/scgi; include {folder}/site.conf; }}\n"
    )
    return main


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_production_site_serves_the_viewer_and_proxies_the_pacs_on_its_origin(
    orthanc_ready: None, nginx: str, tmp_path: Path
) -> None:
    """The nginx site of deploy/k8s/viewer run by a real nginx before a real Orthanc: the viewer's files and
    routes, the config it mounts, and DICOMweb whose BulkData URLs point back through the site."""
    dist = fetch_viewer()
    [port] = free_ports(1)
    series = tmp_path / "series"
    write_series(series, np.clip(phantom(seed=4, shape=(16, 12, 4)).array, -1024, None))
    with Orthanc(tmp_path / "orthanc") as orthanc:
        orthanc.upload_folder(series)
        config = production_site(dist, port, orthanc.dicomweb_url, tmp_path)
        checked = subprocess.run([nginx, "-t", "-c", str(config)], capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stderr
        process = subprocess.Popen([nginx, "-c", str(config)], stderr=subprocess.DEVNULL)
        try:
            site = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 10
            while get_or_none(f"{site}/healthz") is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert get(f"{site}/healthz") == (200, b"ok\n")
            assert get(f"{site}/app-config.js") == (200, APP_CONFIG.read_bytes())
            index = (dist / "index.html").read_bytes()
            assert get(f"{site}/viewer?StudyInstanceUIDs=1.2.3") == (200, index)  # the viewer's own route
            status, body = get(f"{site}/dicom-web/studies")
            assert status == 200
            [study] = json.loads(body)
            study_uid = study["0020000D"]["Value"][0]
            status, body = get(f"{site}/dicom-web/studies/{study_uid}/metadata")
            assert status == 200
            bulk = [item["7FE00010"]["BulkDataURI"] for item in json.loads(body)]
            assert len(bulk) == 4 and all(uri.startswith(f"{site}/dicom-web/") for uri in bulk), bulk[0]
            status, pixels = get(bulk[0])
            assert status == 200 and len(pixels) >= 16 * 12 * 2
        finally:
            process.terminate()
            process.wait(timeout=10)


def get_or_none(url: str) -> int | None:
    try:
        return get(url)[0]
    except OSError:
        return None


def test_the_pins_patches_replace_every_occurrence_and_refuse_a_bundle_without_their_text(tmp_path: Path) -> None:
    pin = NpmPackage.load()
    assert len(pin.replacements) == 4
    (tmp_path / "a.js").write_text("x; " + " ".join(find for find, _ in pin.replacements) * 2)
    (tmp_path / "b.js").write_text(pin.replacements[0][0])
    (tmp_path / "index.html").write_text(pin.replacements[0][0])
    pin.patch(tmp_path)
    for find, replace in pin.replacements:
        assert find not in (tmp_path / "a.js").read_text() and (tmp_path / "a.js").read_text().count(replace) == 2
    assert (tmp_path / "b.js").read_text() == pin.replacements[0][1]
    assert (tmp_path / "index.html").read_text() == pin.replacements[0][0]  # only the bundles
    with pytest.raises(RuntimeError, match="no bundle holds the patched text"):
        pin.patch(tmp_path)  # already made: a different build
    assert pin.cache() != NpmPackage(pin.package, pin.version, pin.integrity).cache()  # patches key the cache
