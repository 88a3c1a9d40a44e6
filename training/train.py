"""Segmentation training with Hugging Face accelerate: one CPU for a smoke test, many GPUs or nodes for real runs.

The same code runs everywhere; ``accelerate launch`` and its config decide the processes, the device and the
precision. One optimizer step sees ``batch_size * gradient_accumulation * processes`` patches; gradients are
averaged over processes (DDP), so every process holds the same weights.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from satseg.checkpoint import load_checkpoint, save_checkpoint, stored_state_dict
from satseg.cli.common import cli_parser, run_cli
from satseg.errors import SatInputError
from satseg.model import SAT, SATConfig, build_sat
from satseg.spec import default_spec
from satseg.text import Vocabulary, tensor_sha256
from satseg_training.config import TrainingConfig, load_config, resolve_path
from satseg_training.losses import deep_supervision_loss
from satseg_training.patches import (
    CasePool,
    PatchDataset,
    PhantomPool,
    collate_patches,
    sampling_weights,
    standardised_pools,
)
from satseg_training.queries import PromptedSegmentation

PROG = "sat-train"
STATE_FOLDER = "state"
STATE_PREFIX = "step_"
CHECKPOINT_FOLDER = "checkpoint"
METRICS_FILE = "metrics.csv"
METRIC_COLUMNS = ("step", "loss", "dice_loss", "bce_loss", "lr", "patches_per_s", "elapsed")

EPILOG = """examples (sat-train is the installed name of python -m satseg_training.train):
  python -m satseg_training.train --config training/configs/smoke.toml --output runs/smoke
  python -m satseg_training.train --config training/configs/demo.toml --output runs/demo train.steps=200 \\
      data.num_workers=2
  python -m satseg_training.train --config training/configs/demo.toml --output runs/demo --resume
  accelerate launch --config_file training/configs/multi_gpu.yaml -m satseg_training.train \\
      --config training/configs/demo.toml --output runs/demo train.mixed_precision=bf16
  (multi-node: edit machine_rank and main_process_ip in training/configs/multi_node.yaml on each node)

outputs (under --output):
  metrics.csv          step, loss, dice_loss, bce_loss, lr, patches_per_s, elapsed (s since this run started)
  state/step_<n>/      resumable state (model, optimizer, scheduler, RNG, step, terms seen); --resume continues
                       from the latest one exactly (every train.save_every steps and at the end of each run)
  checkpoint/          satseg checkpoint (fp16) for sat-segment and satseg_training.evaluate, every
                       train.export_every steps and at the end; config.json's "extra" records the trained
                       terms, the step count and this config

config (a TOML file, training/configs/*.toml; every key is documented in training/config.py):
  [model]  size, patch_size, text_pretraining (a folder from training/pretrain_text.py),
           init_from (a satseg checkpoint to fine-tune, e.g. models/demo)
  [data]   roots (standardised), phantom, holdout, weights.<dataset>, max_prompts, positive_centre_probability,
           negatives ("dataset" or "modality"), negative_ratio, spatial_augment_probability,
           intensity_augment_probability, edge_crop_probability, field_of_view_probability,
           thick_slice_probability, t1_contrast_probability, seed, num_workers, cached_cases
  [train]  steps, batch_size, gradient_accumulation, learning_rate, final_learning_rate, warmup_steps,
           weight_decay, gradient_clip, mixed_precision, seed, save_every, export_every, keep_states
Override any key as section.key=value (a TOML value): train.steps=4 'data.weights={synthseg=0.5}'.
Prompts per patch vary; a batch pads them to its largest count and masks the padding out of the loss.
Without CUDA every process runs on the CPU (gloo between processes).
"""


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int, final_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (step 0 gets ``1 / warmup_steps``), then a half cosine from 1 down to
    ``final_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainingProgress:
    """What a resumed run needs besides model, optimizer, scheduler and RNG states (saved by accelerate).

    Attributes:
        step: optimizer steps done. Samples are a function of their index (``satseg_training.patches``), so with
            ``samples_per_step`` it is the whole sampler state.
        seen: bool ``[terms]``, the terms that were positives in some patch on some process.
        samples_per_step, data_seed: recorded to warn when a resumed run would draw other samples.
    """

    def __init__(self, num_terms: int, samples_per_step: int, data_seed: int) -> None:
        self.step = 0
        self.seen = torch.zeros(num_terms, dtype=torch.bool)
        self.samples_per_step = samples_per_step
        self.data_seed = data_seed

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seen": self.seen.clone(),
            "samples_per_step": self.samples_per_step,
            "data_seed": self.data_seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["samples_per_step"], state["data_seed"]) != (self.samples_per_step, self.data_seed):
            warnings.warn(
                f"resuming with {self.samples_per_step} patches per step and data seed {self.data_seed} where the "
                f"state had {state['samples_per_step']} and {state['data_seed']}: the samples differ from an "
                "uninterrupted run",
                RuntimeWarning,
                stacklevel=2,
            )
        self.step = int(state["step"])
        self.seen = state["seen"].clone()


def state_folders(output: Path) -> list[Path]:
    """``output/state/step_<n>`` folders, oldest step first."""
    folder = output / STATE_FOLDER
    found = [path for path in folder.glob(f"{STATE_PREFIX}*") if path.name[len(STATE_PREFIX) :].isdigit()]
    return sorted(found, key=lambda path: int(path.name[len(STATE_PREFIX) :]))


def build_pools(config: TrainingConfig) -> list[CasePool]:
    """The case pools the config names: one per dataset in ``data.roots``, plus the phantom if asked."""
    data = config.data
    pools: list[CasePool] = list(
        standardised_pools([resolve_path(root) for root in data.roots], data.holdout, data.cached_cases)
    )
    if data.phantom:
        pools.append(PhantomPool())
    return pools


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[dict[str, torch.Tensor]],
    gradient_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this process's gradient-accumulation micro-batches (batches of ``collate_patches``).

    Returns:
        ``losses`` float32 ``[3]`` (total, Dice, BCE) averaged over the micro-batches, and the term ids that
        were positives, int64 ``[P]``; both on ``accelerator.device``.
    """
    sums = torch.zeros(3, device=accelerator.device)
    positives = []
    count = 0
    for batch in micro_batches:
        with accelerator.accumulate(model):
            outputs = model(batch["image"], batch["term_ids"], batch["modality"])
            loss = deep_supervision_loss(outputs, batch["masks"], batch["valid"])
            accelerator.backward(loss.total)
            if accelerator.sync_gradients and gradient_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), gradient_clip)
            optimizer.step()  # accelerate's wrapper steps only when gradients are synchronised
            optimizer.zero_grad(set_to_none=True)
        sums += torch.stack([loss.total, loss.dice, loss.bce]).detach()
        positives.append(batch["term_ids"][batch["positive"]])
        count += 1
    return sums / count, torch.cat(positives)


class MetricsLog:
    """``metrics.csv``, one row per optimizer step; a resumed run first drops rows past its starting step."""

    def __init__(self, path: Path, start_step: int) -> None:
        self.path = path
        rows = []
        if start_step and path.exists():
            with path.open(newline="") as file:
                rows = [row for row in csv.DictReader(file) if int(row["step"]) <= start_step]
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, values: dict[str, float]) -> None:
        with self.path.open("a", newline="") as file:
            csv.DictWriter(file, METRIC_COLUMNS).writerow(
                {key: f"{value:.6g}" if isinstance(value, float) else value for key, value in values.items()}
            )


def save_training_state(accelerator: Accelerator, output: Path, step: int, keep: int) -> None:
    """``accelerator.save_state`` into ``output/state/step_<step>``; older states beyond ``keep`` are deleted."""
    accelerator.save_state(str(output / STATE_FOLDER / f"{STATE_PREFIX}{step}"))
    if accelerator.is_main_process:
        for old in state_folders(output)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def export_checkpoint(
    accelerator: Accelerator,
    sat: SAT,
    output: Path,
    progress: TrainingProgress,
    config: TrainingConfig,
    vocabulary: Vocabulary,
) -> None:
    """Write the satseg checkpoint (fp16) of ``sat`` into ``output/checkpoint`` from the main process.

    ``sat`` shares its trained modules with the unwrapped training model (DDP wraps, never copies, them).
    """
    if accelerator.is_main_process:
        terms = [term.name for term in vocabulary.terms]
        trained = sorted(terms[i] for i in progress.seen.nonzero().flatten().tolist())
        save_checkpoint(
            sat,
            output / CHECKPOINT_FOLDER,
            vocabulary_sha256=vocabulary.sha256,
            dtype=torch.float16,
            spec=default_spec(sat.config.patch_size, vocabulary, trained),
            extra={
                "trained": True,
                "trained_terms": trained,
                "steps": progress.step,
                "config": config.to_dict(),
            },
        )
    accelerator.wait_for_everyone()


def fingerprinted(batches: Iterator[dict[str, torch.Tensor]], digest: Any) -> Iterator[dict[str, torch.Tensor]]:
    """``batches`` unchanged, their images fed into ``digest`` on the way (to show processes see other data)."""
    for batch in batches:
        digest.update(batch["image"].detach().cpu().numpy().tobytes())
        yield batch


def check_processes(accelerator: Accelerator) -> None:
    """Refuse a launch whose processes did not join one group: each would silently train alone."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise SatInputError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes}; "
            "launch with accelerate launch (or torchrun) and a config from training/configs/"
        )


def initial_weights(expected: SATConfig, checkpoint: Path) -> SAT:
    """The model of a satseg checkpoint to fine-tune, in training mode.

    Raises:
        SatInputError: its model config (size, widths, patch) is not ``expected``.
    """
    sat, metadata = load_checkpoint(checkpoint)
    if metadata.config != expected:
        raise SatInputError(
            f"model.init_from {checkpoint} is a {metadata.config.name} model with patch {metadata.config.patch_size}; "
            f"the config trains {expected.name} with patch {expected.patch_size}: set model.size/patch_size to match"
        )
    return sat.train()


def build_model(config: TrainingConfig, vocabulary: Vocabulary) -> tuple[SAT, PromptedSegmentation]:
    """The SAT to train (with knowledge-pretrained text layers when configured) and its training view.

    The pooled encoder features are computed after the text pretraining is loaded, so queries use it.
    """
    if config.model.init_from:
        sat = initial_weights(config.model.sat_config(), resolve_path(config.model.init_from))
    else:
        sat = build_sat(config.model.sat_config())
    if config.model.text_pretraining:
        from satseg.checkpoint import load_text_pretraining  # the knowledge-pretraining hook

        load_text_pretraining(sat, resolve_path(config.model.text_pretraining))
    return sat, PromptedSegmentation(sat, [term.name for term in vocabulary.terms])


def build_loader(
    config: TrainingConfig, pools: list[CasePool], terms: list[str], vocabulary: Vocabulary, processes: int
) -> DataLoader:
    """The DataLoader of the whole run: ``steps * batch_size * gradient_accumulation * processes`` samples.

    ``accelerator.prepare`` shards its batches over the processes (process ``r`` takes batches r, r + P, ...),
    so each process trains on other patches.
    """
    settings = config.train
    samples = settings.steps * settings.batch_size * settings.gradient_accumulation * processes
    patch_size = config.model.sat_config().patch_size
    dataset = PatchDataset(
        pools, sampling_weights(pools, config.data.weights), terms, vocabulary, patch_size, config.data, samples
    )
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        collate_fn=collate_patches,
        num_workers=config.data.num_workers,
        persistent_workers=config.data.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def build_optimizer(model: torch.nn.Module, config: TrainingConfig) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW over the trainable parameters and its warm-up + cosine schedule (one scheduler step per optimizer step)."""
    settings = config.train
    optimizer = torch.optim.AdamW(
        [parameter for parameter in model.parameters() if parameter.requires_grad],
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
    )
    factor = partial(
        learning_rate_factor,
        warmup_steps=settings.warmup_steps,
        total_steps=settings.steps,
        final_ratio=settings.final_learning_rate / settings.learning_rate,
    )
    return optimizer, LambdaLR(optimizer, factor)


def train(
    config: TrainingConfig,
    output: Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    write_hashes: bool = False,
) -> int:
    """Run (or continue) the training ``config`` describes, writing under ``output`` (see the module's EPILOG)."""
    settings = config.train
    # Without CUDA every process runs on the CPU; gloo connects them.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.gradient_accumulation,
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps; stepped by hand below
    )
    check_processes(accelerator)
    states = state_folders(output)
    if states and not resume:
        raise SatInputError(f"{output} already holds training states; pass --resume to continue, or another --output")
    output.mkdir(parents=True, exist_ok=True)

    # Patches have one fixed shape: let cuDNN pick its fastest 3D convolutions (GPU runs are not bitwise
    # reproducible anyway; CPU runs, and so resuming on the CPU, are).
    torch.backends.cudnn.benchmark = True
    vocabulary = Vocabulary.load()
    set_seed(settings.seed)  # the same initial weights on every process
    sat, model = build_model(config, vocabulary)
    pools = build_pools(config)
    loader = build_loader(config, pools, model.terms, vocabulary, accelerator.num_processes)
    optimizer, scheduler = build_optimizer(model, config)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    samples_per_step = settings.batch_size * settings.gradient_accumulation * accelerator.num_processes
    progress = TrainingProgress(len(vocabulary), samples_per_step, config.data.seed)
    accelerator.register_for_checkpointing(progress)
    set_seed(settings.seed, device_specific=True)  # seed + rank from here on
    initial_hash = tensor_sha256(stored_state_dict(sat)) if write_hashes else ""
    if resume and states:
        accelerator.load_state(str(states[-1]))
        accelerator.print(f"resumed from {states[-1]} (step {progress.step})")
    elif resume:
        accelerator.print(f"no state under {output / STATE_FOLDER}; starting at step 0")

    accelerator.print(
        f"{accelerator.num_processes} process(es) on {accelerator.device} ({accelerator.distributed_type}), "
        f"mixed precision {accelerator.mixed_precision}, {samples_per_step} patches of "
        f"{'x'.join(map(str, sat.config.patch_size))} per step; datasets: "
        + ", ".join(
            f"{pool.name} ({pool.size} cases, p={weight:.2f})"
            for pool, weight in zip(pools, loader.dataset.weights, strict=True)
        )
    )
    last_step = settings.steps if stop_after is None else min(settings.steps, progress.step + stop_after)
    done_batches = progress.step * settings.gradient_accumulation
    batches: Iterator[dict[str, torch.Tensor]] = iter(
        accelerator.skip_first_batches(loader, done_batches) if done_batches else loader
    )
    data_digest = hashlib.sha256()
    if write_hashes:
        batches = fingerprinted(batches, data_digest)
    metrics = MetricsLog(output / METRICS_FILE, progress.step) if accelerator.is_main_process else None
    bar = tqdm(
        total=settings.steps, initial=progress.step, desc="train", unit="step", disable=not accelerator.is_main_process
    )
    started = time.perf_counter()
    model.train()
    while progress.step < last_step:
        step_started = time.perf_counter()
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses
        micro_batches = (next(batches) for _ in range(settings.gradient_accumulation))
        losses, positives = train_step(accelerator, model, optimizer, micro_batches, settings.gradient_clip)
        if not accelerator.optimizer_step_was_skipped:  # fp16 skips steps whose gradients overflowed
            scheduler.step()
        progress.step += 1
        losses = accelerator.reduce(losses, "mean")
        seen = torch.zeros(len(vocabulary), device=accelerator.device).index_fill_(0, positives, 1.0)
        progress.seen |= accelerator.reduce(seen, "sum").cpu() > 0
        if metrics is not None:
            loss, dice, bce = losses.tolist()
            now = time.perf_counter()
            metrics.write(
                {
                    "step": progress.step,
                    "loss": loss,
                    "dice_loss": dice,
                    "bce_loss": bce,
                    "lr": learning_rate,
                    "patches_per_s": samples_per_step / (now - step_started),
                    "elapsed": now - started,
                }
            )
            bar.set_postfix(loss=f"{loss:.3f}", dice=f"{dice:.3f}", bce=f"{bce:.3f}")
        bar.update(1)
        if progress.step == last_step or (settings.save_every and progress.step % settings.save_every == 0):
            save_training_state(accelerator, output, progress.step, settings.keep_states)
        if progress.step == settings.steps or (settings.export_every and progress.step % settings.export_every == 0):
            export_checkpoint(accelerator, sat, output, progress, config, vocabulary)
    bar.close()
    if write_hashes:
        final_hash = tensor_sha256(stored_state_dict(sat))
        lines = f"initial {initial_hash}\nfinal {final_hash}\ndata {data_digest.hexdigest()}\n"
        (output / f"rank_{accelerator.process_index}.sha256").write_text(lines)
    accelerator.print(f"{progress.step}/{settings.steps} steps done; outputs in {output}")
    accelerator.end_training()
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser(PROG, "Train SAT to segment what text prompts name (accelerate; CPU, GPUs or nodes).", EPILOG)
    parser.add_argument(
        "--config", type=Path, required=True, help="training config (TOML), e.g. training/configs/smoke.toml"
    )
    parser.add_argument("--output", type=Path, required=True, help="run folder: metrics, states and the checkpoint")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest state under --output (none: start at step 0)"
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="stop after N steps of this run, saving a state (to fit a job time limit; --resume continues)",
    )
    parser.add_argument(
        "--write-weight-hashes",
        action="store_true",
        help="each process writes rank_<r>.sha256 (initial and final weights, data seen): the multi-process test",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.steps=4"
    )
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        config = load_config(args.config, args.overrides)
        return train(
            config, args.output, resume=args.resume, stop_after=args.stop_after, write_hashes=args.write_weight_hashes
        )

    return run_cli(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
