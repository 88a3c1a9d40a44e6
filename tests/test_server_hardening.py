"""The served model under hostile and unlucky conditions (issue 16).

The request tests use the session's real server (conftest).
"""

from __future__ import annotations

import pytest
from served import phantom

from clients.sat_client import infer_inputs, request_arrays
from satseg.serving import contract
from satseg.serving.server import TritonServer

pytest.importorskip("pytriton", reason="the serving tests need the serve extra (nvidia-pytriton)")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402 - after the importorskip


def test_a_request_without_prompts_gets_one_line_invalid_arg(triton_server: TritonServer) -> None:
    volume = phantom(seed=2, shape=(16, 16, 8))
    arrays = request_arrays(volume.array, volume.affine, "ct", ["liver"])
    del arrays[contract.PROMPTS]
    with pytest.raises(InferenceServerException) as caught:
        grpcclient.InferenceServerClient(triton_server.grpc_url).infer("sat", infer_inputs(grpcclient, arrays))
    assert "INVALID_ARG" in str(caught.value.status())
    assert "input PROMPTS is missing" in caught.value.message() and "deadlock" not in caught.value.message()
