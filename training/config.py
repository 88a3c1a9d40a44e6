"""Training configuration: a versioned TOML file (``training/configs/*.toml``) plus command-line overrides.

Three tables, every key optional except ``train.steps`` (defaults below)::

    [model]  size, patch_size, text_pretraining, init_from
    [data]   roots, phantom, holdout, weights, structures, max_prompts, positive_centre_probability,
             negatives, negative_ratio, spatial_augment_probability, intensity_augment_probability,
             edge_crop_probability, field_of_view_probability, thick_slice_probability,
             t1_contrast_probability, seed, num_workers, cached_cases
    [train]  steps, batch_size, gradient_accumulation, learning_rate, final_learning_rate, warmup_steps,
             weight_decay, gradient_clip, mixed_precision, seed, save_every, export_every, keep_states

Overrides are ``section.key=value`` with a TOML value (``train.steps=4``, ``model.patch_size=[64,64,32]``,
``data.roots=["a","b"]``); a value that is not TOML is taken as a string (``train.mixed_precision=bf16``).
Unknown keys are refused with the list of known ones, so a typo never trains with a default silently.
Relative paths (``data.roots``, ``model.text_pretraining``, ``model.init_from``) are relative to the repository root.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no tomllib; tomli is the same parser
    import tomli as tomllib

from satseg.errors import SatInputError
from satseg.model import SATConfig, get_config

REPOSITORY = Path(__file__).resolve().parents[1]
"""Relative paths in a config are taken from here (the folder holding ``training/``)."""
MIXED_PRECISION = ("no", "fp16", "bf16")
NEGATIVE_POOLS = ("dataset", "modality")


@dataclass(frozen=True)
class ModelSettings:
    """Which model to train.

    Attributes:
        size: a registered size (``tiny``, ``nano``, ``pro``).
        patch_size: ``(H, W, D)`` training and inference patch, each a multiple of 32; default the size's.
            It is stored in the exported checkpoint, so inference uses the same window.
        text_pretraining: a folder of knowledge-pretrained text encoder layers to load first (optional).
        init_from: a satseg checkpoint folder whose weights the run starts from (fine-tuning, e.g. the bundled
            ``models/demo``); its size and patch must be this config's. Its text layers come with it, so
            ``text_pretraining`` stays unset. Optimiser and schedule start fresh (``--resume`` continues a run).
    """

    size: str = "tiny"
    patch_size: tuple[int, int, int] | None = None
    text_pretraining: str | None = None
    init_from: str | None = None

    def sat_config(self) -> SATConfig:
        """The model config: the registered size with ``patch_size`` replaced when given."""
        config = get_config(self.size)
        if self.patch_size is not None:
            config = dataclasses.replace(config, patch_size=tuple(self.patch_size))
        config.validate()
        if math.prod(config.token_grid) < 2:
            raise ValueError(f"patch_size {config.patch_size} leaves 1 bottleneck voxel; InstanceNorm needs 2 or more")
        return config


@dataclass(frozen=True)
class DataSettings:
    """Where training patches come from and how prompts are picked.

    Attributes:
        roots: standardised dataset roots (``manifest.jsonl`` + images + labels); every dataset in them is used.
        phantom: also draw synthetic torso CTs (random oblique grids, prepared like inference input).
        holdout: case keys (``<dataset>/<case id>``, as in the manifest) never trained on.
        weights: per-dataset sampling weight overrides; the default is ``1 / sqrt(cases in the dataset)``
            (the phantom counts as one case), normalised over datasets.
        structures: the only terms prompted (vocabulary terms or synonyms; empty: every labelled term). Other
            labelled structures are then plain background: a small run learns a few structures well
            instead of many poorly, and crops are centred on these structures only. A parent listed here
            ("cerebral white matter") is trained on the union of its labelled descendants.
        max_prompts: most positive prompts per sample (labels present in the crop beyond it are subsampled).
        positive_centre_probability: chance that a crop is centred on a voxel of a random label of the case
            (else the crop position is uniform).
        negatives: where absent-structure prompts come from, always among the terms usable with the case's
            modality: ``"dataset"``, the terms the case's dataset labels (absent from the crop means absent:
            a term the dataset never labels may be in the crop unlabelled, e.g. "brain" on a SynthSeg map);
            ``"modality"``, any such vocabulary term. How many: ``negative_ratio``.
        negative_ratio: negatives per positive (at least one, at most every candidate): the reference's 0.5.
            A run with few structures can afford them all (a large value): whole-volume inference asks about
            every structure in every window, and absent ones are most of those answers.
        spatial_augment_probability: chance that a patch is rotated (up to 20 degrees about the left-right and
            superior axes) and zoomed (0.85-1.15 per axis) about its centre (``training/augment.py``).
        intensity_augment_probability: chance that a real image patch gets blur, gamma, brightness/contrast
            and noise (synthesised SynthSeg images are random anyway).
        edge_crop_probability: chance that a crop may reach up to half a patch past the volume's edge, the
            outside filled with the image's minimum (air for CT). Without it no patch shows a field-of-view
            edge, and a resampled or padded input's edges (an oblique grid's empty corners) are unseen.
        field_of_view_probability: chance that a real image patch shows only part of itself, as a partial
            scan does: a slab of 20-100% of its depth and, half the time each, 50-100% of its width or height;
            outside is the image's minimum and unlabelled (``training/augment.py``, ``FieldOfView``).
        thick_slice_probability: chance that a real image patch looks acquired with 3-6 mm slices
            (``training/augment.py``, ``thicken_slices``).
        t1_contrast_probability: chance that a synthesised (SynthSeg) image has T1-weighted tissue order
            (:func:`satseg_training.data.synthseg.t1_mean_ranges`) instead of any contrast.
        seed: data seed; sample ``i`` of the run is drawn from a generator seeded by ``(seed, i)``.
        num_workers: DataLoader worker processes per training process.
        cached_cases: decoded cases kept in memory per worker (standardised roots).
    """

    roots: tuple[str, ...] = ()
    phantom: bool = False
    holdout: tuple[str, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)
    structures: tuple[str, ...] = ()
    max_prompts: int = 32
    positive_centre_probability: float = 0.5
    negatives: str = "dataset"
    negative_ratio: float = 0.5
    spatial_augment_probability: float = 0.0
    intensity_augment_probability: float = 0.0
    edge_crop_probability: float = 0.0
    field_of_view_probability: float = 0.0
    thick_slice_probability: float = 0.0
    t1_contrast_probability: float = 0.0
    seed: int = 0
    num_workers: int = 0
    cached_cases: int = 8


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation, precision and checkpointing.

    Attributes:
        steps: optimizer steps of the whole run.
        batch_size: patches per process per micro-batch (prompts are padded to the batch's largest count).
        gradient_accumulation: micro-batches per optimizer step; a step sees
            ``batch_size * gradient_accumulation * processes`` patches.
        learning_rate: AdamW peak learning rate, reached after ``warmup_steps`` of linear warm-up.
        final_learning_rate: where the cosine decay ends, at ``steps``.
        weight_decay: AdamW's decoupled weight decay.
        gradient_clip: largest global gradient norm (0 turns clipping off).
        mixed_precision: ``"no"`` (CPU), ``"bf16"`` or ``"fp16"`` (GPU autocast through accelerate); unset, the
            ``accelerate launch`` config decides (``"no"`` when started with ``python -m``).
        seed: model initialisation seed (the same on every process), then ``seed + rank`` for the rest.
        save_every: save the resumable state every this many steps (0: only at the end).
        export_every: export a satseg checkpoint every this many steps (0: only at the end).
        keep_states: how many of the latest resumable states to keep on disk.
    """

    steps: int
    batch_size: int = 1
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    final_learning_rate: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 1e-5
    gradient_clip: float = 1.0
    mixed_precision: str | None = None
    seed: int = 0
    save_every: int = 0
    export_every: int = 0
    keep_states: int = 2


@dataclass(frozen=True)
class TrainingConfig:
    """A whole training configuration; ``to_dict`` is what exported checkpoints record."""

    model: ModelSettings
    data: DataSettings
    train: TrainSettings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Raise SatInputError for values no run can use (each message names the key)."""
        data, train = self.data, self.train
        problems = []
        if not data.roots and not data.phantom:
            problems.append("data.roots is empty and data.phantom is false: there is nothing to train on")
        if data.negatives not in NEGATIVE_POOLS:
            problems.append(f"data.negatives must be one of {', '.join(NEGATIVE_POOLS)}")
        if train.mixed_precision not in (None, *MIXED_PRECISION):
            problems.append(f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.model.init_from and self.model.text_pretraining:
            problems.append("model.init_from brings its own text layers: leave model.text_pretraining unset")
        if data.negative_ratio < 0:
            problems.append("data.negative_ratio must be >= 0")
        for key in (
            "positive_centre_probability",
            "spatial_augment_probability",
            "intensity_augment_probability",
            "edge_crop_probability",
            "field_of_view_probability",
            "thick_slice_probability",
            "t1_contrast_probability",
        ):
            if not 0.0 <= getattr(data, key) <= 1.0:
                problems.append(f"data.{key} must be in [0, 1]")
        if any(weight <= 0 for weight in data.weights.values()):
            problems.append("data.weights must be positive")
        for key, value in (
            ("train.steps", train.steps),
            ("train.batch_size", train.batch_size),
            ("train.gradient_accumulation", train.gradient_accumulation),
            ("train.keep_states", train.keep_states),
            ("data.max_prompts", data.max_prompts),
        ):
            if value < 1:
                problems.append(f"{key} must be at least 1")
        if train.warmup_steps < 0 or train.save_every < 0 or train.export_every < 0 or data.num_workers < 0:
            problems.append("train.warmup_steps, train.save_every, train.export_every, data.num_workers must be >= 0")
        if problems:
            raise SatInputError("invalid training config: " + "; ".join(problems))
        try:
            self.model.sat_config()
        except ValueError as error:
            raise SatInputError(f"invalid training config: model: {error}") from None


_SECTIONS: dict[str, type] = {"model": ModelSettings, "data": DataSettings, "train": TrainSettings}


def resolve_path(path: str) -> Path:
    """``path`` as is when absolute, else relative to :data:`REPOSITORY`."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else REPOSITORY / candidate


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"train.steps=4"`` -> ``("train", "steps", 4)``; a non-TOML value stays a string.

    Raises:
        SatInputError: not of the form ``section.key=value``.
    """
    name, separator, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not (separator and dot and section and key):
        raise SatInputError(f"override {text!r} is not section.key=value (e.g. train.steps=4)")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key.strip(), value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainingConfig:
    """Read a TOML training config, apply ``section.key=value`` overrides, check it.

    Raises:
        SatInputError: unreadable TOML, unknown sections or keys, wrong value types, or values
            :meth:`TrainingConfig.check` refuses.
    """
    try:
        document = tomllib.loads(Path(path).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise SatInputError(f"cannot read training config {path}: {' '.join(str(error).split())}") from None
    for override in overrides:
        section, key, value = parse_override(override)
        document.setdefault(section, {})[key] = value
    unknown = set(document) - set(_SECTIONS)
    if unknown:
        raise SatInputError(f"unknown config section(s) {sorted(unknown)}; known: {', '.join(_SECTIONS)}")
    sections = {name: _settings(cls, document.get(name, {}), name) for name, cls in _SECTIONS.items()}
    config = TrainingConfig(**sections)
    config.check()
    return config


def _settings(cls: type, values: dict[str, Any], section: str) -> Any:
    """A settings dataclass from one TOML table, each value checked against its field's type."""
    fields = {item.name: str(item.type) for item in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise SatInputError(f"unknown key(s) {sorted(unknown)} in [{section}]; known: {', '.join(fields)}")
    converted = {key: _typed(value, fields[key], f"{section}.{key}") for key, value in values.items()}
    try:
        return cls(**converted)
    except TypeError as error:  # a required key is missing
        raise SatInputError(f"[{section}]: {error}") from None


def _typed(value: Any, annotation: str, name: str) -> Any:
    """``value`` as the field type ``annotation`` names (TOML lists become tuples, ints floats where asked).

    Handles the annotations the settings use: ``int``, ``float``, ``bool``, ``str``, ``str | None``,
    ``tuple[int, ...]`` / ``tuple[str, ...]`` (optionally ``| None``) and ``dict[str, float]``.

    Raises:
        SatInputError: a value of another kind (``train.steps = "4"``), naming the key and the type wanted.
    """
    kind = annotation.removesuffix(" | None")
    if kind == "float" and _is_number(value):
        return float(value)
    if kind.startswith("tuple") and isinstance(value, list):
        item = int if kind.startswith("tuple[int") else str
        if all(isinstance(element, item) and not isinstance(element, bool) for element in value):
            return tuple(value)
    if kind.startswith("dict") and isinstance(value, dict) and all(_is_number(item) for item in value.values()):
        return {key: float(item) for key, item in value.items()}
    expected = {"int": int, "bool": bool, "str": str}.get(kind)
    if expected is not None and isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise SatInputError(f"{name} = {value!r}: expected a value of type {kind}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
