"""Checkpoints load strictly or not at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DEMO_CHECKPOINT
from safetensors.torch import load_file, save_file

from satseg.checkpoint import (
    CONFIG_FILE,
    TEXT_PRETRAINING_WEIGHTS,
    WEIGHTS_FILE,
    load_checkpoint,
    load_text_pretraining,
    read_metadata,
    save_checkpoint,
)
from satseg.cli.checkpoint import main as checkpoint_cli
from satseg.errors import CheckpointError
from satseg.model import SAT, build_sat
from satseg.spec import default_spec
from satseg.text import DEFAULT_TEXT_ENCODER, Vocabulary, tensor_sha256
from satseg.text.encoder_source import encoder_in_checkpoint, encoder_relative_to


@pytest.fixture(scope="module")
def tiny_model() -> SAT:
    torch.manual_seed(0)
    return build_sat("tiny").eval()


@pytest.fixture
def saved(tiny_model: SAT, tmp_path: Path) -> Path:
    return save_checkpoint(tiny_model, tmp_path / "ckpt", vocabulary_sha256=Vocabulary.load().sha256)


def test_round_trip_reproduces_logits(tiny_model: SAT, saved: Path) -> None:
    loaded, metadata = load_checkpoint(saved)
    assert metadata.config == tiny_model.config
    size = tiny_model.config.patch_size
    image, queries = torch.randn(1, 1, *size), torch.randn(1, 2, tiny_model.config.d_model)
    with torch.inference_mode():
        assert torch.equal(tiny_model.vision(image, queries), loaded.vision(image, queries))


def test_fp16_checkpoint_is_half_size_and_close(tiny_model: SAT, saved: Path, tmp_path: Path) -> None:
    half = save_checkpoint(tiny_model, tmp_path / "half", vocabulary_sha256="x", dtype=torch.float16)
    assert (half / WEIGHTS_FILE).stat().st_size < 0.55 * (saved / WEIGHTS_FILE).stat().st_size
    loaded, metadata = load_checkpoint(half)
    assert metadata.weights_dtype == "float16"
    assert next(loaded.vision.parameters()).dtype == torch.float32
    size = tiny_model.config.patch_size
    image, queries = torch.randn(1, 1, *size), torch.randn(1, 2, tiny_model.config.d_model)
    with torch.inference_mode():
        torch.testing.assert_close(tiny_model.vision(image, queries), loaded.vision(image, queries), atol=2e-2, rtol=0)


def test_text_encoder_is_not_stored(saved: Path) -> None:
    keys = load_file(str(saved / WEIGHTS_FILE)).keys()
    assert not any(key.startswith("text.encoder.") for key in keys)
    assert any(key.startswith("text.projection.") for key in keys)
    assert json.loads((saved / CONFIG_FILE).read_text())["text_encoder"]["identity"] == "minilm-l6"


def rewrite_weights(folder: Path, change) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE))


def test_missing_key_is_refused_with_its_name(saved: Path) -> None:
    rewrite_weights(saved, lambda tensors: tensors.pop("vision.mask_head.mlp.0.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing \(vision\.mask_head\.mlp\.0\.weight\)"):
        load_checkpoint(saved)


def test_unexpected_keys_are_refused_and_listed(saved: Path) -> None:
    def add_prefixed_copies(tensors: dict[str, torch.Tensor]) -> None:
        for key in list(tensors)[:10]:
            tensors["module." + key] = tensors.pop(key)

    rewrite_weights(saved, add_prefixed_copies)
    with pytest.raises(CheckpointError, match=r"10 missing .* and 2 more\); 10 unexpected \(module\."):
        load_checkpoint(saved)


def test_wrong_shape_is_refused(saved: Path) -> None:
    rewrite_weights(saved, lambda tensors: tensors.__setitem__("vision.mask_head.mlp.2.bias", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"vision\.mask_head\.mlp\.2\.bias"):
        load_checkpoint(saved)


def test_size_mismatch_between_config_and_weights_is_refused(saved: Path, tmp_path: Path) -> None:
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["model_config"]["unet_channels"] = [8, 16, 32, 64, 96, 160]
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shapes do not match"):
        load_checkpoint(saved)


def test_a_spec_window_that_disagrees_with_the_model_config_is_refused(
    saved: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["spec"] = default_spec((48, 48, 32), Vocabulary.load(), None).to_json()  # the model_config: 96x96x32
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"patch_size \[96, 96, 32\] but spec\.window\.patch_size \[48, 48, 32\]"):
        load_checkpoint(saved)
    assert checkpoint_cli(["info", str(saved)]) != 0
    refusal = capsys.readouterr().err.strip()
    assert len(refusal.splitlines()) == 1 and "window sizes disagree" in refusal


def test_other_text_encoder_weights_are_refused(saved: Path) -> None:
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["text_encoder"]["sha256"] = "0" * 64
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="text encoder 'minilm-l6' has weights sha256"):
        load_checkpoint(saved)


def test_truncated_weights_give_a_clear_error(saved: Path) -> None:
    weights = saved / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="could not read"):
        load_checkpoint(saved)


def test_missing_folder_and_foreign_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"expected a folder with config\.json"):
        read_metadata(tmp_path / "nowhere")
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model_state_dict": {}}))
    with pytest.raises(CheckpointError, match="import_sat"):
        read_metadata(tmp_path)


def test_cli_init_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "fresh"
    assert checkpoint_cli(["init", "--size", "tiny", "--output", str(target), "--fp16"]) == 0
    assert checkpoint_cli(["init", "--size", "tiny", "--output", str(target), "--if-missing"]) == 0
    assert "kept it" in capsys.readouterr().out
    assert checkpoint_cli(["info", str(target)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_size"] == "tiny" and info["extra"]["trained"] is False
    assert info["vocabulary_matches_this_install"] is True
    assert checkpoint_cli(["info", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("sat-checkpoint: error: no checkpoint at")


def pretrained_layers(model: SAT, folder: Path, prefixes: tuple[str, ...]) -> Path:
    """What training/pretrain_text.py writes: changed top layers and their base's hash."""
    folder.mkdir()
    base = tensor_sha256(model.text.encoder.state_dict())
    layers = {key: value + 0.01 for key, value in model.text.encoder.state_dict().items() if key.startswith(prefixes)}
    save_file(layers, str(folder / TEXT_PRETRAINING_WEIGHTS))
    config = {"base": "minilm-l6", "base_sha256": base, "trained_prefixes": list(prefixes)}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


def test_knowledge_pretrained_layers_travel_with_the_checkpoint(tmp_path: Path) -> None:
    model = build_sat("tiny")
    prefixes = ("encoder.layer.5.",)
    assert load_text_pretraining(model, pretrained_layers(model, tmp_path / "pre", prefixes)) == prefixes
    saved = save_checkpoint(model, tmp_path / "ckpt", vocabulary_sha256="x", dtype=torch.float16)
    keys = load_file(str(saved / WEIGHTS_FILE)).keys()
    encoder_keys = {key for key in keys if key.startswith("text.encoder.")}
    assert encoder_keys and all(key.startswith("text.encoder.encoder.layer.5.") for key in encoder_keys)
    loaded, metadata = load_checkpoint(saved)
    assert metadata.trained_encoder_prefixes == prefixes
    for key, value in model.text.encoder.state_dict().items():
        torch.testing.assert_close(loaded.text.encoder.state_dict()[key], value, atol=1e-2, rtol=0)
    fresh = build_sat("tiny")
    assert not torch.equal(
        fresh.text.encoder.state_dict()["encoder.layer.5.output.dense.weight"],
        loaded.text.encoder.state_dict()["encoder.layer.5.output.dense.weight"],
    )


def test_text_pretraining_from_another_base_is_refused(tmp_path: Path) -> None:
    model = build_sat("tiny")
    folder = pretrained_layers(model, tmp_path / "pre", ("encoder.layer.5.",))
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["base_sha256"] = "f" * 64
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="the trained layers were made from ffffffffffff"):
        load_text_pretraining(model, folder)


def test_the_bundled_demo_model_is_small_fp16_trained_and_loads() -> None:
    from satseg.checkout import BUNDLED_CHECKPOINT

    weights = BUNDLED_CHECKPOINT / "model.safetensors"
    assert weights.stat().st_size <= 30 * 1024 * 1024
    assert {tensor.dtype for tensor in load_file(str(weights)).values()} == {torch.float16}
    assert (BUNDLED_CHECKPOINT / "README.md").is_file()  # the model card
    model, metadata = load_checkpoint(BUNDLED_CHECKPOINT)
    assert metadata.extra["trained"] is True and metadata.extra["steps"] > 0
    assert {"liver", "spleen", "left kidney", "right kidney", "cerebral white matter"} <= set(
        metadata.extra["trained_terms"]
    )
    # The base text encoder is referenced, not copied: only the knowledge-pretrained top layers are stored.
    encoder_keys = {key for key in load_file(str(weights)) if key.startswith("text.encoder.")}
    top_layers = ("text.encoder.encoder.layer.4.", "text.encoder.encoder.layer.5.")
    assert encoder_keys and all(key.startswith(top_layers) for key in encoder_keys)
    assert metadata.vocabulary_sha256 == Vocabulary.load().sha256
    assert isinstance(model, SAT)


def test_a_relative_encoder_is_the_checkpoints_only_if_it_holds_that_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tmp_path / "ckpt"
    (checkpoint / "text_encoder").mkdir(parents=True)
    (checkpoint / DEFAULT_TEXT_ENCODER).mkdir()
    (tmp_path / "cwd" / "encoders" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    inside = str((checkpoint / "text_encoder").resolve())
    assert encoder_in_checkpoint("text_encoder", checkpoint) == inside
    assert encoder_in_checkpoint("./text_encoder", checkpoint) == inside
    assert encoder_in_checkpoint(DEFAULT_TEXT_ENCODER, checkpoint) == DEFAULT_TEXT_ENCODER  # identities win
    assert encoder_in_checkpoint("encoders/mine", checkpoint) == "encoders/mine"  # still relative to the cwd
    assert encoder_in_checkpoint("../cwd", checkpoint) == "../cwd"  # not inside the checkpoint
    assert encoder_in_checkpoint(".", checkpoint) == "."  # the checkpoint itself is no encoder
    assert encoder_in_checkpoint("/elsewhere/enc", checkpoint) == "/elsewhere/enc"


def test_an_encoder_inside_the_checkpoint_is_saved_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = tmp_path / "ckpt"
    (checkpoint / "text_encoder").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    assert encoder_relative_to(str(checkpoint / "text_encoder"), checkpoint) == "text_encoder"
    assert encoder_relative_to("ckpt/text_encoder", Path("ckpt")) == "text_encoder"
    assert encoder_relative_to(str(tmp_path / "other"), checkpoint) == str(tmp_path / "other")
    assert encoder_relative_to(str(checkpoint), checkpoint) == str(checkpoint)
    assert encoder_relative_to(DEFAULT_TEXT_ENCODER, checkpoint) == DEFAULT_TEXT_ENCODER


def test_cli_dice_states_measured_dice_from_evaluations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each trained term takes the input-grid Dice of the first evaluation that scored it; the weights stay."""
    target = tmp_path / "demo"
    shutil.copytree(DEMO_CHECKPOINT, target)
    weights = (target / WEIGHTS_FILE).read_bytes()
    trained = read_metadata(target).spec.trained_terms  # type: ignore[union-attr]
    assert trained and "liver" in trained and "spleen" in trained

    def evaluation(path: Path, means: list[tuple[str, str, float]]) -> Path:
        items = [{"geometry": g, "structure": s, "cases": 1, "dice": {"candidate": d}} for g, s, d in means]
        path.write_text(json.dumps({"structure_means": items}))
        return path

    first = evaluation(tmp_path / "first.json", [("oblique15", "liver", 0.1), ("input", "liver", 0.5004)])
    second = evaluation(tmp_path / "second.json", [("input", "liver", 0.9), ("input", "spleen", 0.25)])
    assert checkpoint_cli(["dice", str(target), str(first), str(second)]) == 0
    spec = read_metadata(target).spec
    assert spec is not None and spec.trained_terms is not None
    assert spec.trained_terms["liver"] == 0.5 and spec.trained_terms["spleen"] == 0.25
    assert set(spec.trained_terms) == set(trained)  # no term added or lost
    assert "first.json" in spec.notes["dice"] and (target / WEIGHTS_FILE).read_bytes() == weights
    capsys.readouterr()
    (tmp_path / "other.json").write_text("{}")
    assert checkpoint_cli(["dice", str(target), str(tmp_path / "other.json")]) == 2
    assert "is not an evaluation.json" in capsys.readouterr().err
