"""Moving tensors between torch and Triton's python backend: DLPack on the GPU (no copy), numpy on the host.

``triton_python_backend_utils`` exists only inside a python-backend stub, so it is imported on use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def backend() -> Any:
    """The python backend's utility module (only importable inside ``tritonserver``)."""
    import triton_python_backend_utils

    return triton_python_backend_utils


def to_triton(name: str, tensor: torch.Tensor | np.ndarray) -> Any:
    """A ``pb_utils.Tensor``; a CUDA tensor goes by DLPack and stays on its device."""
    pb_utils = backend()
    if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
        return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(tensor.contiguous()))
    array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else tensor
    return pb_utils.Tensor(name, np.ascontiguousarray(array))


def to_torch(tensor: Any, device: torch.device) -> torch.Tensor:
    """A ``pb_utils.Tensor`` as a torch tensor on ``device`` (zero-copy where it already lies there)."""
    if tensor.is_cpu():
        result = torch.from_numpy(np.ascontiguousarray(tensor.as_numpy()))
    else:
        result = torch.from_dlpack(tensor.to_dlpack())
    return result.to(device)


def optional_input(request: Any, name: str) -> np.ndarray | None:
    """An input as numpy, or ``None`` where the request left the optional input out."""
    tensor = backend().get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def required_input(request: Any, name: str) -> np.ndarray:
    from satseg.errors import SatInputError

    array = optional_input(request, name)
    if array is None:
        raise SatInputError(f"input {name} is missing")
    return array


def error_response(error: Exception) -> Any:
    """The response of a request that failed: ``INVALID_ARG`` for bad input, ``INTERNAL`` for anything else."""
    from satseg.errors import SatInputError, one_line

    pb_utils = backend()
    message = one_line(str(error)) or type(error).__name__
    if isinstance(error, SatInputError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(f"internal error: {message}", pb_utils.TritonError.INTERNAL)
    )


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a parsed model config as plain strings."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}
