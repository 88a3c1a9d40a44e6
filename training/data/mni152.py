"""nilearn's MNI152 2009 T1 template with its white- and grey-matter maps: a real brain MRI on every machine.

The template and its tissue probability maps ship inside the nilearn wheel (the ``train`` extra), so they
need no download. Labels are the maps above 0.5 (disjoint at that level). nilearn's ready-made
``load_mni152_*_mask`` masks are not used: they are thresholded at 0.2 and dilated, so white and grey
overlap by 0.6 L and a perfect segmentation could not score well against them. White matter here includes
the cerebellar white matter and brainstem tracts, grey matter the deep nuclei and the cerebellar cortex, so
they are looser references for "cerebral white matter" and "cerebral cortex" than a parcellation would be.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from satseg.geometry import Volume
from satseg.outputs import write_json
from satseg.outputs.nifti import save_nifti_exact

MNI152_TISSUES = {1: "cerebral white matter", 2: "cerebral cortex"}
"""Label values of :func:`load_mni152`'s tissue map: nilearn's white and grey matter, as the closest terms."""
MNI152_SIDED_TISSUES = {
    1: "left cerebral white matter",
    2: "left cerebral cortex",
    3: "right cerebral white matter",
    4: "right cerebral cortex",
}
"""Label values of :func:`sided_tissues`: :data:`MNI152_TISSUES` split at the midline (MNI x = 0)."""
TISSUE_PROBABILITY_THRESHOLD = 0.5


def load_mni152() -> tuple[Volume, np.ndarray]:
    """The template (197x233x189 at 1 mm, RAS, skull-stripped, values 0..1) and its tissue labels.

    Returns:
        ``(volume, labels)``: the T1 as an ``mri`` :class:`Volume`, and uint8 labels on its grid
        (:data:`MNI152_TISSUES`: where the white- or grey-matter probability exceeds 0.5).
    """
    from nilearn import datasets  # only this source needs nilearn

    template = datasets.load_mni152_template(resolution=1)
    white = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj) > TISSUE_PROBABILITY_THRESHOLD
    grey = np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj) > TISSUE_PROBABILITY_THRESHOLD
    labels = np.where(white, 1, np.where(grey, 2, 0)).astype(np.uint8)  # probabilities sum to <= 1: disjoint
    return Volume(np.asarray(template.dataobj, dtype=np.float32), template.affine, "mri"), labels


def sided_tissues(labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """:data:`MNI152_TISSUES` labels split into hemispheres at MNI x = 0 (:data:`MNI152_SIDED_TISSUES`).

    MNI space puts the interhemispheric plane at x = 0 and the patient's left at x < 0 (RAS+). The split is a
    plane, not a parcellation: the few voxels of a hemisphere that cross it count for the other side.

    Args:
        labels: ``[I, J, K]`` values of :data:`MNI152_TISSUES` (0 background).
        affine: ``[4, 4]`` voxel -> MNI (RAS+) mm.

    Returns:
        ``[I, J, K]`` uint8: 1/2 left white/grey matter, 3/4 right, 0 background.
    """
    x_mm = affine[0, :3] @ np.indices(labels.shape).reshape(3, -1) + affine[0, 3]
    right = (x_mm >= 0).reshape(labels.shape)
    return np.where(labels > 0, labels + 2 * right, 0).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    """``sat-mni152``: write the template, and optionally its tissue labels and their names, as NIfTI."""
    parser = argparse.ArgumentParser(
        prog="sat-mni152",
        description="Write nilearn's MNI152 2009 T1 template (a real, skull-stripped brain MRI; no download).",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="T1 image to write (.nii.gz)")
    parser.add_argument("--labels", type=Path, help="also write white/grey matter (probability > 0.5) as labels here")
    parser.add_argument("--names", type=Path, help="also write the label names here (JSON)")
    args = parser.parse_args(argv)
    volume, labels = load_mni152()
    save_nifti_exact(volume.array, volume.affine, args.output)
    if args.labels:
        save_nifti_exact(labels, volume.affine, args.labels)
    if args.names:
        write_json({str(value): name for value, name in MNI152_TISSUES.items()}, args.names)
    print(f"wrote {args.output} ({'x'.join(map(str, volume.shape))}, 1 mm, MNI152 2009 from nilearn)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
