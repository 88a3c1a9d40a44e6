"""``sat-segment``: segment a CT, MRI or PET volume from text prompts, in this process."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from satseg.checkout import BUNDLED_CHECKPOINT, GET_A_CHECKPOINT, IN_CHECKOUT
from satseg.cli.common import cli_parser, run_cli
from satseg.cli.runtime_options import add_runtime_arguments, check_runtime_arguments, segmenter_for
from satseg.contract import MAX_OVERLAP, check_overlap, check_threshold
from satseg.engine import Outputs
from satseg.engine.options import InferenceOptions, resolve_device
from satseg.errors import SatInputError
from satseg.geometry import load_volume
from satseg.geometry.io import check_intensities
from satseg.geometry.volume import MODALITIES, choose_modality
from satseg.outputs import WARNINGS_KEY, OutputOptions
from satseg.outputs.run_folder import MANIFEST_FILE, check_output_folder, run_folder
from satseg.outputs.writer import mask_writer, write_result
from satseg.text import ALL_TRAINED, Vocabulary, asks_all_trained

EPILOG = f"""examples:
  sat-segment -i ct.nii.gz -o out/ --modality ct --prompts "liver,spleen,left kidney" --statistics --preview
  sat-segment -i dicom_series/ -o out/ --prompts "left hippocampus,right hippocampus" --modality mri --ml
  sat-segment -i ct.nii.gz -o out/ --modality ct --prompts "liver" --checkpoint checkpoints/nano --device cuda
  sat-segment -i ct.nii.gz -o out/ --modality ct --prompts all-trained --ml   # everything the model knows

outputs (all on the input's grid, with the input's affine):
  <term>.nii.gz     one uint8 mask per prompt (spaces become underscores), or with --ml
  labelmap.nii.gz   one uint16 label map; where masks overlap the highest probability wins
  labels.json       label value -> term (also stored in each NIfTI header extension)
  statistics.json   volume in mL and voxel count per structure (--statistics)
  preview.png       three orthogonal slices with coloured overlays (--preview)
  {MANIFEST_FILE}      the run's record and its file list, written last

The folder is replaced whole when the run succeeds: an interrupted or failed run leaves the earlier result
as it was, and a folder holding files no run wrote is refused, not overwritten.

Prompts are anatomy terms from the packaged vocabulary (synonyms and snake_case such as
"kidney_left" are understood). Not for clinical use.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser(
        "sat-segment", "Segment anatomy named by text prompts in a 3D CT, MRI or PET volume (in-process).", EPILOG
    )
    parser.add_argument("-i", "--input", type=Path, required=True, help="a .nii/.nii.gz file or a DICOM series folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the results (created)")
    parser.add_argument(
        "--prompts",
        required=True,
        help=f'comma-separated anatomy terms, e.g. "liver,left kidney"; {ALL_TRAINED}: every term the model was '
        "trained on for the modality (sat-checkpoint info lists them)",
    )
    parser.add_argument(
        "--modality",
        choices=MODALITIES,
        help="imaging modality; default: read from DICOM (required for NIfTI: it selects the intensity normalisation)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=os.environ.get("SATSEG_CHECKPOINT"),
        help="checkpoint folder (config.json + model.safetensors); default $SATSEG_CHECKPOINT or the bundled demo",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    add_runtime_arguments(parser)
    parser.add_argument("--ml", action="store_true", help="write one merged label map instead of one mask per prompt")
    parser.add_argument("--statistics", action="store_true", help="write statistics.json (volume in mL per structure)")
    parser.add_argument("--preview", action="store_true", help="write preview.png (three slices with overlays)")
    parser.add_argument("--threshold", type=float, help="probability threshold in (0, 1) (default: the checkpoint's)")
    parser.add_argument(
        "--keep-all-components",
        action="store_true",
        help="keep every piece of each mask; by default a structure that is one connected body (liver, a kidney, "
        "a vertebra: single_component in the vocabulary) keeps only its largest piece",
    )
    parser.add_argument(
        "--overlap", type=float, help=f"sliding-window overlap in [0, {MAX_OVERLAP}] (default: the checkpoint's)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="windows per model call (default 1)")
    parser.add_argument(
        "--orientation",
        help="working orientation code (default: the checkpoint's, RAS for ours; ASR for sagittal acquisitions)",
    )
    parser.add_argument(
        "--allow-free-text",
        action="store_true",
        help="send prompts missing from the vocabulary to the text encoder",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def choose_checkpoint(requested: Path | None) -> Path:
    if requested is not None:
        return requested
    if IN_CHECKOUT and BUNDLED_CHECKPOINT.is_dir():
        return BUNDLED_CHECKPOINT
    raise SatInputError(f"no checkpoint: {GET_A_CHECKPOINT}")


def check_options(args: argparse.Namespace) -> None:
    if args.threshold is not None:
        check_threshold(args.threshold, "--threshold")
    if args.overlap is not None:
        check_overlap(args.overlap, "--overlap")
    if args.batch_size < 1:
        raise SatInputError(f"--batch-size {args.batch_size} must be at least 1")
    check_runtime_arguments(args)


def segment(args: argparse.Namespace) -> int:
    check_options(args)
    check_output_folder(args.output)
    vocabulary = Vocabulary.load()
    all_trained = asks_all_trained(args.prompts)
    terms = [] if all_trained else vocabulary.resolve_all(args.prompts, allow_free_text=args.allow_free_text)
    volume = load_volume(args.input)
    modality = choose_modality(args.modality, volume.modality)
    check_intensities(volume.array, modality)
    device = resolve_device(args.device)
    options = InferenceOptions(
        overlap=args.overlap,
        batch_size=args.batch_size,
        runtime=args.runtime,
        precision=args.precision,
        threshold=args.threshold,
        keep_largest_component=not args.keep_all_components,
        orientation=args.orientation,
    )
    checkpoint = choose_checkpoint(args.checkpoint)
    segmenter = segmenter_for(args, checkpoint, device, options, vocabulary=vocabulary)
    if all_trained:
        terms = vocabulary.trained_for(segmenter.spec.trained_terms, modality)
    if segmenter.untrained_weights:
        print(f"warning: {checkpoint} holds untrained weights; the masks are meaningless", file=sys.stderr)
    planned = segmenter.plan(terms)
    warnings = planned[0].warnings
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    started = time.perf_counter()
    prepared = segmenter.prepare(volume, modality)
    record = {
        "tool": "sat-segment",
        "terms": terms,
        "modality": modality,
        "shape": list(volume.shape),
        "model_grid": list(prepared.image.shape),  # the grid the spec put the windows on
        WARNINGS_KEY: list(warnings),
    }
    with run_folder(args.output, record) as work:
        # Masks are written as they are cut and none is kept; the label map is kept where a file needs it.
        written: list[Path] = []
        result = segmenter.segment(
            volume,
            terms,
            modality,
            outputs=Outputs(masks=False, labelmap=args.ml or args.preview),
            on_mask=None if args.ml else mask_writer(volume, work, written),
            progress=not args.quiet,
            prepared=prepared,
            planned=planned,
        )
        files = OutputOptions(
            masks=False, merged_labelmap=args.ml, statistics=args.statistics, preview=args.preview, modality=modality
        )
        written += write_result(volume, result, work, files)
    print(
        f"segmented {len(terms)} structure(s) of a {'x'.join(map(str, volume.shape))} {modality} volume "
        f"in {time.perf_counter() - started:.1f} s on {device}; wrote {len(written) + 1} file(s) to {args.output}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("sat-segment", lambda: segment(args))


if __name__ == "__main__":
    raise SystemExit(main())
