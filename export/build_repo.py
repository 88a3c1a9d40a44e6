"""``sat-export``: fill the Triton model repository from a checkpoint, behind parity gates.

What lands in the repository (the configs and ``model.py`` files are versioned; these are built):

- ``text_encoder/1/model.onnx`` and ``vision/1/model.onnx`` (FP32, served on CPU by ``configs/cpu.pbtxt``),
  their FP16 variants ``model.fp16.onnx`` (onnxruntime-gpu, TensorRT 11), and with ``--tensorrt``
  ``model.plan`` + ``manifest.json`` (TensorRT FP16, the production ``config.pbtxt``);
- ``prompt_encoder/1/tokenizer/`` and ``prompt_encoder/1/embeddings.safetensors``: the queries of every
  vocabulary term for every modality, so known prompts never run the text encoder;
- ``sat/metadata.json``: the input/output contract (MONAI bundle style) and ``sat/export_report.{json,md}``:
  the parity of every graph against PyTorch.

Nothing is written into the repository unless every parity gate passes: graphs are built in a staging
folder first, so a failed export leaves the previous repository as it was.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from satseg import __version__
from satseg.checkout import DEFAULT_REPOSITORY, IN_CHECKOUT
from satseg.checkpoint import WEIGHTS_FILE, CheckpointMetadata, load_checkpoint, read_metadata
from satseg.cli.common import cli_parser, run_cli
from satseg.contract import CONTRACT_FILE, ENTRY_MODEL, OUTPUT_CHOICES, OUTPUT_MASKS
from satseg.errors import ExportError, SatInputError
from satseg.geometry import MODALITIES, Volume, load_volume
from satseg.model import SAT
from satseg.onnx_graphs import ExportedGraph, export_text_encoder, export_vision, file_sha256
from satseg.runtimes import INT8_GRAPH, int8_acceleration, openvino_has_native_bf16
from satseg.spec import ModelSpec
from satseg.text import PromptTokenizer, Vocabulary, resolve_text_encoder
from satseg_export.fp16 import convert_to_fp16
from satseg_export.int8 import offer_int8
from satseg_export.parity import (
    BF16_MIN_DICE,
    DEFAULT_MIN_DICE,
    INT8_MIN_DICE,
    ParityReport,
    compare_text,
    compare_vision,
    graph_vision_logits,
    onnx_session,
    torch_logits,
    volume_patches,
)

PROG = "sat-export"
TEXT_MAX_ABS_ERROR = 1e-3
"""FP32 text-encoder queries may differ from PyTorch's by at most this (they are O(1) values)."""
FP16_TEXT_MAX_ABS_ERROR = 0.05
FP16_MIN_DICE = 0.95
RANDOM_PATCHES_LABEL = "random patches"
"""FP16 graphs are held to these looser gates (half precision carries about 3 significant digits)."""
PARITY_PROMPTS = ("liver", "spleen", "left kidney", "right kidney", "aorta", "cerebral white matter")
RANDOM_PATCHES = 2
REAL_PATCHES = 4
EMBEDDING_BATCH = 64
NOT_FOR_CLINICAL_USE = "Research use only. Not for clinical use: outputs are AI-generated and unverified."

EPILOG = """examples:
  sat-export models/demo                      # triton_repo/ for CPU serving from the bundled demo model
  sat-export CKPT --volume ct.nii.gz --modality ct --prompts "liver,spleen"   # parity on a real CT's windows
  sat-export CKPT --tensorrt                  # also FP16 TensorRT plans (on the target GPU, in NVIDIA's container)

The vision graph is compared with PyTorch on random patches and on the windows of a real volume (--volume,
default: a synthetic torso CT): every prompt's thresholded mask must agree to Dice >= --min-dice (0.99).
"""


@dataclass(frozen=True)
class ExportSettings:
    """What ``sat-export`` was asked for."""

    checkpoint: Path
    repository: Path
    volume: Path | None = None
    modality: str = "ct"
    prompts: tuple[str, ...] = PARITY_PROMPTS
    min_dice: float = DEFAULT_MIN_DICE
    tensorrt: bool = False
    keep_norms_fp32: bool = False
    seed: int = 0
    random_patches: int = RANDOM_PATCHES
    real_patches: int = REAL_PATCHES
    int8: bool = False
    int8_windows: int | None = None


def build_repository(settings: ExportSettings) -> list[ParityReport]:
    """Export, gate and install everything the repository needs for ``settings.checkpoint``; returns the reports.

    Raises:
        ExportError: a parity gate failed (nothing was installed), or ``--tensorrt`` without TensorRT.
    """
    sat, metadata = load_checkpoint(settings.checkpoint)
    vocabulary = Vocabulary.load()
    with tempfile.TemporaryDirectory(prefix="sat-export-") as staging_name:
        staging = Path(staging_name)
        graphs = {
            "text_encoder": export_text_encoder(sat, staging / "text_encoder" / "1" / "model.onnx"),
            "vision": export_vision(sat, staging / "vision" / "1" / "model.onnx"),
        }
        for name, graph in list(graphs.items()):
            graphs[f"{name} fp16"] = convert_to_fp16(graph.path, graph.path.with_name("model.fp16.onnx"))
        reports = check_parity(sat, graphs, settings, vocabulary, metadata.model_spec(vocabulary))
        failed = [report for report in reports if report.blocking and not report.passed]
        if failed:
            raise ExportError("parity gate failed, nothing installed: " + "; ".join(r.summary() for r in failed))
        int8 = graphs["vision"].path.with_name(INT8_GRAPH)
        if int8.is_file():
            graphs["vision int8"] = replace(graphs["vision"], path=int8, sha256=file_sha256(int8))
        write_prompt_assets(sat, vocabulary, staging / "prompt_encoder" / "1")
        (staging / "sat").mkdir()
        write_metadata(staging / ENTRY_MODEL / CONTRACT_FILE, sat, metadata, vocabulary, graphs, settings)
        write_report(staging / "sat", reports, settings)
        if settings.tensorrt:
            build_plans(graphs, sat, settings)
        install(staging, settings.repository)
    return reports


def repository_is_current(settings: ExportSettings) -> bool:
    """Whether ``settings.repository`` was exported by this version from these exact weights, all graphs present."""
    try:
        contract = json.loads((settings.repository / ENTRY_MODEL / CONTRACT_FILE).read_text())
    except (OSError, ValueError):
        return False
    graphs = [settings.repository / graph["file"] for graph in contract.get("graphs", {}).values()]
    if settings.tensorrt:
        graphs += [settings.repository / name / "1" / "model.plan" for name in ("text_encoder", "vision")]
    return (
        contract.get("version") == __version__
        and contract.get("checkpoint", {}).get("weights_sha256") == file_sha256(settings.checkpoint / WEIGHTS_FILE)
        and contract.get("vocabulary", {}).get("sha256") == Vocabulary.load().sha256
        and contract.get("spec") == read_metadata(settings.checkpoint).model_spec(Vocabulary.load()).to_json()
        and bool(graphs)
        and all(path.is_file() for path in graphs)
    )


def check_parity(
    sat: SAT, graphs: dict[str, ExportedGraph], settings: ExportSettings, vocabulary: Vocabulary, spec: ModelSpec
) -> list[ParityReport]:
    """Every graph, in every runtime that can run it here, against PyTorch: FP32 gated in onnxruntime and
    OpenVINO; FP16 gated at FP16_MIN_DICE; OpenVINO BF16 (where native) gated at BF16_MIN_DICE, not blocking."""
    prompts = vocabulary.resolve_all(list(settings.prompts))
    tokenizer = PromptTokenizer(resolve_text_encoder(sat.config.text_encoder))
    tokens = tokenizer(prompts)
    modality_ids = torch.full((len(prompts),), MODALITIES.index(settings.modality))
    with torch.inference_mode():
        queries = sat.encode_prompts(tokens["input_ids"], tokens["attention_mask"], modality_ids).float()
    generator = torch.Generator().manual_seed(settings.seed)
    random_patches = torch.randn((settings.random_patches, 1, *spec.window.patch_size), generator=generator)
    volume, source = parity_volume(settings)
    patch_sets = {
        RANDOM_PATCHES_LABEL: random_patches,
        f"{source} windows": volume_patches(volume, settings.modality, spec, settings.real_patches),
    }
    # PyTorch's logits once per patch set, shared by the FP32 and FP16 graphs.
    expected = {label: torch_logits(sat.vision, patches, queries) for label, patches in patch_sets.items()}
    reports = []
    for name, graph in graphs.items():
        gate = settings.min_dice if "fp16" not in name else min(settings.min_dice, FP16_MIN_DICE)
        if name.startswith("text_encoder"):
            session = onnx_session(graph.path)
            if session is None:
                continue  # this onnxruntime has no kernels for the graph's types (FP16 on CPU): checked on GPU
            feeds = {"input_ids": tokens["input_ids"].numpy(), "attention_mask": tokens["attention_mask"].numpy()}
            got = session.run(None, {**feeds, "modality": modality_ids.numpy()})[0]
            bound = TEXT_MAX_ABS_ERROR if "fp16" not in name else FP16_TEXT_MAX_ABS_ERROR
            reports.append(compare_text(queries.numpy(), got, graph=name, inputs="prompts", max_abs_error=bound))
            continue
        for runtime, precision in vision_runtimes(name):
            for label, patches in patch_sets.items():
                logits = graph_vision_logits(graph.path, patches.numpy(), queries.numpy(), runtime, precision)
                if logits is None:
                    break  # as above: FP16 vision is checked where a runtime has the kernels
                checked = f"{name} · {runtime} {precision}"
                if precision == "bf16":  # an optional precision: gated on the real windows, never blocking
                    gate_here = BF16_MIN_DICE if label != RANDOM_PATCHES_LABEL else 0.0
                    reports.append(
                        compare_vision(expected[label], logits, prompts, graph=checked, inputs=label,
                                       min_dice=gate_here, blocking=False)
                    )  # fmt: skip
                    continue
                reports.append(
                    compare_vision(expected[label], logits, prompts, graph=checked, inputs=label, min_dice=gate)
                )
    if settings.int8:
        # Every window of the volume by default (the organs must be in the gate), most textured first:
        # calibrated on every other one, gated on the rest, which it never saw.
        windows = volume_patches(volume, settings.modality, spec, count=settings.int8_windows)
        calibration, held_out = windows[0::2], windows[1::2]
        _, int8_reports = offer_int8(
            graphs["vision"].path,
            calibration.numpy(),
            held_out.numpy(),
            torch_logits(sat.vision, held_out, queries),
            queries.numpy(),
            prompts,
            f"{source} windows (not the {len(calibration)} calibration windows)",
        )
        reports += int8_reports
    return reports


def vision_runtimes(graph: str) -> list[tuple[str, str]]:
    """The (runtime, precision) pairs a vision graph is checked in here: onnxruntime for every graph; for the
    FP32 graph also OpenVINO FP32, and OpenVINO BF16 on a CPU with native BF16."""
    if "fp16" in graph:
        return [("onnxruntime", "fp32")]
    bf16 = [("openvino", "bf16")] if openvino_has_native_bf16() else []
    return [("onnxruntime", "fp32"), ("openvino", "fp32"), *bf16]


def parity_volume(settings: ExportSettings) -> tuple[Volume, str]:
    """The real volume whose windows the vision graphs are checked on: ``--volume``, else a synthetic torso CT."""
    if settings.volume is not None:
        return load_volume(settings.volume), settings.volume.name.split(".")[0]
    from satseg.phantom import centred_affine, make_torso_phantom  # the default needs no data

    shape = (120, 100, 40)
    volume, _, _ = make_torso_phantom(shape, centred_affine(shape, (2.5, 2.5, 5.0), 12.0), seed=settings.seed)
    return volume, "phantom CT"


def write_prompt_assets(sat: SAT, vocabulary: Vocabulary, folder: Path) -> None:
    """Tokenizer files and the query of every vocabulary term for every modality (``embeddings.safetensors``).

    The table is ``[modalities, terms, d_model]`` float32 in ``MODALITIES`` and vocabulary order; its
    metadata names both orders and the vocabulary's sha256, so a mismatched table is refused at load.
    """
    tokenizer = PromptTokenizer(resolve_text_encoder(sat.config.text_encoder))
    tokenizer.save(folder / "tokenizer")
    terms = [term.name for term in vocabulary.terms]
    table = torch.empty((len(MODALITIES), len(terms), sat.config.d_model))
    with torch.inference_mode():
        for start in range(0, len(terms), EMBEDDING_BATCH):
            tokens = tokenizer(terms[start : start + EMBEDDING_BATCH])
            count = tokens["input_ids"].shape[0]
            for index, _ in enumerate(MODALITIES):
                modality_ids = torch.full((count,), index)
                rows = sat.encode_prompts(tokens["input_ids"], tokens["attention_mask"], modality_ids)
                table[index, start : start + count] = rows.float()
    save_file(
        {"embeddings": table.contiguous()},
        str(folder / "embeddings.safetensors"),
        metadata={
            "terms": json.dumps(terms),
            "modalities": json.dumps(list(MODALITIES)),
            "vocabulary_sha256": vocabulary.sha256,
        },
    )


def write_metadata(
    path: Path,
    sat: SAT,
    metadata: CheckpointMetadata,
    vocabulary: Vocabulary,
    graphs: dict[str, ExportedGraph],
    settings: ExportSettings,
) -> None:
    """The ensemble's machine-readable contract (inputs, outputs, intended use) and the checkpoint's model spec,
    copied unchanged (:mod:`satseg.spec`): what the served models read their preprocessing, window and
    post-processing from."""
    spec = metadata.model_spec(vocabulary)
    trained = None if spec.trained_terms is None else sorted(spec.trained_terms)
    contract: dict[str, Any] = {
        "schema": "satseg-metadata/1",
        "name": "SAT text-prompted 3D segmentation",
        "version": __version__,
        "intended_use": NOT_FOR_CLINICAL_USE,
        "checkpoint": {
            "source": settings.checkpoint.name,
            "weights_sha256": file_sha256(settings.checkpoint / WEIGHTS_FILE),
            **metadata.to_json(),
        },
        "inputs": {
            "IMAGE": {
                "dtype": "FP32",
                "shape": [-1, -1, -1],
                "optional": True,
                "description": "the volume in its stored voxel order; send exactly one of IMAGE and IMAGE_INT16",
            },
            "IMAGE_INT16": {
                "dtype": "INT16",
                "shape": [-1, -1, -1],
                "optional": True,
                "description": "the volume as INT16 (CT in Hounsfield units: half the bytes of FP32)",
            },
            "AFFINE": {"dtype": "FP64", "shape": [4, 4], "description": "voxel index -> RAS+ world mm"},
            "MODALITY": {"dtype": "BYTES", "shape": [1], "values": list(MODALITIES)},
            "PROMPTS": {"dtype": "BYTES", "shape": [-1], "description": "anatomical terms, see vocabulary"},
        },
        "options": {
            "transport": "request parameters",
            "output": {"values": list(OUTPUT_CHOICES), "default": OUTPUT_MASKS},
            "threshold": {"range": "(0, 1)", "default": spec.postprocess.threshold},
            "overlap": {"range": "[0, 0.9]", "default": spec.window.overlap},
        },
        "outputs": {
            "MASKS": {"dtype": "UINT8", "shape": [-1, -1, -1, -1], "description": "one mask per prompt, input grid"},
            "LABELMAP": {"dtype": "UINT16", "shape": [-1, -1, -1], "description": "merged labels, input grid"},
            "LABELS": {"dtype": "BYTES", "shape": [-1], "description": "the term of each mask / label value"},
            "VOLUMES_ML": {"dtype": "FP32", "shape": [-1], "description": "volume of each mask in mL"},
            "STATISTICS": {
                "dtype": "BYTES",
                "shape": [-1],
                "description": "per term, one JSON object: voxels, mL, intensities, world bounding box, FOV edge",
            },
            "MODEL": {"dtype": "BYTES", "shape": [1], "description": "sha256 of this metadata.json file"},
            "MODEL_GRID": {"dtype": "INT32", "shape": [3], "description": "the model grid the windows slid on"},
            "WARNINGS": {"dtype": "BYTES", "shape": [-1], "description": "one line per caveat, e.g. untrained terms"},
        },
        "spec": spec.to_json(),
        "vocabulary": {
            "terms": len(vocabulary),
            "sha256": vocabulary.sha256,
            "trained_terms": trained,
        },
        "graphs": {
            name: {
                "file": f"{name.split()[0]}/1/{graph.path.name}",
                "sha256": graph.sha256,
                "inputs": graph.inputs,
                "outputs": graph.outputs,
            }
            for name, graph in graphs.items()
        },
    }
    path.write_text(json.dumps(contract, indent=2) + "\n")


def write_report(folder: Path, reports: Sequence[ParityReport], settings: ExportSettings) -> None:
    """``export_report.json`` and ``export_report.md``: each graph's parity against PyTorch."""
    (folder / "export_report.json").write_text(json.dumps([report.to_json() for report in reports], indent=2) + "\n")
    lines = [
        f"# Export parity: {settings.checkpoint.name}",
        "",
        "| graph | inputs | max abs error | p99 abs error | worst prompt Dice | gate | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        worst = f"{min(report.dice.values()):.4f}" if report.dice else "n/a"
        gate = f"Dice >= {report.min_dice}{report.ungated_note}" if report.dice else "max error"
        lines.append(
            f"| {report.graph} | {report.inputs} | {report.max_abs_error:.2e} | {report.p99_abs_error:.2e} "
            f"| {worst} | {gate} | {verdict(report)} |"
        )
    (folder / "export_report.md").write_text("\n".join(lines) + "\n")


def verdict(report: ParityReport) -> str:
    """``pass``, ``FAIL``, or for an optional precision that failed, that it is not offered."""
    if report.passed:
        return "pass"
    return "FAIL" if report.blocking else "below its gate: not offered"


def build_plans(graphs: dict[str, ExportedGraph], sat: SAT, settings: ExportSettings) -> None:
    """TensorRT plans next to the ONNX graphs (only on a machine with TensorRT and the target GPU)."""
    from satseg_export.tensorrt import build_engine, current_runtime, fp16_method, text_profiles, vision_profiles

    strongly_typed = fp16_method(current_runtime().tensorrt) != "builder-flag"
    for name, profiles in (
        ("text_encoder", text_profiles()),
        ("vision", vision_profiles(sat.config.patch_size, sat.config.d_model)),
    ):
        graph = graphs[f"{name} fp16"] if strongly_typed else graphs[name]
        build_engine(
            graph.path,
            graph.path.with_name("model.plan"),
            profiles,
            onnx_sha256=graph.sha256,
            keep_norms_fp32=settings.keep_norms_fp32,
        )


VERSIONED_FILES = ("*/config.pbtxt", "*/configs/*.pbtxt", "*/1/model.py")
"""The repository layout kept in git (``triton_repo/``): copied first when building a repository elsewhere."""


def install(staging: Path, repository: Path) -> None:
    """Copy the staged artefacts into ``repository``, over the previous build (versioned files untouched).

    A repository other than ``triton_repo/`` first gets the versioned configs and ``model.py`` files, so any
    folder ``sat-export -o`` fills is complete. The ``sat`` ensemble gets its (empty) version folder.
    """
    if repository.resolve() != DEFAULT_REPOSITORY.resolve():
        for pattern in VERSIONED_FILES:
            for source in sorted(DEFAULT_REPOSITORY.glob(pattern)):
                target = repository / source.relative_to(DEFAULT_REPOSITORY)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    (repository / "sat" / "1").mkdir(parents=True, exist_ok=True)
    for source in sorted(staging.rglob("*")):
        if source.is_file():
            target = repository / source.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser(
        PROG, "Export a checkpoint to ONNX (and TensorRT) and fill the Triton model repository.", EPILOG
    )
    parser.add_argument("checkpoint", type=Path, help="satseg checkpoint folder (config.json + model.safetensors)")
    parser.add_argument(
        "--repository", "-o", type=Path, default=DEFAULT_REPOSITORY, help="model repository (default triton_repo/)"
    )
    parser.add_argument("--volume", type=Path, help="a real volume whose windows the vision graph is checked on")
    parser.add_argument(
        "--modality", default="ct", choices=MODALITIES, help="modality of --volume and the prompts (default ct)"
    )
    parser.add_argument(
        "--prompts", default=",".join(PARITY_PROMPTS), help="prompts of the parity check (comma-separated)"
    )
    parser.add_argument(
        "--min-dice", type=float, default=DEFAULT_MIN_DICE, help="per-prompt Dice gate of FP32 ONNX (default 0.99)"
    )
    parser.add_argument(
        "--tensorrt", action="store_true", help="also build FP16 TensorRT plans (needs TensorRT and the GPU)"
    )
    parser.add_argument(
        "--keep-norms-fp32", action="store_true", help="keep InstanceNorm/LayerNorm in FP32 in the plans"
    )
    parser.add_argument(
        "--random-patches", type=int, default=RANDOM_PATCHES, help=f"random windows checked (default {RANDOM_PATCHES})"
    )
    parser.add_argument(
        "--real-patches", type=int, default=REAL_PATCHES, help=f"windows of the real volume checked ({REAL_PATCHES})"
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also offer an INT8 OpenVINO graph of vision (NNCF), installed only if it holds the Dice gate "
        f"({INT8_MIN_DICE}) on real windows it was not calibrated on; needs a CPU with VNNI or AMX",
    )
    parser.add_argument(
        "--int8-windows",
        type=int,
        help="with --int8: the volume's most textured windows used, half to calibrate, half to gate (default all)",
    )
    parser.add_argument(
        "--if-stale",
        action="store_true",
        help="do nothing when the repository was already exported from these exact weights by this version",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if not IN_CHECKOUT:  # the versioned configs and model.py files live in the checkout's triton_repo/
            raise SatInputError(
                "sat-export builds on the model configs in triton_repo/ of the source repository, which an "
                "installed wheel does not carry; run it from a clone (or in export/Dockerfile's image)"
            )
        settings = ExportSettings(
            checkpoint=args.checkpoint,
            repository=args.repository,
            volume=args.volume,
            modality=args.modality,
            prompts=tuple(prompt.strip() for prompt in args.prompts.split(",") if prompt.strip()),
            min_dice=args.min_dice,
            tensorrt=args.tensorrt,
            keep_norms_fp32=args.keep_norms_fp32,
            random_patches=args.random_patches,
            real_patches=args.real_patches,
            int8=args.int8,
            int8_windows=args.int8_windows,
        )
        if settings.int8 and not int8_acceleration():
            raise SatInputError(
                "--int8: this CPU has no INT8 instructions (AVX512-VNNI, AVX-VNNI or AMX), so an INT8 graph would "
                "not run faster than FP32 here; export on the serving CPU class, or leave --int8 out"
            )
        if min(settings.random_patches, settings.real_patches) < 1:
            raise SatInputError("--random-patches and --real-patches must be at least 1")
        if settings.int8_windows is not None and settings.int8_windows < 2:
            raise SatInputError("--int8-windows must be at least 2: one to calibrate on, one to gate on")
        if args.if_stale and repository_is_current(settings):
            print(f"{settings.repository} is current for {settings.checkpoint} (nothing to do)")
            return 0
        if settings.tensorrt:
            from satseg_export.tensorrt import current_runtime

            current_runtime()  # fail in one line before minutes of export when there is no TensorRT or GPU
        for report in build_repository(settings):
            print(report.summary())
        print(f"installed into {settings.repository} (report: {settings.repository / 'sat' / 'export_report.md'})")
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
