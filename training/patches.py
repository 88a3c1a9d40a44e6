"""Training samples: a case drawn by dataset weight, a patch cropped from it, prompts and binary targets.

Every sample is a pure function of ``(data seed, sample index)``: sample ``i`` is drawn from
``numpy.random.default_rng([seed, i])``. The sampler's whole state is therefore the number of samples
consumed, which makes resuming exact and lets DataLoader workers and processes draw in any order.

Cases come from pools, one per dataset: the cases of a dataset in standardised roots
(:class:`StandardisedPool`), or synthetic torso CTs on random oblique grids (:class:`PhantomPool`). Either
way the arrays lie on the model grid (RAS, 1x1x3 mm, z-scored images), as inference sees them.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from satseg.engine.preprocess import prepare
from satseg.errors import SatInputError
from satseg.geometry.volume import MODALITIES
from satseg.phantom import TORSO_ORGANS, centred_affine, make_torso_phantom
from satseg.text import Vocabulary
from satseg_training.augment import FieldOfView, SpatialAugmentation, augment_intensity, thicken_slices
from satseg_training.config import DataSettings
from satseg_training.data.standardised import StandardisedDataset

PHANTOM_DATASET = "phantom"
PHANTOM_FIELD_OF_VIEW_MM = np.array([320.0, 240.0, 200.0])
"""Covers the phantom's body cross-section (300 x 210 mm) and every organ along z."""
PHANTOM_SPACING_MM = (np.array([1.5, 1.5, 2.5]), np.array([3.0, 3.0, 5.0]))
"""Low and high voxel sizes of the random source grids, drawn uniformly per axis."""
PHANTOM_MAX_ROTATION_DEG = 20.0


@dataclass(frozen=True)
class CaseArrays:
    """One case on the model grid.

    Attributes:
        dataset: the dataset (pool) it came from.
        modality: one of ``MODALITIES``.
        image: ``[H, W, D]`` float32 z-scored, or ``None`` when it is synthesised from the labels (SynthSeg).
        labels: ``[H, W, D]`` integer label values, 0 background.
        classes: label value -> canonical vocabulary term, for the values present in ``labels``.
    """

    dataset: str
    modality: str
    image: np.ndarray | None
    labels: np.ndarray
    classes: dict[int, str]


class CasePool(Protocol):
    """The cases of one dataset, drawn at random."""

    name: str
    size: int
    """Number of cases, for the default sampling weight ``1 / sqrt(size)``."""
    labelled_terms: frozenset[str]
    """Every term the dataset labels (where it is absent from a label map, it is absent from the body)."""

    def draw(self, rng: np.random.Generator) -> CaseArrays: ...


class PhantomPool:
    """Synthetic torso CTs: a random oblique, anisotropic source grid, prepared exactly like inference input.

    The image goes through :func:`satseg.geometry.prepare` (reorient, resample, crop, normalise) and the
    labels through the same map (:meth:`PreparedVolume.labels_to_grid`), as ``sat-standardise`` does.
    """

    name = PHANTOM_DATASET
    size = 1
    labelled_terms = frozenset(organ.name for organ in TORSO_ORGANS)

    def draw(self, rng: np.random.Generator) -> CaseArrays:
        spacing = rng.uniform(*PHANTOM_SPACING_MM)
        shape = tuple(int(size) for size in np.ceil(PHANTOM_FIELD_OF_VIEW_MM / spacing))
        affine = centred_affine(shape, tuple(spacing), rng.uniform(-PHANTOM_MAX_ROTATION_DEG, PHANTOM_MAX_ROTATION_DEG))
        volume, source_labels, names = make_torso_phantom(shape, affine, seed=int(rng.integers(2**31)))
        prepared = prepare(volume, "ct")
        labels = prepared.labels_to_grid(source_labels)
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=len(names) + 1))
        classes = {int(value): names[int(value)] for value in present if value in names}
        return CaseArrays(self.name, "ct", prepared.image.numpy(), labels, classes)


class StandardisedPool:
    """The cases of one dataset across standardised roots, with the last ``cached_cases`` decoded kept in memory."""

    def __init__(self, name: str, cases: Sequence[tuple[StandardisedDataset, int]], cached_cases: int) -> None:
        self.name = name
        self.size = len(cases)
        self._cases = list(cases)
        self.labelled_terms = frozenset(
            term for root, index in self._cases for term in root.cases[index].classes.values()
        )
        self._cached_cases = cached_cases
        self._cache: OrderedDict[int, CaseArrays] = OrderedDict()

    def draw(self, rng: np.random.Generator) -> CaseArrays:
        position = int(rng.integers(self.size))
        if position in self._cache:
            self._cache.move_to_end(position)
            return self._cache[position]
        root, index = self._cases[position]
        image, labels, entry = root.load(index)
        case = CaseArrays(entry.dataset, entry.modality, image, labels, dict(entry.classes))
        self._cache[position] = case
        if len(self._cache) > self._cached_cases:
            self._cache.popitem(last=False)
        return case


def standardised_pools(roots: Sequence[Path], holdout: Sequence[str], cached_cases: int) -> list[StandardisedPool]:
    """One pool per dataset found in the manifests of ``roots``, without the ``holdout`` case keys.

    Raises:
        SatInputError: a manifest is unreadable, or a holdout key names no case (a typo would train on it).
    """
    by_dataset: dict[str, list[tuple[StandardisedDataset, int]]] = defaultdict(list)
    held_out = set(holdout)
    found = set()
    for root in roots:
        dataset = StandardisedDataset(root)
        for index, entry in enumerate(dataset.cases):
            if entry.case in held_out:
                found.add(entry.case)
            else:
                by_dataset[entry.dataset].append((dataset, index))
    missing = held_out - found
    if missing:
        raise SatInputError(f"data.holdout names cases in no manifest: {', '.join(sorted(missing))}")
    return [StandardisedPool(name, cases, cached_cases) for name, cases in sorted(by_dataset.items())]


def sampling_weights(pools: Sequence[CasePool], overrides: dict[str, float]) -> np.ndarray:
    """Probability of drawing from each pool: ``overrides[name]``, else ``1 / sqrt(size)``, normalised.

    Raises:
        SatInputError: an override names no pool.
    """
    unknown = set(overrides) - {pool.name for pool in pools}
    if unknown:
        raise SatInputError(f"data.weights names unknown datasets {sorted(unknown)}; known: {[p.name for p in pools]}")
    weights = np.array([overrides.get(pool.name, 1.0 / math.sqrt(pool.size)) for pool in pools], dtype=np.float64)
    return weights / weights.sum()


def crop_start(
    shape: Sequence[int],
    patch: Sequence[int],
    centre: Sequence[int] | None,
    rng: np.random.Generator,
    overhang: Sequence[int] = (0, 0, 0),
) -> tuple[int, int, int]:
    """Start index of a patch: centred on ``centre`` (moved inside the volume where it fits), else uniform.

    Along an axis shorter than the patch, the start is negative (the patch is padded) and the volume lies
    at a random offset inside it. ``overhang`` lets the patch reach that many voxels past each edge of a
    longer axis, so it can show the field of view's edge.
    """
    starts = []
    for axis in range(3):
        low, high = sorted((0, shape[axis] - patch[axis]))
        if shape[axis] >= patch[axis]:
            low, high = low - overhang[axis], high + overhang[axis]
        if centre is None:
            starts.append(int(rng.integers(low, high + 1)))
        else:
            starts.append(int(np.clip(centre[axis] - patch[axis] // 2, low, high)))
    return starts[0], starts[1], starts[2]


def labelled_voxel(labels: np.ndarray, classes: dict[int, str], rng: np.random.Generator) -> tuple[int, int, int]:
    """A random voxel of ``labels`` of a random one of ``classes`` (equally likely, so small ones get centred too)."""
    value = rng.choice(sorted(classes))
    voxels = np.flatnonzero(labels == value)
    index = np.unravel_index(voxels[rng.integers(len(voxels))], labels.shape)
    return int(index[0]), int(index[1]), int(index[2])


def prompted_terms(structures: Sequence[str], vocabulary: Vocabulary) -> frozenset[str] | None:
    """The canonical terms of ``structures`` (``None``, meaning every term, when it is empty).

    Raises:
        SatInputError: a structure the vocabulary does not know (the message lists the closest terms).
    """
    if not structures:
        return None
    return frozenset(vocabulary.resolve(structure) for structure in structures)


def crop(array: np.ndarray, start: Sequence[int], patch: Sequence[int], fill: float) -> np.ndarray:
    """``array [H, W, D]`` cut to ``patch`` voxels from ``start`` (may be negative); outside is ``fill``."""
    out = np.full(tuple(patch), fill, dtype=array.dtype)
    source, target = [], []
    for axis in range(3):
        begin, end = max(start[axis], 0), min(start[axis] + patch[axis], array.shape[axis])
        source.append(slice(begin, end))
        target.append(slice(begin - start[axis], end - start[axis]))
    out[tuple(target)] = array[tuple(source)]
    return out


def pick_prompts(
    present: Sequence[str],
    absent: Sequence[str],
    max_prompts: int,
    rng: np.random.Generator,
    negative_ratio: float = 0.5,
) -> tuple[list[str], list[str]]:
    """Positive and negative prompts of one sample.

    Args:
        present: the terms labelled in the crop.
        absent: terms that may serve as negatives (none of them in the crop).
        max_prompts: most positives; beyond it a random subset is kept.
        negative_ratio: negatives per positive (the reference's 0.5).

    Returns:
        ``(positives, negatives)``, each sorted: every present term (or a random ``max_prompts`` of them),
        and ``max(1, floor(len(positives) * negative_ratio))`` random ``absent`` terms (all of them if there
        are fewer).
    """
    positives = list(present)
    if len(positives) > max_prompts:
        positives = sorted(rng.choice(positives, size=max_prompts, replace=False).tolist())
    count = min(max(1, math.floor(len(positives) * negative_ratio)), len(absent))
    negatives = sorted(rng.choice(list(absent), size=count, replace=False).tolist()) if count else []
    return positives, negatives


class PatchDataset(Dataset):
    """Sample ``i``: a patch of ``patch_size``, its prompts and targets, drawn from ``default_rng([seed, i])``.

    One sample, as :meth:`__getitem__` returns it:

    - ``image``: float32 ``[1, H, W, D]`` z-scored (synthesised for label-only cases);
    - ``masks``: uint8 ``[N, H, W, D]``, 1 inside the prompt's structure (all 0 for negatives);
    - ``term_ids``: int64 ``[N]``, indices into ``terms``;
    - ``positive``: bool ``[N]``, whether the prompt's structure is in the patch;
    - ``modality``: int64 scalar, the index in ``MODALITIES``.

    Args:
        pools: where cases come from; ``weights`` gives each pool's probability.
        terms: the term table (every prompt is one of these; the model's query table has the same order).
        vocabulary: for the terms usable with each modality.
        patch_size: ``(H, W, D)``.
        settings: prompt counts, centring probability, negative pool and seed.
        length: number of samples (the run's total).
    """

    def __init__(
        self,
        pools: Sequence[CasePool],
        weights: np.ndarray,
        terms: Sequence[str],
        vocabulary: Vocabulary,
        patch_size: tuple[int, int, int],
        settings: DataSettings,
        length: int,
    ) -> None:
        self.pools = list(pools)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.term_ids = {term: index for index, term in enumerate(terms)}
        unknown = sorted(term for pool in self.pools for term in pool.labelled_terms if term not in self.term_ids)
        if unknown:
            raise SatInputError(f"labelled terms missing from the vocabulary (re-standardise the data?): {unknown}")
        self.prompted = prompted_terms(settings.structures, vocabulary)
        self.patch_size = patch_size
        self.settings = settings
        self.length = length
        self._modality_terms = {modality: vocabulary.for_modality(modality) for modality in MODALITIES}
        self._parents: dict[str, list[str]] = defaultdict(list)
        for term in vocabulary.terms:
            for child in term.children:
                self._parents[child].append(term.name)

    def __len__(self) -> int:
        return self.length

    def is_prompted(self, term: str) -> bool:
        """Whether ``term`` may be a prompt (``DataSettings.structures``; every term when it is empty)."""
        return self.prompted is None or term in self.prompted

    def absent_terms(self, pool: CasePool, modality: str, present: set[str]) -> list[str]:
        """Negative candidates for a crop of a ``pool`` case holding ``present`` (see ``DataSettings.negatives``).

        Terms usable with ``modality`` that are neither in ``present`` nor a parent of one ("kidney" is not
        absent where "left kidney" is present); with ``negatives = "dataset"`` only those the pool labels,
        unless the crop holds all of them.
        """
        covered = set(present).union(*(self.ancestors(term) for term in present))
        usable = [term for term in self._modality_terms[modality] if term not in covered and self.is_prompted(term)]
        if self.settings.negatives == "dataset":
            labelled = pool.labelled_terms.union(*(self.ancestors(term) for term in pool.labelled_terms))
            return [term for term in usable if term in labelled] or usable
        return usable

    def ancestors(self, term: str) -> frozenset[str]:
        """Every parent of ``term`` in the vocabulary's tree, transitively ("left kidney" -> "kidney", ...)."""
        found: set[str] = set()
        pending = [term]
        while pending:
            for parent in self._parents[pending.pop()]:
                if parent not in found:
                    found.add(parent)
                    pending.append(parent)
        return frozenset(found)

    def targets_of(self, term: str) -> list[str]:
        """The prompts a voxel labelled ``term`` is inside of.

        Without ``structures``, the labelled term alone. With it, the term and its ancestors that are listed:
        a listed parent ("cerebral white matter") is trained on the union of its labelled descendants.
        """
        if self.prompted is None:
            return [term]
        return sorted(name for name in (term, *self.ancestors(term)) if name in self.prompted)

    def cropped(
        self, case: CaseArrays, start: Sequence[int], rng: np.random.Generator
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """The patch at ``start`` (image ``None`` for label-only cases), rotated and zoomed about its centre
        with probability ``spatial_augment_probability`` (from a larger crop, so no corner is padding)."""
        patch = self.patch_size
        if not happens(self.settings.spatial_augment_probability, rng):
            image = None if case.image is None else crop(case.image, start, patch, fill=float(case.image.min()))
            return image, crop(case.labels, start, patch, fill=0)
        spatial = SpatialAugmentation.draw(rng)
        margin = spatial.margin(patch)
        source_start = [begin - extra for begin, extra in zip(start, margin, strict=True)]
        source_size = [size + 2 * extra for size, extra in zip(patch, margin, strict=True)]
        labels = crop(case.labels, source_start, source_size, fill=0)
        image = None
        if case.image is not None:
            image = crop(case.image, source_start, source_size, fill=float(case.image.min()))
        return spatial.apply(image, labels, patch)

    def acquired(
        self, image: np.ndarray, labels: np.ndarray, fill: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """A real image patch as another acquisition would show it, each step with its own probability: thicker
        slices, a partial field of view (outside it ``fill`` and unlabelled), then contrast and noise."""
        if happens(self.settings.thick_slice_probability, rng):
            image = thicken_slices(image, rng)
        if happens(self.settings.field_of_view_probability, rng):
            image, labels = FieldOfView.draw(rng, self.patch_size).apply(image, labels, fill)
        if happens(self.settings.intensity_augment_probability, rng):
            image = augment_intensity(image, rng)
        return image, labels

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.settings.seed, index])
        pool = self.pools[int(rng.choice(len(self.pools), p=self.weights))]
        case = pool.draw(rng)
        classes = {value: term for value, term in case.classes.items() if self.targets_of(term)}
        centre = None
        if classes and rng.random() < self.settings.positive_centre_probability:
            centre = labelled_voxel(case.labels, classes, rng)
        edge = happens(self.settings.edge_crop_probability, rng)
        overhang = tuple(size // 2 if edge else 0 for size in self.patch_size)
        start = crop_start(case.labels.shape, self.patch_size, centre, rng, overhang)
        image, labels = self.cropped(case, start, rng)
        if image is None:
            from satseg_training.data.synthseg import synthesize_image, t1_mean_ranges  # only label-only data needs it

            # Every named structure is brain; the rest (0 and the unnamed head tissues) is what skull
            # stripping removes.
            brain = np.isin(labels, list(case.classes))
            t1_like = happens(self.settings.t1_contrast_probability, rng)
            ranges = t1_mean_ranges(case.classes) if t1_like else None
            image = synthesize_image(labels, rng, brain=brain, mean_ranges=ranges)  # on the model grid
        else:
            image, labels = self.acquired(image, labels, float(case.image.min()), rng)
        values_of: dict[str, list[int]] = defaultdict(list)  # prompted term -> its label values in the crop
        present = set()
        for value in np.unique(labels).tolist():
            if value in case.classes:
                present.add(case.classes[value])
                for term in self.targets_of(case.classes[value]):
                    values_of[term].append(value)
        absent = self.absent_terms(pool, case.modality, present)
        positives, negatives = pick_prompts(
            sorted(values_of), absent, self.settings.max_prompts, rng, self.settings.negative_ratio
        )
        masks = np.zeros((len(positives) + len(negatives), *self.patch_size), dtype=np.uint8)
        for row, term in enumerate(positives):
            masks[row] = np.isin(labels, values_of[term])
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            "masks": torch.from_numpy(masks),
            "term_ids": torch.tensor([self.term_ids[term] for term in positives + negatives], dtype=torch.int64),
            "positive": torch.tensor([True] * len(positives) + [False] * len(negatives)),
            "modality": torch.tensor(MODALITIES.index(case.modality), dtype=torch.int64),
        }


def happens(probability: float, rng: np.random.Generator) -> bool:
    """A draw with ``probability``; none at all when it is 0, so runs without augmentation keep their samples."""
    return probability > 0 and rng.random() < probability


def collate_patches(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples, padding the prompts to the batch's largest count ``N``.

    Returns:
        ``image`` ``[B, 1, H, W, D]``, ``masks`` ``[B, N, H, W, D]`` uint8, ``term_ids`` ``[B, N]`` (padding 0),
        ``positive`` and ``valid`` ``[B, N]`` bool (``valid`` is False on padding), ``modality`` ``[B]``.
    """
    prompts = max(len(sample["term_ids"]) for sample in samples)
    batch = len(samples)
    spatial = samples[0]["masks"].shape[1:]
    masks = torch.zeros((batch, prompts, *spatial), dtype=torch.uint8)
    term_ids = torch.zeros((batch, prompts), dtype=torch.int64)
    positive = torch.zeros((batch, prompts), dtype=torch.bool)
    valid = torch.zeros((batch, prompts), dtype=torch.bool)
    for row, sample in enumerate(samples):
        count = len(sample["term_ids"])
        masks[row, :count] = sample["masks"]
        term_ids[row, :count] = sample["term_ids"]
        positive[row, :count] = sample["positive"]
        valid[row, :count] = True
    return {
        "image": torch.stack([sample["image"] for sample in samples]),
        "masks": masks,
        "term_ids": term_ids,
        "positive": positive,
        "valid": valid,
        "modality": torch.stack([sample["modality"] for sample in samples]),
    }
