"""Knowledge injection into the text encoder (training/pretrain_text.py)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from satseg.checkpoint import load_text_pretraining
from satseg.model import build_sat
from satseg.model.text_tower import load_hf_encoder
from satseg.text import DEFAULT_TEXT_ENCODER, resolve_text_encoder, tensor_sha256
from satseg_training.knowledge import KnowledgeTree, Pair
from satseg_training.pretrain_text import (
    DEFAULT_CONFIG,
    batch_count,
    batches,
    freeze_all_but_top_layers,
    hold_out_synonyms,
    load_config,
    main,
    multi_positive_info_nce,
    positive_mask,
    pretrain,
    recall_at,
    training_pairs,
    whole_words,
)


@pytest.fixture(scope="module")
def tree() -> KnowledgeTree:
    return KnowledgeTree.load()


# --- data ------------------------------------------------------------------------------------------


def test_held_out_synonyms_are_seeded_and_sized(tree: KnowledgeTree) -> None:
    held_out = hold_out_synonyms(tree, 0.15, seed=0)
    synonyms = sum(len(concept.synonyms) for concept in tree.concepts)
    assert len(held_out) == round(0.15 * synonyms)
    assert held_out == hold_out_synonyms(tree, 0.15, seed=0)
    assert held_out != hold_out_synonyms(tree, 0.15, seed=1)
    assert all(synonym in tree[term].synonyms for synonym, term in held_out.items())


def test_held_out_synonyms_never_reach_training(tree: KnowledgeTree) -> None:
    held_out = hold_out_synonyms(tree, 0.15, seed=0)
    pairs = training_pairs(tree.pairs(), held_out)
    assert 0.6 * len(tree.pairs()) < len(pairs) < len(tree.pairs())
    texts = {whole_words(pair.positive) for pair in pairs}
    for synonym in held_out:
        assert not any(whole_words(synonym) in text for text in texts), synonym
    assert {pair.kind for pair in pairs} == {"definition", "synonym", "is_a", "part_of"}


@pytest.mark.parametrize(("count", "size", "expected"), [(10, 4, 3), (9, 4, 2), (8, 4, 2), (1, 4, 0), (5, 2, 2)])
def test_batches_cover_the_pairs_without_a_lone_last_pair(count: int, size: int, expected: int) -> None:
    pairs = [Pair(f"term {i}", f"text {i}", "synonym") for i in range(count)]
    cut = list(batches(pairs, size, torch.Generator().manual_seed(0)))
    assert len(cut) == batch_count(count, size) == expected
    assert all(1 < len(batch) <= size for batch in cut)
    seen = [pair for batch in cut for pair in batch]
    assert len(set(seen)) == len(seen) >= count - 1


def test_identical_texts_of_two_terms_are_both_positives() -> None:
    batch = [
        Pair("femur", "a kind of bone", "is_a"),
        Pair("humerus", "a kind of bone", "is_a"),
        Pair("femur", "thigh bone", "synonym"),
        Pair("liver", "part of the digestive system", "part_of"),
    ]
    known = frozenset((pair.anchor, pair.positive) for pair in batch)
    expected = [
        [True, True, True, False],
        [True, True, False, False],
        [True, True, True, False],
        [False, False, False, True],
    ]
    assert positive_mask(batch, known).tolist() == expected


# --- loss and metric -------------------------------------------------------------------------------


def test_info_nce_with_one_positive_each_is_symmetric_cross_entropy() -> None:
    torch.manual_seed(0)
    anchors = F.normalize(torch.randn(6, 8), dim=-1)
    positives = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(math.log(10.0))
    loss = multi_positive_info_nce(anchors, positives, torch.eye(6, dtype=torch.bool), scale)
    logits = 10.0 * anchors @ positives.T
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(loss, expected)


def test_info_nce_rewards_all_positives_and_clamps_the_scale() -> None:
    anchors = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    mask = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    scale = torch.tensor(math.log(1000.0), requires_grad=True)  # clamped to 100
    aligned = multi_positive_info_nce(anchors, anchors, mask, scale)
    # Rows 0 and 1 split their probability over two equal positives (log 2 each), row 2 is certain.
    assert math.isclose(aligned.item(), 2 / 3 * math.log(2.0), rel_tol=1e-4)
    swapped = multi_positive_info_nce(anchors, anchors.flip(0), mask, scale)
    assert swapped > aligned
    aligned.backward()
    assert scale.grad is not None and scale.grad.item() == 0.0  # beyond the clamp, the scale is not pushed


def test_recall_at_counts_ties_against_the_query() -> None:
    candidates = torch.eye(6)
    queries = torch.stack([candidates[0], candidates[1] + 0.5 * candidates[2], candidates[3] + candidates[4]])
    targets = torch.tensor([0, 2, 3])  # right, second, tied for first
    assert recall_at(F.normalize(queries, dim=-1), candidates, targets) == {"recall@1": 1 / 3, "recall@5": 1.0}


# --- settings and encoder --------------------------------------------------------------------------


def test_config_file_and_overrides(tmp_path: Path) -> None:
    defaults = load_config(DEFAULT_CONFIG, {})
    assert (defaults.encoder, defaults.top_layers, defaults.epochs) == (DEFAULT_TEXT_ENCODER, 2, 6)
    overridden = load_config(DEFAULT_CONFIG, {"epochs": 1, "lr": None})
    assert overridden == dataclasses.replace(defaults, epochs=1)
    unknown = tmp_path / "bad.toml"
    unknown.write_text("epochs = 1\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError, match=r"unknown settings \[learning_rate\], missing \[batch_size, encoder"):
        load_config(unknown, {})
    with pytest.raises(ValueError, match="holdout_fraction"):
        load_config(DEFAULT_CONFIG, {"holdout_fraction": 1.5})


def test_only_the_top_layers_train() -> None:
    encoder = load_hf_encoder(resolve_text_encoder(DEFAULT_TEXT_ENCODER), pretrained=False)
    assert freeze_all_but_top_layers(encoder, 2) == ("encoder.layer.4.", "encoder.layer.5.")
    trainable = {name for name, parameter in encoder.named_parameters() if parameter.requires_grad}
    assert trainable and all(name.startswith(("encoder.layer.4.", "encoder.layer.5.")) for name in trainable)
    assert "embeddings.word_embeddings.weight" not in trainable
    with pytest.raises(ValueError, match="has 6 layers"):
        freeze_all_but_top_layers(encoder, 7)


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("--top-layers", "held-out", "recall@1", "text_encoder_layers.safetensors", "load_text_pretraining"):
        assert phrase in text


def test_bad_config_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = \n")
    with pytest.raises(SystemExit) as exited:
        main(["--output", str(tmp_path / "out"), "--config", str(bad)])
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


# --- a short run -----------------------------------------------------------------------------------


def test_pretraining_smoke(tmp_path: Path, tree: KnowledgeTree) -> None:
    output = tmp_path / "text"
    config = load_config(DEFAULT_CONFIG, {"epochs": 1, "max_pairs": 96, "batch_size": 32})
    metrics = pretrain(config, output, tree)

    assert math.isfinite(metrics["final_loss"]) and metrics["train_pairs"] == 96
    for stage in ("before", "after"):
        assert set(metrics[stage]) == {"recall@1", "recall@5"}
        assert 0.0 <= metrics[stage]["recall@1"] <= metrics[stage]["recall@5"] <= 1.0
    assert metrics["candidate_terms"] == len(tree)

    described = json.loads((output / "config.json").read_text())
    assert set(described) == {"base", "base_sha256", "trained_prefixes", "metrics", "seed", "epochs", "lr"}
    assert described["trained_prefixes"] == ["encoder.layer.4.", "encoder.layer.5."]
    base = load_hf_encoder(resolve_text_encoder(DEFAULT_TEXT_ENCODER))
    assert described["base"] == DEFAULT_TEXT_ENCODER
    assert described["base_sha256"] == tensor_sha256(base.state_dict())
    assert described["metrics"] == json.loads((output / "metrics.json").read_text()) == metrics

    layers = load_file(str(output / "text_encoder_layers.safetensors"))
    expected = {key for key in base.state_dict() if key.startswith(("encoder.layer.4.", "encoder.layer.5."))}
    assert set(layers) == expected
    changed = [key for key in expected if not torch.equal(layers[key], base.state_dict()[key])]
    assert changed, "training changed no weight"

    # The segmentation side accepts exactly this folder.
    model = build_sat("tiny")
    assert load_text_pretraining(model, output) == ("encoder.layer.4.", "encoder.layer.5.")
