"""The reference in-process segmenter: a volume and prompts in, per-prompt probabilities on the input grid out.

Everything a server or a client does later is measured against this path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from satseg.checkpoint import CheckpointMetadata, load_checkpoint
from satseg.errors import SatInputError
from satseg.geometry import PreparedVolume, prepare
from satseg.geometry.volume import MODALITIES, Volume, check_modality
from satseg.model import SAT
from satseg.outputs.components import keep_largest_component
from satseg.spec import ModelSpec, WindowSpec, default_spec
from satseg.text import (
    EmbeddingCache,
    PromptTokenizer,
    Vocabulary,
    resolve_text_encoder,
    tensor_sha256,
)
from satseg.window import Predictor, sliding_window_probabilities


@dataclass(frozen=True)
class InferenceOptions:
    """How windows are run, and what a caller overrides of the checkpoint's spec (:mod:`satseg.spec`).

    ``overlap``, ``threshold`` and ``orientation`` are ``None`` unless the caller overrides the spec (the CLI's
    ``--overlap``, ``--threshold`` and ``--orientation``, for a sagittal scan): the spec decides all it states.
    ``prompts_per_pass`` bounds memory: each pass holds ``prompts_per_pass`` fp16 probability maps
    of the model grid (2 bytes per voxel each); more prompts take more passes over the windows.
    ``precision`` is the vision model's arithmetic: ``fp32``, or ``fp16`` (CUDA autocast; logits come back
    float32). ``keep_largest_component``: a structure the spec lists as one connected body keeps only
    the largest connected piece of its ``> threshold`` mask (its other pieces get probability 0).
    """

    overlap: float | None = None
    precision: str = "fp32"
    threshold: float | None = None
    keep_largest_component: bool = True
    batch_size: int = 1
    accumulator_dtype: torch.dtype = torch.float16
    prompts_per_pass: int = 32
    orientation: str | None = None

    def applied_to(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` with this caller's overrides."""
        window = spec.window if self.overlap is None else replace(spec.window, overlap=self.overlap)
        post = spec.postprocess if self.threshold is None else replace(spec.postprocess, threshold=self.threshold)
        spec = replace(spec, window=window, postprocess=post)
        return spec if self.orientation is None else spec.with_overrides(orientation=self.orientation)


@dataclass(frozen=True)
class PromptProbabilities:
    """One prompt's result: ``probabilities`` float32 ``[I, J, K]`` in [0, 1] on the input grid.

    ``threshold``: a voxel is inside where its probability exceeds it; the largest-piece clean-up cut there,
    so masks must be cut there too (the writers and the evaluation read it from here).
    """

    index: int
    term: str
    probabilities: torch.Tensor
    threshold: float


PRECISIONS = ("fp32", "fp16")


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision ``device`` cannot run: fp16 only on CUDA (CPU convolutions have no fast fp16 kernels)."""
    if precision not in PRECISIONS:
        raise SatInputError(f"unknown precision {precision!r}; accepted: {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise SatInputError(f"precision fp16 needs a CUDA device, not {device}; the CPU runs fp32")


def vision_logits(
    vision: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    patches: torch.Tensor,
    queries: torch.Tensor,
    precision: str = "fp32",
) -> torch.Tensor:
    """``vision(patches, queries)`` in ``precision`` (fp16: autocast on the inputs' CUDA device), float32 out."""
    with torch.autocast(patches.device.type, dtype=torch.float16, enabled=precision == "fp16"):
        return vision(patches, queries).float()


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (refused with a clear message when absent) or ``auto``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SatInputError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise SatInputError(f"unknown device {name!r}; accepted: cpu, cuda, cuda:N, auto")
    return torch.device(name)


class Segmenter:
    """SAT inference in this process, on CPU or one GPU.

    Prompts are embedded once per (term, modality) and cached; windows run through
    :meth:`predict_logits`, the same ``(patches, queries) -> logits`` contract that onnxruntime
    and Triton implement; probabilities go back to the input grid one prompt at a time.
    """

    def __init__(
        self,
        model: SAT,
        *,
        vocabulary: Vocabulary | None = None,
        device: torch.device | str = "cpu",
        cache_dir: Path | None = None,
        options: InferenceOptions | None = None,
        metadata: CheckpointMetadata | None = None,
    ) -> None:
        self.metadata = metadata
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.vocabulary = vocabulary or Vocabulary.load()
        self.options = options or InferenceOptions()
        stated = (
            metadata.model_spec(self.vocabulary)
            if metadata is not None
            else default_spec(model.config.patch_size, self.vocabulary, trained_terms=None)
        )
        self.spec = self.options.applied_to(stated)
        """What this segmenter runs: the checkpoint's spec with the caller's overrides."""
        check_precision(self.options.precision, self.device)
        self.tokenizer = PromptTokenizer(resolve_text_encoder(model.config.text_encoder))
        # The cached value is the final query, so the key covers the whole text tower.
        self.embeddings = EmbeddingCache(tensor_sha256(model.text.state_dict()), cache_dir=cache_dir)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | os.PathLike[str], *, device: torch.device | str = "cpu", **kwargs: object
    ) -> Segmenter:
        model, metadata = load_checkpoint(checkpoint, device=device)
        return cls(model, device=device, metadata=metadata, **kwargs)  # type: ignore[arg-type]

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return self.spec.window.patch_size

    def resolve_prompts(self, prompts: Sequence[str], *, allow_free_text: bool = False) -> list[str]:
        """Canonical vocabulary terms for ``prompts`` (or normalised free text where allowed)."""
        return self.vocabulary.resolve_all(prompts, allow_free_text=allow_free_text)

    @torch.inference_mode()
    def _encode_uncached(self, terms: list[str], modality: str) -> torch.Tensor:
        tokens = {key: value.to(self.device) for key, value in self.tokenizer(terms).items()}
        modality_ids = torch.full((len(terms),), MODALITIES.index(modality), device=self.device)
        return self.model.encode_prompts(tokens["input_ids"], tokens["attention_mask"], modality_ids).float().cpu()

    def encode(self, terms: Sequence[str], modality: str) -> torch.Tensor:
        """Queries ``[N, d_model]`` float32 for resolved ``terms`` (the encoder runs only for new ones)."""
        return self.embeddings.get_or_compute(terms, modality, self._encode_uncached)

    @torch.inference_mode()
    def predict_logits(self, patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``patches [B, 1, H, W, D]``, ``queries [B, N, d]`` -> ``logits [B, N, H, W, D]`` (the Predictor)."""
        return vision_logits(
            self.model.vision, patches.to(self.device), queries.to(self.device), self.options.precision
        )

    @property
    def trained_terms(self) -> frozenset[str] | None:
        """The terms the checkpoint was trained on as positives, where its spec records them."""
        recorded = self.spec.trained_terms
        return frozenset(recorded) if recorded is not None else None

    def components(self, term: str) -> list[str]:
        """The terms the model is asked for to segment ``term`` (a parent becomes its trained children)."""
        return self.vocabulary.expand(term, self.trained_terms)

    def prepare(self, volume: Volume, modality: str) -> PreparedVolume:
        """``volume`` on the model grid of this segmenter's spec (``image.shape`` is the grid windows slide on)."""
        return prepare(volume, check_modality(modality), self.spec.preprocess)

    def segment(
        self,
        volume: Volume,
        terms: Sequence[str],
        modality: str,
        *,
        progress: bool = False,
        prepared: PreparedVolume | None = None,
    ) -> Iterator[PromptProbabilities]:
        """Yield each term's probabilities on ``volume``'s grid, in the order of ``terms``.

        ``terms`` must already be resolved (:meth:`resolve_prompts`). A parent term ("kidney") the
        model was not trained on is the union (voxel-wise maximum) of its trained children's maps.
        ``prepared``: ``volume`` already put on the model grid by :meth:`prepare`.
        """
        if not terms:
            raise ValueError("segment() needs at least one term resolved by resolve_prompts()")
        modality = check_modality(modality)
        prepared = prepared or self.prepare(volume, modality)
        plan = [self.components(term) for term in terms]
        components = [component for parts in plan for component in parts]
        queries = self.encode(components, modality)
        stream = probabilities_on_input_grid(
            prepared, queries, self.predict_logits, self.spec.window, self.options, self.device, progress
        )
        threshold = self.spec.postprocess.threshold
        if self.options.keep_largest_component:
            single = self.spec.single_component(components)
            stream = largest_components(stream, single, threshold)
        for index, union in enumerate(union_per_prompt(stream, [len(components) for components in plan])):
            yield PromptProbabilities(index, terms[index], union, threshold)


def largest_components(
    stream: Iterator[tuple[int, torch.Tensor]], single_component: Sequence[bool], threshold: float
) -> Iterator[tuple[int, torch.Tensor]]:
    """``stream`` with each query row flagged in ``single_component`` cut to its largest connected piece.

    Applied per component before :func:`union_per_prompt`, so "kidney" is each kidney's largest piece, joined.
    """
    for index, probabilities in stream:
        yield index, keep_largest_component(probabilities, threshold) if single_component[index] else probabilities


def union_per_prompt(stream: Iterator[tuple[int, torch.Tensor]], counts: Sequence[int]) -> Iterator[torch.Tensor]:
    """Per prompt, the voxel-wise maximum of its ``counts[i]`` consecutive component maps in ``stream``.

    ``stream`` is :func:`probabilities_on_input_grid`'s output for queries laid out prompt by prompt
    (a parent prompt's trained children in a row).
    """
    for count in counts:
        union = next(stream)[1]
        for _ in range(count - 1):
            torch.maximum(union, next(stream)[1], out=union)
        yield union


def probabilities_on_input_grid(
    prepared: PreparedVolume,
    queries: torch.Tensor,
    predictor: Predictor,
    window: WindowSpec,
    options: InferenceOptions,
    device: torch.device,
    progress: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The windowing around any predictor (torch, onnxruntime or Triton), on a volume already on the model grid.

    Slides ``window`` windows over ``prepared.image`` with ``queries [N, C]`` in passes of
    ``options.prompts_per_pass`` prompts, and yields ``(index, probabilities)`` per prompt: float32
    ``[I, J, K]`` in [0, 1] on the input grid. At most one pass of fp16 model-grid maps and one input-grid
    map exist at a time.
    """
    image = prepared.image.to(device)
    for start in range(0, queries.shape[0], options.prompts_per_pass):
        probabilities = sliding_window_probabilities(
            image,
            queries[start : start + options.prompts_per_pass].to(device),
            predictor,
            window.patch_size,
            overlap=window.overlap,
            sigma_scale=window.sigma_scale,
            batch_size=options.batch_size,
            accumulator_dtype=options.accumulator_dtype,
            device=device,
            progress=progress,
        )
        for offset in range(probabilities.shape[0]):
            yield start + offset, prepared.to_input_grid(probabilities[offset].float())
        del probabilities
