"""The reference in-process segmenter: a volume and prompts in, per-prompt probabilities on the input grid out.

Everything a server or a client does later is measured against this path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from satseg.checkpoint import CheckpointMetadata, DeferredCheckpoint
from satseg.engine import MaskSink, Outputs, PromptPlan, plan_prompts, prompt_probabilities, segment_prepared
from satseg.engine.options import InferenceOptions, check_precision
from satseg.engine.preprocess import PreparedVolume, prepare
from satseg.errors import SatInputError
from satseg.geometry.volume import MODALITIES, Volume, check_modality
from satseg.model import SAT
from satseg.outputs.result import SegmentationResult
from satseg.runtimes import GraphSession
from satseg.spec import default_spec
from satseg.text import (
    EmbeddingCache,
    PromptTokenizer,
    Vocabulary,
    resolve_text_encoder,
    tensor_sha256,
)


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


def vision_logits(
    vision: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    patches: torch.Tensor,
    queries: torch.Tensor,
    precision: str = "fp32",
) -> torch.Tensor:
    """``vision(patches, queries)`` in ``precision`` (fp16: autocast on the inputs' CUDA device), float32 out."""
    with torch.autocast(patches.device.type, dtype=torch.float16, enabled=precision == "fp16"):
        return vision(patches, queries).float()


class Segmenter:
    """SAT inference in this process, on CPU or one GPU.

    Prompts are embedded once per (term, modality) and cached; windows run through
    :meth:`predict_logits`, the same ``(patches, queries) -> logits`` contract that onnxruntime
    and Triton implement; probabilities go back to the input grid one prompt at a time.
    """

    def __init__(
        self,
        model: SAT | DeferredCheckpoint,
        *,
        vocabulary: Vocabulary | None = None,
        device: torch.device | str = "cpu",
        cache_dir: Path | None = None,
        options: InferenceOptions | None = None,
        metadata: CheckpointMetadata | None = None,
        graph: Path | None = None,
    ) -> None:
        """``model``: a built model, or a checkpoint built only where needed (the torch runtime's windows, or a
        prompt ``cache_dir`` lacks), whose ``metadata`` is then its own unless given."""
        self.device = torch.device(device)
        if isinstance(model, DeferredCheckpoint):
            self._deferred: DeferredCheckpoint | None = model
            self._model: SAT | None = None
            self.config = model.metadata.config
            metadata = metadata or model.metadata
            text_key = model.text_key()
        else:
            self._deferred, self._model = None, self._placed(model)
            self.config = model.config
            # The cached value is the final query, so the key covers the whole text tower.
            text_key = tensor_sha256(model.text.state_dict())
        self.metadata = metadata
        self.vocabulary = vocabulary or Vocabulary.load()
        self.options = options or InferenceOptions()
        stated = (
            metadata.model_spec(self.vocabulary)
            if metadata is not None
            else default_spec(self.config.patch_size, self.vocabulary, trained_terms=None)
        )
        self.spec = self.options.applied_to(stated)
        """What this segmenter runs: the checkpoint's spec with the caller's overrides."""
        check_precision(self.options.precision, self.device, self.options.runtime)
        self.graph = None if self.options.runtime == "torch" else self._open_graph(graph)
        """The vision graph's session when a graph runtime runs the windows (``graph``: its ONNX file)."""
        if self.options.runtime == "torch":
            _ = self.model  # its windows need it: fail here, not mid-run
        self.embeddings = EmbeddingCache(text_key, cache_dir=cache_dir)

    def _placed(self, model: SAT) -> SAT:
        model = model.to(self.device).eval()
        if self.device.type == "cpu":
            # oneDNN convolves channels-last maps without reordering them: a third less memory and faster
            # on the CPU (benchmarks/RESULTS.md, "SAT-Nano's window memory").
            model.vision.to(memory_format=torch.channels_last_3d)
        return model

    @property
    def model(self) -> SAT:
        """The model on this segmenter's device, built on first use where it came from a checkpoint."""
        if self._model is None:
            assert self._deferred is not None
            self._model = self._placed(self._deferred.model())
        return self._model

    @functools.cached_property
    def tokenizer(self) -> PromptTokenizer:
        """The text encoder's tokenizer, made on the first prompt the embedding cache lacks."""
        return PromptTokenizer(resolve_text_encoder(self.config.text_encoder))

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | os.PathLike[str], *, device: torch.device | str = "cpu", **kwargs: object
    ) -> Segmenter:
        """The segmenter of a checkpoint folder, its model built only where needed (see :class:`DeferredCheckpoint`)."""
        return cls(DeferredCheckpoint(checkpoint), device=device, **kwargs)  # type: ignore[arg-type]

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

    def _open_graph(self, graph: Path | None) -> GraphSession:
        if graph is None:
            raise SatInputError(f"runtime {self.options.runtime} needs the vision graph (model.onnx); pass it")
        threads = torch.get_num_threads()  # the same cores torch would use
        return GraphSession(graph, self.options.runtime, self.options.precision, threads=threads)

    @torch.inference_mode()
    def predict_logits(self, patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``patches [B, 1, H, W, D]``, ``queries [B, N, d]`` -> ``logits [B, N, H, W, D]`` (the Predictor)."""
        if self.graph is not None:
            feeds = {"image": patches.cpu().numpy(), "queries": queries.cpu().numpy()}
            return torch.from_numpy(self.graph.run(feeds, ["logits"])[0])
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
        return prepare(volume, check_modality(modality), self.spec.preprocess, self.spec.window)

    def plan(self, terms: Sequence[str]) -> tuple[PromptPlan, list[str]]:
        """The engine's prompt plan for resolved ``terms`` and the term of each query row (see
        :func:`~satseg.engine.plan_prompts`); untrained weights get no untrained-term warning (all is meaningless)."""
        return plan_prompts(
            terms,
            self.vocabulary,
            self.spec,
            keep_largest_component=self.options.keep_largest_component,
            flag_untrained=not self.untrained_weights,
        )

    @property
    def untrained_weights(self) -> bool:
        """The checkpoint says its weights were never trained (``sat-checkpoint init``)."""
        return self.metadata is not None and self.metadata.extra.get("trained") is False

    def segment(
        self,
        volume: Volume,
        terms: Sequence[str],
        modality: str,
        *,
        outputs: Outputs | None = None,
        on_mask: MaskSink | None = None,
        progress: bool = False,
        prepared: PreparedVolume | None = None,
        planned: tuple[PromptPlan, list[str]] | None = None,
    ) -> SegmentationResult:
        """Segment resolved ``terms`` (:meth:`resolve_prompts`) in ``volume``: the engine's result on its grid.

        ``outputs``: the volumes the result keeps (default: the masks). ``prepared``: ``volume`` already put on the
        model grid by :meth:`prepare`. ``on_mask`` sees each mask as it is cut (``sat-segment`` writes it there and
        keeps none: ``outputs.masks`` ``False``). ``planned``: :meth:`plan` of ``terms``, where the caller made it
        already (``sat-segment`` prints its warnings first).
        """
        prepared, plan, queries = self._inputs(volume, terms, modality, prepared, planned)
        run = self.options.window_run(self.device, progress)
        outputs = outputs or Outputs()
        return segment_prepared(volume, prepared, plan, queries, self.predict_logits, self.spec, run, outputs, on_mask)

    def probabilities(
        self,
        volume: Volume,
        terms: Sequence[str],
        modality: str,
        *,
        progress: bool = False,
        prepared: PreparedVolume | None = None,
    ) -> Iterator[PromptProbabilities]:
        """Each term's probabilities on ``volume``'s grid, before the threshold, in the order of ``terms``
        (for parity checks and calibration; :meth:`segment` is the answer).

        A parent term ("kidney") the model was not trained on is the union (voxel-wise maximum) of its trained
        children's maps, each cut to its largest piece where the spec says so.
        """
        prepared, plan, queries = self._inputs(volume, terms, modality, prepared, None)
        run = self.options.window_run(self.device, progress)
        threshold = self.spec.postprocess.threshold
        stream = prompt_probabilities(prepared, queries, plan, self.predict_logits, self.spec, run)
        for index, union in enumerate(stream):
            yield PromptProbabilities(index, terms[index], union, threshold)

    def _inputs(
        self,
        volume: Volume,
        terms: Sequence[str],
        modality: str,
        prepared: PreparedVolume | None,
        planned: tuple[PromptPlan, list[str]] | None,
    ) -> tuple[PreparedVolume, PromptPlan, torch.Tensor]:
        if not terms:
            raise ValueError("segment() needs at least one term resolved by resolve_prompts()")
        modality = check_modality(modality)
        plan, rows = planned or self.plan(terms)
        return prepared or self.prepare(volume, modality), plan, self.encode(rows, modality)
