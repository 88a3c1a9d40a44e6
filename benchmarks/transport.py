"""Bytes on the wire and time per transport for a 512x512x300 CT, against the real server on loopback.

Each transport (gRPC and HTTP, plain, gzip and system shared memory) sends the same synthetic torso CT
(INT16 HU, 0.8x0.8x1.0 mm) with one prompt and gets its mask back. Bytes are the loopback interface's
transmitted-byte counter around the request (every byte of both directions crosses it once); the time
outside the server is the client's wall time minus the ``sat`` ensemble's own request time from Triton's
statistics, i.e. serialisation, compression, copies and the socket. Overlap 0 keeps inference short:
the transport is what is measured.

    python benchmarks/transport.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_model

from satseg.checkout import BUNDLED_CHECKPOINT
from satseg.geometry import Volume
from satseg.phantom import centred_affine, make_torso_phantom
from satseg.server.triton import TritonServer
from satseg_clients import SATClient
from satseg_export.build_repo import ExportSettings, build_repository

SHAPE = (512, 512, 300)
SPACING = (0.8, 0.8, 1.0)
TRANSPORTS = {
    "plain": {"compression": None, "shared_memory": "off"},
    "gzip": {"compression": "gzip", "shared_memory": "off"},
    "shared memory": {"shared_memory": "on"},
}


def loopback_bytes() -> int:
    """Bytes transmitted on ``lo`` so far (Linux)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def server_seconds(client: SATClient) -> float:
    for model in client.inference_statistics()["model_stats"]:
        if model["name"] == "sat":
            return int(model["inference_stats"]["success"]["ns"]) / 1e9
    raise RuntimeError("no statistics for sat")


def measure(client: SATClient, volume: Volume) -> tuple[float, float, int]:
    """(wall seconds, seconds outside the server, bytes on loopback) of one request."""
    inside, sent = server_seconds(client), loopback_bytes()
    started = time.perf_counter()
    client.segment(volume, ["liver"], "ct", overlap=0.0)
    wall = time.perf_counter() - started
    on_wire = loopback_bytes() - sent
    return wall, wall - (server_seconds(client) - inside), on_wire


def main() -> None:
    affine = centred_affine(SHAPE, SPACING, 0.0)
    phantom, _, _ = make_torso_phantom(SHAPE, affine, seed=0)
    volume = Volume(phantom.array.astype(np.int16), affine, "ct")
    megabytes = volume.array.nbytes / 1e6
    print(f"machine: {cpu_model()}; CT {SHAPE} int16 = {megabytes:.0f} MB, mask {np.prod(SHAPE) / 1e6:.0f} MB")
    with tempfile.TemporaryDirectory(prefix="sat-transport-") as folder:
        repository = Path(folder) / "triton_repo"
        build_repository(ExportSettings(checkpoint=BUNDLED_CHECKPOINT, repository=repository))
        with TritonServer(repository, log_path=Path(folder) / "tritonserver.log") as server:
            print(f"{'transport':<24} {'wall':>8} {'outside server':>15} {'bytes on loopback':>18}")
            for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
                for name, options in TRANSPORTS.items():
                    with SATClient(url, protocol, admin_key=server.admin_key, **options) as client:
                        if name == "plain":
                            client.segment(volume, ["liver"], "ct", overlap=0.0)  # warm-up of the server
                        wall, outside, on_wire = measure(client, volume)
                    label = f"{protocol} {name}"
                    print(f"{label:<24} {wall:7.2f}s {outside:14.2f}s {on_wire / 1e6:15.1f} MB", flush=True)


if __name__ == "__main__":
    main()
