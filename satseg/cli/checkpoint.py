"""``sat-checkpoint``: create and inspect checkpoints."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from satseg.atomic import write_bytes_atomically
from satseg.checkpoint import CONFIG_FILE, checkpoint_folder, read_metadata, save_checkpoint
from satseg.cli.common import cli_parser, run_cli
from satseg.errors import SatInputError
from satseg.model import SAT_CONFIGS, build_sat
from satseg.spec import default_spec
from satseg.text import Vocabulary

EPILOG = """examples:
  sat-checkpoint init --size tiny --output checkpoints/tiny-untrained
  sat-checkpoint info models/demo
  sat-checkpoint dice models/demo runs/evaluate-demo/ct/evaluation.json runs/evaluate-demo/synthseg-t1/evaluation.json
"""

DICE_GEOMETRY = "input"
"""The Dice a checkpoint states is the one measured on the input's own grid."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser(
        "sat-checkpoint", "Create a freshly initialised SAT checkpoint, or describe an existing one.", EPILOG
    )
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser(
        "init", help="write a randomly initialised checkpoint (a starting point for training, or for tests)"
    )
    init.add_argument("--size", choices=sorted(SAT_CONFIGS), default="tiny", help="model size (default tiny)")
    init.add_argument("--output", "-o", type=Path, required=True, help="folder to write config.json and weights")
    init.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    init.add_argument("--fp16", action="store_true", help="store weights in float16 (half the size)")
    init.add_argument("--if-missing", action="store_true", help="do nothing if the folder already has a checkpoint")
    info = commands.add_parser("info", help="print what a checkpoint holds, as JSON")
    info.add_argument("checkpoint", type=Path, help="checkpoint folder")
    dice = commands.add_parser(
        "dice", help="state each trained term's measured Dice in the checkpoint's spec, from sat-evaluate's output"
    )
    dice.add_argument("checkpoint", type=Path, help="checkpoint folder (its config.json is rewritten)")
    dice.add_argument(
        "evaluations", type=Path, nargs="+", help="evaluation.json files; a term takes its Dice from the first"
    )
    return parser.parse_args(argv)


def init_checkpoint(args: argparse.Namespace) -> int:
    if args.if_missing and (args.output / CONFIG_FILE).exists():
        print(f"{args.output} already holds a checkpoint; kept it")
        return 0
    torch.manual_seed(args.seed)
    model = build_sat(args.size)
    vocabulary = Vocabulary.load()
    save_checkpoint(
        model,
        args.output,
        vocabulary_sha256=vocabulary.sha256,
        dtype=torch.float16 if args.fp16 else None,
        spec=default_spec(model.config.patch_size, vocabulary, trained_terms=()),
        extra={"trained": False, "note": f"random initialisation, seed {args.seed}: masks are meaningless"},
    )
    print(f"wrote an untrained {args.size} checkpoint to {args.output}")
    return 0


def show_info(args: argparse.Namespace) -> int:
    metadata = read_metadata(args.checkpoint)
    vocabulary = Vocabulary.load()
    summary = metadata.to_json()
    summary["spec"] = metadata.model_spec(vocabulary).to_json()  # stated, or the defaults it loads with
    summary["vocabulary_matches_this_install"] = metadata.vocabulary_sha256 == vocabulary.sha256
    trained = metadata.model_spec(vocabulary).trained_terms
    if trained is not None:  # what a prompt may name without the untrained-term warning
        summary["known_terms"] = vocabulary.known_terms(trained)
    print(json.dumps(summary, indent=2))
    return 0


def measured_dice(evaluations: list[Path]) -> dict[str, float]:
    """Per structure, the candidate's mean Dice over cases on the input grid, from the first file that has it."""
    found: dict[str, float] = {}
    for path in evaluations:
        try:
            means = json.loads(path.read_text())["structure_means"]
        except (OSError, ValueError, KeyError) as error:
            raise SatInputError(
                f"{path} is not an evaluation.json of sat-evaluate with structure means: {error}"
            ) from None
        for item in means:
            if item["geometry"] == DICE_GEOMETRY:
                found.setdefault(item["structure"], round(float(item["dice"]["candidate"]), 3))
    return found


def state_dice(args: argparse.Namespace) -> int:
    folder = checkpoint_folder(args.checkpoint)
    metadata = read_metadata(folder)
    spec = metadata.model_spec(Vocabulary.load())
    if not spec.trained_terms:
        raise SatInputError(f"{folder} states no trained terms; there is nothing to give a Dice to")
    dice = measured_dice(args.evaluations)
    trained = {term: dice.get(term, value) for term, value in spec.trained_terms.items()}
    sources = ", ".join(path.parent.name + "/" + path.name for path in args.evaluations)
    notes = spec.notes | {"dice": f"measured {date.today().isoformat()} by sat-evaluate ({sources}), input grid"}
    updated = replace(metadata, spec=replace(spec, trained_terms=trained, notes=notes))
    write_bytes_atomically(folder / CONFIG_FILE, json.dumps(updated.to_json(), indent=2).encode())
    missing = sorted(term for term, value in trained.items() if value is None)
    print(
        f"{len(trained) - len(missing)} of {len(trained)} trained terms have a measured Dice in {folder / CONFIG_FILE}"
    )
    if missing:
        print(f"no Dice for: {', '.join(missing)}")
    return 0


COMMANDS = {"init": init_checkpoint, "info": show_info, "dice": state_dice}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("sat-checkpoint", lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    raise SystemExit(main())
