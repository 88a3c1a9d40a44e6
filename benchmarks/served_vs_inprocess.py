"""Served (Triton ensemble, CPU) against in-process inference, on the same volumes and checkpoint, in one run.

Four ways to get the same masks, interleaved per repeat so they share the machine's state:

- ``torch``, ``onnxruntime``, ``openvino``: :class:`satseg.pipeline.Segmenter` in this process (what
  ``sat-segment --runtime`` does), the graph runtimes on the exported ``vision`` graph; the one the CPU
  server's ``configs/cpu.pbtxt`` names separates the runtime's share from the serving overhead;
- ``served``: :class:`satseg_clients.SATClient` over gRPC to the real ``tritonserver`` on loopback, the tensors on the
  wire and (``served + shared memory``, what a client on the server's host uses) in system shared memory.

Where the served time goes comes from Triton's own statistics (the admin endpoint): the ``segmenter``
model's execution (geometry, stitching, thresholding, waiting for ``vision``) against ``vision``'s.

    python benchmarks/served_vs_inprocess.py [--repeats 2] [--ct CT.nii.gz]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import cpu_model

from satseg import contract
from satseg.checkout import BUNDLED_CHECKPOINT
from satseg.geometry import Volume, load_volume
from satseg.pipeline import Segmenter
from satseg.runtimes import GRAPH_RUNTIMES, GraphSession
from satseg.server.triton import TritonServer
from satseg_clients import SATClient
from satseg_clients.demo import ABDOMEN_PROMPTS, BRAIN_PROMPTS, SHARED_CT, load_mni152_volume
from satseg_export.build_repo import ExportSettings, build_repository

MODELS = contract.MODELS


@dataclass(frozen=True)
class Case:
    name: str
    volume: Volume
    prompts: tuple[str, ...]
    modality: str


@dataclass
class Timed:
    """A predictor wrapper that adds up the seconds spent inside it."""

    predictor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    seconds: float = 0.0

    def __call__(self, patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        logits = self.predictor(patches, queries)
        self.seconds += time.perf_counter() - started
        return logits


TRANSPORTS = ("gRPC", "gRPC + shared memory")


def graph_predictor(path: Path, runtime: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The windows run by ``runtime`` on the graph at ``path``, with torch's thread count (as in-process)."""
    session = GraphSession(path, runtime, threads=torch.get_num_threads())

    def predict(patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        feeds = {"image": patches.numpy(), "queries": queries.numpy()}
        return torch.from_numpy(session.run(feeds, ["logits"])[0])

    return predict


def in_process(segmenter: Segmenter, case: Case, predictor: Any) -> tuple[float, float, np.ndarray]:
    """Seconds in all, seconds inside ``predictor``, and the masks (thresholded like the server does)."""
    timed = Timed(predictor)
    segmenter.predict_logits = timed  # type: ignore[method-assign] - the benchmark's probe
    started = time.perf_counter()
    terms = segmenter.resolve_prompts(case.prompts)
    masks = segmenter.segment(case.volume, terms, case.modality).masks
    seconds = time.perf_counter() - started
    del segmenter.predict_logits  # back to the class's own method
    return seconds, timed.seconds, masks


def model_seconds(client: SATClient, key: str) -> dict[str, float]:
    """Cumulative seconds per model from Triton's statistics: the ensemble's whole requests, each step's
    execution."""
    totals = {}
    for model in client.inference_statistics(key).get("model_stats", []):
        part = "success" if model["name"] == "sat" else "compute_infer"
        totals[model["name"]] = int(model.get("inference_stats", {}).get(part, {}).get("ns", 0)) / 1e9
    return totals


def served(client: SATClient, case: Case, key: str) -> tuple[float, dict[str, float], np.ndarray]:
    before = model_seconds(client, key)
    started = time.perf_counter()
    result = client.segment(case.volume, case.prompts, case.modality)
    seconds = time.perf_counter() - started
    after = model_seconds(client, key)
    assert result.masks is not None
    return seconds, {name: after.get(name, 0.0) - before.get(name, 0.0) for name in MODELS}, result.masks


def cases(ct: Path) -> list[Case]:
    found = [Case("MNI152 T1 (197x233x189, 1 mm)", load_mni152_volume(), BRAIN_PROMPTS, "mri")]
    if ct.is_file():
        volume = load_volume(ct)
        shape = "x".join(map(str, volume.shape))
        found.append(Case(f"abdominal CT ({shape})", volume, ABDOMEN_PROMPTS, "ct"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=BUNDLED_CHECKPOINT)
    parser.add_argument("--ct", type=Path, default=SHARED_CT, help="a CT to time too (default: the shared one)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} torch threads; checkpoint {args.checkpoint}")
    with tempfile.TemporaryDirectory(prefix="sat-bench-") as folder:
        repository = Path(folder) / "triton_repo"
        build_repository(ExportSettings(checkpoint=args.checkpoint, repository=repository))
        segmenter = Segmenter.from_checkpoint(args.checkpoint)
        graph = repository / "vision" / "1" / "model.onnx"
        predictors = {
            "torch": segmenter.predict_logits,
            **{name: graph_predictor(graph, name) for name in GRAPH_RUNTIMES},
        }
        with TritonServer(repository, log_path=Path(folder) / "tritonserver.log") as server:
            clients = {
                TRANSPORTS[0]: SATClient(server.grpc_url, shared_memory="off"),
                TRANSPORTS[1]: SATClient(server.grpc_url, admin_key=server.admin_key, shared_memory="on"),
            }
            for case in cases(args.ct):
                report(case, segmenter, predictors, clients, server.admin_key, args.repeats)


def report(
    case: Case,
    segmenter: Segmenter,
    predictors: dict[str, Any],
    clients: dict[str, SATClient],
    key: str,
    repeats: int,
) -> None:
    for client in clients.values():
        served(client, case, key)  # warm-up: first-call allocations on both sides
    seconds: dict[str, list[float]] = {name: [] for name in [*predictors, *clients]}
    vision: dict[str, list[float]] = {name: [] for name in predictors}
    shares: dict[str, list[float]] = {name: [] for name in MODELS}
    differ: dict[str, list[int]] = {name: [] for name in predictors}
    for _ in range(repeats):
        masks = {}
        for name, predictor in predictors.items():
            total, inside, masks[name] = in_process(segmenter, case, predictor)
            seconds[name].append(total)
            vision[name].append(inside)
        answers = []
        for transport, client in clients.items():
            total, per_model, answer = served(client, case, key)
            seconds[transport].append(total)
            answers.append(answer)
        assert all((answer == answers[0]).all() for answer in answers)  # the transport changes no voxel
        served_masks = answers[0]
        for name in MODELS:
            shares[name].append(per_model[name])  # the last transport's (shared memory)
        for name in predictors:
            differ[name].append(int((served_masks != masks[name]).sum()))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    model = {name: statistics.median(values) for name, values in shares.items()}
    voxels = served_masks.size
    print(f"\n{case.name}, {len(case.prompts)} prompts, median of {repeats}")
    for name in predictors:
        ratios = ", ".join(f"{median[transport] / median[name]:.2f}" for transport in clients)
        print(
            f"  in-process {name:<12} {median[name]:7.2f} s  (vision {statistics.median(vision[name]):6.2f} s); "
            f"served / it {ratios}; mask voxels differing from served {max(differ[name])} of {voxels:,}"
        )
    for transport in clients:
        print(f"  served ({transport}, loopback) {median[transport]:7.2f} s")
    stitching = model["segmenter"] - model["vision"]
    print(
        f"  inside the server: segmenter {model['segmenter']:.2f} s = vision {model['vision']:.2f} s "
        f"({model['vision'] / model['segmenter']:.0%}) + geometry/stitching/thresholding {stitching:.2f} s "
        f"({stitching / model['segmenter']:.0%}); prompt_encoder {model['prompt_encoder']:.3f} s; "
        f"outside the models (transport, ensemble) {median[TRANSPORTS[1]] - model['sat']:.2f} s with shared memory"
    )


if __name__ == "__main__":
    main()
