"""``SATClient``: send a volume to the served ``sat`` ensemble and get masks back on the volume's own grid.

The server answers on the grid it was sent (the stored voxel order), so the client keeps the input's
affine and attaches it to the result: nothing about geometry travels back over the wire.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydicom

from satseg import contract
from satseg.errors import SatInputError, one_line
from satseg.geometry import Volume, load_volume
from satseg.geometry.io import check_intensities
from satseg.geometry.volume import MODALITIES, check_modality, choose_modality
from satseg.outputs import OutputOptions, SegmentationResult, write_result
from satseg.spec import ModelSpec
from satseg.text import Vocabulary, check_prompts
from satseg_clients.dicom_seg import SEG_FILE, write_dicom_seg
from satseg_clients.measurement_report import SR_FILE, write_measurement_report
from satseg_clients.rtstruct import RTSTRUCT_FILE, write_rtstruct
from satseg_clients.shared_memory import Placement, placements, read_output, request_region

PROTOCOLS = ("grpc", "http")
DICOM_WRITERS = {"dicom_seg": (write_dicom_seg, SEG_FILE), "rtstruct": (write_rtstruct, RTSTRUCT_FILE)}
DICOM_OUTPUTS = {"dicom_seg": "DICOM SEG", "rtstruct": "RT Structure Set", "sr": "DICOM SR measurement report"}
"""The DICOM output types, by what they are called in messages; each references its source series."""
OUTPUT_TYPES = ("nifti", *DICOM_OUTPUTS)
DEFAULT_PORTS = {"grpc": contract.DEFAULT_GRPC_PORT, "http": contract.DEFAULT_HTTP_PORT}
DEFAULT_RETRY_BUDGET_S = 60.0
"""How long a request keeps being retried after its first failure: longer than a server restart (about 18 s on
CPU, several times that on a loaded host)."""
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 4.0
"""The longest wait between two attempts, so a server that is back is found within seconds."""
MAX_REASON_CHARS = 400
"""A server's message is quoted up to this length (one line): enough for any reason, never a whole payload."""
INT16_RANGE = (np.iinfo(np.int16).min, np.iinfo(np.int16).max)
RESULT_TENSORS = (
    contract.MASKS,
    contract.LABELMAP,
    contract.LABELS,
    contract.VOLUMES_ML,
    contract.STATISTICS,
    contract.MODEL,
    contract.MODEL_GRID,
    contract.WARNINGS,
)
SHARED_OUTPUTS = (contract.MASKS, contract.LABELMAP)
SHARED_MEMORY_MODES = ("auto", "on", "off")
MAX_MESSAGE_BYTES = 2**31 - 1
"""gRPC and Triton's HTTP front end carry at most 2 GiB per message."""
Result = TypeVar("Result")
logger = logging.getLogger(__name__)


class ServerUnavailable(RuntimeError):
    """The server could not be reached, or stayed unavailable through every retry."""


@dataclass(frozen=True)
class Segmentation:
    """One served answer, on the grid of :attr:`volume` (the input, whose affine the masks carry).

    Attributes:
        volume: the input volume (array, voxel -> RAS+ mm affine, modality).
        result: the engine's result as the server computed it (terms, masks and/or label map, statistics, the
            model grid, warnings); nothing in it is recomputed here.
        model: sha256 of the served repository's ``sat/metadata.json`` (which export answered).
        source_series: the DICOM series folder the volume was read from, if it was (for DICOM SEG output).
        sent_bytes: the size of the image as sent (INT16 or FP32).
    """

    volume: Volume
    result: SegmentationResult
    model: str
    source_series: Path | None = None
    sent_bytes: int = 0

    @property
    def affine(self) -> np.ndarray:
        return self.volume.affine

    @property
    def labels(self) -> tuple[str, ...]:
        """The term of each mask, in prompt order (label value ``i + 1`` is ``labels[i]``)."""
        return self.result.terms

    @property
    def masks(self) -> np.ndarray | None:
        """``[N, I, J, K]`` uint8 in ``{0, 1}``, or ``None`` when only a label map was asked for."""
        return self.result.masks

    @property
    def labelmap(self) -> np.ndarray | None:
        """``[I, J, K]`` uint16 in ``0..N`` (overlaps go to the most probable), or ``None``."""
        return self.result.labelmap

    @property
    def volumes_ml(self) -> np.ndarray:
        """``[N]`` float32, each mask's volume in mL (the one definition: :class:`SegmentationResult`)."""
        return self.result.volumes_ml

    @property
    def warnings(self) -> tuple[str, ...]:
        """One line each that the result must be read with (prompts outside the trained terms)."""
        return self.result.warnings

    def save(
        self,
        output_dir: str | os.PathLike[str],
        *,
        ml: bool | None = None,
        statistics: bool = True,
        preview: bool = False,
        output_type: str | Sequence[str] = "nifti",
        source_series: Path | None = None,
        dicom_uids: Callable[[str], tuple[str, str]] | None = None,
    ) -> list[Path]:
        """Write the outputs on the input grid (atomically) and return their paths.

        Args:
            ml: NIfTI only. ``True``: the merged ``labelmap.nii.gz``; ``False``: one ``<term>.nii.gz`` per mask;
                ``None``: whatever this result holds.
            statistics: also ``statistics.json`` (the server's statistics per structure, and the warnings).
            preview: also ``preview.png`` (needs the label map).
            output_type: one or more of :data:`OUTPUT_TYPES` (``"nifti,dicom_seg,rtstruct,sr"`` or a list), each
                written from this one result: ``nifti`` (the masks or label map), ``dicom_seg``
                (``segmentation.dcm``, one segment per mask), ``rtstruct`` (``rtstruct.dcm``, one ROI per mask)
                and ``sr`` (``measurements.dcm``, each structure's volume and mean intensity, referencing the SEG's
                segments), the DICOM ones referencing the source series.
            source_series: the DICOM series folder the volume came from (default: the one segmented, if any).
            dicom_uids: output type -> the (series, SOP instance) UIDs of that DICOM output (default: new ones);
                the node derives them from the source series and the model, so a resent result is one instance.
        """
        types = parse_output_types(output_type)
        dicom = [kind for kind in types if kind in DICOM_OUTPUTS]
        if ml is True and self.labelmap is None:
            raise SatInputError('this result holds no label map: segment with output="labelmap" or "both"')
        if (ml is False or dicom) and self.masks is None:
            raise SatInputError('this result holds no masks: segment with output="masks" or "both"')
        if preview and self.labelmap is None:
            raise SatInputError('a preview needs the label map: segment with output="labelmap" or "both"')
        folder = Path(output_dir)
        nifti = "nifti" in types
        options = OutputOptions(
            masks=nifti and ml is not True and self.masks is not None,
            merged_labelmap=nifti and ml is not False and self.labelmap is not None,
            statistics=statistics,
            preview=preview,
            modality=self.volume.modality,
        )
        series = source_series or self.source_series
        if dicom and series is None:
            raise SatInputError(f"{needs_series(dicom)}; this volume did not come from one")
        written = []
        if dicom:
            folder.mkdir(parents=True, exist_ok=True)
        for kind in dicom:
            assert self.masks is not None and series is not None  # checked above
            series_uid, instance_uid = dicom_uids(kind) if dicom_uids else (None, None)
            uids = {"model": self.model, "series_uid": series_uid, "instance_uid": instance_uid}
            if kind in DICOM_WRITERS:
                writer, name = DICOM_WRITERS[kind]
                written.append(writer(self.masks, self.labels, series, folder / name, **uids))
            else:  # the SR, after the SEG whose segments it reports on
                seg = pydicom.dcmread(folder / SEG_FILE)
                modality = self.volume.modality or ""
                written.append(
                    write_measurement_report(seg, self.result.statistics, modality, folder / SR_FILE, **uids)
                )
        return [*written, *write_result(self.volume, self.result, folder, options)]


def parse_output_types(requested: str | Sequence[str]) -> tuple[str, ...]:
    """``"nifti,dicom_seg"`` (or a list of names) -> those output types in :data:`OUTPUT_TYPES`' order, each
    once; an unknown or empty one is refused, and so is ``sr`` without the ``dicom_seg`` it refers to."""
    names = [name.strip().lower() for name in (requested.split(",") if isinstance(requested, str) else requested)]
    unknown = [name for name in names if name not in OUTPUT_TYPES]
    if unknown or not names:
        raise SatInputError(
            f"output type {','.join(unknown) or '(none)'!r} is not accepted; use one or more of "
            f"{', '.join(OUTPUT_TYPES)}, e.g. nifti,dicom_seg"
        )
    if "sr" in names and "dicom_seg" not in names:
        raise SatInputError("output type sr reports on the DICOM SEG's segments; ask for dicom_seg,sr")
    return tuple(kind for kind in OUTPUT_TYPES if kind in names)


def needs_series(dicom: Sequence[str]) -> str:
    """The reason DICOM outputs cannot be written without a source series."""
    return f"{' and '.join(DICOM_OUTPUTS[kind] for kind in dicom)} output needs the source DICOM series"


class SATClient:
    """A client of one Triton server serving the ``sat`` ensemble.

    Args:
        url: ``host:port`` of the gRPC (default ``127.0.0.1:8001``) or HTTP (``127.0.0.1:8000``) endpoint.
        protocol: ``"grpc"`` or ``"http"``.
        timeout_s: time allowed for one request, network and inference together.
        retry_budget_s: how long, after a request's first failure, it is retried while the server is unavailable
            or times out (waits double from ``backoff_s`` up to :data:`MAX_BACKOFF_S`); 0: no retries.
        compression: ``"gzip"``, ``None`` or ``"auto"`` (default: gzip unless the server is on this host).
        admin_key: the server's ``sat-admin-key`` (default ``$SAT_ADMIN_KEY``): shared memory needs it.
        shared_memory: ``"auto"`` (system shared memory when the server is on this host and accepts a region,
            else the socket, said once in the log), ``"on"`` (required) or ``"off"``.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        *,
        timeout_s: float = 600.0,
        retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
        compression: str | None = "auto",
        backoff_s: float = FIRST_BACKOFF_S,
        admin_key: str | None = None,
        shared_memory: str = "auto",
    ) -> None:
        if protocol not in PROTOCOLS:
            raise SatInputError(f"protocol {protocol!r} is not supported; use grpc or http")
        if shared_memory not in SHARED_MEMORY_MODES:
            raise SatInputError(f"shared_memory {shared_memory!r} is not one of {', '.join(SHARED_MEMORY_MODES)}")
        self.admin_key = admin_key or os.environ.get(contract.ADMIN_KEY_VARIABLE)
        self.shared_memory = shared_memory
        self._shared_memory_note: str | None = None
        self.protocol = protocol
        self.url = url or f"127.0.0.1:{DEFAULT_PORTS[protocol]}"
        self.timeout_s = timeout_s
        self.retry_budget_s = retry_budget_s
        self.backoff_s = backoff_s
        self._model: tuple[str, ModelSpec] | None = None
        self.compression = default_compression(self.url) if compression == "auto" else compression
        self._module = _client_module(protocol)
        if protocol == "grpc":
            self._connection = self._module.InferenceServerClient(self.url)
        else:
            self._connection = self._module.InferenceServerClient(
                self.url, connection_timeout=timeout_s, network_timeout=timeout_s
            )

    def is_ready(self) -> bool:
        """Whether ``sat`` answers ready (``False`` when the server cannot be reached)."""
        try:
            return bool(self._connection.is_model_ready(contract.ENTRY_MODEL))
        except Exception:  # any transport failure means "not ready" to a caller asking this
            return False

    def wait_ready(self) -> bool:
        """Whether ``sat`` turns ready within the retry budget (polled with the same backoff as requests)."""

        def ready() -> None:
            if not self._connection.is_model_ready(contract.ENTRY_MODEL):
                raise ConnectionError(f"{contract.ENTRY_MODEL} is not ready")

        try:
            self._with_retries(ready)
        except ServerUnavailable:
            return False
        return True

    def model_hash(self, prompt: str, modality: str | None = None) -> str:
        """The served model's hash (``MODEL``: sha256 of ``sat/metadata.json``), without sending an image.

        Asks :data:`~satseg.contract.PROMPT_ENCODER_MODEL` alone with ``prompt`` (a term of the run, so a
        refusal is the one the run would get) and answers from a cache after the first call: one small
        request per client, which also brings the model's spec (:meth:`model_spec`).

        Raises:
            SatInputError: the prompt or modality was refused.
            ServerUnavailable: the server stayed unreachable through the retry budget.
        """
        return self._served_model(prompt, modality)[0]

    def model_spec(self, prompt: str, modality: str | None = None) -> ModelSpec:
        """The served model spec (spacing, crop, normalisation, window, threshold, trained terms), as
        :meth:`model_hash` fetches it."""
        return self._served_model(prompt, modality)[1]

    def trained_terms(self, modality: str) -> list[str]:
        """What ``--prompts all-trained`` asks this server for: the terms usable with ``modality`` that the
        served model was trained on (every term usable with it where the model does not record them)."""
        vocabulary = Vocabulary.load()
        spec = self.model_spec(vocabulary.for_modality(modality)[0], modality)
        return vocabulary.trained_for(spec.trained_terms, modality)

    def _served_model(self, prompt: str, modality: str | None) -> tuple[str, ModelSpec]:
        if self._model is None:
            # MODEL and SPEC are the same for every modality; the encoder only needs a valid one.
            names = {contract.MODALITY: check_modality(modality or MODALITIES[0]), contract.PROMPTS: prompt}
            inputs = infer_inputs(self._module, {name: contract.strings([value]) for name, value in names.items()})
            outputs = [self._module.InferRequestedOutput(name) for name in (contract.MODEL, contract.SPEC)]
            result = self._with_retries(lambda: self._infer(contract.PROMPT_ENCODER_MODEL, inputs, {}, outputs))
            spec = ModelSpec.from_json(json.loads(result.as_numpy(contract.SPEC)[0]))
            self._model = (str(result.as_numpy(contract.MODEL)[0].decode()), spec)
        return self._model

    def server_version(self) -> str:
        """The Triton version the server reports."""
        metadata = self._with_retries(self._connection.get_server_metadata)
        return str(metadata["version"] if isinstance(metadata, dict) else metadata.version)

    def inference_statistics(self, admin_key: str | None = None) -> dict[str, Any]:
        """Triton's per-model statistics (counts and cumulative ns per phase). An admin endpoint: it needs the
        server's ``sat-admin-key`` (default: this client's)."""
        extra = {"as_json": True} if self.protocol == "grpc" else {}
        call = partial(self._connection.get_inference_statistics, headers=self._admin_headers(admin_key), **extra)
        return dict(self._with_retries(call))

    @property
    def transport(self) -> str:
        """How the last requests travelled: "shared memory", or the protocol with its compression."""
        if self.uses_shared_memory:
            return f"{self.protocol} + shared memory"
        return f"{self.protocol} + {self.compression}" if self.compression else self.protocol

    @property
    def uses_shared_memory(self) -> bool:
        """Whether requests go through system shared memory (decided at the first request)."""
        return self._shared_memory_note == ""

    def segment(
        self,
        volume_or_path: Volume | str | os.PathLike[str],
        prompts: Sequence[str],
        modality: str | None = None,
        *,
        output: str = contract.OUTPUT_MASKS,
        threshold: float | None = None,
        overlap: float | None = None,
    ) -> Segmentation:
        """Segment ``prompts`` in one volume.

        Args:
            volume_or_path: a :class:`Volume`, a NIfTI file or a DICOM series folder.
            prompts: anatomy terms (the server resolves synonyms and refuses unknown ones).
            modality: one of :data:`~satseg.geometry.volume.MODALITIES`; default: the volume's own (from DICOM),
                else refused (:func:`~satseg.geometry.volume.choose_modality`, the rule of every entry point).
            output: ``"masks"``, ``"labelmap"`` or ``"both"``.
            threshold: probability threshold in ``(0, 1)``; default: the served model spec's.
            overlap: sliding-window overlap in ``[0, 0.9]``; default: the served model spec's.

        Raises:
            SatInputError: the volume, a prompt or an option was refused (by this client or the server); the
                checks the server applies to the modality, the prompts and the intensities run here first, so
                a bad request is refused with the server's message without being sent.
            ServerUnavailable: the server stayed unreachable through the retry budget.
        """
        volume = volume_or_path if isinstance(volume_or_path, Volume) else load_volume(volume_or_path)
        modality = choose_modality(modality, volume.modality)
        prompts = check_prompts(prompts)
        check_intensities(volume.array, modality)
        image = wire_image(volume.array, modality)
        optional = {"threshold": threshold, "overlap": overlap}
        parameters = {"output": output, **{key: value for key, value in optional.items() if value is not None}}
        arrays = self._with_retries(lambda: self._request(image, volume.affine, modality, prompts, parameters))
        result = SegmentationResult.from_outputs(arrays)
        for warning in result.warnings:
            logger.warning("%s", warning)
        return Segmentation(
            volume=Volume(volume.array, volume.affine, modality),
            result=result,
            model=arrays[contract.MODEL][0].decode(),
            source_series=None
            if isinstance(volume_or_path, Volume) or not Path(volume_or_path).is_dir()
            else Path(volume_or_path),
            sent_bytes=image.nbytes,
        )

    def _request(
        self, image: np.ndarray, affine: np.ndarray, modality: str, prompts: list[str], parameters: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        """One inference; the image and masks go through shared memory when that is on."""
        arrays = request_arrays(image, affine, modality, prompts)
        if not self._shared_memory_usable():
            check_response_size(image.shape, len(prompts), parameters["output"])
            result = self._infer(contract.ENTRY_MODEL, infer_inputs(self._module, arrays), parameters)
            return {name: result.as_numpy(name) for name in RESULT_TENSORS}
        image_name = image_tensor_name(image)
        inputs = infer_inputs(self._module, {name: array for name, array in arrays.items() if name != image_name})
        layout = placements(image, len(prompts), parameters["output"])
        with request_region(self._connection, image, layout, self._admin_headers()) as (region, handle):
            tensor = self._module.InferInput(image_name, list(image.shape), triton_dtype(image))
            tensor.set_shared_memory(region, layout["image"].byte_size)
            outputs = []
            for name in RESULT_TENSORS:
                requested = self._module.InferRequestedOutput(name)
                if name in layout:
                    requested.set_shared_memory(region, layout[name].byte_size, offset=layout[name].offset)
                outputs.append(requested)
            result = self._infer(contract.ENTRY_MODEL, [tensor, *inputs], parameters, outputs)
            arrays = {name: result.as_numpy(name) for name in RESULT_TENSORS if name not in layout}
            arrays.update({name: read_output(handle, layout[name]) for name in SHARED_OUTPUTS if name in layout})
        for name in SHARED_OUTPUTS:
            arrays.setdefault(name, np.zeros((0,), dtype=np.uint8))
        return arrays

    def _shared_memory_usable(self) -> bool:
        """Whether to use shared memory; decided on the first request, and said once when it is not used."""
        if self._shared_memory_note is None:
            self._shared_memory_note = self._shared_memory_obstacle()
            if self._shared_memory_note and self.shared_memory == "on":
                raise SatInputError(f"shared memory was required but cannot be used: {self._shared_memory_note}")
            if self._shared_memory_note and self.shared_memory == "auto":
                logger.warning(
                    "shared memory not used (%s); tensors go over %s", self._shared_memory_note, self.protocol
                )
        return not self._shared_memory_note

    def _shared_memory_obstacle(self) -> str:
        """Why shared memory cannot be used, or "" when a trial region registers."""
        if self.shared_memory == "off":
            return "turned off"
        if not is_local(self.url):
            return "the server is on another host"
        if not self.admin_key:
            return "it needs the server's admin key (SATClient(admin_key=...) or $SAT_ADMIN_KEY)"
        try:
            trial = np.zeros(1, dtype=np.uint8)
            with request_region(
                self._connection, trial, {"image": Placement(0, 1, (1,), np.uint8)}, self._admin_headers()
            ):
                return ""
        except Exception as error:  # any failure to set up the trial region means plain transport
            return f"the server refused a region: {' '.join(str(error).split())}"

    def _admin_headers(self, admin_key: str | None = None) -> dict[str, str]:
        """The admin key under the header name the protocol uses (gRPC prefixes it)."""
        header = contract.GRPC_ADMIN_HEADER if self.protocol == "grpc" else contract.ADMIN_HEADER
        return {header: admin_key or self.admin_key or ""}

    def _infer(
        self, model: str, inputs: list[Any], parameters: dict[str, Any], outputs: list[Any] | None = None
    ) -> Any:
        if self.protocol == "grpc":
            transport = {"client_timeout": self.timeout_s, "compression_algorithm": self.compression}
        else:  # the HTTP client's timeouts were set on the connection
            transport = {
                "request_compression_algorithm": self.compression,
                "response_compression_algorithm": self.compression,
            }
        return self._connection.infer(model, inputs, outputs=outputs, parameters=parameters or None, **transport)

    def _with_retries(self, call: Callable[[], Result]) -> Result:
        """Run ``call``; on unavailability or a timeout retry it with backoff until :attr:`retry_budget_s` has
        passed since its first failure; a refusal (INVALID_ARG, a size limit) becomes SatInputError at once."""
        first_failure: float | None = None
        attempt = 0
        while True:
            try:
                return call()
            except Exception as error:
                failure = self._retryable_failure(error)
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            left = self.retry_budget_s - (now - first_failure)
            if left <= 0:
                raise ServerUnavailable(
                    f"{self.url} ({self.protocol}) still unavailable after {attempt + 1} attempt(s) in "
                    f"{now - first_failure:.0f} s (retry budget {self.retry_budget_s:g} s): {failure}"
                )
            time.sleep(min(backoff_delay(attempt, self.backoff_s), left))
            attempt += 1

    def _retryable_failure(self, error: Exception) -> str:
        """The one-line reason to retry, or raise: SatInputError for a refusal, ServerUnavailable otherwise."""
        from tritonclient.utils import InferenceServerException

        if isinstance(error, InferenceServerException):
            status = str(error.status())
            reason = short_reason(str(error.message()))
            failure = f"{status} {reason}"
            if any(marker in status for marker in contract.REFUSED_STATUSES):
                raise SatInputError(f"the server refused the request: {reason}") from None
            if any(marker in status for marker in contract.OVER_LIMIT_STATUSES):
                raise SatInputError(
                    f"the request or its answer is over a size limit (not an outage; retrying would not help): "
                    f"{failure}"
                ) from None
            if "restricted" in failure or status == "403":
                raise PermissionError(f"{self.url} refused an admin call (wrong or missing admin key): {failure}")
            if any(marker in failure for marker in contract.UNAVAILABLE_FAILURES):
                return failure
            raise ServerUnavailable(f"{self.url} ({self.protocol}): {failure}") from None
        if isinstance(error, (ConnectionError, TimeoutError, OSError)):
            return f"cannot be reached: {error}"
        raise error

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> SATClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def backoff_delay(attempt: int, first_s: float, cap_s: float = MAX_BACKOFF_S) -> float:
    """Seconds to wait before retry ``attempt + 1``: ``first_s`` doubling per attempt, at most ``cap_s``."""
    return min(cap_s, first_s * 2.0 ** min(attempt, 32))  # the exponent's cap keeps the float finite


def short_reason(message: str) -> str:
    """A server's message on one line (no control characters) and at most :data:`MAX_REASON_CHARS` long."""
    line = one_line(message)
    return line if len(line) <= MAX_REASON_CHARS else f"{line[:MAX_REASON_CHARS]}… ({len(line)} characters)"


def wire_image(array: np.ndarray, modality: str) -> np.ndarray:
    """The array to send: CT as INT16 HU when every value is a whole number in range (half of FP32's bytes),
    anything else as FP32."""
    if modality == "ct" and array.dtype.kind in "iu":
        low, high = int(array.min()), int(array.max())
        if INT16_RANGE[0] <= low and high <= INT16_RANGE[1]:
            return np.ascontiguousarray(array, dtype=np.int16)
    return np.ascontiguousarray(array, dtype=np.float32)


def is_local(url: str) -> bool:
    """Whether ``host:port`` names this host's loopback."""
    host = url.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_compression(url: str) -> str | None:
    """gzip for a remote server (volumes compress 2-4x), none on this host (compression would only cost time)."""
    return None if is_local(url) else "gzip"


def check_response_size(shape: Sequence[int], prompts: int, output: str) -> None:
    """Refuse, before sending, a request whose masks could not come back in one message."""
    voxels = int(np.prod(shape))
    size = (prompts * voxels if output != contract.OUTPUT_LABELMAP else 0) + 2 * voxels * (
        output != contract.OUTPUT_MASKS
    )
    if size > MAX_MESSAGE_BYTES:
        raise SatInputError(
            f"the answer would be {size / 2**30:.1f} GiB ({prompts} masks of {voxels:,} voxels), over the 2 GiB "
            'limit of one message; ask for output="labelmap" or send fewer prompts per request'
        )


def image_tensor_name(image: np.ndarray) -> str:
    """``IMAGE_INT16`` for an int16 image, else ``IMAGE`` (FP32)."""
    return contract.IMAGE_INT16 if image.dtype == np.int16 else contract.IMAGE


def request_arrays(
    image: np.ndarray, affine: np.ndarray, modality: str, prompts: Sequence[str]
) -> dict[str, np.ndarray]:
    """The input tensors of one ``sat`` request, by name (see :func:`wire_image` for ``image``)."""
    return {
        image_tensor_name(image): image,
        contract.AFFINE: np.asarray(affine, dtype=np.float64),
        contract.MODALITY: np.array([modality.encode()], dtype=np.object_),
        contract.PROMPTS: np.array([prompt.encode() for prompt in prompts], dtype=np.object_),
    }


def infer_inputs(module: Any, arrays: dict[str, np.ndarray]) -> list[Any]:
    """``tritonclient`` (``module``: its grpc or http package) inputs holding ``arrays``; reusable across calls."""
    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), triton_dtype(array))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def triton_dtype(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return str(np_to_triton_dtype(array.dtype))


def _client_module(protocol: str) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError:
        raise SatInputError(
            f'tritonclient[{protocol}] is not installed; install the client extra (pip install -e ".[serve]")'
        ) from None
    return module
