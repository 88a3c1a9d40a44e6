"""export/import_sat.py: reference SAT files in, the reference's queries and logits out, strictly.

The reference files are built here from the reference's documented key layout (zhaoziheng/SAT: a
``Maskformer`` with a dynamic_network_architectures ``PlainConvUNet``, and a ``Knowledge_Encoder``),
at tiny widths, with random weights. The reference forward is written out below with
``torch.nn.functional`` on those reference-named tensors, independently of satseg's modules, so a
wrong key mapping, layer order or activation makes the comparison fail.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from satseg.checkpoint import load_checkpoint, read_metadata
from satseg.errors import CheckpointError
from satseg.model import SAT, SATConfig, get_config
from satseg.spec import DEFAULT_PREPROCESS
from satseg.text import PromptTokenizer
from satseg.text.tokenize import REFERENCE_RULES_FILE, wrap_and_pad
from satseg_export import import_sat as importer

ARCH = SATConfig(
    name="tiny-reference",
    unet_channels=(4, 4, 8, 8, 12, 16),
    convs_per_stage=2,
    patch_size=(64, 64, 32),
    d_model=32,  # not a multiple of 6: the reference's per-axis encoding is cut short
    decoder_layers=2,
    decoder_heads=4,
    decoder_ffn=40,
    token_mlp_hidden=24,
    mask_mlp_hidden=(12, 10, 14, 16),
    mlp_final_gelu=True,
    position_encoding="interleaved",
)
"""The reference architecture (6 stages, strides 1-2-2-2-2-2, deep supervision) at tiny widths."""
VOCABULARY = ["<s>", "<pad>", "</s>", "[UNK]", "<unk>", "[CLS]", "[SEP]", "<mask>", "left", "kidney", "liver", "##s"]
TEXT_HIDDEN = 16
PROMPTS = ["left kidney", "liver", "kidneys"]
PROMPT_IDS = [[5, 8, 9, 6], [5, 10, 6, 0], [5, 9, 11, 6]]
"""What the reference tokeniser makes of PROMPTS with VOCABULARY: "[CLS]" ... "[SEP]", padded with 0."""
MODALITY_IDS = [0, 1, 3]
MAX_RELATIVE_ERROR = 1e-4


def random_tensor(generator: torch.Generator, *shape: int, scale: float = 0.2, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * scale + offset


def reference_vision_state(arch: SATConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ``Maskformer`` state dict as ``nn.Module.state_dict`` lists it (before DDP's ``module.``)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def linear(name: str, fan_in: int, fan_out: int) -> None:
        state[f"{name}.weight"] = random_tensor(generator, fan_out, fan_in, scale=fan_in**-0.5)
        state[f"{name}.bias"] = random_tensor(generator, fan_out, scale=0.1)

    def norm(name: str, width: int) -> None:
        state[f"{name}.weight"] = random_tensor(generator, width, offset=1.0)
        state[f"{name}.bias"] = random_tensor(generator, width, scale=0.1)

    def conv_block(name: str, cin: int, cout: int) -> None:  # ConvDropoutNormReLU
        state[f"{name}.conv.weight"] = random_tensor(generator, cout, cin, 3, 3, 3, scale=(cin * 27) ** -0.5)
        state[f"{name}.conv.bias"] = random_tensor(generator, cout, scale=0.1)
        norm(f"{name}.norm", cout)
        for index, module in enumerate(("conv", "norm")):  # all_modules re-registers both: the same tensors
            for kind in ("weight", "bias"):
                state[f"{name}.all_modules.{index}.{kind}"] = state[f"{name}.{module}.{kind}"]

    channels, convs, d = arch.unet_channels, arch.convs_per_stage, arch.d_model
    cin = 3
    for stage, cout in enumerate(channels):
        for block in range(convs):
            conv_block(f"backbone.encoder.stages.{stage}.0.convs.{block}", cin if block == 0 else cout, cout)
        cin = cout
    for step in range(len(channels) - 1):
        below, skip = channels[-1 - step], channels[-2 - step]
        state[f"backbone.decoder.transpconvs.{step}.weight"] = random_tensor(generator, below, skip, 2, 2, 2)
        state[f"backbone.decoder.transpconvs.{step}.bias"] = random_tensor(generator, skip, scale=0.1)
        for block in range(convs):
            conv_block(f"backbone.decoder.stages.{step}.convs.{block}", 2 * skip if block == 0 else skip, skip)
    linear("projection_layer.0", sum(channels), arch.token_mlp_hidden)
    linear("projection_layer.2", arch.token_mlp_hidden, d)
    for layer in range(arch.decoder_layers):
        name = f"transformer_decoder.layers.{layer}"
        state[f"{name}.multihead_attn.in_proj_weight"] = random_tensor(generator, 3 * d, d, scale=d**-0.5)
        state[f"{name}.multihead_attn.in_proj_bias"] = random_tensor(generator, 3 * d, scale=0.1)
        linear(f"{name}.multihead_attn.out_proj", d, d)
        linear(f"{name}.linear1", d, arch.decoder_ffn)
        linear(f"{name}.linear2", arch.decoder_ffn, d)
        for index in (1, 2, 3):
            norm(f"{name}.norm{index}", d)
    norm("transformer_decoder.norm", d)
    hidden = arch.mask_mlp_hidden
    linear("mask_embed_proj.0", d, hidden[0])
    linear("mask_embed_proj.2", hidden[0], channels[0])
    for level in range(arch.deep_supervision_levels):
        linear(f"mid_mask_embed_proj.{level}.0", d, hidden[level + 1])
        linear(f"mid_mask_embed_proj.{level}.2", hidden[level + 1], channels[level + 1])
    return state


def write_encoder_folder(folder: Path) -> Path:
    """A BioLORD-like folder: an MPNet ``config.json`` and tokenizer files, no weights."""
    from transformers import MPNetConfig, MPNetTokenizer

    MPNetTokenizer(vocab={word: index for index, word in enumerate(VOCABULARY)}).save_pretrained(str(folder))
    config = MPNetConfig(
        vocab_size=len(VOCABULARY),
        hidden_size=TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        relative_attention_num_buckets=32,  # what MPNet's forward assumes
    )
    config.save_pretrained(str(folder))
    return folder


def reference_text_state(encoder_folder: Path, d_model: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A ``Knowledge_Encoder`` state dict, with the extras published files carry."""
    from transformers import AutoConfig, MPNetModel

    generator = torch.Generator().manual_seed(seed)
    biolord = MPNetModel(AutoConfig.from_pretrained(str(encoder_folder), local_files_only=True))
    state = {
        f"text_tower.biolord.{key}": random_tensor(
            generator, *value.shape, offset=1.0 if "LayerNorm.weight" in key else 0
        )
        for key, value in biolord.state_dict().items()
    }
    state["text_tower.biolord.embeddings.position_ids"] = torch.arange(32).unsqueeze(0)  # saved by transformers 4.21
    state["projection_layer.0.weight"] = random_tensor(generator, d_model, TEXT_HIDDEN, scale=TEXT_HIDDEN**-0.5)
    state["projection_layer.0.bias"] = random_tensor(generator, d_model, scale=0.1)
    state["projection_layer.2.weight"] = random_tensor(generator, d_model, d_model, scale=d_model**-0.5)
    state["projection_layer.2.bias"] = random_tensor(generator, d_model, scale=0.1)
    state["modality_embed.weight"] = random_tensor(generator, 4, d_model)
    # Knowledge pretraining's temperature and atlas tower, which the reference's loader drops.
    state["temperature"] = torch.tensor(math.log(1 / 0.07))
    state["atlas_tower.encoder.stages.0.0.convs.0.conv.weight"] = random_tensor(generator, 4, 3, 3, 3, 3)
    return state


def save_reference(state: dict[str, torch.Tensor], path: Path) -> Path:
    """As the reference's training saved it: DDP's ``module.`` prefix inside ``model_state_dict``."""
    torch.save({"model_state_dict": {f"module.{key}": value for key, value in state.items()}, "step": 1000}, path)
    return path


# --- the reference forward, from the reference's tensors ---------------------------------------------------------


def reference_position_encoding(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """positional_encodings' PositionalEncoding3D(dim): per axis sin/cos pairs over 2*ceil(dim/6) channels."""
    channels = 2 * math.ceil(dim / 6)
    rows = []
    for x in range(grid[0]):
        for y in range(grid[1]):
            for z in range(grid[2]):
                row = []
                for position in (x, y, z):
                    for pair in range(channels // 2):
                        frequency = 10000.0 ** (-2 * pair / channels)
                        row += [math.sin(position * frequency), math.cos(position * frequency)]
                rows.append(row[:dim])
    return torch.tensor(rows, dtype=torch.float32)


def reference_logits(
    state: dict[str, torch.Tensor], arch: SATConfig, image: torch.Tensor, queries: torch.Tensor
) -> torch.Tensor:
    """The reference ``Maskformer`` in eval: ``image [B, 3, H, W, D]``, ``queries [N, d]`` -> ``[B, N, H, W, D]``."""

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)

    def conv_blocks(x: torch.Tensor, name: str, stride: int) -> torch.Tensor:
        for block in range(arch.convs_per_stage):
            prefix = f"{name}.convs.{block}"
            x = F.conv3d(x, state[f"{prefix}.conv.weight"], state[f"{prefix}.conv.bias"], stride=stride, padding=1)
            x = F.instance_norm(x, weight=state[f"{prefix}.norm.weight"], bias=state[f"{prefix}.norm.bias"], eps=1e-5)
            x = F.leaky_relu(x, 0.01)
            stride = 1
        return x

    skips, x = [], image
    for stage, stride in enumerate(arch.unet_strides):
        x = conv_blocks(x, f"backbone.encoder.stages.{stage}.0", stride)
        skips.append(x)
    for step in range(len(skips) - 1):
        name = f"backbone.decoder.transpconvs.{step}"
        x = F.conv_transpose3d(x, state[f"{name}.weight"], state[f"{name}.bias"], stride=2)
        x = conv_blocks(torch.cat([x, skips[-2 - step]], dim=1), f"backbone.decoder.stages.{step}", 1)
    per_pixel = x

    pooled = [F.avg_pool3d(skip, 2 ** (len(skips) - 1 - level)) for level, skip in enumerate(skips[:-1])]
    fused = torch.cat([*pooled, skips[-1]], dim=1).permute(0, 2, 3, 4, 1)  # b h w d c
    tokens = F.gelu(linear(F.gelu(linear(fused, "projection_layer.0")), "projection_layer.2"))
    batch, d = image.shape[0], arch.d_model
    grid = tuple(tokens.shape[1:4])
    tokens = tokens.reshape(batch, -1, d)
    keys_in = tokens + reference_position_encoding(grid, d)  # type: ignore[arg-type]

    heads = arch.decoder_heads
    q = queries.unsqueeze(0).expand(batch, -1, -1)
    for layer in range(arch.decoder_layers):
        name = f"transformer_decoder.layers.{layer}"
        w_q, w_k, w_v = state[f"{name}.multihead_attn.in_proj_weight"].chunk(3)
        b_q, b_k, b_v = state[f"{name}.multihead_attn.in_proj_bias"].chunk(3)
        normed = layer_norm(q, f"{name}.norm2")

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, x.shape[1], heads, d // heads).transpose(1, 2)

        scores = split(F.linear(normed, w_q, b_q)) @ split(F.linear(keys_in, w_k, b_k)).transpose(2, 3)
        attended = torch.softmax(scores / math.sqrt(d // heads), dim=-1) @ split(F.linear(tokens, w_v, b_v))
        q = q + linear(attended.transpose(1, 2).reshape(batch, -1, d), f"{name}.multihead_attn.out_proj")
        q = q + linear(F.relu(linear(layer_norm(q, f"{name}.norm3"), f"{name}.linear1")), f"{name}.linear2")
    q = layer_norm(q, "transformer_decoder.norm")
    mask_embedding = F.gelu(linear(F.gelu(linear(q, "mask_embed_proj.0")), "mask_embed_proj.2"))
    return torch.einsum("bchwd,bnc->bnhwd", per_pixel, mask_embedding)


def reference_tokens(encoder_folder: Path, texts: list[str]) -> torch.Tensor:
    """The reference MyTokenizer: "[CLS]" + tokenize(text) + "[SEP]" as token strings, zero-padded."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(encoder_folder), local_files_only=True)
    rows = [tokenizer.convert_tokens_to_ids(["[CLS]", *tokenizer.tokenize(text), "[SEP]"]) for text in texts]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.int64)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row)
    return ids


def reference_queries(
    state: dict[str, torch.Tensor], encoder_folder: Path, input_ids: torch.Tensor, modality_ids: torch.Tensor
) -> torch.Tensor:
    """The reference Knowledge_Encoder: MPNet, mean pooling over ids > 0, projection, + modality embedding."""
    from transformers import AutoConfig, MPNetModel

    biolord = MPNetModel(AutoConfig.from_pretrained(str(encoder_folder), local_files_only=True)).eval()
    prefix = "text_tower.biolord."
    biolord.load_state_dict(
        {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}, strict=False
    )
    mask = (input_ids > 0).to(torch.int64)
    hidden = biolord(input_ids=input_ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).float()
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    projection = F.linear(
        F.gelu(F.linear(pooled, state["projection_layer.0.weight"], state["projection_layer.0.bias"])),
        state["projection_layer.2.weight"],
        state["projection_layer.2.bias"],
    )
    return projection + state["modality_embed.weight"][modality_ids]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude."""
    return ((ours - reference).abs().max() / reference.abs().max()).item()


# --- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("reference")
    encoder_folder = write_encoder_folder(folder / "biolord")
    vision_state = reference_vision_state(ARCH)
    text_state = reference_text_state(encoder_folder, ARCH.d_model)
    return {
        "encoder_folder": encoder_folder,
        "vision_state": vision_state,
        "text_state": text_state,
        "vision": save_reference(vision_state, folder / "SAT_Tiny.pth"),
        "text": save_reference(text_state, folder / "text_encoder.pth"),
    }


@pytest.fixture(scope="module")
def imported(reference: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("imported") / "sat-tiny"
    return importer.import_sat(reference["vision"], reference["text"], reference["encoder_folder"], output, ARCH)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 1, *ARCH.patch_size, generator=torch.Generator().manual_seed(2))


def our_logits(model: SAT, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries for PROMPTS through our prompt path, then the vision network: ``(queries, logits)``."""
    tokens = PromptTokenizer(model.config.text_encoder)(PROMPTS)
    with torch.inference_mode():
        queries = model.encode_prompts(tokens["input_ids"], tokens["attention_mask"], torch.tensor(MODALITY_IDS))
        logits = model.vision(image, queries.unsqueeze(0).expand(image.shape[0], -1, -1))
    return queries, logits


# --- tests -----------------------------------------------------------------------------------------------------


def expected_queries(reference: dict[str, Any]) -> torch.Tensor:
    """The reference text path on PROMPTS: ``[N, d_model]``."""
    with torch.inference_mode():
        ids = reference_tokens(reference["encoder_folder"], PROMPTS)
        return reference_queries(reference["text_state"], reference["encoder_folder"], ids, torch.tensor(MODALITY_IDS))


def expected_logits(reference: dict[str, Any], image: torch.Tensor) -> torch.Tensor:
    """The reference vision path on ``image`` repeated to 3 channels, queried with PROMPTS: ``[B, N, H, W, D]``."""
    with torch.inference_mode():
        three_channels = image.expand(-1, 3, -1, -1, -1)
        return reference_logits(reference["vision_state"], ARCH, three_channels, expected_queries(reference))


def test_imported_model_reproduces_the_reference_logits(
    reference: dict[str, Any], imported: Path, image: torch.Tensor
) -> None:
    model, metadata = load_checkpoint(imported)
    queries, logits = our_logits(model, image)
    assert logits.shape == (2, len(PROMPTS), *ARCH.patch_size)
    assert relative_error(queries, expected_queries(reference)) < MAX_RELATIVE_ERROR
    assert relative_error(logits, expected_logits(reference, image)) < MAX_RELATIVE_ERROR
    assert metadata.config.num_modalities == 4 and metadata.config.deep_supervision_levels == 3
    assert metadata.extra["imported"]["vision"]["file"] == "SAT_Tiny.pth"


def test_the_imported_folder_still_loads_after_a_move(
    reference: dict[str, Any], image: torch.Tensor, tmp_path: Path
) -> None:
    """The checkpoint names its text_encoder/ relative to itself, so the folder can move as a whole."""
    output = importer.import_sat(
        reference["vision"], reference["text"], reference["encoder_folder"], tmp_path / "made" / "sat-tiny", ARCH
    )
    written = json.loads((output / "config.json").read_text())
    for identity in (written["model_config"]["text_encoder"], written["text_encoder"]["identity"]):
        assert not Path(identity).is_absolute() and identity == importer.TEXT_ENCODER_FOLDER
    moved = Path(shutil.move(output, tmp_path / "elsewhere" / "moved"))
    shutil.rmtree(tmp_path / "made")
    model, metadata = load_checkpoint(moved)
    assert Path(model.config.text_encoder) == (moved / importer.TEXT_ENCODER_FOLDER).resolve()
    assert metadata.config == model.config
    _, logits = our_logits(model, image)
    assert relative_error(logits, expected_logits(reference, image)) < MAX_RELATIVE_ERROR


def test_first_conv_is_the_sum_over_the_three_channels(reference: dict[str, Any], imported: Path) -> None:
    model, _ = load_checkpoint(imported)
    folded = reference["vision_state"]["backbone.encoder.stages.0.0.convs.0.conv.weight"].sum(dim=1, keepdim=True)
    assert torch.equal(model.vision.backbone.encoder[0][0][0].weight, folded)


@pytest.mark.parametrize("mutation", ["swapped decoder norms", "swapped decoder levels", "block position encoding"])
def test_the_comparison_catches_a_wrong_mapping(
    mutation: str, reference: dict[str, Any], image: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The logits test can fail: each plausible mistake (all shape-compatible) misses the tolerance tenfold."""
    arch = ARCH
    if mutation == "swapped decoder norms":
        right_layer = importer.decoder_layer_keys
        swap = {"norm2": "norm3", "norm3": "norm2"}

        def swapped_norms(layer: int) -> dict[str, str]:
            return {
                re.sub(r"norm[23]", lambda found: swap[found[0]], key): ours for key, ours in right_layer(layer).items()
            }

        monkeypatch.setattr(importer, "decoder_layer_keys", swapped_norms)
    elif mutation == "swapped decoder levels":  # levels 0 and 1 both have 4 channels
        right_blocks = importer.backbone_blocks
        swap = {
            "vision.backbone.decoder.0.": "vision.backbone.decoder.1.",
            "vision.backbone.decoder.1.": "vision.backbone.decoder.0.",
        }

        def swapped_levels(stages: int, convs: int) -> list[tuple[str, str]]:
            return [
                (key, re.sub(r"^vision\.backbone\.decoder\.[01]\.", lambda found: swap[found[0]], ours))
                for key, ours in right_blocks(stages, convs)
            ]

        monkeypatch.setattr(importer, "backbone_blocks", swapped_levels)
    else:
        arch = dataclasses.replace(ARCH, position_encoding="blocks")
    folder = importer.import_sat(reference["vision"], reference["text"], reference["encoder_folder"], tmp_path, arch)
    model, _ = load_checkpoint(folder)
    _, logits = our_logits(model, image)
    assert relative_error(logits, expected_logits(reference, image)) > 10 * MAX_RELATIVE_ERROR


def import_modified(
    reference: dict[str, Any], tmp_path: Path, *, vision: dict | None = None, text: dict | None = None
) -> Path:
    vision_path = save_reference(vision or reference["vision_state"], tmp_path / "vision.pth")
    text_path = save_reference(text or reference["text_state"], tmp_path / "text.pth")
    return importer.import_sat(vision_path, text_path, reference["encoder_folder"], tmp_path / "out", ARCH)


def test_unexpected_keys_are_all_named(reference: dict[str, Any], tmp_path: Path) -> None:
    extra = {"backbone.encoder.stages.6.0.convs.0.conv.weight": torch.zeros(1), "query_proj.0.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError) as caught:
        import_modified(reference, tmp_path, vision={**reference["vision_state"], **extra})
    assert "2 unexpected" in str(caught.value)
    assert all(key in str(caught.value) for key in extra)
    assert not (tmp_path / "out").exists()


def test_missing_keys_are_all_named_untruncated(reference: dict[str, Any], tmp_path: Path) -> None:
    gone = {key for key in reference["vision_state"] if key.startswith("backbone.decoder.stages.0.")}
    gone.add("transformer_decoder.norm.bias")
    vision = {key: value for key, value in reference["vision_state"].items() if key not in gone}
    text = {key: value for key, value in reference["text_state"].items() if key != "modality_embed.weight"}
    with pytest.raises(CheckpointError) as caught:
        import_modified(reference, tmp_path, vision=vision, text=text)
    message = str(caught.value)
    assert len(gone) > 8 and f"{len(gone)} missing" in message
    assert all(key in message for key in gone)
    assert "modality_embed.weight" in message and "more" not in message


def test_a_different_alias_tensor_is_refused(reference: dict[str, Any], tmp_path: Path) -> None:
    vision = dict(reference["vision_state"])
    alias = "backbone.encoder.stages.2.0.convs.1.all_modules.1.bias"
    vision[alias] = vision[alias] + 1
    with pytest.raises(CheckpointError, match=alias.replace(".", r"\.")):
        import_modified(reference, tmp_path, vision=vision)


def test_cli_exits_nonzero_and_lists_the_keys(
    reference: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importer, "get_config", lambda name: ARCH)  # --size nano, at the test's widths
    vision = {key: value for key, value in reference["vision_state"].items() if key != "mask_embed_proj.2.bias"}
    vision_path = save_reference(vision, tmp_path / "vision.pth")
    argv = ["--vision", str(vision_path), "--size", "nano", "--text-encoder", str(reference["text"])]
    argv += ["--tokenizer", str(reference["encoder_folder"]), "-o", str(tmp_path / "out")]
    assert importer.main(argv) != 0
    error = capsys.readouterr().err
    assert error.startswith("sat-import: error:") and "1 missing (mask_embed_proj.2.bias)" in error
    assert not (tmp_path / "out").exists()


def test_a_file_of_the_other_size_is_named() -> None:
    nano_keys = dict.fromkeys(importer.vision_key_map(get_config("nano-reference")).expected)
    assert importer.size_hint(nano_keys, "pro-reference", deep_supervision=True) == " (the keys fit --size nano)"
    assert importer.size_hint(nano_keys, "nano-reference", deep_supervision=True) == ""


def test_help_teaches_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        importer.main(["--help"])
    assert exited.value.code == 0
    assert "sat-import --vision SAT_Nano_UNET.pth --size nano" in capsys.readouterr().out


def leave_mark(path: str) -> None:
    Path(path).touch()


class Payload:
    """Unpickling it outside ``weights_only`` runs code: it touches a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return leave_mark, (str(self.path),)


def test_files_needing_arbitrary_objects_are_refused(reference: dict[str, Any], tmp_path: Path) -> None:
    mark = tmp_path / "code-ran"
    path = tmp_path / "SAT_Nano_UNET.pth"
    torch.save({"model_state_dict": reference["vision_state"], "args": Payload(mark)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        importer.read_reference_state(path)
    assert not mark.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert mark.exists()


def test_reference_tokenizer_wraps_pads_with_zero_and_masks_ids_above_zero(imported: Path) -> None:
    encoder_folder = imported / importer.TEXT_ENCODER_FOLDER
    assert (encoder_folder / REFERENCE_RULES_FILE).is_file()
    tokens = PromptTokenizer(encoder_folder)(PROMPTS)
    assert tokens["input_ids"].tolist() == PROMPT_IDS
    assert tokens["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_wrap_and_pad_cuts_long_prompts_and_masks_id_zero() -> None:
    batch = wrap_and_pad([[7, 8, 9, 10], [0, 7]], start_id=5, end_id=6, max_length=4)
    assert batch["input_ids"].tolist() == [[5, 7, 8, 6], [5, 0, 7, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 1, 1]]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64


def test_saved_tokenizer_keeps_the_reference_rules(imported: Path, tmp_path: Path) -> None:
    saved = PromptTokenizer(imported / importer.TEXT_ENCODER_FOLDER).save(tmp_path / "tokenizer")
    assert PromptTokenizer(saved)(PROMPTS)["input_ids"].tolist() == PROMPT_IDS


def test_the_imported_checkpoint_states_the_reference_preprocessing(imported: Path) -> None:
    """The spec travels with the weights: the reference's own crop rule, stated where it departs from ours."""
    spec = read_metadata(imported).spec
    assert spec is not None and spec.preprocess.ct_foreground_hu == 0.0
    assert spec.preprocess.ct_window_hu == DEFAULT_PREPROCESS.ct_window_hu
    assert "> 0 HU" in spec.notes["ct_foreground_hu"] and spec.trained_terms is None
    assert spec.window.patch_size == ARCH.patch_size


def downloads_folder(reference: dict[str, Any], folder: Path) -> Path:
    """The published files as a user downloads them into one folder (the names of the reference's release)."""
    folder.mkdir()
    shutil.copy(reference["vision"], folder / "SAT_Nano_UNET.pth")
    shutil.copy(reference["text"], folder / "text_encoder.pth")
    shutil.copytree(reference["encoder_folder"], folder / "BioLORD-2023-C")
    return folder


def test_a_folder_without_the_published_files_is_refused_in_one_line(
    reference: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    downloads = downloads_folder(reference, tmp_path / "downloads")
    (downloads / "text_encoder.pth").unlink()
    assert importer.main(["--folder", str(downloads), "--size", "nano", "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "it holds SAT_Nano_UNET.pth, BioLORD-2023-C" in error
    with pytest.raises(SystemExit):  # --folder and the files named one by one exclude each other
        importer.main(["--folder", str(downloads), "--vision", "x.pth", "--size", "nano", "-o", "out"])


def test_the_published_files_go_through_import_export_and_serve_as_just_serve_published_runs_them(
    reference: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``just serve-published`` runs, on upstream-format files at tiny widths with random weights:
    ``sat-import --folder``, ``sat-export`` (its parity gates), the real ``tritonserver``, and a first request
    whose masks lie on the input's grid."""
    pytest.importorskip("pytriton", reason="serving needs the serve extra (nvidia-pytriton)")
    from satseg.phantom import centred_affine, make_torso_phantom
    from satseg.server.triton import TritonServer
    from satseg_clients.sat_client import SATClient
    from satseg_export.build_repo import main as export_main

    monkeypatch.setattr(importer, "get_config", lambda name: ARCH)  # --size nano, at the test's widths
    downloads = downloads_folder(reference, tmp_path / "downloads")
    checkpoint = tmp_path / "checkpoints" / "sat-nano"
    assert importer.main(["--folder", str(downloads), "--size", "nano", "-o", str(checkpoint)]) == 0
    repository = tmp_path / "triton_repo"
    sizes = ["--random-patches", "1", "--real-patches", "1"]  # the gates run; fewer windows than by default
    assert export_main([str(checkpoint), "--repository", str(repository), *sizes]) == 0
    shape = (40, 32, 24)
    volume, _, _ = make_torso_phantom(shape, centred_affine(shape, (8.0, 8.0, 8.0), 0.0))
    with TritonServer(repository, log_path=tmp_path / "tritonserver.log") as server:
        result = SATClient(server.grpc_url).segment(volume, ["liver", "left kidney"], modality="ct")
    assert result.result.masks.shape == (2, *shape)
