"""Dice and normalised surface Dice (NSD) per structure, measured through the serving path.

Every case runs through :meth:`satseg.pipeline.Segmenter.segment` (the engine) on the image's own grid, exactly as
``sat-segment`` does, and the thresholded masks are compared with the label map on that same grid: what is
measured is what ships. ``--geometry`` re-evaluates on a second grid of the same world content (reoriented,
or rotated and resampled), to show that results do not depend on how the input was stored.
"""

from __future__ import annotations

import argparse
import json
import warnings
import zlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage
from scipy.spatial.transform import Rotation
from tqdm.auto import tqdm

from satseg.cli.common import cli_parser, run_cli
from satseg.cli.runtime_options import add_runtime_arguments, check_runtime_arguments, segmenter_for
from satseg.engine import Outputs
from satseg.errors import SatInputError
from satseg.geometry import Volume, load_volume
from satseg.geometry.volume import check_modality
from satseg.pipeline import InferenceOptions, Segmenter, resolve_device
from satseg.spec import PreprocessConfig
from satseg.text import Vocabulary
from satseg_training.data.mni152 import MNI152_SIDED_TISSUES, load_mni152, sided_tissues
from satseg_training.data.names import map_label_names
from satseg_training.data.readers import (
    check_same_grid,
    mask_files_case,
    mask_folder_case,
    nifti_stem,
    read_labels,
    read_names,
)
from satseg_training.data.standardised import StandardisedDataset

PROG = "sat-evaluate"
DEFAULT_TOLERANCE_MM = 2.0
INPUT_GEOMETRY = "input"
OBLIQUE = "oblique"
NO_REGION = "other"
ALL_REGIONS = "all"
CONTRASTS = ("any", "t1")
"""How label-only maps are synthesised: any contrast per label, or named tissues in T1-weighted order."""
CANDIDATE, BASELINE = "candidate", "baseline"
LABELLED = "labelled"
"""The ``--prompts`` item that stands for every term labelled in a case."""
SINGLE_LABEL, UNION = "single label", "union of labels"
"""Prompt kinds: the ground truth is one labelled term ("left thalamus"), or several ("thalamus")."""

EPILOG = """examples (sat-evaluate is the installed name of python -m satseg_training.evaluate):
  python -m satseg_training.evaluate --checkpoint runs/demo/checkpoint --output runs/demo/evaluation \\
      --case ct.nii.gz seg.nii.gz classes_total.json ct --geometry lps oblique15
  python -m satseg_training.evaluate --checkpoint runs/demo/checkpoint --output runs/demo/evaluation-holdout \\
      --standardised data/standardised --cases synthseg/training_seg_17,synthseg/training_seg_18
  python -m satseg_training.evaluate --checkpoint CKPT --output OUT --case ct.nii.gz seg.nii.gz classes.json ct \\
      --prompts "liver,kidney=left kidney+right kidney"
  python -m satseg_training.evaluate --checkpoint models/demo --output runs/mni --mni152 \\
      --prompts "cerebral white matter,cerebral cortex"
  python -m satseg_training.evaluate --checkpoint runs/new/checkpoint --baseline models/demo --output runs/crop \\
      --mask-case crop/ct_cropped.nii.gz crop ct --prompts aorta

outputs (under --output):
  evaluation.md     per-region and per-kind summaries, per-structure means over cases and the
                    per-case table (Markdown); with --baseline, both models side by side
  evaluation.json   the same numbers, plus the settings

Prompts: by default every vocabulary term labelled in a case. With --prompts, each item is a prompt,
optionally "=" and the label terms (joined by "+") whose union is its ground truth; without "=", a parent
term's ground truth is the union of its own and its descendants' labels. The item "labelled" stands for
every term labelled in each case ("labelled,thalamus": each side, and both together).
Geometries: "input" (always), nibabel axis codes such as "lps" or "asr" (exact reorientation), or
"obliqueN" (the voxel axes rotated N degrees about z and x; image linear, labels nearest-neighbour).
NSD counts the surface within the tolerance (mm, voxel spacing respected; MONAI's compute_surface_dice).
"""


@dataclass(frozen=True)
class EvaluationCase:
    """One labelled volume on its own grid.

    Attributes:
        name: shown in the reports.
        volume: the image as a user would pass it to ``sat-segment``.
        labels: ``[I, J, K]`` integer label values on ``volume``'s grid, 0 background.
        classes: label value -> canonical vocabulary term (several values may share a term).
        modality: one of ``MODALITIES``.
    """

    name: str
    volume: Volume
    labels: np.ndarray
    classes: dict[int, str]
    modality: str


@dataclass(frozen=True)
class Prompt:
    """What is asked (``term``, sent to the model) and the label terms whose union is its ground truth."""

    term: str
    truth: tuple[str, ...]


def dice_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    """``2 |P & T| / (|P| + |T|)`` of two boolean masks of one shape, in [0, 1]; 1.0 when both are empty."""
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def surface_dice(
    prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float = DEFAULT_TOLERANCE_MM
) -> float:
    """Normalised surface Dice of two boolean ``[I, J, K]`` masks, in [0, 1].

    The fraction of both surfaces (weighted by surface area, DeepMind's surface elements via MONAI's
    ``use_subvoxels``) lying within ``tolerance_mm`` of the other surface, distances in mm with the voxel
    ``spacing``. 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    from monai.metrics import compute_surface_dice  # slow import, only needed here

    if not prediction.any() or not truth.any():
        return float(prediction.any() == truth.any())
    with warnings.catch_warnings():
        # MONAI 1.5+ passes its own deprecated argument internally; nothing for a caller to change.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        value = compute_surface_dice(
            torch.from_numpy(np.ascontiguousarray(prediction))[None, None],
            torch.from_numpy(np.ascontiguousarray(truth))[None, None],
            class_thresholds=[float(tolerance_mm)],
            include_background=True,
            spacing=[float(size) for size in spacing],
            use_subvoxels=True,
        )
    return float(value[0, 0])


def check_geometry(geometry: str) -> str:
    """``geometry`` in its canonical spelling: ``input``, axis codes (``lps``) or ``obliqueN`` (``oblique15``).

    Raises:
        SatInputError: any other name.
    """
    name = geometry.strip().lower()
    if name == INPUT_GEOMETRY:
        return name
    if name.startswith(OBLIQUE):
        try:
            float(name[len(OBLIQUE) :])
        except ValueError:
            raise SatInputError(f"geometry {geometry!r}: expected obliqueN with N in degrees, e.g. oblique15") from None
        return name
    try:
        PreprocessConfig(orientation=name.upper())  # the model grid's own check of axis codes
    except SatInputError as error:
        raise SatInputError(f"geometry {geometry!r}: expected input, obliqueN or axis codes; {error}") from None
    return name


def regrid(volume: Volume, labels: np.ndarray, geometry: str) -> tuple[Volume, np.ndarray]:
    """The same world content on another grid: ``(volume, labels)`` for ``geometry`` (see :func:`check_geometry`).

    Axis codes reorient exactly (a signed permutation of the arrays); ``obliqueN`` resamples (:func:`_rotated`).
    """
    name = check_geometry(geometry)
    if name == INPUT_GEOMETRY:
        return volume, labels
    if name.startswith(OBLIQUE):
        return _rotated(volume, labels, float(name[len(OBLIQUE) :]))
    ornt = ornt_transform(io_orientation(volume.affine), axcodes2ornt(tuple(name.upper())))
    affine = volume.affine @ inv_ornt_aff(ornt, volume.shape)
    array = np.ascontiguousarray(apply_orientation(volume.array, ornt))
    return Volume(array, affine, volume.modality), np.ascontiguousarray(apply_orientation(labels, ornt))


def _rotated(volume: Volume, labels: np.ndarray, degrees: float) -> tuple[Volume, np.ndarray]:
    """A grid whose voxel axes are rotated ``degrees`` about world z then x, same spacing, covering the input.

    The image is resampled linearly (outside the input: its minimum, air for CT), the labels by nearest
    neighbour (outside: 0).
    """
    direction = Rotation.from_euler("zx", [degrees, degrees], degrees=True).as_matrix() @ volume.affine[:3, :3]
    corners = np.array(np.meshgrid(*[[-0.5, size - 0.5] for size in volume.shape], indexing="ij")).reshape(3, -1)
    world = volume.affine[:3, :3] @ corners + volume.affine[:3, 3:4]
    positions = np.linalg.solve(direction, world)  # the corners in voxel units of the rotated axes
    low = np.ceil(positions.min(axis=1))
    shape = tuple(int(size) for size in np.floor(positions.max(axis=1)) - low + 1)
    affine = np.eye(4)
    affine[:3, :3] = direction
    affine[:3, 3] = direction @ low
    new_to_old = np.linalg.solve(volume.affine, affine)
    matrix, offset = new_to_old[:3, :3], new_to_old[:3, 3]
    image = ndimage.affine_transform(
        volume.array.astype(np.float32),
        matrix,
        offset,
        output_shape=shape,
        order=1,
        mode="grid-constant",
        cval=float(volume.array.min()),
    )
    resampled = ndimage.affine_transform(
        labels, matrix, offset, output_shape=shape, order=0, mode="grid-constant", cval=0
    )
    return Volume(image, affine, volume.modality), resampled


def case_from_files(
    image: Path, labels: Path, names: Path | Mapping[int, str], modality: str, vocabulary: Vocabulary
) -> EvaluationCase:
    """A case from an image, its label map and the label names (a JSON file ``{"1": "spleen"}`` or a mapping).

    Names are resolved to vocabulary terms ("kidney_left" -> "left kidney"); unresolved ones are left out
    (with a warning).

    Raises:
        SatInputError: unreadable files, labels off the image's grid, an unknown modality.
    """
    raw = read_names(Path(names)) if isinstance(names, Path | str) else dict(names)
    volume, label_volume = load_volume(image), read_labels(Path(labels))
    check_same_grid(volume, label_volume, f"labels {Path(labels).name}")
    name = nifti_stem(Path(image))
    mapped, _ = map_label_names(raw, vocabulary, source=f"case {name}")
    return EvaluationCase(name, volume, label_volume.array, mapped, check_modality(modality))


def case_from_masks(image: Path, masks: Path, modality: str, vocabulary: Vocabulary) -> EvaluationCase:
    """A case from an image and binary masks named ``<structure>.nii.gz`` (TotalSegmentator's layout): one
    mask file, or a folder of them (:func:`satseg_training.data.readers.mask_folder_case`); named after the folder.

    One file keeps its structure whole where a folder's masks overlap (a later file wins there: an aorta
    under its lumens' masks).

    Raises:
        SatInputError: unreadable files, a mask off the image's grid, an empty folder, an unknown modality.
    """
    masks = Path(masks)
    if masks.is_dir():
        source = mask_folder_case(Path(image), masks, modality=modality, dataset="evaluation")
    else:
        name = masks.parent.name
        source = mask_files_case(Path(image), [masks], modality=modality, dataset="evaluation", case_id=name)
    loaded = source.load()
    assert loaded.image is not None  # masks always come with their image
    mapped, _ = map_label_names(loaded.classes, vocabulary, source=f"masks {masks.name}")
    return EvaluationCase(loaded.case_id, loaded.image, loaded.labels, mapped, loaded.modality)


def mni152_case() -> EvaluationCase:
    """nilearn's MNI152 2009 T1 template scored against its white/grey-matter maps (see
    ``satseg_training.data.mni152``), each split into hemispheres at the midline: "cerebral white matter" is
    scored against both, "left cerebral white matter" against its half."""
    volume, labels = load_mni152()
    sided = sided_tissues(labels, volume.affine)
    return EvaluationCase("mni152_2009_nilearn", volume, sided, dict(MNI152_SIDED_TISSUES), "mri")


def standardised_cases(
    root: Path, keys: Sequence[str] | None, seed: int = 0, contrast: str = CONTRASTS[0]
) -> list[EvaluationCase]:
    """Cases of a standardised root (all, or those whose ``<dataset>/<case>`` key is in ``keys``).

    Their grid is the standardised model grid (the original is not kept). Label-only maps get an image
    synthesised with a generator seeded by ``seed`` and the case key, so reruns see the same image, in
    ``contrast`` (one of :data:`CONTRASTS`: ``"t1"`` puts the named tissues in T1-weighted order).
    Non-CT images are shifted to start at 0: they are z-scored, and the MRI/PET foreground crop keeps
    values above 0, while the normalisation itself ignores a shift.

    Raises:
        SatInputError: an unreadable root, or a key naming no case.
    """
    dataset = StandardisedDataset(root)
    index = {entry.case: position for position, entry in enumerate(dataset.cases)}
    wanted = list(index) if keys is None else list(keys)
    missing = [key for key in wanted if key not in index]
    if missing:
        raise SatInputError(f"cases not in {root / 'manifest.jsonl'}: {', '.join(missing)}")
    cases = []
    for key in wanted:
        image, labels, entry = dataset.load(index[key])
        if image is None:
            from satseg_training.data.synthseg import synthesize_image, t1_mean_ranges  # only label-only maps need it

            rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
            ranges = t1_mean_ranges(entry.classes) if contrast == "t1" else None
            image = synthesize_image(labels, rng, mean_ranges=ranges)  # on the model grid, its default spacing
        if entry.modality != "ct":
            image = image - image.min()
        volume = Volume(image, entry.affine, entry.modality)
        cases.append(EvaluationCase(key, volume, labels, dict(entry.classes), entry.modality))
    return cases


def descendants(term: str, vocabulary: Vocabulary) -> tuple[str, ...]:
    """``term`` and every term below it in the vocabulary's children (just ``term`` for free text)."""
    found = [term]
    pending = [term]
    while pending:
        current = pending.pop()
        children = vocabulary.children_of(current) if current in vocabulary else ()
        for child in children:
            if child not in found:
                found.append(child)
                pending.append(child)
    return tuple(found)


def parse_prompts(text: str, vocabulary: Vocabulary, *, allow_free_text: bool = False) -> list[Prompt]:
    """Prompts from ``"liver,kidney=left kidney+right kidney"`` (see the EPILOG); the item :data:`LABELLED` is
    left out here (:func:`case_prompts` puts each case's labelled terms in its place).

    Raises:
        SatInputError: no prompts, an unknown prompt (unless ``allow_free_text``) or an unknown label term.
    """
    prompts = []
    items = [part.strip() for part in text.split(",")]
    for item in items:
        if not item or item == LABELLED:
            continue
        spoken, _, parts = item.partition("=")
        term = vocabulary.resolve_all([spoken], allow_free_text=allow_free_text)[0]
        truth = tuple(vocabulary.resolve(name) for name in parts.split("+")) if parts else descendants(term, vocabulary)
        prompts.append(Prompt(term, truth))
    if not prompts and LABELLED not in items:
        raise SatInputError('no prompts in --prompts; pass e.g. "liver,kidney=left kidney+right kidney"')
    return prompts


def case_prompts(case: EvaluationCase, text: str | None, asked: Sequence[Prompt]) -> list[Prompt]:
    """What ``case`` is asked: every labelled term without ``--prompts`` (``text``), else the parsed ``asked``,
    after the case's labelled terms where ``text`` names :data:`LABELLED`."""
    if text is None:
        return labelled_prompts(case)
    if LABELLED not in (part.strip() for part in text.split(",")):
        return list(asked)
    labelled = labelled_prompts(case)
    return labelled + [prompt for prompt in asked if prompt.term not in {item.term for item in labelled}]


def labelled_prompts(case: EvaluationCase) -> list[Prompt]:
    """One prompt per term labelled in ``case`` (values absent from its label map are skipped)."""
    present = set(np.unique(case.labels).tolist())
    terms = sorted({term for value, term in case.classes.items() if value in present})
    return [Prompt(term, (term,)) for term in terms]


def truth_mask(case_labels: np.ndarray, classes: Mapping[int, str], truth: Sequence[str]) -> np.ndarray:
    """Boolean mask of the label values whose term is one of ``truth`` (their union)."""
    values = [value for value, term in classes.items() if term in truth]
    return np.isin(case_labels, values)


def evaluate_case(
    segmenter: Segmenter,
    case: EvaluationCase,
    prompts: Sequence[Prompt],
    geometry: str,
    *,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> list[dict[str, Any]]:
    """Segment ``case`` on ``geometry``'s grid through the serving path and score every prompt.

    Each prediction is the engine's mask, exactly as ``sat-segment`` writes it and the server returns it; its
    ``predicted_ml`` is the engine's volume.

    Returns:
        One row per prompt: case, geometry, structure, kind (:data:`SINGLE_LABEL` or :data:`UNION`: how many
        of the case's labelled terms its ground truth joins), dice, nsd, truth_ml, predicted_ml, truth_voxels
        and model_grid (the grid the checkpoint's spec put the windows on).
    """
    volume, labels = regrid(case.volume, case.labels, geometry)
    rows: list[dict[str, Any]] = []
    prepared = segmenter.prepare(volume, case.modality)
    labelled_terms = set(case.classes.values())

    def score(index: int, term: str, prediction: np.ndarray) -> None:
        truth = truth_mask(labels, case.classes, prompts[index].truth)
        joined = len(labelled_terms.intersection(prompts[index].truth))
        rows.append(
            {
                "case": case.name,
                "geometry": geometry,
                "structure": term,
                "kind": UNION if joined > 1 else SINGLE_LABEL,
                "dice": dice_score(prediction, truth),
                "nsd": surface_dice(prediction, truth, volume.spacing, tolerance_mm),
                "truth_ml": float(truth.sum()) * volume.voxel_volume_ml,
                "truth_voxels": int(truth.sum()),
                "model_grid": list(prepared.image.shape),
            }
        )

    terms = [prompt.term for prompt in prompts]
    result = segmenter.segment(
        volume, terms, case.modality, outputs=Outputs(masks=False), on_mask=score, prepared=prepared
    )
    for row, statistics in zip(rows, result.statistics, strict=True):
        row["predicted_ml"] = statistics["volume_ml"]
    return rows


def group_means(
    rows: Sequence[dict[str, Any]], key: str, group: Callable[[dict[str, Any]], str]
) -> list[dict[str, Any]]:
    """Mean Dice and NSD per (model, geometry, ``group(row)``), and per (model, geometry) over all (``"all"``).

    Rows whose ground truth is empty are left out (their Dice only says whether anything was predicted).
    Each item holds model, geometry, ``key`` (the group), structures (rows averaged), dice and nsd.
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["truth_voxels"]:
            model = row.get("model", CANDIDATE)
            groups[(model, row["geometry"], group(row))].append(row)
            groups[(model, row["geometry"], ALL_REGIONS)].append(row)
    return [
        {
            "model": model,
            "geometry": geometry,
            key: name,
            "structures": len(members),
            "dice": float(np.mean([row["dice"] for row in members])),
            "nsd": float(np.mean([row["nsd"] for row in members])),
        }
        for (model, geometry, name), members in sorted(groups.items())
    ]


def region_summary(rows: Sequence[dict[str, Any]], regions: Mapping[str, str | None]) -> list[dict[str, Any]]:
    """:func:`group_means` by the vocabulary's region of each structure (``regions``: term -> region)."""
    return group_means(rows, "region", lambda row: regions.get(row["structure"]) or NO_REGION)


def kind_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`group_means` by prompt kind: single-label prompts ("left thalamus") apart from unions ("thalamus")."""
    return group_means(rows, "kind", lambda row: row["kind"])


def structure_means(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (geometry, structure), the mean Dice and NSD over the cases with ground truth, per model.

    Each item: geometry, structure, cases, and ``dice`` / ``nsd`` keyed by model (``candidate``, and
    ``baseline`` when one was evaluated).
    """
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["truth_voxels"]:
            groups[(row["geometry"], row["structure"])][row.get("model", CANDIDATE)].append(row)
    return [
        {
            "geometry": geometry,
            "structure": structure,
            "cases": len(by_model[CANDIDATE]),
            "dice": {model: float(np.mean([row["dice"] for row in members])) for model, members in by_model.items()},
            "nsd": {model: float(np.mean([row["nsd"] for row in members])) for model, members in by_model.items()},
        }
        for (geometry, structure), by_model in groups.items()
    ]


def grid_dependence(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per extra geometry, the candidate's largest ``|Dice - Dice on the input grid|`` over a (case, structure)."""
    candidate = [row for row in rows if row.get("model", CANDIDATE) == CANDIDATE]
    on_input = {(row["case"], row["structure"]): row["dice"] for row in candidate if row["geometry"] == INPUT_GEOMETRY}
    largest: dict[str, float] = {}
    for row in candidate:
        if row["geometry"] != INPUT_GEOMETRY:
            difference = abs(row["dice"] - on_input[(row["case"], row["structure"])])
            largest[row["geometry"]] = max(largest.get(row["geometry"], 0.0), difference)
    return largest


def markdown_report(
    rows: Sequence[dict[str, Any]],
    summaries: Mapping[str, Sequence[dict[str, Any]]],
    dependence: Mapping[str, float],
    settings: Mapping[str, Any],
) -> str:
    """``evaluation.md``: the settings, grid dependence, the summaries (``{"region": ..., "kind": ...}``), the
    per-structure means over cases (each model, and the difference when a baseline was evaluated) and the
    per-case table."""
    tolerance = f"NSD@{settings['tolerance_mm']:g}mm"
    means = structure_means(rows)
    compared = any(BASELINE in item["dice"] for item in means)
    lines = [
        "# SAT evaluation",
        "",
        *(f"- {key}: {value}" for key, value in settings.items()),
        *(
            f"- largest |Dice change| on the {name} grid vs the input grid: {value:.3f}"
            for name, value in dependence.items()
        ),
    ]
    for key, summary in summaries.items():
        lines += [
            "",
            f"## Per {key} (structures with ground truth)",
            "",
            f"| model | geometry | {key} | structures | mean Dice | mean {tolerance} |",
            "|---|---|---|---:|---:|---:|",
            *(
                f"| {item['model']} | {item['geometry']} | {item[key]} | {item['structures']} | {item['dice']:.3f} "
                f"| {item['nsd']:.3f} |"
                for item in summary
            ),
        ]
    lines += ["", "## Per structure, mean over cases", ""]
    if compared:
        lines += [
            f"| geometry | structure | cases | Dice | {tolerance} | baseline Dice | baseline {tolerance} "
            "| Dice change |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {item['geometry']} | {item['structure']} | {item['cases']} | {item['dice'][CANDIDATE]:.3f} "
                f"| {item['nsd'][CANDIDATE]:.3f} | {item['dice'][BASELINE]:.3f} | {item['nsd'][BASELINE]:.3f} "
                f"| {item['dice'][CANDIDATE] - item['dice'][BASELINE]:+.3f} |"
                for item in means
            ),
        ]
    else:
        lines += [
            f"| geometry | structure | cases | Dice | {tolerance} |",
            "|---|---|---:|---:|---:|",
            *(
                f"| {item['geometry']} | {item['structure']} | {item['cases']} | {item['dice'][CANDIDATE]:.3f} "
                f"| {item['nsd'][CANDIDATE]:.3f} |"
                for item in means
            ),
        ]
    lines += [
        "",
        "## Per case",
        "",
        f"| model | case | geometry | structure | Dice | {tolerance} | truth mL | predicted mL |",
        "|---|---|---|---|---:|---:|---:|---:|",
        *(
            f"| {row.get('model', CANDIDATE)} | {row['case']} | {row['geometry']} | {row['structure']} "
            f"| {row['dice']:.3f} | {row['nsd']:.3f} | {row['truth_ml']:.1f} | {row['predicted_ml']:.1f} |"
            for row in rows
        ),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser(PROG, "Dice and NSD per structure through the serving path, on the input's own grid.", EPILOG)
    parser.add_argument("--checkpoint", type=Path, required=True, help="satseg checkpoint folder")
    parser.add_argument(
        "--baseline", type=Path, help="a second checkpoint scored on the same cases in the same run, for comparison"
    )
    parser.add_argument("--output", type=Path, required=True, help="folder for evaluation.md and evaluation.json")
    parser.add_argument(
        "--case",
        nargs=4,
        action="append",
        default=[],
        metavar=("IMAGE", "LABELS", "NAMES", "MODALITY"),
        help='image, label map on its grid, names JSON {"1": "spleen", ...}, modality (repeatable)',
    )
    parser.add_argument(
        "--mask-case",
        nargs=3,
        action="append",
        default=[],
        metavar=("IMAGE", "MASKS", "MODALITY"),
        help="image, a <structure>.nii.gz mask or a folder of them on its grid, modality (repeatable)",
    )
    parser.add_argument(
        "--mni152",
        action="store_true",
        help="add nilearn's MNI152 T1 template, scored against its white/grey matter (probability > 0.5)",
    )
    parser.add_argument("--standardised", type=Path, help="a standardised root (manifest.jsonl) to evaluate")
    parser.add_argument(
        "--cases", help="with --standardised: comma-separated case keys (<dataset>/<case>); default all"
    )
    parser.add_argument(
        "--prompts", help='comma-separated prompts, each optionally "=label+label"; default: all labelled'
    )
    parser.add_argument(
        "--allow-free-text", action="store_true", help="send prompts outside the vocabulary as they are"
    )
    parser.add_argument(
        "--geometry", nargs="*", default=[], help="extra grids to evaluate on: lps, asr, ..., obliqueN (e.g. oblique15)"
    )
    parser.add_argument(
        "--tolerance-mm", type=float, default=DEFAULT_TOLERANCE_MM, help="NSD tolerance in mm (default 2)"
    )
    parser.add_argument("--threshold", type=float, help="probability threshold (default: the checkpoint's)")
    parser.add_argument(
        "--keep-all-components",
        action="store_true",
        help="score raw masks: no largest-piece clean-up of single-body structures (served masks have it)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    add_runtime_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the images synthesised for label-only cases")
    parser.add_argument(
        "--contrast",
        choices=CONTRASTS,
        default=CONTRASTS[0],
        help="images synthesised for label-only cases: any contrast per label (default) or T1-ordered tissues",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if not args.case and not args.mask_case and args.standardised is None and not args.mni152:
        raise SatInputError(
            "nothing to evaluate: pass --case or --mask-case (repeatable), --standardised and/or --mni152"
        )
    geometries = list(dict.fromkeys([INPUT_GEOMETRY, *(check_geometry(name) for name in args.geometry)]))
    check_runtime_arguments(args)
    options = InferenceOptions(
        threshold=args.threshold,
        keep_largest_component=not args.keep_all_components,
        runtime=args.runtime,
        precision=args.precision,
    )
    device = resolve_device(args.device)
    models = {CANDIDATE: args.checkpoint} | ({BASELINE: args.baseline} if args.baseline else {})
    segmenters = {model: segmenter_for(args, path, device, options) for model, path in models.items()}
    segmenter = segmenters[CANDIDATE]
    vocabulary = segmenter.vocabulary
    asked = parse_prompts(args.prompts, vocabulary, allow_free_text=args.allow_free_text) if args.prompts else []
    cases = [
        case_from_files(Path(image), Path(labels), Path(names), modality, vocabulary)
        for image, labels, names, modality in args.case
    ]
    cases += [
        case_from_masks(Path(image), Path(masks), modality, vocabulary) for image, masks, modality in args.mask_case
    ]
    if args.mni152:
        cases.append(mni152_case())
    if args.standardised is not None:
        keys = [key.strip() for key in args.cases.split(",") if key.strip()] if args.cases else None
        cases += standardised_cases(args.standardised, keys, args.seed, args.contrast)
    work = [
        (model, case, case_prompts(case, args.prompts, asked), geometry)
        for case in cases
        for geometry in geometries
        for model in segmenters
    ]
    rows: list[dict[str, Any]] = []
    for model, case, prompts, geometry in tqdm(work, desc="evaluate", unit="grid"):
        scored = evaluate_case(segmenters[model], case, prompts, geometry, tolerance_mm=args.tolerance_mm)
        rows += [{"model": model, **row} for row in scored]
    summaries = {
        "region": region_summary(rows, {term.name: term.region for term in vocabulary.terms}),
        "kind": kind_summary(rows),
    }
    dependence = grid_dependence(rows)
    extra = segmenter.metadata.extra if segmenter.metadata else {}
    settings = {
        "checkpoint": str(args.checkpoint),
        "trained steps": extra.get("steps", "untrained"),
        **({"baseline": str(args.baseline)} if args.baseline else {}),
        "tolerance_mm": args.tolerance_mm,
        "threshold": segmenter.spec.postprocess.threshold,
        "largest piece of single-body structures": options.keep_largest_component,
        "runtime": f"{options.runtime} {options.precision}",
        "geometries": ", ".join(geometries),
        "cases": len(cases),
        **({"contrast of synthesised images": args.contrast} if args.standardised is not None else {}),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "evaluation.md").write_text(markdown_report(rows, summaries, dependence, settings))
    document = {
        "settings": settings,
        "regions": summaries["region"],
        "kinds": summaries["kind"],
        "grid_dependence": dependence,
        "structure_means": structure_means(rows),
        "structures": rows,
    }
    (args.output / "evaluation.json").write_text(json.dumps(document, indent=2) + "\n")
    for key, summary in summaries.items():
        for item in summary:
            print(
                f"{item['model']:>9} {item['geometry']:>10} {item[key]:<16} "
                f"Dice {item['dice']:.3f}  NSD {item['nsd']:.3f}"
            )
    print(f"wrote {args.output / 'evaluation.md'} and evaluation.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
