"""``sat-demo``: the main job end to end, through the real server.

Builds the model repository from the bundled demo checkpoint (once), starts the pip ``tritonserver`` on
loopback, segments a real brain MRI (nilearn's MNI152 T1, inside the wheel) and, where ``../shared/data``
is present, a real abdominal CT through :class:`~clients.SATClient`, writes masks, label maps, statistics
and PNG previews, and stops the server. Every step is timed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from satseg import contract
from satseg.checkout import BUNDLED_CHECKPOINT, DEFAULT_REPOSITORY
from satseg.cli.common import cli_parser, run_cli
from satseg.geometry import Volume, load_volume
from satseg.server.triton import TritonServer
from satseg_clients.sat_client import SATClient
from satseg_clients.tasks import task
from satseg_export.build_repo import ExportSettings, build_repository, repository_is_current

PROG = "sat-demo"
REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = REPOSITORY_ROOT.parent / "shared" / "data" / "totalseg" / "example_ct.nii.gz"
BRAIN_PROMPTS = task("demo_brain").prompts
ABDOMEN_PROMPTS = task("demo_abdomen").prompts

EPILOG = """what it does (each step is timed):
  1. sat-export the checkpoint into the model repository, unless it is already current
  2. start tritonserver (pip, CPU, 127.0.0.1, free ports; log in OUTPUT/tritonserver.log)
  3. segment nilearn's MNI152 T1 (a real brain MRI) -> OUTPUT/brain/
  4. segment the real abdominal CT in ../shared/data, when it is there -> OUTPUT/abdomen/
  5. stop the server

each case folder holds one <term>.nii.gz mask per prompt, labelmap.nii.gz, labels.json,
statistics.json and preview.png, all on the input's grid with the input's affine.
Not for clinical use.
"""


@dataclass
class StepTimer:
    """Wall-clock seconds per named step, printed as they finish."""

    steps: list[tuple[str, float]] = field(default_factory=list)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"[{len(self.steps) + 1}] {name} …", flush=True)
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self.steps.append((name, seconds))
        print(f"    done in {seconds:.1f} s", flush=True)

    def table(self) -> str:
        width = max(len(name) for name, _ in self.steps)
        rows = [f"  {name:<{width}}  {seconds:7.1f} s" for name, seconds in self.steps]
        total = sum(seconds for _, seconds in self.steps)
        return "\n".join([*rows, f"  {'total':<{width}}  {total:7.1f} s"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser(PROG, "Serve the bundled demo model and segment a real brain MRI and CT through it.", EPILOG)
    parser.add_argument("-o", "--output", type=Path, default=Path("demo_output"), help="results (default demo_output)")
    parser.add_argument(
        "--checkpoint", type=Path, default=BUNDLED_CHECKPOINT, help="checkpoint to serve (default the bundled demo)"
    )
    parser.add_argument(
        "--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository to fill (default triton_repo/)"
    )
    parser.add_argument("--ct", type=Path, default=SHARED_CT, help="a CT to segment too (default: the shared one)")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class DemoCase:
    """One volume of the demo: where its results go and what is asked of it."""

    folder: str
    title: str
    load: Callable[[], Volume]
    prompts: tuple[str, ...]
    modality: str


def demo_cases(ct: Path) -> list[DemoCase]:
    """The MNI152 brain, and the CT when it is there."""
    cases = [DemoCase("brain", "the MNI152 T1 brain MRI", load_mni152_volume, BRAIN_PROMPTS, "mri")]
    if ct.is_file():
        cases.append(DemoCase("abdomen", "the abdominal CT", lambda: load_volume(ct), ABDOMEN_PROMPTS, "ct"))
    else:
        print(f"(no CT at {ct}: the CT part of the demo is skipped)")
    return cases


def load_mni152_volume() -> Volume:
    """nilearn's MNI152 T1 (imported here: only this case needs nilearn)."""
    from satseg_training.data.mni152 import load_mni152

    return load_mni152()[0]


def run_case(client: SATClient, case: DemoCase, output: Path, timer: StepTimer) -> None:
    volume = case.load()
    shape = "x".join(map(str, volume.shape))
    with timer.step(f"segment {case.title} ({shape}, {len(case.prompts)} prompts)"):
        segmentation = client.segment(volume, case.prompts, case.modality, output=contract.OUTPUT_BOTH)
    folder = output / case.folder
    with timer.step(f"write {folder}/"):
        segmentation.save(folder, statistics=True, preview=True)
    for label, volume_ml in zip(segmentation.labels, segmentation.volumes_ml, strict=True):
        print(f"    {label:<26} {volume_ml:9.1f} mL")
    print(f"    look at {folder / 'preview.png'}")


def run_demo(args: argparse.Namespace) -> int:
    timer = StepTimer()
    settings = ExportSettings(checkpoint=args.checkpoint, repository=args.repository)
    with timer.step(f"export {args.checkpoint.name} into {args.repository.name}/"):
        if repository_is_current(settings):
            print("    already current: nothing to export")
        else:
            build_repository(settings)
    args.output.mkdir(parents=True, exist_ok=True)
    server = TritonServer(args.repository, log_path=args.output / "tritonserver.log")
    with timer.step("start tritonserver (CPU, loopback)"):
        server.start()
    try:
        with SATClient(server.grpc_url, "grpc", admin_key=server.admin_key) as client:
            for case in demo_cases(args.ct):
                run_case(client, case, args.output, timer)
    finally:
        with timer.step("stop tritonserver"):
            server.stop()
    print(f"timings:\n{timer.table()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: run_demo(args))


if __name__ == "__main__":
    raise SystemExit(main())
