"""Window economy: how many windows each rule runs, and what the model spec's rule costs in accuracy.

1. Window counts on real and synthetic volumes, for the ``nano`` (288 x 288 x 96) and ``tiny`` / demo
   (96 x 96 x 32) windows: nnU-Net placement over our whole crop (before the economy rules), ours now
   (``WindowSpec.trim_margin`` and ``edge_allowance``), and the reference rule (crop at HU > 0 without a
   margin, a stride of half a window, the last window snapped to the end).
2. The bundled demo model's learning checks (the training CT on its own grid and rotated 15 degrees, and the
   MNI152 T1), Dice per structure with the placement before, with each rule alone, and with both (now), in
   one run.

    python benchmarks/window_economy.py
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

from machine import cpu_model
from reference_sat import reference_window_count

from satseg.engine.preprocess import prepare
from satseg.geometry import Volume, load_volume
from satseg.phantom import centred_affine, make_torso_phantom
from satseg.pipeline import Segmenter
from satseg.spec import PreprocessConfig, WindowSpec
from satseg.window import planned_windows
from satseg_training.evaluate import evaluate_case
from satseg_training.evaluation.cases import case_from_files, mni152_case
from satseg_training.evaluation.prompts import labelled_prompts, parse_prompts

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOTALSEG = ROOT.parent / "shared" / "data" / "totalseg"
DEMO = ROOT / "models" / "demo"
PATCHES = {"nano": (288, 288, 96), "tiny": (96, 96, 32)}
ABDOMEN = ("liver", "spleen", "left kidney", "right kidney", "stomach", "aorta")


def volumes() -> dict[str, tuple[Volume, str]]:
    """The volumes counted: the shared CTs and MR where present, the MNI152 T1 and two synthetic torsos."""
    found = {}
    for name, path, modality in (
        ("example_ct", TOTALSEG / "example_ct.nii.gz", "ct"),
        ("example_ct_sm", TOTALSEG / "example_ct_sm.nii.gz", "ct"),
        ("aorta_crop", TOTALSEG / "aorta_crop" / "ct_cropped.nii.gz", "ct"),
        ("pulmonary_crop", TOTALSEG / "pulmonary_crop" / "ct_cropped.nii.gz", "ct"),
        ("example_mr_sm", TOTALSEG / "example_mr_sm.nii.gz", "mri"),
    ):
        if path.is_file():
            found[name] = (load_volume(path), modality)
    found["mni152"] = (mni152_case().volume, "mri")
    for name, shape, spacing, degrees in (
        ("torso 200x160x60, 2x2x5 mm", (200, 160, 60), (2.0, 2.0, 5.0), 0.0),
        ("torso 160x160x80, 2.5 mm, oblique 15", (160, 160, 80), (2.5, 2.5, 2.5), 15.0),
    ):
        found[name] = (make_torso_phantom(shape, centred_affine(shape, spacing, degrees))[0], "ct")
    return found


def count_windows() -> None:
    print("| volume | window | before: grid, windows | now: windows | reference: grid, windows |")
    print("|---|---|---|---:|---|")
    before_spec = PreprocessConfig()
    reference_crop = replace(before_spec, ct_foreground_hu=0.0, crop_margin_mm=0.0)
    for name, (volume, modality) in volumes().items():
        for size, patch in PATCHES.items():
            window = WindowSpec(patch_size=patch)
            grid = tuple(prepare(volume, modality, before_spec).image.shape)
            before = len(planned_windows(grid, patch, window.overlap)[1])
            economical = tuple(prepare(volume, modality, before_spec, window).image.shape)
            now = len(planned_windows(economical, patch, window.overlap, window.edge_allowance)[1])
            reference = tuple(prepare(volume, modality, reference_crop).image.shape)
            counted = reference_window_count(reference, patch)
            print(f"| {name} | {size} | {grid}, {before} | {now} | {reference}, {counted} |")


PLACEMENTS = {
    "before": {"trim_margin": False, "edge_allowance": 0.0},
    "trim only": {"edge_allowance": 0.0},
    "allowance only": {"trim_margin": False},
    "now": {},
}
"""The window rules compared, as changes to the bundled model's spec: neither, each alone, both (the spec's)."""


def accuracy() -> None:
    now = Segmenter.from_checkpoint(DEMO)
    segmenters = {}
    for label, changes in PLACEMENTS.items():
        segmenter = copy.copy(now)
        segmenter.spec = replace(now.spec, window=replace(now.spec.window, **changes))
        segmenters[label] = segmenter
    cases = []
    if (TOTALSEG / "example_ct.nii.gz").is_file():
        ct = case_from_files(
            TOTALSEG / "example_ct.nii.gz",
            TOTALSEG / "example_seg_fast_force_split.nii.gz",
            TOTALSEG / "classes_total.json",
            "ct",
            now.vocabulary,
        )
        prompts = [prompt for prompt in labelled_prompts(ct) if prompt.term in ABDOMEN]
        cases += [(ct, prompts, "input"), (ct, prompts, "oblique15")]
    mni = mni152_case()
    tissues = parse_prompts("cerebral white matter,cerebral cortex", now.vocabulary)  # both hemispheres, as recorded
    cases.append((mni, tissues, "input"))
    others = [label for label in PLACEMENTS if label != "before"]
    print(f"| case | grid | structure | Dice before | {' | '.join(f'change, {label}' for label in others)} |")
    print(f"|---|---|---|---:|{'---:|' * len(others)}")
    for case, prompts, geometry in cases:
        rows = {label: evaluate_case(segmenter, case, prompts, geometry) for label, segmenter in segmenters.items()}
        counts = []
        for label, segmenter in segmenters.items():
            window, grid = segmenter.spec.window, tuple(rows[label][0]["model_grid"])
            counts.append(len(planned_windows(grid, window.patch_size, window.overlap, window.edge_allowance)[1]))
        for index, first in enumerate(rows["before"]):
            changes = " | ".join(f"{rows[label][index]['dice'] - first['dice']:+.4f}" for label in others)
            print(f"| {case.name} | {geometry} | {first['structure']} | {first['dice']:.4f} | {changes} |")
        print(f"windows ({', '.join(PLACEMENTS)}): {', '.join(map(str, counts))}")


def main() -> None:
    print(f"machine: {cpu_model()}")
    count_windows()
    accuracy()


if __name__ == "__main__":
    main()
