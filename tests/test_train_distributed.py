"""Two training processes under ``accelerate launch`` (CPU, gloo) average their gradients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from satseg.checkpoint import read_metadata

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIGS = REPOSITORY / "training" / "configs"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_hashes(path: Path) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in path.read_text().splitlines())


def test_two_processes_end_with_identical_changed_weights(tmp_path: Path) -> None:
    """Each process trains on other patches (its data hash differs), yet both end with the same weights,
    which differ from the initial ones: the gradients were averaged across processes at every step."""
    output = tmp_path / "run"
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--config_file", str(CONFIGS / "accelerate_cpu_2proc.yaml"), "--main_process_port", str(free_port())),
        *("-m", "satseg_training.train", "--config", str(CONFIGS / "smoke.toml"), "--output", str(output)),
        *("--write-weight-hashes", "train.steps=2", "train.save_every=0", "model.patch_size=[64,32,32]"),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stdout and "MULTI_CPU" in run.stdout
    ranks = [read_hashes(output / f"rank_{rank}.sha256") for rank in (0, 1)]
    assert ranks[0]["data"] != ranks[1]["data"]
    assert ranks[0]["initial"] == ranks[1]["initial"]
    assert ranks[0]["final"] == ranks[1]["final"]
    assert ranks[0]["final"] != ranks[0]["initial"]
    assert read_metadata(output / "checkpoint").extra["steps"] == 2
    assert len((output / "metrics.csv").read_text().splitlines()) == 3  # the main process alone writes it
