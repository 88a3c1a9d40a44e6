"""Grid ceiling: how much Dice a model grid's spacing takes from each brain structure before any model runs.

Training puts label maps on the model grid by nearest neighbour (``PreparedVolume.labels_to_grid``), and
inference brings the model's probabilities back to the input grid trilinearly and thresholds them at 0.5
(``PreparedVolume.to_input_grid``). A model that predicted its training labels perfectly would therefore
score, on a 1 mm scan, the Dice of that round trip. This benchmark measures it for every SynthSeg structure
of the held-out maps 17-20 (256^3 at 1 mm) through the engine's own geometry, for the demo model's grid
(1 x 1 x 3 mm) and finer ones, with what each grid costs in windows on the shared CT and the MNI152 T1.

    python benchmarks/grid_ceiling.py
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model

from satseg.checkpoint import read_metadata
from satseg.engine.preprocess import prepare
from satseg.geometry import Volume, load_volume
from satseg.text import Vocabulary
from satseg.window import planned_windows
from satseg_training.data.mni152 import load_mni152
from satseg_training.data.readers import read_labels, read_names
from satseg_training.evaluation.metrics import dice_score

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "data"
DEMO = ROOT / "models" / "demo"
HELD_OUT = ("training_seg_17", "training_seg_18", "training_seg_19", "training_seg_20")
SPACINGS = ((1.0, 1.0, 3.0), (1.0, 1.0, 2.0), (1.0, 1.0, 1.5), (1.0, 1.0, 1.0))


def round_trip_dice(labels: Volume, classes: dict[int, str], spacing: tuple[float, float, float]) -> dict[str, float]:
    """Per structure, the Dice of its mask after the trip to a ``spacing`` model grid and back."""
    spec = read_metadata(DEMO).model_spec(Vocabulary.load())
    config = replace(spec.preprocess, target_spacing=spacing)
    foreground = Volume((labels.array > 0).astype(np.float32), labels.affine, "mri")
    prepared = prepare(foreground, "mri", config)
    on_grid = prepared.labels_to_grid(labels.array)
    scores = {}
    for value, name in classes.items():
        truth = labels.array == value
        back = prepared.to_input_grid(torch.from_numpy((on_grid == value).astype(np.float32))).numpy() > 0.5
        scores[name] = dice_score(back, truth)
    return scores


def window_count(volume: Volume, modality: str, spacing: tuple[float, float, float]) -> int:
    """The windows the demo model's spec runs over ``volume`` on a ``spacing`` grid."""
    spec = read_metadata(DEMO).model_spec(Vocabulary.load())
    prepared = prepare(volume, modality, replace(spec.preprocess, target_spacing=spacing), spec.window)
    window = spec.window
    return len(
        planned_windows(tuple(prepared.image.shape), window.patch_size, window.overlap, window.edge_allowance)[1]
    )


def main() -> None:
    folder = SHARED / "synthseg"
    if not folder.is_dir():
        raise SystemExit(f"grid_ceiling needs the SynthSeg maps in {folder}")
    classes = {int(value): name for value, name in read_names(folder / "labels.json").items()}
    print(f"# Grid ceiling ({cpu_model()})\n")
    means: dict[tuple[float, ...], dict[str, list[float]]] = {spacing: {} for spacing in SPACINGS}
    for case in HELD_OUT:
        labels = read_labels(folder / f"{case}.nii.gz")
        for spacing in SPACINGS:
            for name, dice in round_trip_dice(labels, classes, spacing).items():
                means[spacing].setdefault(name, []).append(dice)
    header = " | ".join(f"{'x'.join(f'{s:g}' for s in spacing)} mm" for spacing in SPACINGS)
    print(f"| structure | {header} |")
    print(f"|---|{'---:|' * len(SPACINGS)}")
    for name in classes.values():
        print(f"| {name} | {' | '.join(f'{np.mean(means[spacing][name]):.3f}' for spacing in SPACINGS)} |")
    overall = " | ".join(f"{np.mean([np.mean(v) for v in means[s].values()]):.3f}" for s in SPACINGS)
    print(f"| **mean of {len(classes)}** | {overall} |")
    costs = [("MNI152 T1", load_mni152()[0], "mri")]
    if (SHARED / "totalseg" / "example_ct.nii.gz").exists():
        costs.append(("example_ct", load_volume(SHARED / "totalseg" / "example_ct.nii.gz"), "ct"))
    for title, volume, modality in costs:
        counts = " | ".join(str(window_count(volume, modality, spacing)) for spacing in SPACINGS)
        print(f"| windows on {title} | {counts} |")


if __name__ == "__main__":
    main()
