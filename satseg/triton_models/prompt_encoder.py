"""``prompt_encoder``: prompts and a modality in, the vision model's queries out (first step of ``sat``).

Known terms are looked up in the table ``sat-export`` precomputed (every vocabulary term for every
modality), so they never run the text encoder; free text, where the config allows it, goes to the
``text_encoder`` model by BLS. A parent prompt ("kidney") becomes the trained children whose union it is,
by the engine's plan (:func:`satseg.engine.plan_prompts`) as in process, so ``PROMPT_INDEX`` says which query rows
belong to which prompt.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from satseg import contract
from satseg.engine.plan import plan_prompts
from satseg.errors import SatInputError
from satseg.geometry.volume import MODALITIES
from satseg.spec import ModelSpec
from satseg.text import PromptTokenizer, Vocabulary
from satseg.triton_models import requests
from satseg.triton_models.tensors import (
    backend,
    error_response,
    model_parameters,
    optional_input,
    required_input,
    to_torch,
    to_triton,
)

EMBEDDINGS_FILE = "embeddings.safetensors"
TOKENIZER_FOLDER = "tokenizer"

MISSING_PROMPTS = (
    f"input {contract.PROMPTS} is missing; send the anatomical terms to segment as a BYTES tensor [N] "
    '(e.g. ["liver", "spleen"])'
)
"""PROMPTS is optional in the configs only so that its absence reaches this refusal (Triton's own is a deadlock)."""


def read_contract(model_folder: Path) -> dict[str, Any]:
    """The repository's ``sat/metadata.json`` (written by ``sat-export``), seen from a model's own folder."""
    return json.loads(contract_bytes(model_folder))


def contract_bytes(model_folder: Path) -> bytes:
    """The bytes of ``sat/metadata.json`` (what the ``MODEL`` hash covers)."""
    path = model_folder.parent / contract.ENTRY_MODEL / contract.CONTRACT_FILE
    try:
        return path.read_bytes()
    except OSError as error:
        raise RuntimeError(f"cannot read {path} ({error}); build the repository with sat-export") from None


def load_query_table(path: Path, vocabulary: Vocabulary) -> tuple[torch.Tensor, dict[str, int]]:
    """``[modalities, terms, d]`` float32 and term -> row, refusing a table made for another vocabulary."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        table = handle.get_tensor("embeddings").float()
    if metadata.get("vocabulary_sha256") != vocabulary.sha256:
        raise RuntimeError(f"{path} was built for another vocabulary; rebuild the repository with sat-export")
    if json.loads(metadata["modalities"]) != list(MODALITIES):
        raise RuntimeError(f"{path} lists modalities in another order than {MODALITIES}")
    terms = json.loads(metadata["terms"])
    return table, {term: row for row, term in enumerate(terms)}


class PromptEncoderModel:
    """Lifecycle: ``initialize`` loads the table once; ``execute`` answers each request on its own."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the query table, the vocabulary, the trained terms (``sat/metadata.json``) and the limits."""
        folder = Path(args["model_repository"])
        config = json.loads(args["model_config"])
        self.limits = contract.ServingLimits.from_parameters(model_parameters(config))
        self.vocabulary = Vocabulary.load()
        version = folder / args["model_version"]
        self.table, self.rows = load_query_table(version / EMBEDDINGS_FILE, self.vocabulary)
        metadata = contract_bytes(folder)
        # Clients record this with every result: it names the exact export (weights, graphs, vocabulary).
        self.model_id = np.array([hashlib.sha256(metadata).hexdigest().encode()], dtype=np.object_)
        self.spec = ModelSpec.from_json(json.loads(metadata)["spec"])
        self.spec_json = contract.strings([json.dumps(self.spec.to_json())])
        self.tokenizer_folder = version / TOKENIZER_FOLDER
        self._tokenizer: PromptTokenizer | None = None

    async def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request; a bad prompt fails its own request with INVALID_ARG."""
        responses = []
        for request in requests:
            try:
                responses.append(await self._answer(request))
            except Exception as error:  # never raise out of execute: the request gets the error
                responses.append(error_response(error))
        return responses

    async def _answer(self, request: Any) -> Any:
        modality = requests.request_modality(required_input(request, contract.MODALITY))
        prompts_array = optional_input(request, contract.PROMPTS)
        if prompts_array is None:
            raise SatInputError(MISSING_PROMPTS)
        prompts = requests.request_prompts(prompts_array, self.limits)
        terms = self.vocabulary.resolve_all(prompts, allow_free_text=self.limits.allow_free_text)
        plan, rows = plan_prompts(terms, self.vocabulary, self.spec)
        queries = await self._queries(rows, modality)
        return backend().InferenceResponse(
            output_tensors=[
                to_triton(contract.QUERIES, queries),
                to_triton(contract.PROMPT_INDEX, contract.prompt_index(plan.counts)),
                to_triton(contract.SINGLE_COMPONENT, np.array(plan.single_component, dtype=bool)),
                to_triton(contract.LABELS, contract.strings(plan.terms)),
                to_triton(contract.MODEL, self.model_id),
                to_triton(contract.SPEC, self.spec_json),
                to_triton(contract.WARNINGS, contract.strings(plan.warnings)),
            ]
        )

    async def _queries(self, components: list[str], modality: str) -> torch.Tensor:
        """``[M, d]`` float32: table rows for known terms, the text encoder for the rest."""
        plane = self.table[MODALITIES.index(modality)]
        queries = torch.empty((len(components), plane.shape[1]), dtype=torch.float32)
        unknown = [index for index, term in enumerate(components) if term not in self.rows]
        for index, term in enumerate(components):
            if term in self.rows:
                queries[index] = plane[self.rows[term]]
        if unknown:
            queries[unknown] = await self._encode([components[index] for index in unknown], modality)
        return queries

    async def _encode(self, texts: list[str], modality: str) -> torch.Tensor:
        """Free-text prompts through the ``text_encoder`` model (BLS)."""
        if self._tokenizer is None:
            self._tokenizer = PromptTokenizer(self.tokenizer_folder)
        tokens = self._tokenizer(texts)
        modality_ids = torch.full((len(texts),), MODALITIES.index(modality), dtype=torch.int64)
        pb_utils = backend()
        request = pb_utils.InferenceRequest(
            model_name=contract.TEXT_ENCODER_MODEL,
            requested_output_names=["queries"],
            inputs=[
                to_triton("input_ids", tokens["input_ids"]),
                to_triton("attention_mask", tokens["attention_mask"]),
                to_triton("modality", modality_ids),
            ],
        )
        response = await request.async_exec()
        if response.has_error():
            raise RuntimeError(f"text_encoder failed: {response.error().message()}")
        return to_torch(pb_utils.get_output_tensor_by_name(response, "queries"), torch.device("cpu"))

    def finalize(self) -> None:
        """Nothing to release beyond memory."""
