"""``sat-pacs-demo`` (``just pacs-demo``): a PACS, the served model and the DICOM node, end to end on loopback.

Starts a real Orthanc (the PACS), the pip ``tritonserver`` with the bundled demo model, and ``sat-dicom-node``;
sends the demo CT (or nilearn's MNI152 T1 when ``../shared/data`` is absent) into Orthanc as a DICOM series,
has Orthanc C-STORE it to the node as a PACS routing rule would, waits for the DICOM SEG to land in Orthanc,
reads it back from there and draws it over the series in ``OUTPUT/seg_preview.png``, then stops everything.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from satseg.checkout import BUNDLED_CHECKPOINT, DEFAULT_REPOSITORY
from satseg.cli.common import StopRequested, cli_parser, run_cli, stop_on_signals
from satseg.errors import SatInputError
from satseg.geometry import Volume, load_volume
from satseg.outputs.preview import CT_SOFT_TISSUE_WINDOW, save_preview
from satseg.server.triton import TritonServer, free_ports
from satseg_clients.demo import SHARED_CT, StepTimer, load_mni152_volume
from satseg_clients.dicom_node.config import from_document
from satseg_clients.dicom_node.node import Node
from satseg_clients.dicom_node.orthanc import Orthanc, orthanc_available
from satseg_clients.dicom_seg import read_dicom_seg
from satseg_clients.viewer import ViewerFront, fetch_viewer
from satseg_export.build_repo import ExportSettings, build_repository, repository_is_current

PROG = "sat-pacs-demo"
NODE_AET = "SATNODE"
SEG_TIMEOUT_S = 900.0
SEND_TIMEOUT_S = 60.0
LPS = np.diag([-1.0, -1.0, 1.0])
"""RAS+ (our affines) to DICOM's patient LPS+ coordinates."""
EPILOG = """what it does (each step is timed):
  1. sat-export the bundled checkpoint into triton_repo/, unless it is already current
  2. start Orthanc (OUTPUT/orthanc/), tritonserver and sat-dicom-node (log in OUTPUT/dicom_node.log)
  3. write the demo CT (../shared/data; else the MNI152 T1) as a DICOM series and upload it into Orthanc
  4. Orthanc C-STOREs the series to the node (AE SATNODE); the node segments it and C-STOREs a DICOM SEG and
     an RT Structure Set back
  5. read the SEG back from Orthanc -> OUTPUT/seg_preview.png; print the Orthanc Explorer URL
  6. serve the OHIF web viewer on loopback, reading Orthanc's DICOMweb (its files come once from the npm
     registry, pinned, into ~/.cache/satseg); print the URL of the study with its SEG
  7. stop everything (--keep-running: wait for Ctrl-C first; meanwhile the node also segments any CT or MR
     series uploaded into this Orthanc, which it watches over DICOMweb)
Needs Debian's orthanc and orthanc-dicomweb. Not for clinical use.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser(PROG, "Orthanc, the served model and sat-dicom-node: DICOM in, DICOM SEG back.", EPILOG)
    parser.add_argument("-o", "--output", type=Path, default=Path("pacs_demo_output"), help="default pacs_demo_output")
    parser.add_argument("--keep-running", action="store_true", help="keep Orthanc up until Ctrl-C")
    parser.add_argument("--viewer-port", type=int, default=0, help="the viewer's loopback port (default: a free one)")
    parser.add_argument(
        "--screenshot",
        type=Path,
        help="also open the viewer in headless Chromium (needs it and playwright) and save the page as this PNG",
    )
    return parser.parse_args(argv)


def write_dicom_series(volume: Volume, folder: Path, description: str) -> Path:
    """``volume`` as single-frame DICOM slices (one per ``k``) on its own grid, with new UIDs.

    Written by hand: pydicom writes datasets but no library turns a NIfTI grid into an image series.
    CT is stored as signed HU; other modalities are scaled into unsigned 16 bits (RescaleSlope/Intercept).
    """
    folder.mkdir(parents=True, exist_ok=True)
    axes = volume.affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    row_cosine, column_cosine = (LPS @ axes[:, axis] / spacing[axis] for axis in (0, 1))
    ct = volume.modality == "ct"
    low, high = float(volume.array.min()), float(volume.array.max())
    slope = 1.0 if ct else max(high - low, 1e-6) / 65535.0
    stored = (volume.array if ct else np.round((volume.array - low) / slope)).astype(np.int16 if ct else np.uint16)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2" if ct else "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = (
            "CT" if ct else "MR",
            description,
            1,
            k + 1,
        )
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "SAT^Demo", "SATDEMO", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = time.strftime("%Y%m%d"), "120000", "1", ""
        ds.ReferringPhysicianName, ds.Manufacturer = "", "satseg demo"
        ds.ImageOrientationPatient = [*map(float, row_cosine), *map(float, column_cosine)]
        ds.ImagePositionPatient = [float(v) for v in LPS @ (volume.affine @ [0.0, 0.0, k, 1.0])[:3]]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows (J), between columns (I)
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(ct)
        ds.RescaleSlope, ds.RescaleIntercept = slope, 0.0 if ct else low
        if ct:  # what a viewer shows first: the abdominal soft-tissue window, as a scanner's protocol sets it
            low_hu, high_hu = CT_SOFT_TISSUE_WINDOW
            ds.WindowCenter, ds.WindowWidth = (low_hu + high_hu) / 2, high_hu - low_hu
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(folder / f"slice{k:04d}.dcm", enforce_file_format=True)
    return folder


def scanner_axial(volume: Volume) -> Volume:
    """``volume`` with its voxel axes turned to L, P and S (its world content unchanged): rows run to the
    patient's left, columns to the back, slices upward, as scanners write an axial series, so every viewer shows
    it in the radiological layout (anterior up, the patient's right on the screen's left)."""
    transform = ornt_transform(io_orientation(volume.affine), axcodes2ornt(("L", "P", "S")))
    array = np.ascontiguousarray(apply_orientation(volume.array, transform))
    return Volume(array, volume.affine @ inv_ornt_aff(transform, volume.shape), volume.modality)


ROUTES = [{"modality": "CT", "task": "demo_abdomen", "min_slices": 20}, {"modality": "MR", "task": "demo_brain"}]
"""The demo node's routes: what the demo model was trained on, by modality."""


def demo_volume() -> tuple[Volume, str]:
    """The volume to send and its description."""
    if SHARED_CT.is_file():
        ct = load_volume(SHARED_CT)
        return Volume(ct.array, ct.affine, "ct"), "SAT demo abdominal CT"
    print(f"(no CT at {SHARED_CT}: the MNI152 T1 is sent instead)")
    return load_mni152_volume(), "SAT demo T1 brain"


def run_demo(args: argparse.Namespace) -> int:
    if reason := orthanc_available():
        raise SatInputError(reason)
    timer, output = StepTimer(), args.output
    output.mkdir(parents=True, exist_ok=True)
    settings = ExportSettings(checkpoint=BUNDLED_CHECKPOINT, repository=DEFAULT_REPOSITORY)
    with timer.step("export the demo model into triton_repo/"):
        if not repository_is_current(settings):
            build_repository(settings)
    volume, description = demo_volume()
    [node_port] = free_ports(1)
    shutil.rmtree(output / "orthanc", ignore_errors=True)  # each run's PACS starts empty: its SEG is this run's
    orthanc = Orthanc(output / "orthanc", modalities={"sat": (NODE_AET, "127.0.0.1", node_port)})
    server = TritonServer(DEFAULT_REPOSITORY, log_path=output / "tritonserver.log")
    node: Node | None = None
    viewer: ViewerFront | None = None
    thread: threading.Thread | None = None
    # Whatever stops the demo (Ctrl-C, a script's SIGTERM, a closed terminal) stops all it started, below.
    stop_on_signals(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    try:
        with timer.step("start Orthanc and tritonserver"):
            orthanc.start()
            server.start()
        os.environ["SAT_ADMIN_KEY"] = server.admin_key  # the node's SATClient then uses shared memory on this host
        node = demo_node(output, orthanc, node_port, server.grpc_url)
        thread = threading.Thread(target=node.run, daemon=True)
        thread.start()
        series = output / "series"
        with timer.step(f"write {description} ({'x'.join(map(str, volume.shape))}) as DICOM and upload it"):
            write_dicom_series(scanner_axial(volume), series, description)
            [series_id] = orthanc.upload_folder(series)
        with timer.step("Orthanc C-STOREs it to the node; wait for the SEG in Orthanc"):
            orthanc.store_to("sat", [series_id])
            [seg_series] = orthanc.wait_for_series("SEG", timeout_s=SEG_TIMEOUT_S)
            orthanc.wait_for_series("RTSTRUCT", timeout_s=SEND_TIMEOUT_S)  # sent right after the SEG
        with timer.step("read the SEG back from Orthanc and draw it"):
            seg = pydicom.dcmread(io.BytesIO(orthanc.instance_file(seg_series["Instances"][0])))
            preview = draw(seg, series, output / "seg_preview.png")
        print(f"    look at {preview}")
        print(f"    Orthanc Explorer: {orthanc.url}/app/explorer.html#series?uuid={seg_series['ID']}")
        with timer.step("start the OHIF viewer on this Orthanc"):
            viewer = start_viewer(orthanc, args.viewer_port)
        if viewer is not None:
            study = viewer.study_url(seg.StudyInstanceUID, seg.SeriesInstanceUID)
            print(f"    viewer, the CT with its SEG (and RT Structure Set in the study panel): {study}")
            print(f"    viewer's study list (series uploaded into this Orthanc, with their results): {viewer.url}")
            if args.screenshot is not None:
                with timer.step("open the viewer in headless Chromium and take a screenshot"):
                    screenshot(study, busiest_slice(seg, series), args.screenshot)
                print(f"    look at {args.screenshot}")
        if args.keep_running:
            print(
                f"    all stays up until Ctrl-C: upload a CT or MR series at {orthanc.url}/app/explorer.html "
                f"(or storescu to 127.0.0.1:{orthanc.dicom_port}); the node pulls it, and its SEG appears in "
                "Orthanc and in the viewer's study list",
                flush=True,
            )
            threading.Event().wait()
    except StopRequested as stop:
        print(f"    {stop} received: stopping", flush=True)
    finally:
        for handled in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # a second signal must not cut the clean-up
            signal.signal(handled, signal.SIG_IGN)
        with timer.step("stop the node, tritonserver and Orthanc"):
            if node is not None and thread is not None:
                node.stop.set()
                thread.join(timeout=120)
            server.stop()
            if viewer is not None:
                viewer.stop()
            orthanc.stop()
    print(f"timings:\n{timer.table()}")
    return 0


def start_viewer(orthanc: Orthanc, port: int) -> ViewerFront | None:
    """The OHIF viewer on loopback, reading this Orthanc's DICOMweb; None (and why, in one line) when its
    files cannot be fetched: the rest of the demo does not need it."""
    try:
        dist = fetch_viewer()
    except RuntimeError as error:
        print(f"    (no viewer: {error})")
        return None
    return ViewerFront(dist, orthanc.dicomweb_url, port=port).start()


def busiest_slice(seg: pydicom.Dataset, series: Path) -> np.ndarray:
    """The centre (patient LPS mm) of the series' slice where the SEG's segments cover the most voxels."""
    masks, _ = read_dicom_seg(seg, series)
    volume = load_volume(series)
    k = int(np.argmax(np.sum(masks > 0, axis=(0, 1, 2))))
    centre = [(volume.shape[0] - 1) / 2, (volume.shape[1] - 1) / 2, k, 1.0]
    return LPS @ (volume.affine @ centre)[:3]


def screenshot(url: str, world_lps: np.ndarray, path: Path) -> None:
    """The viewer at ``url`` in headless Chromium, on the image through ``world_lps``, saved as a PNG.

    Raises:
        SatInputError: no Chromium, or no playwright (one line each).
    """
    from satseg_clients.viewer_browser import CHROMIUM_INSTALL_HINT, ViewerBrowser, chromium_executable

    executable = chromium_executable()
    if executable is None:
        raise SatInputError(f"--screenshot needs Chromium: {CHROMIUM_INSTALL_HINT}")
    try:
        browser = ViewerBrowser(executable)
    except ImportError:
        raise SatInputError(
            "--screenshot needs playwright (pip install playwright; it drives the system's Chromium)"
        ) from None
    with browser:
        browser.open(url)
        browser.show_slice_at(world_lps)
        path.parent.mkdir(parents=True, exist_ok=True)
        browser.screenshot(path)


def demo_node(output: Path, orthanc: Orthanc, port: int, triton_url: str) -> Node:
    """The node as ``deploy/dicom_node.toml`` describes it, pointed at this Orthanc and server; logs to a file.

    It takes series both ways: C-STOREd by Orthanc, and pulled from Orthanc's DICOMweb (what ``--keep-running``
    relies on for series a user uploads); a series that comes both ways is one job.
    """
    handler = logging.FileHandler(output / "dicom_node.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("sat-dicom-node")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    document = {
        "data_dir": str(output / "dicom_node_data"),
        "receive": {
            "port": port,
            "allowed_calling_ae_titles": [orthanc.aet],
            "settle_s": 2.0,
            "dicomweb": {"url": orthanc.dicomweb_url},
            "poll_s": 5.0,
            "lookback_days": 0,
        },
        "segment": {"triton_urls": [triton_url]},
        "send": {"kind": "dimse", "ae_title": orthanc.aet, "port": orthanc.dicom_port, "rtstruct": True},
        "route": ROUTES,
    }
    return Node(from_document(document, output))


def draw(seg: pydicom.Dataset, series: Path, path: Path) -> Path:
    """The SEG's segments over the series (three planes through the largest one), as the PACS holds them."""
    masks, labels = read_dicom_seg(seg, series)
    volume = load_volume(series)
    labelmap = np.zeros(volume.shape, np.uint16)
    for value, mask in enumerate(masks, start=1):
        labelmap[(mask > 0) & (labelmap == 0)] = value
    window = CT_SOFT_TISSUE_WINDOW if volume.modality == "ct" else None
    names = dict(enumerate(labels, start=1))
    title = f"DICOM SEG read back from Orthanc: {len(labels)} segments"
    return save_preview(volume.array, volume.affine, labelmap, names, path, title=title, window=window)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: run_demo(args))


if __name__ == "__main__":
    raise SystemExit(main())
