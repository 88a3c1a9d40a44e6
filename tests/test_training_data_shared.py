"""Training data on the real volumes in ../shared/data (skipped, saying why, where it is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from satseg_training.data.readers import labelmap_case, synthseg_cases
from satseg_training.data.standardise import standardise
from satseg_training.data.standardised import StandardisedDataset
from satseg_training.data.synthseg import synthesize_image

ABDOMEN = {"liver", "spleen", "left kidney", "right kidney"}


def test_totalsegmentator_ct_label_map(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "totalseg"
    source = labelmap_case(
        folder / "example_ct.nii.gz",
        folder / "example_seg_fast_force_split.nii.gz",
        folder / "classes_total.json",
        modality="ct",
        dataset="totalseg",
    )
    result = standardise([source], tmp_path, progress=False)
    assert result.written == ["totalseg/example_ct"] and not result.failed
    image, labels, entry = StandardisedDataset(tmp_path).load(0)
    values = {term: value for value, term in entry.classes.items()}
    assert set(values) >= ABDOMEN
    for term in ABDOMEN:
        inside = labels == values[term]
        assert inside.sum() > 1000, term  # present on the model grid, not a stray voxel
        # Organs are soft tissue: brighter than the image average (air, fat) and short of bone.
        assert 0.0 < float(np.median(image[inside])) < 2.0, term


def test_one_synthseg_map(shared_data: Path, tmp_path: Path) -> None:
    sources = synthseg_cases(shared_data / "synthseg")
    assert len(sources) == 20 and all(source.modality == "mri" for source in sources)
    result = standardise(sources[:1], tmp_path, progress=False)
    assert result.written == ["synthseg/training_seg_01"] and result.unmapped == {}
    image, labels, entry = StandardisedDataset(tmp_path).load(0)
    assert image is None and entry.synthetic == "synthseg"
    assert {"left hippocampus", "right hippocampus", "cerebrospinal fluid"} <= set(entry.classes.values())
    assert len(entry.classes) == 32  # every named structure survives the resampling
    assert {502, 530} <= set(entry.extra_labels)  # unnamed tissues stay in the map, to paint
    assert not set(entry.extra_labels) & set(entry.classes)
    assert set(np.unique(labels).tolist()) == {0, *entry.classes, *entry.extra_labels}
    crop = labels[40:136, 60:156, 20:52]  # one 96 x 96 x 32 training crop
    synthetic = synthesize_image(crop, np.random.default_rng(0))
    assert synthetic.shape == crop.shape and np.isfinite(synthetic).all()
