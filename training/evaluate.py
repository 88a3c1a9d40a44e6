"""Dice and normalised surface Dice (NSD) per structure, measured through the serving path.

Every case runs through :meth:`satseg.pipeline.Segmenter.segment` (the engine) on the image's own grid, exactly as
``sat-segment`` does, and the thresholded masks are compared with the label map on that same grid: what is
measured is what ships. ``--geometry`` re-evaluates on a second grid of the same world content (reoriented,
or rotated and resampled), to show that results do not depend on how the input was stored.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from satseg.cli.common import cli_parser, run_cli
from satseg.cli.runtime_options import add_runtime_arguments, check_runtime_arguments, segmenter_for
from satseg.engine import Outputs
from satseg.engine.options import InferenceOptions, resolve_device
from satseg.errors import SatInputError
from satseg.pipeline import Segmenter
from satseg_training.evaluation.cases import (
    CONTRASTS,
    INPUT_GEOMETRY,
    EvaluationCase,
    case_from_files,
    case_from_masks,
    check_geometry,
    mni152_case,
    regrid,
    standardised_cases,
)
from satseg_training.evaluation.metrics import DEFAULT_TOLERANCE_MM, dice_score, surface_dice
from satseg_training.evaluation.prompts import Prompt, case_prompts, parse_prompts, truth_mask
from satseg_training.evaluation.report import (
    BASELINE,
    CANDIDATE,
    SINGLE_LABEL,
    UNION,
    grid_dependence,
    kind_summary,
    markdown_report,
    region_summary,
    structure_means,
)

PROG = "sat-evaluate"

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
