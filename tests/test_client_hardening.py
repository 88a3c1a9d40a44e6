"""``sat-client`` and ``SATClient`` against hostile or changing inputs (issue 16, client side), on the session's
real server from conftest: resume that checks what it skips, local refusals, one modality rule, size limits."""

from __future__ import annotations

import pytest
from served import phantom

from clients import SATClient
from clients.sat_client import backoff_delay
from satseg.errors import SatInputError
from satseg.serving.server import TritonServer

pytest.importorskip("tritonclient.grpc")
SMALL = (32, 28, 16)
OTHER = (28, 24, 14)
PROMPTS = "liver"


def model_requests(client: SATClient, model: str) -> int:
    """Requests ``model`` has answered or failed so far (Triton's statistics; needs the admin key)."""
    stats = client.inference_statistics()["model_stats"]
    counts = [
        entry["inference_stats"][outcome].get("count", 0)
        for outcome in ("success", "fail")
        for entry in stats
        if entry["name"] == model
    ]
    return sum(int(count) for count in counts)


def test_an_answer_over_a_message_limit_is_a_refusal_not_an_outage(triton_server: TritonServer) -> None:
    import tritonclient.grpc

    client = SATClient(triton_server.grpc_url, shared_memory="off")
    # A receive limit below the answer's size: gRPC itself answers RESOURCE_EXHAUSTED, as for any message over
    # a limit (the 16 KB metadata limit an error message once exceeded, a proxy's message cap).
    client._connection = tritonclient.grpc.InferenceServerClient(
        triton_server.grpc_url, channel_args=[("grpc.max_receive_message_length", 1024)]
    )
    with SATClient(triton_server.grpc_url, admin_key=triton_server.admin_key) as observer:
        before = model_requests(observer, "sat")
        with client, pytest.raises(SatInputError, match="size limit") as refused:
            client.segment(phantom(seed=40, shape=SMALL), [PROMPTS], "ct")
        assert model_requests(observer, "sat") == before + 1, "a refusal is never retried"
    assert "not an outage" in str(refused.value) and "\n" not in str(refused.value)


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [backoff_delay(attempt, 0.5) for attempt in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert backoff_delay(10_000, 0.5) == 4.0
