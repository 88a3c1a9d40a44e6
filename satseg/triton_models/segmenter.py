"""``segmenter``: the whole geometry of ``sat`` around the ``vision`` model (second step of the ensemble).

Per request: validate, then the engine (:mod:`satseg.engine`: reorient, resample, normalise, slide windows,
blend, invert to the input grid, then clean up, threshold, merge and measure) with windows sent to ``vision``
by concurrent BLS ``async_exec`` calls. Windows, accumulators and probabilities live on this instance's device: on a
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

from satseg import contract
from satseg.engine import Outputs, PromptPlan, segment_prepared
from satseg.engine.options import InferenceOptions
from satseg.engine.preprocess import prepare
from satseg.errors import SatInputError
from satseg.geometry import Volume
from satseg.outputs.result import SegmentationResult
from satseg.spec import ModelSpec
from satseg.triton_models import requests
from satseg.triton_models.prompt_encoder import read_contract
from satseg.triton_models.tensors import (
    backend,
    error_response,
    model_parameters,
    optional_input,
    required_input,
    to_torch,
    to_triton,
)


@dataclass(frozen=True)
class SegmentationRequest:
    """One validated request: the volume, the prompt plan from ``prompt_encoder`` and its queries ``[M, C]``."""

    volume: Volume
    modality: str
    plan: PromptPlan
    queries: torch.Tensor
    options: contract.RequestOptions


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
                result = await loop.run_in_executor(None, self._segment, parsed, loop)
                responses.append(self._response(result))
            except Exception as error:  # never raise out of execute: the request gets the error
                responses.append(error_response(error))
        return responses

    def _read(self, request: Any) -> SegmentationRequest:
        options = contract.RequestOptions.from_parameters(contract.parse_parameters(request.parameters()))
        modality = requests.request_modality(required_input(request, contract.MODALITY))
        image = requests.pick_image(
            optional_input(request, contract.IMAGE), optional_input(request, contract.IMAGE_INT16)
        )
        volume = requests.request_volume(image, required_input(request, contract.AFFINE), modality, self.limits)
        queries = torch.from_numpy(np.ascontiguousarray(required_input(request, contract.QUERIES)))
        return SegmentationRequest(volume, modality, self._plan(request, queries.shape[0]), queries, options)

    @staticmethod
    def _plan(request: Any, rows: int) -> PromptPlan:
        """The plan ``prompt_encoder`` made (``LABELS``, ``PROMPT_INDEX``, ``SINGLE_COMPONENT``, ``WARNINGS``)."""
        single = [bool(flag) for flag in required_input(request, contract.SINGLE_COMPONENT).reshape(-1)]
        if len(single) != rows:
            raise SatInputError(f"{contract.SINGLE_COMPONENT} needs one flag per query row ({rows})")
        counts = contract.component_counts(required_input(request, contract.PROMPT_INDEX))
        return PromptPlan(
            terms=tuple(contract.decode_strings(required_input(request, contract.LABELS), contract.LABELS)),
            counts=tuple(counts),
            single_component=tuple(single),
            warnings=tuple(contract.decode_strings(required_input(request, contract.WARNINGS), contract.WARNINGS)),
        )

    def _segment(self, request: SegmentationRequest, loop: asyncio.AbstractEventLoop) -> SegmentationResult:
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
        prepared = prepare(request.volume, request.modality, spec.preprocess, spec.window)
        output = request.options.output
        outputs = Outputs(masks=output != contract.OUTPUT_LABELMAP, labelmap=output != contract.OUTPUT_MASKS)
        run = options.window_run(self.device)
        return segment_prepared(request.volume, prepared, request.plan, request.queries, predictor, spec, run, outputs)

    async def _vision(self, patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``[B, 1, h, w, d]`` windows and ``[B, N, C]`` queries -> ``[B, N, h, w, d]`` logits, in concurrent calls."""
        pb_utils = backend()
        size = max(1, math.ceil(patches.shape[0] / self.concurrent_calls))
        calls = [
            pb_utils.InferenceRequest(
                model_name=contract.VISION_MODEL,
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
    def _response(result: SegmentationResult) -> Any:
        return backend().InferenceResponse(
            output_tensors=[to_triton(name, array) for name, array in result.to_outputs().items()]
        )

    def finalize(self) -> None:
        """Nothing to release beyond memory."""
