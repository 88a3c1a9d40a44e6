"""``sat-import``: convert the published SAT checkpoints (zhaoziheng/SAT) into a satseg checkpoint.

Inputs are the reference's own files: the vision network (``SAT_Nano_UNET.pth`` or ``SAT_Pro.pth``),
the text encoder (``text_encoder.pth``: a BioLORD-2023-C/MPNet tower, a projection and a modality
embedding), each a ``torch.save`` dict whose ``model_state_dict`` keys carry DistributedDataParallel's
``module.`` prefix, and a folder with the text tower's Hugging Face ``config.json`` and tokenizer files.

Every reference key is accounted for by an explicit map (reference name -> our name, built by the small
functions below); a file with any key missing or unexpected, or a tensor of the wrong shape, is refused
as a whole, naming every offending key. What the map does besides renaming:

- the first convolution takes the reference's three identical input channels; summing its weights over
  them gives the single-channel convolution that computes the same thing on one channel;
- ``all_modules.0``/``all_modules.1`` of every reference conv block are second names of its ``conv`` and
  ``norm`` (the same tensors, checked equal) and ``norm1`` of every reference decoder layer is built
  but never used by its pre-norm forward: these are read and dropped;
- the text file may hold keys the reference's own loader discards (``temperature`` and ``atlas_tower.*``
  from knowledge pretraining) and the constant ``embeddings.position_ids`` buffer older transformers
  saved (checked to be 0, 1, 2, ...): these are dropped too.

The result is a ``nano-reference``/``pro-reference`` model (:mod:`satseg.model.config`) whose forward is
the reference's. Its text encoder is written in Hugging Face layout to ``OUT/text_encoder/`` together
with the tokenizer files and the reference's tokenisation rules (:func:`satseg.text.tokenize.wrap_and_pad`);
the checkpoint's ``text_encoder`` identity is ``"text_encoder"``, that folder's path relative to the
checkpoint (:func:`satseg.checkpoint.save_checkpoint`), so the output folder can be moved or copied whole.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from satseg.checkpoint import describe_key_mismatch, save_checkpoint
from satseg.cli.common import cli_parser, run_cli
from satseg.errors import CheckpointError, SatInputError
from satseg.geometry.volume import MODALITIES
from satseg.model import SAT, SATConfig, SATVision, TextTower, get_config
from satseg.model.text_tower import load_hf_encoder
from satseg.onnx_graphs import file_sha256
from satseg.spec import ModelSpec, default_spec
from satseg.text import PromptTokenizer, Vocabulary, resolve_text_encoder
from satseg.text.tokenize import write_reference_rules

PROG = "sat-import"
REFERENCE_SIZES = {"nano": "nano-reference", "pro": "pro-reference"}
"""``--size`` (the reference's SAT-Nano ``UNET`` and SAT-Pro ``UNET-L``) -> our registered size."""
TEXT_ENCODER_FOLDER = "text_encoder"
FIRST_CONV = "vision.backbone.encoder.0.0.0.weight"
"""Our first convolution, ``[C, 1, 3, 3, 3]``; the reference's is ``[C, 3, 3, 3, 3]``."""
DEEP_SUPERVISION_PREFIX = "mid_mask_embed_proj."
"""Present when the reference was built with deep supervision (its auxiliary mask heads)."""
POSITION_IDS = "text_tower.biolord.embeddings.position_ids"
DISCARDED_TEXT_KEYS = frozenset({"temperature", POSITION_IDS})
DISCARDED_TEXT_PREFIXES = ("atlas_tower.",)

EPILOG = """examples:
  sat-import --vision SAT_Nano_UNET.pth --size nano --text-encoder text_encoder.pth \\
             --tokenizer BioLORD-2023-C/ -o checkpoints/sat-nano
  sat-import --vision SAT_Pro.pth --size pro --text-encoder text_encoder.pth \\
             --tokenizer BioLORD-2023-C/ -o checkpoints/sat-pro
  sat-import --folder downloads/ --size nano -o checkpoints/sat-nano   # the same files, found in a folder
  sat-segment -i ct.nii.gz -o out/ --prompts "liver,spleen" --checkpoint checkpoints/sat-nano   # then use it

--tokenizer is a local Hugging Face folder of the text tower (FremyCompany/BioLORD-2023-C): its
config.json and tokenizer files; its weights are not needed (they come from --text-encoder). Nothing
is downloaded. Only the networks are converted: satseg's own preprocessing (resampling, intensity
normalisation) runs around them.

The output folder gets config.json and model.safetensors (the satseg checkpoint) and text_encoder/
(the imported MPNet encoder, its tokenizer and the reference's tokenisation rules: "[CLS]" and
"[SEP]" written as text, padding with 0, mask = ids > 0). The checkpoint names text_encoder/ relative
to its own folder: move or copy the output folder as a whole.

A key missing from or unexpected in either file, or a tensor of the wrong shape, stops the import
(exit status 2) with every offending key listed; nothing is written. Files are read with
torch.load(weights_only=True): a file that needs arbitrary Python objects to unpickle is refused.
"""


@dataclass(frozen=True)
class KeyMap:
    """How one reference file's keys become ours.

    Attributes:
        names: reference key -> our state-dict key, one entry per tensor we load.
        aliases: reference key -> the reference key it is a second name of (must hold an equal tensor).
        unused: reference keys the reference builds but never reads in its forward.
    """

    names: dict[str, str]
    aliases: dict[str, str]
    unused: frozenset[str]

    @property
    def expected(self) -> set[str]:
        """Every key the reference file must hold."""
        return set(self.names) | set(self.aliases) | self.unused


def affine_keys(reference: str, ours: str) -> dict[str, str]:
    """``weight`` and ``bias`` of one layer (Linear, conv, norm) under the reference's and our module path."""
    return {f"{reference}.{name}": f"{ours}.{name}" for name in ("weight", "bias")}


def mlp_keys(reference: str, ours: str) -> dict[str, str]:
    """An MLP whose Linears sit at indices 0 and 2 of a Sequential in both models."""
    return {**affine_keys(f"{reference}.0", f"{ours}.0"), **affine_keys(f"{reference}.2", f"{ours}.2")}


def conv_block_keys(reference: str, ours: str) -> dict[str, str]:
    """One reference ``ConvDropoutNormReLU`` (``conv``, ``norm``) -> our ``ConvBlock`` (indices 0 and 1)."""
    return {**affine_keys(f"{reference}.conv", f"{ours}.0"), **affine_keys(f"{reference}.norm", f"{ours}.1")}


def conv_block_aliases(reference: str) -> dict[str, str]:
    """The block's ``all_modules`` Sequential registers ``conv`` and ``norm`` a second time, at 0 and 1."""
    return {
        f"{reference}.all_modules.{index}.{name}": f"{reference}.{module}.{name}"
        for index, module in enumerate(("conv", "norm"))
        for name in ("weight", "bias")
    }


def backbone_blocks(stages: int, convs_per_stage: int) -> list[tuple[str, str]]:
    """``(reference block, our block)`` for every conv block of the U-Net.

    The reference's encoder stage ``s`` wraps its blocks in a one-element Sequential (``stages.s.0``); its
    decoder stages are numbered in the order they run, from the bottleneck up, so its decoder stage ``j``
    is our decoder level ``stages - 2 - j``.
    """
    pairs = [
        (f"backbone.encoder.stages.{stage}.0.convs.{block}", f"vision.backbone.encoder.{stage}.{block}")
        for stage in range(stages)
        for block in range(convs_per_stage)
    ]
    pairs += [
        (f"backbone.decoder.stages.{step}.convs.{block}", f"vision.backbone.decoder.{stages - 2 - step}.{block}")
        for step in range(stages - 1)
        for block in range(convs_per_stage)
    ]
    return pairs


def decoder_layer_keys(layer: int) -> dict[str, str]:
    """One pre-norm reference decoder layer: ``norm2`` precedes cross-attention, ``norm3`` the FFN."""
    reference, ours = f"transformer_decoder.layers.{layer}", f"vision.decoder.layers.{layer}"
    attention = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    return {
        **{f"{reference}.multihead_attn.{name}": f"{ours}.cross_attention.{name}" for name in attention},
        **affine_keys(f"{reference}.norm2", f"{ours}.norm_attention"),
        **affine_keys(f"{reference}.linear1", f"{ours}.ffn.0"),
        **affine_keys(f"{reference}.linear2", f"{ours}.ffn.2"),
        **affine_keys(f"{reference}.norm3", f"{ours}.norm_ffn"),
    }


def vision_key_map(config: SATConfig) -> KeyMap:
    """The map of a reference ``Maskformer`` state dict (``module.`` stripped) onto ``SAT.vision`` of ``config``."""
    stages = len(config.unet_channels)
    names: dict[str, str] = {}
    aliases: dict[str, str] = {}
    for reference, ours in backbone_blocks(stages, config.convs_per_stage):
        names |= conv_block_keys(reference, ours)
        aliases |= conv_block_aliases(reference)
    for step in range(stages - 1):
        names |= affine_keys(f"backbone.decoder.transpconvs.{step}", f"vision.backbone.upsample.{stages - 2 - step}")
    names |= mlp_keys("projection_layer", "vision.tokenizer.mlp")
    for layer in range(config.decoder_layers):
        names |= decoder_layer_keys(layer)
    names |= affine_keys("transformer_decoder.norm", "vision.decoder.norm")
    names |= mlp_keys("mask_embed_proj", "vision.mask_head.mlp")
    for level in range(config.deep_supervision_levels):
        names |= mlp_keys(f"{DEEP_SUPERVISION_PREFIX}{level}", f"vision.deep_supervision_heads.{level}.mlp")
    unused = frozenset(
        f"transformer_decoder.layers.{layer}.norm1.{name}"
        for layer in range(config.decoder_layers)
        for name in ("weight", "bias")
    )
    return KeyMap(names, aliases, unused)


def text_key_map(encoder_keys: Iterable[str]) -> KeyMap:
    """The map of a reference ``Knowledge_Encoder`` state dict onto ``SAT.text`` with an encoder of ``encoder_keys``."""
    names = {f"text_tower.biolord.{key}": f"text.encoder.{key}" for key in encoder_keys}
    names |= mlp_keys("projection_layer", "text.projection")
    names["modality_embed.weight"] = "text.modality_embedding.weight"
    return KeyMap(names, {}, frozenset())


def is_discarded_text_key(key: str) -> bool:
    """Keys a text-encoder file may hold that the reference's forward never reads (see the module docstring)."""
    return key in DISCARDED_TEXT_KEYS or key.startswith(DISCARDED_TEXT_PREFIXES)


def key_mismatch(state: Mapping[str, torch.Tensor], key_map: KeyMap, discardable: bool = False) -> str:
    """Every missing and unexpected key of ``state`` (all of them named), or ``""`` when it fits ``key_map``.

    With ``discardable``, keys :func:`is_discarded_text_key` accepts are not unexpected.
    """
    missing = key_map.expected - set(state)
    unexpected = {key for key in set(state) - key_map.expected if not (discardable and is_discarded_text_key(key))}
    return describe_key_mismatch(missing, unexpected, limit=max(len(missing), len(unexpected), 1))


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` DistributedDataParallel put before every key (keys without it are kept as they are)."""
    return {key.removeprefix("module."): value for key, value in state.items()}


def read_reference_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``model_state_dict`` of a reference ``.pth`` file, ``module.`` stripped.

    Read with ``weights_only=True``: tensors and plain containers only, never arbitrary objects.

    Raises:
        CheckpointError: the file needs more than that to unpickle, is not a torch file, or holds no
            ``model_state_dict`` of tensors.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(
            f"{path} was refused: it is not a plain tensor file that torch.load(weights_only=True) reads ({reason})"
        ) from None
    state = loaded.get("model_state_dict") if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path} holds no 'model_state_dict' of tensors: not a reference SAT checkpoint")
    return strip_module_prefix(state)


def alias_mismatch(state: Mapping[str, torch.Tensor], key_map: KeyMap) -> list[str]:
    """Aliases whose tensor differs from the one they should be a second name of."""
    return [alias for alias, target in sorted(key_map.aliases.items()) if not torch.equal(state[alias], state[target])]


def translate(state: Mapping[str, torch.Tensor], key_map: KeyMap) -> dict[str, torch.Tensor]:
    """Our state-dict entries for a checked reference ``state`` (aliases and unused keys dropped)."""
    return {ours: state[reference] for reference, ours in key_map.names.items()}


def fold_input_channels(weight: torch.Tensor) -> torch.Tensor:
    """``[C, 3, k, k, k]`` -> ``[C, 1, k, k, k]``: one channel in, the same output as three identical ones."""
    return weight.sum(dim=1, keepdim=True)


def check_position_ids(state: Mapping[str, torch.Tensor]) -> None:
    """The optional ``position_ids`` buffer must be the constant ``0, 1, 2, ...`` the encoder rebuilds itself."""
    if POSITION_IDS in state:
        ids = state[POSITION_IDS].reshape(-1)
        if not torch.equal(ids, torch.arange(ids.numel(), dtype=ids.dtype)):
            raise CheckpointError(f"{POSITION_IDS} is not 0, 1, 2, ...: not a reference text encoder")


def shape_mismatch(tensors: Mapping[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    """``key (given) vs (expected)`` for every tensor whose shape differs from the model's."""
    return [
        f"{key} {tuple(tensors[key].shape)} vs {tuple(value.shape)}"
        for key, value in model.state_dict().items()
        if key in tensors and tensors[key].shape != value.shape
    ]


def reference_config(
    base: SATConfig, *, deep_supervision: bool, text_encoder: str, text_hidden_size: int, num_modalities: int
) -> SATConfig:
    """``base`` (a ``*-reference`` size) with the text encoder and the heads the imported files hold."""
    levels = base.deep_supervision_levels if deep_supervision else 0
    return replace(
        base,
        deep_supervision_levels=levels,
        mask_mlp_hidden=base.mask_mlp_hidden[: levels + 1],
        text_encoder=text_encoder,
        text_hidden_size=text_hidden_size,
        num_modalities=num_modalities,
    )


def size_hint(vision: Mapping[str, torch.Tensor], size_name: str, deep_supervision: bool) -> str:
    """`` (the keys fit --size X)`` when the vision file fits the other published size, else ``""``."""
    for flag, registered in REFERENCE_SIZES.items():
        other = get_config(registered)
        levels = other.deep_supervision_levels if deep_supervision else 0
        if registered != size_name and not key_mismatch(
            vision, vision_key_map(replace(other, deep_supervision_levels=levels))
        ):
            return f" (the keys fit --size {flag})"
    return ""


def import_sat(
    vision_path: str | Path,
    text_encoder_path: str | Path,
    tokenizer_dir: str | Path,
    output: str | Path,
    size: str | SATConfig = "nano",
) -> Path:
    """Convert reference SAT files into a satseg checkpoint folder ``output``; returns it.

    Args:
        vision_path: ``SAT_Nano_UNET.pth`` / ``SAT_Pro.pth`` (``model_state_dict`` of the reference
            ``Maskformer``, first conv ``[C, 3, 3, 3, 3]``).
        text_encoder_path: ``text_encoder.pth`` (``model_state_dict`` of the reference ``Knowledge_Encoder``:
            ``text_tower.biolord.*``, ``projection_layer.{0,2}``, ``modality_embed.weight [M, d_model]``).
        tokenizer_dir: local Hugging Face folder with the text tower's ``config.json`` and tokenizer files.
        output: folder for ``config.json``, ``model.safetensors`` and ``text_encoder/``.
        size: ``"nano"`` or ``"pro"``, or a ``*-reference``-style :class:`SATConfig` (tests use tiny ones).

    Raises:
        CheckpointError: a file is refused (see :func:`read_reference_state`), or does not match the
            reference layout: every missing, unexpected or wrongly shaped key is named; nothing is written.
    """
    base = size if isinstance(size, SATConfig) else get_config(REFERENCE_SIZES[size])
    vision_path, text_encoder_path, output = Path(vision_path), Path(text_encoder_path), Path(output)
    vision_state = read_reference_state(vision_path)
    text_state = read_reference_state(text_encoder_path)
    encoder = load_hf_encoder(resolve_text_encoder(str(tokenizer_dir)), pretrained=False)
    modality_embedding = text_state.get("modality_embed.weight")
    encoder_folder = (output / TEXT_ENCODER_FOLDER).resolve()
    deep_supervision = any(key.startswith(DEEP_SUPERVISION_PREFIX) for key in vision_state)
    config = reference_config(
        base,
        deep_supervision=deep_supervision,
        text_encoder=str(encoder_folder),  # save_checkpoint records it relative to output
        text_hidden_size=int(encoder.config.hidden_size),
        num_modalities=base.num_modalities if modality_embedding is None else modality_embedding.shape[0],
    )
    vision_map, text_map = vision_key_map(config), text_key_map(encoder.state_dict())
    problems = []
    if mismatch := key_mismatch(vision_state, vision_map):
        problems.append(f"{vision_path}: {mismatch}{size_hint(vision_state, base.name, deep_supervision)}")
    if mismatch := key_mismatch(text_state, text_map, discardable=True):
        problems.append(f"{text_encoder_path}: {mismatch}")
    if problems:
        raise CheckpointError("reference keys do not match: " + "; ".join(problems))
    if different := alias_mismatch(vision_state, vision_map):
        raise CheckpointError(f"{vision_path}: these should repeat their block's conv/norm: {', '.join(different)}")
    check_position_ids(text_state)
    if config.num_modalities < len(MODALITIES):
        raise CheckpointError(
            f"{text_encoder_path}: modality_embed has {config.num_modalities} rows, fewer than {', '.join(MODALITIES)}"
        )

    model = SAT(
        config, SATVision(config), TextTower(encoder, config.text_hidden_size, config.d_model, config.num_modalities)
    )
    tensors = translate(vision_state, vision_map) | translate(text_state, text_map)
    tensors[FIRST_CONV] = fold_input_channels(tensors[FIRST_CONV])
    if wrong := shape_mismatch(tensors, model):
        raise CheckpointError(f"reference tensor shapes do not match the {base.name} model: {', '.join(wrong)}")
    model.load_state_dict(tensors, strict=True)

    encoder.save_pretrained(str(encoder_folder))
    PromptTokenizer(tokenizer_dir).save(encoder_folder)
    write_reference_rules(encoder_folder)
    source = {
        "repository": "zhaoziheng/SAT",
        "size": base.name,
        "vision": {"file": vision_path.name, "sha256": file_sha256(vision_path)},
        "text_encoder": {"file": text_encoder_path.name, "sha256": file_sha256(text_encoder_path)},
    }
    vocabulary = Vocabulary.load()
    spec = reference_spec(model.config.patch_size, vocabulary)
    return save_checkpoint(model, output, vocabulary_sha256=vocabulary.sha256, spec=spec, extra={"imported": source})


def reference_spec(patch_size: tuple[int, int, int], vocabulary: Vocabulary) -> ModelSpec:
    """The preprocessing of SAT's reference inference code, which the imported weights were trained with,
    stated where it departs from this project's defaults. Its trained terms (497 classes of 72 datasets) are
    not in the checkpoint, so none are recorded and no prompt is flagged."""
    spec = default_spec(patch_size, vocabulary, trained_terms=None, notes=REFERENCE_DEPARTURES)
    return spec.with_overrides(ct_foreground_hu=0.0)


REFERENCE_DEPARTURES = {
    "ct_foreground_hu": "the reference crops CT to voxels > 0 HU; satseg's default (> -500) also keeps fat and skin",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser(
        PROG, "Convert the published SAT checkpoints (zhaoziheng/SAT) into a satseg checkpoint.", EPILOG
    )
    parser.add_argument(
        "--folder", type=Path, help="the folder of the downloaded files, instead of the next three (see below)"
    )
    parser.add_argument("--vision", type=Path, help="SAT_Nano_UNET.pth or SAT_Pro.pth")
    parser.add_argument("--size", choices=sorted(REFERENCE_SIZES), required=True, help="nano or pro, as --vision")
    parser.add_argument("--text-encoder", type=Path, help="the reference's text_encoder.pth")
    parser.add_argument("--tokenizer", type=Path, help="local BioLORD-2023-C folder: config.json and tokenizer files")
    parser.add_argument("--output", "-o", type=Path, required=True, help="folder for the satseg checkpoint")
    args = parser.parse_args(argv)
    named = [args.vision, args.text_encoder, args.tokenizer]
    if (args.folder is not None and any(named)) or (args.folder is None and not all(named)):
        parser.error("give --folder, or all of --vision, --text-encoder and --tokenizer")
    return args


def published_files(folder: Path) -> tuple[Path, Path, Path]:
    """``(vision, text encoder, tokenizer folder)`` in a folder of the downloaded files: the one ``.pth`` whose
    name holds "text" is the text encoder's, the other ``.pth`` the vision model's, and the one subfolder with a
    ``config.json`` the tokenizer's (whatever the files were renamed to on the way).

    Raises:
        SatInputError: the folder does not hold exactly those; the line says what it found.
    """
    weights = sorted(folder.glob("*.pth"))
    text = [path for path in weights if "text" in path.name.lower()]
    vision = [path for path in weights if path not in text]
    tokenizers = sorted(path.parent for path in folder.glob("*/config.json"))
    if len(text) != 1 or len(vision) != 1 or len(tokenizers) != 1:
        found = ", ".join(path.name for path in [*weights, *tokenizers]) or "nothing of the kind"
        raise SatInputError(
            f"{folder} must hold one vision .pth, one text encoder .pth (its name holding 'text') and one "
            f"tokenizer folder with a config.json; it holds {found}"
        )
    return vision[0], text[0], tokenizers[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        files = published_files(args.folder) if args.folder else (args.vision, args.text_encoder, args.tokenizer)
        folder = import_sat(*files, args.output, args.size)
        print(f"wrote the imported SAT-{args.size.capitalize()} checkpoint to {folder}")
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
