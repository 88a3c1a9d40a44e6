"""The engine: windows through any predictor, then clean-up, union, threshold, merge and measure.

Model-free: it takes a predictor ``(patches, queries) -> logits`` (torch in process, onnxruntime, Triton's
``vision`` by BLS) and the model spec, and every path (``sat-segment``, the Triton ``segmenter``,
``sat-evaluate``) gets its :class:`~satseg.outputs.result.SegmentationResult` from :func:`segment_prepared`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from satseg.engine.components import keep_largest_component
from satseg.engine.labelmap import LabelMapAccumulator
from satseg.engine.plan import PromptPlan
from satseg.engine.preprocess import PreparedVolume
from satseg.geometry.volume import Volume
from satseg.outputs.result import SegmentationResult
from satseg.outputs.statistics import mask_statistics
from satseg.spec import ModelSpec, WindowSpec
from satseg.window import Predictor, sliding_window_probabilities

MaskSink = Callable[[int, str, np.ndarray], None]
"""Called with ``(index, term, mask [I, J, K] uint8)`` as each mask is cut, e.g. to write it and let it go."""


PASS_BYTES = 5 << 30
"""What one pass's prompts may hold, in model-grid maps and window logits, when ``prompts_per_pass`` is not set:
each pass runs every window (the vision backbone included) again, so passes cost time and this memory buys
fewer (128 prompts took 5.9x the time of 8 on the demo model at 32 a pass, benchmarks/RESULTS.md). At this
size ``nano`` keeps about the 32 a pass it had (its 288x288x96 windows' logits dominate)."""
WINDOW_LOGIT_COPIES = 4
"""float32 copies of a window's logits per prompt counted alive at once (2 GiB of grid maps alone let nano take 89
prompts a pass, and 24 GB was not enough). Counted when the runtime's output, its tensor, the sigmoid and the
blended addend were four; the stitcher now makes the last two in place (nano, 32 prompts: 16.50 -> 14.87 GB
peak), and the count stays at 4 until a nano run past one pass measures the margin."""


@dataclass(frozen=True)
class WindowRun:
    """How windows are run; none of it changes the answer.

    Each pass over the windows holds, per prompt of the pass, one model-grid map of ``accumulator_dtype`` and
    the float32 logits of a batch of windows; ``prompts_per_pass`` caps the prompts, or by default
    :data:`PASS_BYTES` does (:meth:`pass_size`). ``batch_size``: windows per predictor call.
    """

    batch_size: int = 1
    prompts_per_pass: int | None = None
    accumulator_dtype: torch.dtype = torch.float16
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = False

    def pass_size(self, grid: Sequence[int], patch_size: Sequence[int]) -> int:
        """Prompts per pass over the ``patch_size`` windows of a model grid of shape ``grid``."""
        if self.prompts_per_pass is not None:
            return self.prompts_per_pass
        map_bytes = int(np.prod(grid)) * torch.finfo(self.accumulator_dtype).bits // 8
        logit_bytes = self.batch_size * int(np.prod(patch_size)) * 4 * WINDOW_LOGIT_COPIES
        return max(1, PASS_BYTES // (map_bytes + logit_bytes))


@dataclass(frozen=True)
class Outputs:
    """Which of the volumes the result keeps: the masks ``[N, I, J, K]``, the label map ``[I, J, K]``."""

    masks: bool = True
    labelmap: bool = False


def segment_prepared(
    volume: Volume,
    prepared: PreparedVolume,
    plan: PromptPlan,
    queries: torch.Tensor,
    predictor: Predictor,
    spec: ModelSpec,
    run: WindowRun = WindowRun(),
    outputs: Outputs = Outputs(),
    on_mask: MaskSink | None = None,
) -> SegmentationResult:
    """Segment ``plan`` in ``volume`` (already on ``spec``'s model grid as ``prepared``).

    Args:
        queries: ``[M, C]`` float32, one row per query row of ``plan`` (``sum(plan.counts)``).
        predictor: ``patches [B, 1, h, w, d], queries [B, N, C] -> logits [B, N, h, w, d]``.
        on_mask: sees each mask as it is cut (whether or not ``outputs.masks`` keeps it).
    """
    probabilities = prompt_probabilities(prepared, queries, plan, predictor, spec, run)
    return collect(
        volume, plan, probabilities, spec.postprocess.threshold, tuple(prepared.image.shape), outputs, on_mask
    )


def prompt_probabilities(
    prepared: PreparedVolume,
    queries: torch.Tensor,
    plan: PromptPlan,
    predictor: Predictor,
    spec: ModelSpec,
    run: WindowRun = WindowRun(),
) -> Iterator[torch.Tensor]:
    """Per term of ``plan``, float32 ``[I, J, K]`` probabilities in [0, 1] on the input grid: each query row's map
    cut to its largest piece where the plan says so, then the union (voxel-wise maximum) of the term's rows."""
    stream = probabilities_on_input_grid(prepared, queries, predictor, spec.window, run)
    stream = largest_components(stream, plan.single_component, spec.postprocess.threshold)
    return union_per_prompt(stream, plan.counts)


def collect(
    volume: Volume,
    plan: PromptPlan,
    probabilities: Iterable[torch.Tensor],
    threshold: float,
    model_grid: tuple[int, ...],
    outputs: Outputs = Outputs(),
    on_mask: MaskSink | None = None,
) -> SegmentationResult:
    """Threshold each term's probabilities (``> threshold``), measure its mask, and merge the label map.

    One term's probabilities are held at a time; the label map keeps only the best probability so far.
    """
    merged = LabelMapAccumulator(volume.shape) if outputs.labelmap else None
    masks: list[np.ndarray] = []
    statistics = []
    for index, (term, term_probabilities) in enumerate(zip(plan.terms, probabilities, strict=True)):
        mask = (term_probabilities > threshold).to(torch.uint8).cpu().numpy()
        statistics.append(mask_statistics(volume, mask))
        if on_mask is not None:
            on_mask(index, term, mask)
        if outputs.masks:
            masks.append(mask)
        if merged is not None:
            merged.add(index + 1, term_probabilities, threshold)
    return SegmentationResult(
        terms=plan.terms,
        statistics=tuple(statistics),
        model_grid=tuple(int(size) for size in model_grid),  # type: ignore[arg-type]
        masks=(np.stack(masks) if masks else np.zeros((0, *volume.shape), np.uint8)) if outputs.masks else None,
        labelmap=np.array(merged.labelmap) if merged is not None else None,
        warnings=plan.warnings,
    )


def largest_components(
    stream: Iterator[tuple[int, torch.Tensor]], single_component: Sequence[bool], threshold: float
) -> Iterator[tuple[int, torch.Tensor]]:
    """``stream`` with each query row flagged in ``single_component`` cut to its largest connected piece.

    Applied per row before :func:`union_per_prompt`, so "kidney" is each kidney's largest piece, joined.
    """
    for index, probabilities in stream:
        yield index, keep_largest_component(probabilities, threshold) if single_component[index] else probabilities


def union_per_prompt(stream: Iterator[tuple[int, torch.Tensor]], counts: Sequence[int]) -> Iterator[torch.Tensor]:
    """Per prompt, the voxel-wise maximum of its ``counts[i]`` consecutive row maps in ``stream``.

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
    run: WindowRun = WindowRun(),
) -> Iterator[tuple[int, torch.Tensor]]:
    """The windowing around any predictor, on a volume already on the model grid.

    Slides ``window`` windows over ``prepared.image`` with ``queries [N, C]`` in passes of
    ``run.pass_size`` rows, and yields ``(index, probabilities)`` per row: float32
    ``[I, J, K]`` in [0, 1] on the input grid. At most one pass of model-grid maps and one input-grid
    map exist at a time.
    """
    image = prepared.image.to(run.device)
    per_pass = run.pass_size(tuple(image.shape[-3:]), window.patch_size)
    for start in range(0, queries.shape[0], per_pass):
        probabilities = sliding_window_probabilities(
            image,
            queries[start : start + per_pass].to(run.device),
            predictor,
            window.patch_size,
            overlap=window.overlap,
            sigma_scale=window.sigma_scale,
            edge_allowance=window.edge_allowance,
            batch_size=run.batch_size,
            accumulator_dtype=run.accumulator_dtype,
            device=run.device,
            progress=run.progress,
        )
        for offset in range(probabilities.shape[0]):
            yield start + offset, prepared.to_input_grid(probabilities[offset].float())
        del probabilities
