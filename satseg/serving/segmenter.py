"""``segmenter``: the whole geometry of ``sat`` around the ``vision`` model (second step of the ensemble).

Per request: validate, then the core library's path (reorient, resample, normalise, slide windows, blend,
invert to the input grid) with windows sent to ``vision`` by concurrent BLS ``async_exec`` calls, then
threshold, merge and measure. Windows, accumulators and probabilities live on this instance's device: on a
GPU instance tensors come and go by DLPack (``FORCE_CPU_ONLY_INPUT_TENSORS: no``) and stitching runs in
torch there; on the CPU the same code runs on the host.

The stitching runs in a worker thread so the stub's event loop stays free to await the BLS calls.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from satseg.errors import SatInputError
from satseg.geometry import Volume, prepare
from satseg.outputs import LabelMapAccumulator
from satseg.pipeline import InferenceOptions, largest_components, probabilities_on_input_grid, union_per_prompt
from satseg.serving import contract
from satseg.serving.prompt_encoder import read_contract
from satseg.serving.triton_tensors import (
    backend,
    error_response,
    model_parameters,
    optional_input,
    required_input,
    to_torch,
    to_triton,
)
from satseg.spec import ModelSpec

VISION_MODEL = "vision"


@dataclass(frozen=True)
class SegmentationRequest:
    """One validated request."""

    volume: Volume
    modality: str
    queries: torch.Tensor
    counts: list[int]
    single_component: list[bool]
    options: contract.RequestOptions


@dataclass(frozen=True)
class SegmentationArrays:
    """What goes back: ``masks`` ``[N, I, J, K]`` uint8 and/or ``labelmap`` ``[I, J, K]`` uint16 (one not asked
    for is empty), ``volumes_ml`` ``[N]`` float32, each mask's volume on the input grid, and ``model_grid``
    ``[3]`` int32, the grid the windows slid on."""

    masks: np.ndarray
    labelmap: np.ndarray
    volumes_ml: np.ndarray
    model_grid: np.ndarray


def threshold_prompts(
    probabilities: Any, shape: tuple[int, int, int], voxel_volume_ml: float, output: str, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks and/or a label map, and volumes, from each prompt's probabilities ``[I, J, K]`` (an iterable of
    tensors) cut at ``threshold``; the output not asked for is an empty array."""
    masks: list[np.ndarray] = []
    volumes: list[float] = []
    keep_masks = output in (contract.OUTPUT_MASKS, contract.OUTPUT_BOTH)
    merged = LabelMapAccumulator(shape) if output != contract.OUTPUT_MASKS else None
    for value, prompt_probabilities in enumerate(probabilities, start=1):
        mask = prompt_probabilities > threshold
        volumes.append(float(mask.sum()) * voxel_volume_ml)
        if keep_masks:
            masks.append(mask.to(torch.uint8).cpu().numpy())
        if merged is not None:
            merged.add(value, prompt_probabilities, threshold)
    return (
        np.stack(masks) if masks else np.zeros((0, 0, 0, 0), np.uint8),
        np.array(merged.labelmap) if merged is not None else np.zeros((0, 0, 0), np.uint16),
        np.array(volumes, np.float32),
    )


class SegmenterModel:
    """Lifecycle: ``initialize`` reads the contract and limits; ``execute`` segments each request on its own."""

    def initialize(self, args: dict[str, str]) -> None:
        """The model spec from ``sat/metadata.json``; device from the instance kind; BLS fan-out from parameters."""
        folder = Path(args["model_repository"])
        parameters = model_parameters(json.loads(args["model_config"]))
        self.limits = contract.ServingLimits.from_parameters(parameters)
        self.windows_per_call = int(parameters.get("windows_per_call", "1"))
        self.concurrent_calls = int(parameters.get("concurrent_calls", "2"))
        self.prompts_per_pass = int(parameters.get("prompts_per_pass", "32"))
        self.spec = ModelSpec.from_json(read_contract(folder)["spec"])
        on_gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu")

    async def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request, in order; a failing request never affects the others."""
        loop = asyncio.get_running_loop()
        responses = []
        for request in requests:
            try:
                parsed = self._read(request)
                arrays = await loop.run_in_executor(None, self._segment, parsed, loop)
                responses.append(self._response(arrays))
            except Exception as error:  # never raise out of execute: the request gets the error
                responses.append(error_response(error))
        return responses

    def _read(self, request: Any) -> SegmentationRequest:
        options = contract.RequestOptions.from_parameters(contract.parse_parameters(request.parameters()))
        modality = contract.request_modality(required_input(request, contract.MODALITY))
        image = contract.pick_image(
            optional_input(request, contract.IMAGE), optional_input(request, contract.IMAGE_INT16)
        )
        volume = contract.request_volume(image, required_input(request, contract.AFFINE), modality, self.limits)
        counts = contract.component_counts(required_input(request, contract.PROMPT_INDEX))
        queries = torch.from_numpy(np.ascontiguousarray(required_input(request, contract.QUERIES)))
        # Optional so the segmenter can be called on its own; the ensemble always sends it.
        flags = optional_input(request, contract.SINGLE_COMPONENT)
        single = [False] * queries.shape[0] if flags is None else [bool(flag) for flag in flags.reshape(-1)]
        if len(single) != queries.shape[0]:
            raise SatInputError(f"{contract.SINGLE_COMPONENT} needs one flag per query row ({queries.shape[0]})")
        return SegmentationRequest(volume, modality, queries, counts, single, options)

    def _segment(self, request: SegmentationRequest, loop: asyncio.AbstractEventLoop) -> SegmentationArrays:
        """Runs in a worker thread; each batch of windows is awaited on the stub's event loop."""

        def predictor(patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
            return asyncio.run_coroutine_threadsafe(self._vision(patches, queries), loop).result()

        options = InferenceOptions(
            overlap=request.options.overlap,
            threshold=request.options.threshold,
            batch_size=self.windows_per_call * self.concurrent_calls,
            prompts_per_pass=self.prompts_per_pass,
        )
        spec = options.applied_to(self.spec)
        prepared = prepare(request.volume, request.modality, spec.preprocess)
        stream = probabilities_on_input_grid(prepared, request.queries, predictor, spec.window, options, self.device)
        stream = largest_components(stream, request.single_component, spec.postprocess.threshold)
        arrays = threshold_prompts(
            union_per_prompt(stream, request.counts),
            request.volume.shape,
            request.volume.voxel_volume_ml,
            request.options.output,
            spec.postprocess.threshold,
        )
        return SegmentationArrays(*arrays, model_grid=np.array(prepared.image.shape, np.int32))

    async def _vision(self, patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``[B, 1, h, w, d]`` windows and ``[B, N, C]`` queries -> ``[B, N, h, w, d]`` logits, in concurrent calls."""
        pb_utils = backend()
        size = max(1, math.ceil(patches.shape[0] / self.concurrent_calls))
        calls = [
            pb_utils.InferenceRequest(
                model_name=VISION_MODEL,
                requested_output_names=["logits"],
                inputs=[
                    to_triton("image", patches[start : start + size]),
                    to_triton("queries", queries[start : start + size]),
                ],
            ).async_exec()
            for start in range(0, patches.shape[0], size)
        ]
        logits = []
        for response in await asyncio.gather(*calls):
            if response.has_error():
                raise RuntimeError(f"vision failed: {response.error().message()}")
            logits.append(to_torch(pb_utils.get_output_tensor_by_name(response, "logits"), self.device))
        return torch.cat(logits)

    @staticmethod
    def _response(arrays: SegmentationArrays) -> Any:
        return backend().InferenceResponse(
            output_tensors=[
                to_triton(contract.MASKS, arrays.masks),
                to_triton(contract.LABELMAP, arrays.labelmap),
                to_triton(contract.VOLUMES_ML, arrays.volumes_ml),
                to_triton(contract.MODEL_GRID, arrays.model_grid),
            ]
        )

    def finalize(self) -> None:
        """Nothing to release beyond memory."""
