"""The model spec: everything a checkpoint states about how its weights must be used, in one typed object.

Preprocessing (model grid, crop, intensity normalisation per modality), the sliding window, the
post-processing (threshold, the terms kept as one connected piece), the vocabulary hash and the terms the
weights were trained on travel with the weights: ``sat-train``, ``sat-checkpoint init`` and ``sat-import``
write it into the checkpoint's ``config.json``, ``sat-export`` copies it unchanged into
``sat/metadata.json``, and every consumer (the in-process segmenter, the served segmenter and prompt
encoder, ``sat-evaluate``) reads it back. A checkpoint without one (written before the spec existed) loads
with :func:`legacy_spec`: the values the code used then, made explicit.

numpy and nibabel only, so a client can read a spec without torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
from nibabel.orientations import axcodes2ornt

from satseg.contract import check_overlap, check_threshold
from satseg.errors import SatInputError
from satseg.text.vocabulary import Vocabulary

SPEC_SCHEMA = "satseg-model-spec/1"
IMPORTANCE_MAPS = ("gaussian",)
DEFAULT_SIGMA_SCALE = 0.125
"""nnU-Net's and SAT's blending Gaussian: sigma = patch / 8 per axis."""
DEFAULT_EDGE_ALLOWANCE = 1 / 32
"""Windows may leave up to 1/32 of a patch (9 voxels of a 288-voxel window, 3 of a 96) uncovered at each end of
an axis where that saves a window; measured in ``benchmarks/window_economy.py``."""
MAX_EDGE_ALLOWANCE = 0.125
"""Beyond an eighth of a patch the replicated edge would be guesswork."""


def _check_range(name: str, values: Sequence[float]) -> tuple[float, float]:
    pair = tuple(float(value) for value in values)
    if len(pair) != 2 or not all(math.isfinite(value) for value in pair) or pair[0] >= pair[1]:
        raise SatInputError(f"{name} {tuple(values)} is not accepted; it must be two finite numbers, low < high")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class PreprocessConfig:
    """How a volume is put on the model grid and normalised.

    Attributes:
        target_spacing: voxel size in mm of the model grid along its axes, in ``orientation`` order.
        orientation: nibabel axis codes of the model grid axes, one of each pair L/R, P/A, I/S
            (``"RAS"``; ``"ASR"`` puts a sagittal scan's in-plane axes first).
        crop_foreground: crop the model grid to the bounding box of the foreground.
        crop_margin_mm: margin kept around the foreground box, so interpolating predictions back to the
            input grid never blends the border of the foreground with the zeros outside the box.
        ct_window_hu: CT intensities are clipped to this range before the z-score.
        ct_foreground_hu: CT voxels above this are foreground for cropping. SAT's reference uses ``> 0``,
            which on HU images crops away fat and skin (about -100 HU); -500 drops air only.
        foreground_above: the foreground threshold of the other modalities (MRI, PET, US).
        percentiles: MRI, PET and US intensities are clipped to these percentiles before the z-score.
    """

    target_spacing: tuple[float, float, float] = (1.0, 1.0, 3.0)
    orientation: str = "RAS"
    crop_foreground: bool = True
    crop_margin_mm: float = 3.0
    ct_window_hu: tuple[float, float] = (-500.0, 1000.0)
    ct_foreground_hu: float = -500.0
    foreground_above: float = 0.0
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        spacing = np.asarray(self.target_spacing, dtype=np.float64)
        if spacing.shape != (3,) or not (np.isfinite(spacing) & (spacing > 0)).all():
            raise SatInputError(
                f"target spacing {self.target_spacing} is not accepted; it must be three positive sizes in mm"
            )
        if not math.isfinite(self.crop_margin_mm) or self.crop_margin_mm < 0:
            raise SatInputError(f"crop margin {self.crop_margin_mm} mm is not accepted; it must be 0 mm or more")
        try:
            axes = axcodes2ornt(tuple(self.orientation))[:, 0]
        except ValueError:
            axes = np.zeros(0)
        if sorted(axes.tolist()) != [0.0, 1.0, 2.0]:
            raise SatInputError(
                f"orientation {self.orientation!r} is not accepted; it must be three axis codes, "
                "one of each pair L/R, P/A, I/S (e.g. RAS, LPS, ASR)"
            )
        _check_range("CT window", self.ct_window_hu)
        low, high = _check_range("percentiles", self.percentiles)
        if low < 0 or high > 100:
            raise SatInputError(f"percentiles {self.percentiles} are not accepted; they must lie in [0, 100]")


DEFAULT_PREPROCESS = PreprocessConfig()
"""The preprocessing of SAT as this project trains it (and of checkpoints written before specs existed)."""


def check_patch_size(patch_size: Sequence[int]) -> None:
    """Refuse a window size that is not three positive integers."""
    if len(patch_size) != 3 or any(int(size) != size or size < 1 for size in patch_size):
        raise SatInputError(f"patch size {tuple(patch_size)} is not accepted; it must be three positive integers")


@dataclass(frozen=True)
class WindowSpec:
    """The sliding window: ``patch_size`` voxels of the model grid, the default ``overlap`` in ``[0, MAX_OVERLAP]``, and
    the importance map that blends windows (a Gaussian with ``sigma = sigma_scale * patch`` per axis).

    Two rules keep a volume from paying for a window its anatomy does not need (``satseg.window.steps``), and
    every path (in-process, served, evaluated) applies them:

    - ``trim_margin``: where the foreground crop's margin (``PreprocessConfig.crop_margin_mm``) would cost a
      whole extra window along an axis, it is trimmed as far as needed, never into the foreground.
    - ``edge_allowance``: where leaving at most this fraction of the patch uncovered at each end of an axis saves
      a window, the windows leave it (as little as needed, evenly on both ends) and those voxels take the
      nearest covered voxel's probabilities. ``0`` covers every voxel, as nnU-Net does.
    """

    patch_size: tuple[int, int, int]
    overlap: float = 0.5
    importance: str = "gaussian"
    sigma_scale: float = DEFAULT_SIGMA_SCALE
    trim_margin: bool = True
    edge_allowance: float = DEFAULT_EDGE_ALLOWANCE

    def __post_init__(self) -> None:
        check_patch_size(self.patch_size)
        check_overlap(self.overlap)
        if self.importance not in IMPORTANCE_MAPS:
            supported = ", ".join(IMPORTANCE_MAPS)
            raise SatInputError(f"importance map {self.importance!r} is not supported; use {supported}")
        if not 0.0 < self.sigma_scale <= 1.0:
            raise SatInputError(f"sigma scale {self.sigma_scale} is outside (0, 1]")
        if not 0.0 <= self.edge_allowance <= MAX_EDGE_ALLOWANCE:
            raise SatInputError(f"edge allowance {self.edge_allowance} is outside [0, {MAX_EDGE_ALLOWANCE}]")
        if not isinstance(self.trim_margin, bool):
            raise SatInputError(f"trim_margin {self.trim_margin!r} is not accepted; it must be true or false")


@dataclass(frozen=True)
class PostprocessSpec:
    """``threshold``: a voxel is inside a mask where its probability exceeds it, in ``(0, 1)``.
    ``single_component_terms``: the terms whose mask keeps only its largest 26-connected piece (one connected
    body: the liver, a kidney, a vertebra)."""

    threshold: float = 0.5
    single_component_terms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_threshold(self.threshold)


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint states about how its weights are used (see the module docstring).

    Attributes:
        preprocess: the model grid and the intensity normalisation.
        window: the sliding window.
        postprocess: threshold and single-component terms.
        vocabulary_sha256: the vocabulary the weights' prompts were resolved with.
        trained_terms: the terms the weights were trained on, each with its measured Dice where known
            (``None``), or ``None`` where the checkpoint does not record them.
        notes: where a value departs from another implementation's (``sat-import``: the reference's own).
    """

    preprocess: PreprocessConfig
    window: WindowSpec
    postprocess: PostprocessSpec
    vocabulary_sha256: str
    trained_terms: dict[str, float | None] | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON values (lists, not tuples), as ``config.json`` and ``metadata.json`` hold it."""
        values = asdict(self)
        values["postprocess"]["single_component_terms"] = sorted(self.postprocess.single_component_terms)
        return json.loads(json.dumps({"schema": SPEC_SCHEMA, **values}))

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> ModelSpec:
        """Parse a spec, refusing unknown fields and values the code cannot honour (one line each)."""
        if values.get("schema") != SPEC_SCHEMA:
            raise SatInputError(f"model spec schema {values.get('schema')!r} is not {SPEC_SCHEMA!r}")
        try:
            preprocess = _build(
                PreprocessConfig, values["preprocess"], tuples=("target_spacing", "ct_window_hu", "percentiles")
            )
            window = _build(WindowSpec, values["window"], tuples=("patch_size",))
            postprocess = _build(PostprocessSpec, values["postprocess"], tuples=("single_component_terms",))
        except KeyError as missing:
            raise SatInputError(f"model spec lacks {missing}") from None
        trained = values.get("trained_terms")
        return cls(
            preprocess=preprocess,
            window=window,
            postprocess=postprocess,
            vocabulary_sha256=str(values["vocabulary_sha256"]),
            trained_terms=None if trained is None else {str(k): v for k, v in dict(trained).items()},
            notes=dict(values.get("notes", {})),
        )

    def single_component(self, terms: Sequence[str]) -> list[bool]:
        """Per term, whether its mask keeps only its largest connected piece."""
        single = frozenset(self.postprocess.single_component_terms)
        return [term in single for term in terms]

    def with_overrides(self, **preprocess: Any) -> ModelSpec:
        """A copy whose preprocessing differs in the given fields (``orientation="ASR"`` for a sagittal scan)."""
        return replace(self, preprocess=replace(self.preprocess, **preprocess))


def default_spec(
    patch_size: Sequence[int],
    vocabulary: Vocabulary,
    trained_terms: Sequence[str] | Mapping[str, float | None] | None,
    notes: Mapping[str, str] | None = None,
) -> ModelSpec:
    """This project's spec for weights of ``patch_size`` windows: :data:`DEFAULT_PREPROCESS`, 50% overlap, a
    Gaussian importance map, threshold 0.5, and the ``vocabulary``'s single-component terms. Also the spec of a
    checkpoint written before specs existed (with a note saying so): the values the code used then, stated."""
    if trained_terms is not None and not isinstance(trained_terms, Mapping):
        trained_terms = dict.fromkeys(trained_terms)
    single = tuple(sorted(term.name for term in vocabulary.terms if term.single_component))
    return ModelSpec(
        preprocess=DEFAULT_PREPROCESS,
        window=WindowSpec(patch_size=tuple(int(size) for size in patch_size)),  # type: ignore[arg-type]
        postprocess=PostprocessSpec(single_component_terms=single),
        vocabulary_sha256=vocabulary.sha256,
        trained_terms=None if trained_terms is None else dict(trained_terms),
        notes=dict(notes or {}),
    )


LEGACY_NOTE = {"source": "the checkpoint states no spec: satseg's defaults of the time, made explicit"}


def _build(kind: type, values: Mapping[str, Any], tuples: Sequence[str] = ()) -> Any:
    """``kind(**values)`` with lists turned into the tuples the dataclass holds; unknown keys refused."""
    known = {item.name for item in fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SatInputError(f"model spec has unknown {kind.__name__} field(s) {unknown}; known: {sorted(known)}")
    return kind(**{key: tuple(value) if key in tuples else value for key, value in values.items()})
