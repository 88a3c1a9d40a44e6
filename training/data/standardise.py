"""``sat-standardise``: labelled datasets in several source formats, written in one form for training.

Each case is put on SAT's model grid exactly as inference does (``satseg.geometry.prepare``: RAS,
1x1x3 mm, cropped to the foreground, z-scored) and its label map follows by nearest neighbour
(``PreparedVolume.labels_to_grid``), so images and labels align voxel for voxel. The output form and the
manifest are described in :mod:`satseg_training.data.standardised`.

Runs are resumable: a case whose manifest line and files exist is skipped without reading its source.
Files are written atomically and a case's manifest line is appended only after both its files exist,
so an interrupted run leaves no case that looks complete; a manifest line whose files were deleted is
dropped and the case rebuilt. One writer per output root at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from satseg.atomic import write_bytes_atomically
from satseg.cli.common import cli_parser, run_cli
from satseg.engine.preprocess import prepare
from satseg.errors import SatInputError
from satseg.geometry import Volume
from satseg.outputs import write_json
from satseg.outputs.nifti import save_nifti_exact
from satseg.text import Vocabulary
from satseg_training.data.names import map_label_names
from satseg_training.data.readers import (
    CaseSource,
    LabelledCase,
    labelmap_case,
    manifest_cases,
    mask_folder_case,
    nnunet_cases,
    synthseg_cases,
)
from satseg_training.data.standardised import IMAGES, LABELS, MANIFEST, UNMAPPED, ManifestEntry, parse_manifest_line

PROG = "sat-standardise"
LABEL_ONLY_MODALITY = "mri"
"""Label-only maps are prepared as if the map were an MRI (foreground > 0), so the crop is the labelled head."""
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_COMPRESSION = 1  # gzip level: z-scored float32 barely compresses further, and level 1 is several times faster

logger = logging.getLogger(__name__)

EPILOG = """examples:
  sat-standardise -o standardised --nnunet nnUNet_raw/Dataset003_Liver
  sat-standardise -o standardised --labelmap ct.nii.gz seg.nii.gz classes_total.json --modality ct --dataset totalseg
  sat-standardise -o standardised --mask-folder aorta/ct.nii.gz aorta/ --modality ct --dataset aorta
  sat-standardise -o standardised --manifest cases.jsonl --synthseg synthseg/

outputs (under --output):
  images/<dataset>/<case>.nii.gz  float32 z-scored image on the model grid (RAS, 1x1x3 mm, cropped)
  labels/<dataset>/<case>.nii.gz  uint16 label map on the same grid, source label values kept
  manifest.jsonl                  one JSON line per case: classes as vocabulary terms, unmapped names, grid
  unmapped.json                   label names not in the vocabulary, per dataset (also printed)

Rerunning skips finished cases. Exit status: 0 all cases done, 1 some cases failed (listed), 2 bad input.
"""


@dataclass
class StandardiseResult:
    """What one run did.

    Attributes:
        written: keys (``<dataset>/<case>``) of the cases written in this run.
        skipped: keys of the cases found finished.
        failed: key -> one-line reason, for the cases that could not be written.
        unmapped: dataset -> raw label names not in the vocabulary, sorted (as in ``unmapped.json``).
    """

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    unmapped: dict[str, list[str]] = field(default_factory=dict)


def standardise(
    sources: Sequence[CaseSource], root: Path, *, vocabulary: Vocabulary | None = None, progress: bool = True
) -> StandardiseResult:
    """Write ``sources`` in the standardised form under ``root``, skipping cases already done.

    A case that fails (unreadable file, labels off the image grid, ...) is reported on stderr and in the
    result, and the run goes on. ``unmapped.json`` gathers the unmapped names of every source seen so far.

    Raises:
        SatInputError: two sources give the same ``<dataset>/<case>``.
    """
    root = Path(root)
    vocabulary = vocabulary or Vocabulary.load()
    _check_unique(sources)
    root.mkdir(parents=True, exist_ok=True)
    done = _finished_cases(root)
    result = StandardiseResult()
    unmapped_names = _read_unmapped(root / UNMAPPED)
    name_maps: dict[tuple[str, tuple[tuple[int, str], ...]], tuple[dict[int, str], dict[int, str]]] = {}
    for source in sources:
        key = (source.dataset, tuple(source.classes.items()))
        if key not in name_maps:  # once per dataset and set of names, so each unmapped name is logged once
            name_maps[key] = map_label_names(source.classes, vocabulary, source=f"dataset {source.dataset}")
        unmapped_names.setdefault(source.dataset, set()).update(name_maps[key][1].values())
    with logging_redirect_tqdm():  # warnings (mask overlaps) print above the progress bar, not through it
        for source in tqdm(sources, desc=PROG, unit="case", disable=not progress):
            if source.key in done:
                result.skipped.append(source.key)
                continue
            try:
                _check_names(source)
                mapped, unmapped = name_maps[(source.dataset, tuple(source.classes.items()))]
                entry = standardise_case(source.load(), mapped, unmapped, root)
                _append_line(root / MANIFEST, entry)
                result.written.append(source.key)
            except Exception as error:  # one bad case must not stop the others; each is reported
                reason = " ".join(str(error).split())
                if not isinstance(error, SatInputError):
                    reason = f"{type(error).__name__}: {reason}"
                result.failed[source.key] = reason
                tqdm.write(f"{PROG}: case {source.key} failed: {reason}", file=sys.stderr)
    result.unmapped = {dataset: sorted(names) for dataset, names in sorted(unmapped_names.items()) if names}
    write_json(result.unmapped, root / UNMAPPED)
    return result


def standardise_case(case: LabelledCase, mapped: dict[int, str], unmapped: dict[int, str], root: Path) -> ManifestEntry:
    """Write one case's image and label map on the model grid; return its manifest entry (not yet appended).

    Args:
        case: the case as read.
        mapped, unmapped: :func:`~satseg_training.data.names.map_label_names` of ``case.classes``.
        root: the output root.
    """
    if case.image is None:
        prepared = prepare(Volume(case.labels, case.affine), LABEL_ONLY_MODALITY)
    else:
        prepared = prepare(case.image, case.modality)
    labels = prepared.labels_to_grid(case.labels)
    present = [int(value) for value in np.flatnonzero(np.bincount(labels.ravel())) if value != 0]
    image_path = None if case.image is None else f"{IMAGES}/{case.dataset}/{case.case_id}.nii.gz"
    labels_path = f"{LABELS}/{case.dataset}/{case.case_id}.nii.gz"
    if image_path is not None:
        save_nifti_exact(prepared.image.numpy(), prepared.affine, root / image_path, compresslevel=_COMPRESSION)
    save_nifti_exact(labels, prepared.affine, root / labels_path, compresslevel=_COMPRESSION)
    return ManifestEntry(
        case=f"{case.dataset}/{case.case_id}",
        dataset=case.dataset,
        modality=LABEL_ONLY_MODALITY if case.image is None else case.modality,
        image=image_path,
        labels=labels_path,
        classes={value: mapped[value] for value in present if value in mapped},
        unmapped={value: unmapped[value] for value in present if value in unmapped},
        extra_labels=tuple(value for value in present if value not in mapped and value not in unmapped),
        synthetic="synthseg" if case.image is None else None,
        shape=labels.shape,
        affine=prepared.affine,
    )


def _check_unique(sources: Sequence[CaseSource]) -> None:
    seen: set[str] = set()
    for source in sources:
        if source.key in seen:
            raise SatInputError(f"case {source.key} is given twice; each <dataset>/<case> must be unique")
        seen.add(source.key)


def _check_names(source: CaseSource) -> None:
    """Dataset and case names become path parts: letters, digits, ``.``, ``_``, ``-``, not starting hidden."""
    for what, name in (("dataset", source.dataset), ("case", source.case_id)):
        if not _SAFE_NAME.match(name):
            raise SatInputError(
                f"{what} name {name!r} is not usable as a file name; use letters, digits, '.', '_' and '-'"
            )


def _finished_cases(root: Path) -> dict[str, ManifestEntry]:
    """Entries of ``root/manifest.jsonl`` whose files exist, by case.

    The manifest is rewritten (atomically) without lines that are cut short (an interrupted append) or
    whose files are gone, so those cases are rebuilt and appended once.
    """
    path = root / MANIFEST
    if not path.exists():
        return {}
    text = path.read_text("utf-8")
    kept: dict[str, tuple[str, ManifestEntry]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = parse_manifest_line(line)
        except (ValueError, KeyError, TypeError, AttributeError):
            logger.warning("dropped an unreadable manifest line (an interrupted run?): %.80s", line)
            continue
        files = [entry.labels] if entry.image is None else [entry.image, entry.labels]
        if all((root / file).is_file() for file in files):
            kept[entry.case] = (line, entry)
        else:
            logger.warning("case %s: its files are missing; rebuilding it", entry.case)
    kept_text = "".join(f"{line}\n" for line, _ in kept.values())
    if kept_text != text:
        write_bytes_atomically(path, kept_text.encode("utf-8"))
    return {case: entry for case, (_, entry) in kept.items()}


def _append_line(path: Path, entry: ManifestEntry) -> None:
    """Append ``entry`` as one JSON line and flush it to disk."""
    line = json.dumps(entry.to_json(), ensure_ascii=False, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as file:
        file.write(line)
        file.flush()
        os.fsync(file.fileno())


def _read_unmapped(path: Path) -> dict[str, set[str]]:
    """``unmapped.json`` of earlier runs as sets; absent or unreadable means none."""
    try:
        document = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(document, dict):
        return {}
    return {str(key): {str(name) for name in names} for key, names in document.items() if isinstance(names, list)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser(
        PROG,
        "Put labelled datasets (nnU-Net, label map + names, mask folders, JSONL manifests, SynthSeg maps)\n"
        "on SAT's model grid, in one form for training.",
        EPILOG,
    )
    parser.add_argument("--output", "-o", type=Path, required=True, metavar="ROOT", help="folder to write into")
    parser.add_argument(
        "--nnunet", type=Path, action="append", default=[], metavar="DIR", help="an nnU-Net raw dataset folder"
    )
    parser.add_argument(
        "--labelmap",
        type=Path,
        nargs=3,
        action="append",
        default=[],
        metavar=("IMAGE", "LABELS", "NAMES_JSON"),
        help='an image, its label map and a names JSON {"1": "spleen", ...} (needs --modality)',
    )
    parser.add_argument(
        "--mask-folder",
        type=Path,
        nargs=2,
        action="append",
        default=[],
        metavar=("IMAGE", "FOLDER"),
        help="an image and a folder of binary masks <structure>.nii.gz, overlaps to the later file (needs --modality)",
    )
    parser.add_argument(
        "--manifest", type=Path, action="append", default=[], metavar="FILE", help="a JSONL manifest of cases"
    )
    parser.add_argument(
        "--synthseg",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of label-only SynthSeg maps training_seg_*.nii.gz with labels.json",
    )
    parser.add_argument(
        "--modality",
        help="ct, mri, pet or us: the modality of --labelmap and --mask-folder cases; overrides --nnunet channel names",
    )
    parser.add_argument(
        "--dataset",
        help="dataset of --labelmap and --mask-folder cases (default: the labels' folder, the mask folder's parent)",
    )
    parser.add_argument("--vocabulary", type=Path, help="vocabulary JSON (default: the packaged one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def collect_sources(args: argparse.Namespace) -> list[CaseSource]:
    """The cases named by the command line, in the order of the options' kinds.

    Raises:
        SatInputError: no sources, a missing --modality, or a source that cannot be listed.
    """
    if not (args.nnunet or args.labelmap or args.mask_folder or args.manifest or args.synthseg):
        raise SatInputError("no sources given; pass --nnunet, --labelmap, --mask-folder, --manifest or --synthseg")
    if (args.labelmap or args.mask_folder) and not args.modality:
        raise SatInputError("--labelmap and --mask-folder need --modality (ct, mri, pet or us)")
    sources: list[CaseSource] = []
    for folder in args.nnunet:
        sources += nnunet_cases(folder, modality=args.modality)
    for image, labels, names in args.labelmap:
        dataset = args.dataset or labels.resolve().parent.name
        sources.append(labelmap_case(image, labels, names, modality=args.modality, dataset=dataset))
    for image, folder in args.mask_folder:
        dataset = args.dataset or folder.resolve().parent.name
        sources.append(mask_folder_case(image, folder, modality=args.modality, dataset=dataset))
    for manifest in args.manifest:
        sources += manifest_cases(manifest)
    for folder in args.synthseg:
        sources += synthseg_cases(folder)
    return sources


def _run(args: argparse.Namespace) -> int:
    vocabulary = Vocabulary.load(args.vocabulary)
    result = standardise(collect_sources(args), args.output, vocabulary=vocabulary, progress=not args.no_progress)
    print(
        f"{len(result.written) + len(result.skipped)} of "
        f"{len(result.written) + len(result.skipped) + len(result.failed)} cases standardised in {args.output} "
        f"({len(result.written)} written, {len(result.skipped)} already done, {len(result.failed)} failed)"
    )
    if result.unmapped:
        print(f"label names not in the vocabulary (kept in the label maps, not prompts; see {UNMAPPED}):")
        for dataset, names in result.unmapped.items():
            print(f"  {dataset}: {', '.join(names)}")
    if result.failed:
        print("failed cases:")
        for key, reason in result.failed.items():
            print(f"  {key}: {reason}")
    return 1 if result.failed else 0


def main(argv: list[str] | None = None) -> int:
    """``sat-standardise``: see ``--help``."""
    logging.basicConfig(format=f"{PROG}: %(message)s", level=logging.WARNING)
    args = parse_args(argv)
    return run_cli(PROG, lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main())
