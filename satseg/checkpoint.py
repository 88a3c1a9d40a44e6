"""Checkpoints: ``model.safetensors`` plus ``config.json``, loaded strictly or not at all.

A checkpoint folder holds the vision network, the text tower's projection and modality
embedding, and any text-encoder layers that knowledge pretraining changed. The base text encoder
itself is named by identity (``config.text_encoder``) and pinned by the sha256 of its tensors, so
a checkpoint stays small and a wrong pairing is refused instead of silently producing garbage
(the reference code's worst trap). A checkpoint that carries its encoder in a subfolder names it
relative to the checkpoint folder, so the folder can be moved or copied as a whole.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from satseg import __version__
from satseg.atomic import write_bytes_atomically
from satseg.errors import CheckpointError
from satseg.model.build import build_sat
from satseg.model.config import SATConfig
from satseg.model.sat import SAT
from satseg.onnx_graphs import file_sha256
from satseg.spec import LEGACY_NOTE, ModelSpec, default_spec
from satseg.text.cache import tensor_sha256
from satseg.text.encoder_source import encoder_in_checkpoint, encoder_relative_to
from satseg.text.vocabulary import Vocabulary

CHECKPOINT_FORMAT = "satseg-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EXTERNAL_PREFIX = "text.encoder."
"""State-dict keys under this prefix are the base text encoder's: stored only where trained."""
TEXT_PRETRAINING_WEIGHTS = "text_encoder_layers.safetensors"
"""``training/pretrain_text.py`` writes the trained encoder layers here, beside a ``config.json``."""


@dataclass(frozen=True)
class CheckpointMetadata:
    """What ``config.json`` records besides the weights."""

    config: SATConfig
    vocabulary_sha256: str
    text_encoder_sha256: str
    trained_encoder_prefixes: tuple[str, ...] = ()
    weights_dtype: str = "float32"
    created_by: str = f"satseg {__version__}"
    extra: dict[str, Any] = field(default_factory=dict)
    spec: ModelSpec | None = None
    """How the weights are used (:mod:`satseg.spec`); ``None`` in checkpoints written before specs existed."""

    def __post_init__(self) -> None:
        # The exported graphs are fixed to the config's window and every sliding-window path uses the spec's:
        # a checkpoint where they differ would run in process and fail only in the fixed-shape graph.
        if self.spec is not None and tuple(self.spec.window.patch_size) != tuple(self.config.patch_size):
            raise CheckpointError(
                f"the checkpoint's window sizes disagree: model_config.patch_size {list(self.config.patch_size)} "
                f"but spec.window.patch_size {list(self.spec.window.patch_size)}; they must be equal"
            )

    def model_spec(self, vocabulary: Vocabulary) -> ModelSpec:
        """The stated spec, or for an older checkpoint the defaults of its time made explicit (its patch size,
        its vocabulary hash, ``vocabulary``'s single-component terms, its recorded trained terms)."""
        if self.spec is not None:
            return self.spec
        trained = self.extra.get("trained_terms")
        spec = default_spec(self.config.patch_size, vocabulary, trained, notes=LEGACY_NOTE)
        return replace(spec, vocabulary_sha256=self.vocabulary_sha256)

    def to_json(self) -> dict[str, Any]:
        spec = {} if self.spec is None else {"spec": self.spec.to_json()}
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            "model_size": self.config.name,
            "model_config": self.config.to_dict(),
            "vocabulary_sha256": self.vocabulary_sha256,
            "text_encoder": {
                "identity": self.config.text_encoder,
                "sha256": self.text_encoder_sha256,
                "trained_prefixes": list(self.trained_encoder_prefixes),
            },
            "weights_dtype": self.weights_dtype,
            "created_by": self.created_by,
            "extra": self.extra,
            **spec,
        }

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> CheckpointMetadata:
        if values.get("format") != CHECKPOINT_FORMAT or values.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"not a {CHECKPOINT_FORMAT} v{FORMAT_VERSION} config (format={values.get('format')!r}, "
                f"version={values.get('format_version')!r}); foreign checkpoints go through export/import_sat.py"
            )
        return cls(
            config=SATConfig.from_dict(values["model_config"]),
            vocabulary_sha256=values["vocabulary_sha256"],
            text_encoder_sha256=values["text_encoder"]["sha256"],
            trained_encoder_prefixes=tuple(values["text_encoder"].get("trained_prefixes", ())),
            weights_dtype=values["weights_dtype"],
            created_by=values.get("created_by", "unknown"),
            extra=values.get("extra", {}),
            spec=ModelSpec.from_json(values["spec"]) if "spec" in values else None,
        )


def text_encoder_sha256(model: SAT) -> str:
    """The identity hash of the model's base text encoder (before any knowledge pretraining)."""
    return model.text.base_encoder_sha256 or tensor_sha256(model.text.encoder.state_dict())


def stored_state_dict(model: SAT) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: all but the base text encoder's untouched layers."""
    trained = tuple(EXTERNAL_PREFIX + prefix for prefix in model.text.trained_encoder_prefixes)
    return {
        key: value
        for key, value in model.state_dict().items()
        if not key.startswith(EXTERNAL_PREFIX) or key.startswith(trained)
    }


def replace_encoder_layers(
    model: SAT, tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...], base_sha256: str
) -> None:
    """Load trained encoder layers (keys relative to the encoder) over the base encoder, strictly.

    The base encoder must be the one they were trained from; every key under ``prefixes`` must be
    given and no other.
    """
    found = tensor_sha256(model.text.encoder.state_dict())
    if found != base_sha256:
        raise CheckpointError(
            f"text encoder {model.config.text_encoder!r} has weights sha256 {found[:12]}…, "
            f"the trained layers were made from {base_sha256[:12]}…; use the matching encoder"
        )
    expected = {key for key in model.text.encoder.state_dict() if key.startswith(prefixes)}
    mismatch = describe_key_mismatch(expected - set(tensors), set(tensors) - expected)
    if mismatch:
        raise CheckpointError(f"trained text-encoder layers do not match {prefixes}: {mismatch}")
    model.text.encoder.load_state_dict(tensors, strict=False)  # strictness was checked above
    model.text.trained_encoder_prefixes = prefixes
    model.text.base_encoder_sha256 = base_sha256


def load_text_pretraining(model: SAT, directory: str | os.PathLike[str]) -> tuple[str, ...]:
    """Put the layers ``training/pretrain_text.py`` trained into ``model``'s text encoder.

    ``directory`` holds ``config.json`` (``base``, ``base_sha256``, ``trained_prefixes``) and
    :data:`TEXT_PRETRAINING_WEIGHTS`. Returns the trained prefixes.
    """
    folder = Path(directory)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        tensors = load_file(str(folder / TEXT_PRETRAINING_WEIGHTS))
    except (OSError, json.JSONDecodeError, SafetensorError) as error:
        raise CheckpointError(f"could not read text pretraining in {folder}: {error}") from None
    if config.get("base") != model.config.text_encoder:
        raise CheckpointError(
            f"text pretraining in {folder} starts from {config.get('base')!r}, "
            f"the model uses {model.config.text_encoder!r}"
        )
    prefixes = tuple(config["trained_prefixes"])
    replace_encoder_layers(model, tensors, prefixes, config["base_sha256"])
    return prefixes


def save_checkpoint(
    model: SAT,
    directory: str | os.PathLike[str],
    *,
    vocabulary_sha256: str,
    dtype: torch.dtype | None = None,
    extra: dict[str, Any] | None = None,
    spec: ModelSpec | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

    ``spec`` (:mod:`satseg.spec`) states how the weights are used; every writer of real checkpoints passes one.

    ``dtype=torch.float16`` halves the file; floating tensors are cast back on load. Both files
    are written under temporary names and renamed, weights first, so a folder with a config
    always has complete weights. A text encoder folder inside ``directory`` is recorded by its
    path relative to ``directory``.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    config = replace(model.config, text_encoder=encoder_relative_to(model.config.text_encoder, target))
    tensors = {
        key: (value.to(dtype) if dtype is not None and value.is_floating_point() else value).contiguous().cpu()
        for key, value in stored_state_dict(model).items()
    }
    weights_dtype = str(dtype or next(iter(model.vision.parameters())).dtype).removeprefix("torch.")
    metadata = CheckpointMetadata(
        config=config,
        vocabulary_sha256=vocabulary_sha256,
        text_encoder_sha256=text_encoder_sha256(model),
        trained_encoder_prefixes=model.text.trained_encoder_prefixes,
        weights_dtype=weights_dtype,
        extra=dict(extra or {}),
        spec=spec,
    )
    write_bytes_atomically(target / WEIGHTS_FILE, save(tensors, metadata={"format": CHECKPOINT_FORMAT}))
    write_bytes_atomically(target / CONFIG_FILE, json.dumps(metadata.to_json(), indent=2).encode())
    return target


def checkpoint_folder(path: Path) -> Path:
    """The checkpoint folder of ``path`` (the folder, or its ``config.json``)."""
    return path.parent if path.is_file() else path


def with_encoder_in(metadata: CheckpointMetadata, folder: Path) -> CheckpointMetadata:
    """``metadata`` whose ``config.text_encoder`` names a folder inside ``folder`` by its absolute path."""
    identity = encoder_in_checkpoint(metadata.config.text_encoder, folder)
    return replace(metadata, config=replace(metadata.config, text_encoder=identity))


def read_metadata(directory: str | os.PathLike[str]) -> CheckpointMetadata:
    """Parse a checkpoint's ``config.json`` (the folder, or the file itself)."""
    path = Path(directory)
    config_path = path if path.is_file() else path / CONFIG_FILE
    try:
        return CheckpointMetadata.from_json(json.loads(config_path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(
            f"no checkpoint at {path}: expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE}"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{config_path} is not a valid checkpoint config: {error}") from None


def describe_key_mismatch(missing: set[str], unexpected: set[str], limit: int = 8) -> str:
    """One line naming the missing and unexpected keys (the first ``limit`` of each)."""

    def listing(keys: set[str]) -> str:
        names = sorted(keys)
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return ", ".join(names[:limit]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({listing(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({listing(unexpected)})")
    return "; ".join(parts)


def load_weights_strict(model: SAT, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``model`` only if keys and shapes match exactly; else raise, loading nothing."""
    expected = stored_state_dict(model)
    mismatch = describe_key_mismatch(set(expected) - set(tensors), set(tensors) - set(expected))
    if mismatch:
        raise CheckpointError(f"checkpoint keys do not match the {model.config.name} model: {mismatch}")
    wrong_shapes = [
        f"{key} {tuple(tensors[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if tensors[key].shape != value.shape
    ]
    if wrong_shapes:
        raise CheckpointError(f"checkpoint tensor shapes do not match the model: {', '.join(wrong_shapes[:8])}")
    model.load_state_dict(tensors, strict=False)  # strictness was checked above; the encoder is external


def load_checkpoint(
    directory: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[SAT, CheckpointMetadata]:
    """Build the model a checkpoint describes and load its weights strictly, in eval mode on ``device``.

    A ``config.text_encoder`` relative to the checkpoint folder (see :func:`encoder_in_checkpoint`)
    becomes that folder's absolute path in the returned model's and metadata's config.

    Raises :class:`CheckpointError` for a missing or malformed folder, missing or unexpected keys,
    shape mismatches, or a text encoder whose weights differ from the ones it was saved with.
    """
    folder, metadata = located_metadata(directory)
    weights_path = folder / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights_path))
    except (FileNotFoundError, SafetensorError, OSError) as error:
        raise CheckpointError(f"could not read {weights_path}: {error}") from None
    model = build_sat(metadata.config)
    prefixes = metadata.trained_encoder_prefixes
    encoder_keys = {EXTERNAL_PREFIX + key for key in model.text.encoder.state_dict() if key.startswith(prefixes)}
    trained_layers = {key.removeprefix(EXTERNAL_PREFIX): tensors[key] for key in encoder_keys if key in tensors}
    replace_encoder_layers(model, trained_layers, prefixes, metadata.text_encoder_sha256)
    load_weights_strict(model, tensors)
    return model.to(device).eval(), metadata


def located_metadata(directory: str | os.PathLike[str]) -> tuple[Path, CheckpointMetadata]:
    """A checkpoint's folder and its metadata, with ``config.text_encoder`` resolved as :func:`load_checkpoint` does."""
    path = Path(directory)
    folder = checkpoint_folder(path)
    return folder, with_encoder_in(read_metadata(path), folder)


class DeferredCheckpoint:
    """A checkpoint whose model is built only when first asked for (:meth:`model`).

    A segmenter that runs its windows in a graph needs the model only for prompts its embedding cache
    lacks, and building it costs the text encoder's import and weights (3 s of a 33 s demo run,
    benchmarks/RESULTS.md, "Where sat-segment's time goes"): so it keys the cache by :meth:`text_key`,
    read from the files, and loads the model on a miss.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.folder, self.metadata = located_metadata(directory)
        self._model: SAT | None = None

    def model(self) -> SAT:
        """The checkpoint's model on the CPU, in eval mode (:func:`load_checkpoint`, once)."""
        if self._model is None:
            self._model = load_checkpoint(self.folder)[0]
        return self._model

    @functools.cached_property
    def weights_sha256(self) -> str:
        """The weights file's sha256, read once: it keys the graph cache and the embedding cache."""
        return file_sha256(self.folder / WEIGHTS_FILE)

    def text_key(self) -> str:
        """The text tower's identity from the files alone: the weights file (the projection, the modality
        embedding and any trained encoder layers) and the base encoder's sha256 its metadata pins."""
        identity = f"{self.weights_sha256}:{self.metadata.text_encoder_sha256}"
        return "checkpoint-" + hashlib.sha256(identity.encode()).hexdigest()
