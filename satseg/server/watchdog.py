"""Watch the python-backend stubs of a running ``tritonserver``, and clean up the shared memory they leave.

Triton 2.51 neither restarts a stub that died (the OOM killer's ``kill -9``) nor reports it: every request
to that model then fails ``Stub process '<instance>' is not healthy`` while every ready endpoint still
answers 200. The stubs are child processes of the server whose command line names the model file and the
instance, so ``/proc`` tells at once which model lost its process. Each stub also owns a region under
``/dev/shm`` that a killed server leaves behind.

Everything here reads ``/proc`` (Linux): a process that is gone, a zombie or a reused pid all count as dead.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from satseg.contract import ENTRY_MODEL

PROC = Path("/proc")
SHM = Path("/dev/shm")
STUB_EXECUTABLE = "triton_python_backend_stub"
SHM_PREFIX = "triton_python_backend"
"""The python backend names its regions ``triton_python_backend_shm_region_<uuid>``; a client's own system
shared-memory regions, which the server maps too, never start so and are the client's to remove."""
WATCH_INTERVAL_S = 0.5
DEAD_STATES = frozenset("ZXx")
"""``/proc/PID/stat`` states of a process that will never run again (zombie, dead)."""


@dataclass(frozen=True)
class Stub:
    """One python-backend stub process: the model instance it runs and the shared memory it owns."""

    pid: int
    start_ticks: int
    """Start time in clock ticks after boot (``/proc/PID/stat`` field 22): tells a reused pid apart."""
    model: str
    instance: str
    region: str

    def describe(self) -> str:
        return f"model {self.model!r} (instance {self.instance}, pid {self.pid})"


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` split after the command name (which may hold spaces): field 3 (state) first."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def parent_pid(fields: list[str]) -> int:
    return int(fields[1])


def start_ticks(fields: list[str]) -> int:
    return int(fields[19])


def stub_from_cmdline(pid: int, ticks: int, argv: list[str]) -> Stub | None:
    """The stub an argv describes, or ``None`` for another program.

    Triton 2.51 starts ``triton_python_backend_stub MODEL.py SHM_REGION SHM_SIZE GROWTH PARENT_PID BACKEND_DIR
    IPC_SIZE INSTANCE_NAME RUNTIME``; the model is the repository folder two levels above ``model.py``.
    """
    if len(argv) < 9 or not argv[0].endswith(STUB_EXECUTABLE):
        return None
    return Stub(pid=pid, start_ticks=ticks, model=Path(argv[1]).parents[1].name, instance=argv[8], region=argv[2])


def python_stubs(server_pid: int) -> list[Stub]:
    """The stub processes ``server_pid`` runs now, by model name."""
    stubs = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
        if fields is None or parent_pid(fields) != server_pid or fields[0] in DEAD_STATES:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        stub = stub_from_cmdline(int(entry.name), start_ticks(fields), argv)
        if stub is not None:
            stubs.append(stub)
    return sorted(stubs, key=lambda stub: (stub.model, stub.instance))


def is_alive(stub: Stub) -> bool:
    """Whether the recorded process still runs (not exited, not a zombie, not a new process on its pid)."""
    fields = stat_fields(stub.pid)
    return fields is not None and fields[0] not in DEAD_STATES and start_ticks(fields) == stub.start_ticks


def dead_stubs(stubs: Iterable[Stub]) -> list[Stub]:
    return [stub for stub in stubs if not is_alive(stub)]


def shm_regions(pids: Iterable[int]) -> set[Path]:
    """The python backend's ``/dev/shm`` regions that ``pids`` have mapped now."""
    regions = set()
    for pid in pids:
        try:
            lines = (PROC / str(pid) / "maps").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
            if path.startswith(f"{SHM}/{SHM_PREFIX}"):
                regions.add(Path(path.removesuffix(" (deleted)")))
    return regions


def unlink_regions(regions: Iterable[Path]) -> list[Path]:
    """Remove the regions that still exist (the server died before it could); the ones removed."""
    removed = []
    for region in sorted(regions):
        try:
            region.unlink()
        except FileNotFoundError:
            continue
        removed.append(region)
    return removed


class StubWatchdog:
    """A daemon thread that checks the recorded stubs every ``interval_s`` and reports the first death once.

    Args:
        stubs: the stubs recorded when the server turned ready.
        on_death: called once, from the watchdog thread, with a one-line description of what died.
        interval_s: seconds between checks.
    """

    def __init__(
        self, stubs: list[Stub], on_death: Callable[[str], None], interval_s: float = WATCH_INTERVAL_S
    ) -> None:
        self.stubs = list(stubs)
        self._on_death = on_death
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sat-stub-watchdog", daemon=True)

    def start(self) -> StubWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            dead = dead_stubs(self.stubs)
            if dead:
                self._on_death(death_message(dead))
                return


def death_message(dead: list[Stub]) -> str:
    """One line naming the models whose stub process died."""
    names = ", ".join(stub.describe() for stub in dead)
    return f"the python-backend process of {names} died (killed, e.g. by the OOM killer); it cannot answer again"


PROBE_TIMEOUT_S = 30.0
BUSY_ANSWERS = ("Exceeds maximum queue size", "Request timeout")
"""Triton's refusals by a full queue or its queue timeout: the server is busy, and its stubs work."""
PROBE_SHAPE = (16, 16, 8)
PROBE_PROMPT = "liver"
AIR_HU, TISSUE_HU = -1000, 40
PROBE_AFFINE = [1.5, 0, 0, 0, 0, 1.5, 0, 0, 0, 0, 3.0, 0, 0, 0, 0, 1]
"""1.5 x 1.5 x 3 mm voxels (row-major 4 x 4)."""


def probe_image() -> list[int]:
    """``PROBE_SHAPE`` voxels in C order: air around a soft-tissue block (plausible HU with contrast)."""
    size_i, size_j, size_k = PROBE_SHAPE
    return [
        TISSUE_HU if 4 <= i < 12 and 4 <= j < 12 and 2 <= k < 6 else AIR_HU
        for i in range(size_i)
        for j in range(size_j)
        for k in range(size_k)
    ]


def probe_request() -> bytes:
    """A tiny but complete ``sat`` request for one known prompt, asking for outputs of both steps (the prompt
    encoder's ``LABELS``, the segmenter's ``VOLUMES_ML``) so that every stub on the serving path must answer."""
    inputs = [
        {"name": "IMAGE_INT16", "datatype": "INT16", "shape": list(PROBE_SHAPE), "data": probe_image()},
        {"name": "AFFINE", "datatype": "FP64", "shape": [4, 4], "data": PROBE_AFFINE},
        {"name": "MODALITY", "datatype": "BYTES", "shape": [1], "data": ["ct"]},
        {"name": "PROMPTS", "datatype": "BYTES", "shape": [1], "data": [PROBE_PROMPT]},
    ]
    outputs = [{"name": "LABELS"}, {"name": "VOLUMES_ML"}]
    return json.dumps({"inputs": inputs, "outputs": outputs}).encode()


def probe(url: str, model: str = ENTRY_MODEL, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """One tiny real inference against ``url`` (``http://host:port``); ``None`` if it answered, else why not.

    Readiness endpoints keep answering 200 after a stub died; only a request that reaches the stubs fails.
    A refusal by a full queue (:data:`BUSY_ANSWERS`) counts as an answer: a busy server is alive.
    """
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v2/models/{model}/infer",
        data=probe_request(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        reason = error.read(500).decode(errors="replace")
        return None if any(busy in reason for busy in BUSY_ANSWERS) else f"HTTP {error.code}: {reason}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        return f"no answer from {url} ({error})"
    outputs = {output.get("name"): output.get("data") for output in answer.get("outputs", [])}
    if outputs.get("LABELS") != [PROBE_PROMPT] or len(outputs.get("VOLUMES_ML") or []) != 1:
        return f"unexpected answer from {url}: {json.dumps(answer)[:200]}"
    return None
