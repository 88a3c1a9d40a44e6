"""Knowledge injection: contrastive pretraining of the text encoder on the anatomy knowledge tree.

The top transformer layers of the text encoder learn to put each anatomy term next to its
definition, its synonyms and sentences naming what it is a kind or part of ("a kind of kidney",
"part of the digestive system"): a CLIP-style, multi-positive InfoNCE loss with a learnable
temperature (SAT, knowledge injection). A seeded share of the synonyms is held out of training
and measures what was learnt: synonym -> term retrieval among all canonical terms, before and
after, in the same run.

Outputs (``--output DIR``), read by :func:`satseg.checkpoint.load_text_pretraining`:

- ``text_encoder_layers.safetensors``: the trained layers only, keys as in the Hugging Face
  encoder's ``state_dict()`` ("encoder.layer.5.attention.self.query.weight");
- ``config.json``: base encoder identity and sha256 (taken before training), trained prefixes,
  metrics, seed, epochs and lr;
- ``metrics.json``: recall@1 and recall@5 before and after, and the training summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import nn
from tqdm import tqdm

from satseg.atomic import write_bytes_atomically
from satseg.checkpoint import CONFIG_FILE, TEXT_PRETRAINING_WEIGHTS
from satseg.cli.common import cli_parser, run_cli
from satseg.model.text_tower import load_hf_encoder, mean_pool
from satseg.text import PromptTokenizer, resolve_text_encoder, tensor_sha256
from satseg_training.knowledge import KnowledgeTree, Pair

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no tomllib; tomli is the same parser
    import tomli as tomllib

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "pretrain_text.toml"
METRICS_FILE = "metrics.json"
INITIAL_LOGIT_SCALE = 1 / 0.07
"""CLIP's initial inverse temperature."""
MAX_LOGIT_SCALE = 100.0
"""The inverse temperature is clamped here, as in CLIP, so logits cannot blow up."""
RECALL_AT = (1, 5)
_GROUP = 16
"""Texts per encoder call in :func:`embed`."""


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of one pretraining run; the defaults live in ``training/configs/pretrain_text.toml`` only.

    Attributes:
        encoder: text encoder identity ("minilm-l6") or local Hugging Face folder.
        top_layers: transformer layers trained, counted from the top; everything else is frozen.
        epochs: passes over the training pairs.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay of the encoder layers (not of the temperature).
        batch_size: pairs per step.
        max_length: tokens kept per text, special tokens included.
        holdout_fraction: share of all synonyms held out of training for the retrieval test.
        seed: fixes the held-out synonyms, the batch order and dropout.
        max_pairs: train on this many (shuffled) pairs only; 0 for all.
        threads: PyTorch CPU threads during the run; 0 keeps PyTorch's choice.
    """

    encoder: str
    top_layers: int
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    max_length: int
    holdout_fraction: float
    seed: int
    max_pairs: int
    threads: int

    def __post_init__(self) -> None:
        if self.top_layers < 1 or self.epochs < 1 or self.batch_size < 2 or min(self.max_pairs, self.threads) < 0:
            raise ValueError("top_layers and epochs must be >= 1, batch_size >= 2, max_pairs and threads >= 0")
        if not 0.0 < self.holdout_fraction < 1.0 or self.lr <= 0.0:
            raise ValueError("holdout_fraction must lie in (0, 1) and lr must be positive")


def load_config(path: Path, overrides: Mapping[str, Any]) -> PretrainConfig:
    """The settings in the TOML file ``path``, with ``overrides`` (non-None values) on top.

    Raises:
        ValueError: a setting is unknown or missing (from both), or a value is out of range.
    """
    values = tomllib.loads(path.read_text("utf-8"))
    values.update({key: value for key, value in overrides.items() if value is not None})
    known = {field.name for field in dataclasses.fields(PretrainConfig)}
    unknown, missing = sorted(set(values) - known), sorted(known - set(values))
    if unknown or missing:
        raise ValueError(f"{path}: unknown settings [{', '.join(unknown)}], missing [{', '.join(missing)}]")
    return PretrainConfig(**values)


# --- data ------------------------------------------------------------------------------------------


def hold_out_synonyms(tree: KnowledgeTree, fraction: float, seed: int) -> dict[str, str]:
    """A seeded ``fraction`` of all synonyms in the tree: held-out synonym -> its canonical term."""
    synonyms = sorted((synonym, concept.term) for concept in tree.concepts for synonym in concept.synonyms)
    chosen = random.Random(seed).sample(synonyms, round(fraction * len(synonyms)))
    return dict(sorted(chosen))


def whole_words(text: str) -> str:
    """``text`` as space-separated lower-case words, padded with a space each side for whole-word search."""
    return f" {' '.join(re.findall(r'[a-z0-9]+', text.lower()))} "


def training_pairs(pairs: Sequence[Pair], held_out: Mapping[str, str]) -> list[Pair]:
    """``pairs`` without any whose positive text contains a held-out synonym as whole words.

    Containment, not just equality: a definition or another synonym that spells out a held-out
    synonym ("first cervical vertebra" inside a definition) would leak it into training.
    """
    held = [whole_words(synonym) for synonym in held_out]
    return [pair for pair in pairs if not any(synonym in whole_words(pair.positive) for synonym in held)]


def batch_count(pair_count: int, batch_size: int) -> int:
    """How many batches :func:`batches` cuts ``pair_count`` pairs into: a last batch of one is dropped.

    A single pair has no negatives, so it would teach nothing.
    """
    return pair_count // batch_size + (pair_count % batch_size > 1)


def batches(pairs: Sequence[Pair], batch_size: int, generator: torch.Generator) -> Iterator[list[Pair]]:
    """``pairs`` in a random order (from ``generator``), cut into :func:`batch_count` batches."""
    order = torch.randperm(len(pairs), generator=generator).tolist()
    for start in range(0, batch_count(len(pairs), batch_size) * batch_size, batch_size):
        yield [pairs[index] for index in order[start : start + batch_size]]


def positive_mask(batch: Sequence[Pair], known: frozenset[tuple[str, str]]) -> torch.Tensor:
    """``[B, B]`` bool: entry (i, j) is True when positive text j describes anchor i's term.

    That holds for every pair j of the same term, and also for an identical text of another
    term's pair ("a kind of bone" for both femur and humerus), which must not count as a negative.
    """
    return torch.tensor([[(anchor.anchor, pair.positive) in known for pair in batch] for anchor in batch])


# --- model -----------------------------------------------------------------------------------------


def freeze_all_but_top_layers(encoder: nn.Module, top_layers: int) -> tuple[str, ...]:
    """Make only the top ``top_layers`` transformer layers trainable; returns their key prefixes.

    Raises:
        ValueError: the encoder has fewer layers.
    """
    count = int(encoder.config.num_hidden_layers)
    if top_layers > count:
        raise ValueError(f"the encoder has {count} layers; cannot train the top {top_layers}")
    prefixes = tuple(f"encoder.layer.{index}." for index in range(count - top_layers, count))
    for name, parameter in encoder.named_parameters():
        parameter.requires_grad_(name.startswith(prefixes))
    return prefixes


def embed(encoder: nn.Module, tokenizer: PromptTokenizer, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings of ``texts``: float32 ``[N, H]``, rows in ``texts`` order.

    Texts go through the encoder in groups of similar length: a definition padded next to
    one-word synonyms would multiply the cost, while mean pooling ignores padding anyway.
    Gradients flow when enabled.
    """
    order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
    pooled = []
    for start in range(0, len(order), _GROUP):
        tokens = tokenizer([texts[index] for index in order[start : start + _GROUP]])
        pooled.append(mean_pool(encoder(**tokens).last_hidden_state, tokens["attention_mask"]))
    inverse = torch.empty(len(order), dtype=torch.int64)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return F.normalize(torch.cat(pooled)[inverse], dim=-1)


@torch.no_grad()
def embed_all(encoder: nn.Module, tokenizer: PromptTokenizer, texts: Sequence[str]) -> torch.Tensor:
    """:func:`embed` in inference mode (no dropout): float32 ``[N, H]``."""
    was_training = encoder.training
    encoder.eval()
    embeddings = embed(encoder, tokenizer, texts)
    encoder.train(was_training)
    return embeddings


def multi_positive_info_nce(
    anchors: torch.Tensor, positives: torch.Tensor, mask: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with several positives per row.

    Args:
        anchors: ``[B, H]`` L2-normalised anchor embeddings.
        positives: ``[B, H]`` L2-normalised positive embeddings.
        mask: ``[B, B]`` bool, True where positive j belongs to anchor i; every row and column
            holds at least one True (the diagonal).
        logit_scale: scalar log inverse temperature; the scale is clamped at :data:`MAX_LOGIT_SCALE`.

    Returns:
        Scalar: the mean over both directions (anchor -> positives, positive -> anchors) of the
        cross-entropy against a uniform target over each row's positives.
    """
    logits = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * anchors @ positives.T
    target = mask.to(logits.dtype)

    def one_direction(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probabilities = F.log_softmax(scores, dim=1)
        return (-(targets * log_probabilities).sum(dim=1) / targets.sum(dim=1)).mean()

    return (one_direction(logits, target) + one_direction(logits.T, target.T)) / 2


# --- evaluation ------------------------------------------------------------------------------------


def recall_at(queries: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Recall@k (k in :data:`RECALL_AT`) of cosine retrieval.

    Args:
        queries: ``[Q, H]`` L2-normalised.
        candidates: ``[C, H]`` L2-normalised.
        targets: ``[Q]`` int64, the index of each query's right candidate.

    Returns:
        ``{"recall@1": ..., "recall@5": ...}``: the share of queries whose right candidate ranks
        within the top k (ties count against it).
    """
    similarity = queries @ candidates.T
    right = similarity.gather(1, targets[:, None])
    rank = (similarity >= right).sum(dim=1) - 1  # candidates scoring at least as high, itself excluded
    return {f"recall@{k}": (rank < k).sum().item() / len(rank) for k in RECALL_AT}


def synonym_retrieval(
    encoder: nn.Module, tokenizer: PromptTokenizer, tree: KnowledgeTree, held_out: Mapping[str, str]
) -> dict[str, float]:
    """Held-out synonym -> term retrieval among all canonical terms of ``tree``: recall@1 and @5."""
    terms = [concept.term for concept in tree.concepts]
    index = {term: position for position, term in enumerate(terms)}
    targets = torch.tensor([index[term] for term in held_out.values()])
    queries = embed_all(encoder, tokenizer, list(held_out))
    return recall_at(queries, embed_all(encoder, tokenizer, terms), targets)


# --- training --------------------------------------------------------------------------------------


def train(
    encoder: nn.Module,
    tokenizer: PromptTokenizer,
    pairs: Sequence[Pair],
    known: frozenset[tuple[str, str]],
    config: PretrainConfig,
) -> dict[str, float]:
    """Train ``encoder``'s trainable parameters on ``pairs``; returns the last epoch's mean loss and the final scale.

    ``known`` holds every (term, text) pair of the tree, so that identical texts of different
    terms are not treated as negatives (:func:`positive_mask`).
    """
    logit_scale = nn.Parameter(torch.tensor(math.log(INITIAL_LOGIT_SCALE)))
    trainable = [parameter for parameter in encoder.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": trainable, "weight_decay": config.weight_decay}, {"params": [logit_scale], "weight_decay": 0.0}],
        lr=config.lr,
    )
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = batch_count(len(pairs), config.batch_size)
    encoder.train()
    epoch_loss = math.nan
    # No bar when the output is not a terminal (logs); the per-epoch line is printed either way.
    with tqdm(total=config.epochs * steps_per_epoch, desc="pretraining", unit="step", disable=None) as bar:
        for epoch in range(1, config.epochs + 1):
            losses = []
            for batch in batches(pairs, config.batch_size, generator):
                anchors = embed(encoder, tokenizer, [pair.anchor for pair in batch])
                positives = embed(encoder, tokenizer, [pair.positive for pair in batch])
                loss = multi_positive_info_nce(anchors, positives, positive_mask(batch, known), logit_scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            epoch_loss = sum(losses) / len(losses)
            tqdm.write(f"epoch {epoch}/{config.epochs}: mean loss {epoch_loss:.4f}")
    return {"final_loss": epoch_loss, "logit_scale": logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE).item()}


def write_outputs(
    output: Path,
    encoder: nn.Module,
    prefixes: tuple[str, ...],
    base_sha256: str,
    metrics: dict[str, Any],
    config: PretrainConfig,
) -> None:
    """Write the trained layers, ``config.json`` and ``metrics.json`` into ``output`` (created if needed)."""
    output.mkdir(parents=True, exist_ok=True)
    layers = {
        key: value.detach().contiguous() for key, value in encoder.state_dict().items() if key.startswith(prefixes)
    }
    write_bytes_atomically(output / TEXT_PRETRAINING_WEIGHTS, save(layers))
    description = {
        "base": config.encoder,
        "base_sha256": base_sha256,
        "trained_prefixes": list(prefixes),
        "metrics": metrics,
        "seed": config.seed,
        "epochs": config.epochs,
        "lr": config.lr,
    }
    write_bytes_atomically(output / CONFIG_FILE, (json.dumps(description, indent=2) + "\n").encode("utf-8"))
    write_bytes_atomically(output / METRICS_FILE, (json.dumps(metrics, indent=2) + "\n").encode("utf-8"))


def format_table(metrics: Mapping[str, Any]) -> str:
    """The before/after retrieval table and a training summary, printed at the end of a run."""
    header = f"{'':8}" + "".join(f"{f'recall@{k}':>10}" for k in RECALL_AT)
    rows = [
        f"{stage:8}" + "".join(f"{metrics[stage][f'recall@{k}']:>10.3f}" for k in RECALL_AT)
        for stage in ("before", "after")
    ]
    title = (
        f"held-out synonym -> term retrieval: {metrics['held_out_synonyms']} synonyms "
        f"against {metrics['candidate_terms']} terms"
    )
    footer = (
        f"{metrics['train_pairs']} training pairs, last epoch loss {metrics['final_loss']:.3f}, "
        f"{metrics['wall_time_s']} s"
    )
    return "\n".join([title, header, *rows, footer])


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` PyTorch CPU threads (0: unchanged), then restore the previous count."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pretrain(config: PretrainConfig, output: Path, tree: KnowledgeTree | None = None) -> dict[str, Any]:
    """Run knowledge injection with ``config``, write the outputs into ``output`` and return the metrics.

    Raises:
        SatInputError: ``config.encoder`` is neither a known identity nor a model folder.
        ValueError: the encoder has fewer than ``top_layers`` layers, or fewer than 2 pairs are left.
    """
    with torch_threads(config.threads):
        return _pretrain(config, output, KnowledgeTree.load() if tree is None else tree)


def _pretrain(config: PretrainConfig, output: Path, tree: KnowledgeTree) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(config.seed)  # dropout
    held_out = hold_out_synonyms(tree, config.holdout_fraction, config.seed)
    all_pairs = tree.pairs()
    pairs = training_pairs(all_pairs, held_out)
    if config.max_pairs:
        pairs = random.Random(config.seed).sample(pairs, min(config.max_pairs, len(pairs)))
    if len(pairs) < 2:
        raise ValueError(f"{len(pairs)} training pair(s) left; contrastive training needs at least 2")
    path = resolve_text_encoder(config.encoder)
    encoder = load_hf_encoder(path)
    tokenizer = PromptTokenizer(path, max_length=config.max_length)
    base_sha256 = tensor_sha256(encoder.state_dict())  # before any change: the base the layers fit
    prefixes = freeze_all_but_top_layers(encoder, config.top_layers)

    before = synonym_retrieval(encoder, tokenizer, tree, held_out)
    known = frozenset((pair.anchor, pair.positive) for pair in all_pairs)
    summary = train(encoder, tokenizer, pairs, known, config)
    after = synonym_retrieval(encoder, tokenizer, tree, held_out)

    metrics = {
        "before": before,
        "after": after,
        "held_out_synonyms": len(held_out),
        "candidate_terms": len(tree),
        "train_pairs": len(pairs),
        **summary,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    write_outputs(output, encoder, prefixes, base_sha256, metrics, config)
    return metrics


_PROG = "python -m satseg_training.pretrain_text"
_EPILOG = f"""\
what it trains:
  The top --top-layers transformer layers of the text encoder (MiniLM-L6 by default; all other
  weights stay frozen), on pairs built from training/knowledge/anatomy.jsonl: term <-> definition,
  term <-> synonym, and term <-> "a kind of X" / "part of the X". Loss: symmetric multi-positive
  InfoNCE (every text of the same term in a batch is a positive) with a learnable temperature
  starting at 1/0.07, AdamW. Defaults come from training/configs/pretrain_text.toml; the default
  run takes about 3-4 minutes on 2 CPU cores.

how it is checked:
  A seeded --holdout-fraction of the synonyms never reaches training (nor does any text that
  contains one). Each held-out synonym is matched against every canonical term by cosine
  similarity; recall@1 and recall@5 are reported before and after training, in the same run.

examples:
  python -m satseg_training.pretrain_text --output runs/text-knowledge
  python -m satseg_training.pretrain_text --output runs/quick --epochs 1 --max-pairs 256
  python -m satseg_training.pretrain_text --config my.toml --output runs/x --lr 3e-5 --top-layers 3

outputs in --output:
  {TEXT_PRETRAINING_WEIGHTS:<33}the trained layers only (encoder state_dict keys)
  {CONFIG_FILE:<33}base, base_sha256, trained_prefixes, metrics, seed, epochs, lr
  {METRICS_FILE:<33}recall@1/@5 before and after, loss, wall time

use the result:
  satseg.checkpoint.load_text_pretraining(model, "runs/text-knowledge") puts the layers into a
  SAT model whose base encoder has the recorded sha256; its checkpoints then carry them.
"""


def main(argv: list[str] | None = None) -> int:
    """Command line: parse the settings, run :func:`pretrain`, print the retrieval table."""
    parser = cli_parser(
        _PROG,
        "Knowledge injection: contrastive pretraining of the text encoder on the anatomy knowledge tree.",
        _EPILOG,
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the trained layers and metrics")
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="TOML defaults (default: training/configs/pretrain_text.toml)",
    )
    parser.add_argument(
        "--tree", type=Path, help="knowledge tree (JSON lines); default: training/knowledge/anatomy.jsonl"
    )
    settings = parser.add_argument_group("settings (override the --config file)")
    settings.add_argument("--encoder", help='"minilm-l6" or a local Hugging Face encoder folder')
    settings.add_argument("--top-layers", type=int, help="transformer layers trained, from the top")
    settings.add_argument("--epochs", type=int, help="passes over the training pairs")
    settings.add_argument("--lr", type=float, help="AdamW learning rate")
    settings.add_argument("--weight-decay", type=float, help="AdamW weight decay of the trained layers")
    settings.add_argument("--batch-size", type=int, help="pairs per step")
    settings.add_argument("--max-length", type=int, help="tokens kept per text")
    settings.add_argument("--holdout-fraction", type=float, help="share of synonyms held out for evaluation")
    settings.add_argument("--seed", type=int, help="fixes held-out synonyms, batch order and dropout")
    settings.add_argument("--max-pairs", type=int, help="train on this many pairs only (0: all)")
    settings.add_argument("--threads", type=int, help="PyTorch CPU threads (0: PyTorch's choice)")
    args = parser.parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if name not in ("output", "config", "tree")}
    try:
        config = load_config(args.config, overrides)
        tree = KnowledgeTree.load(args.tree)
    except (OSError, ValueError) as error:  # tomllib.TOMLDecodeError is a ValueError
        parser.error(" ".join(str(error).split()))

    def run() -> int:
        metrics = pretrain(config, args.output, tree)
        print(format_table(metrics))
        print(f"wrote {TEXT_PRETRAINING_WEIGHTS}, {CONFIG_FILE} and {METRICS_FILE} in {args.output}")
        return 0

    # An unknown encoder or an unwritable output ends with one line, not a traceback.
    return run_cli(_PROG, run)


if __name__ == "__main__":
    raise SystemExit(main())
