"""Segmentation training: losses, schedule, config, patches and prompts, frozen-encoder queries, exact resume."""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import satseg_training.data.synthseg as synthseg
from satseg.checkpoint import CONFIG_FILE, TEXT_PRETRAINING_WEIGHTS, load_checkpoint
from satseg.errors import SatInputError
from satseg.model import build_sat
from satseg.model.sat import SAT
from satseg.phantom import centred_affine, make_torso_phantom
from satseg.text import PromptTokenizer, Term, Vocabulary, resolve_text_encoder, tensor_sha256
from satseg_training.config import DataSettings, load_config, parse_override
from satseg_training.data.readers import labelmap_case, synthseg_cases
from satseg_training.data.standardise import standardise
from satseg_training.data.synthseg import synthesize_image
from satseg_training.losses import (
    DEEP_SUPERVISION_WEIGHTS,
    deep_supervision_loss,
    downsample_targets,
    segmentation_loss,
    soft_dice_loss,
)
from satseg_training.patches import (
    PatchDataset,
    PhantomPool,
    collate_patches,
    crop,
    crop_start,
    pick_prompts,
    sampling_weights,
    standardised_pools,
)
from satseg_training.queries import PromptedSegmentation
from satseg_training.train import learning_rate_factor, main

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
SMALL_PATCH = (64, 64, 32)


# --- losses -------------------------------------------------------------------------------------------


def _targets() -> torch.Tensor:
    """``[2, 3, 16, 16, 8]`` binary masks: boxes of different sizes, the last prompt of sample 1 empty."""
    targets = torch.zeros(2, 3, 16, 16, 8)
    targets[0, 0, 2:10, 2:10, 1:5] = 1
    targets[0, 1, 8:16, 4:12, 2:8] = 1
    targets[0, 2, 5:6, 5:6, 3:4] = 1
    targets[1, 0, :, :, :4] = 1
    targets[1, 1, 3:7, 3:7, 3:7] = 1
    return targets


def test_perfect_prediction_gives_a_low_loss_and_a_wrong_one_a_high_loss() -> None:
    targets = _targets()
    valid = torch.ones(2, 3, dtype=torch.bool)
    perfect = deep_supervision_loss(20.0 * (2 * targets - 1), targets, valid)
    assert perfect.total < 1e-3 and perfect.dice < 1e-3 and perfect.bce < 1e-3
    inverted = deep_supervision_loss(-20.0 * (2 * targets - 1), targets, valid)
    assert inverted.dice > 0.9 and inverted.bce > 10


def test_dice_term_matches_a_hand_computation() -> None:
    """Logits 0 give p = 0.5 everywhere: Dice loss = 1 - (2 * 0.5 * k + 1) / (0.5 * V + k + 1)."""
    targets = _targets()
    voxels = 16 * 16 * 8
    loss = soft_dice_loss(torch.zeros_like(targets), targets)
    for b in range(2):
        for n in range(3):
            k = float(targets[b, n].sum())
            assert loss[b, n].item() == pytest.approx(1 - (k + 1) / (0.5 * voxels + k + 1), rel=1e-6)
    # An empty target predicted empty costs nothing; predicted full it costs almost 1.
    empty = torch.zeros(1, 1, 4, 4, 4)
    assert soft_dice_loss(torch.full_like(empty, -30.0), empty).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(torch.full_like(empty, 30.0), empty).item() == pytest.approx(1 - 1 / 65, rel=1e-6)


def test_padding_prompts_change_neither_the_loss_nor_the_gradients() -> None:
    targets = _targets()[:, :2]
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 16, 16, 8, requires_grad=True)
    reference = segmentation_loss(logits, targets, torch.ones(2, 2, dtype=torch.bool))
    padded_logits = torch.cat([logits, 50 * torch.randn(2, 1, 16, 16, 8)], dim=1).detach().requires_grad_()
    padded_targets = torch.cat([targets, torch.ones(2, 1, 16, 16, 8)], dim=1)
    valid = torch.tensor([[True, True, False], [True, True, False]])
    padded = segmentation_loss(padded_logits, padded_targets, valid)
    torch.testing.assert_close(padded.total, reference.total)
    padded.total.backward()
    assert torch.all(padded_logits.grad[:, 2] == 0)
    assert torch.any(padded_logits.grad[:, :2] != 0)


def test_deep_supervision_weights_and_max_pooled_targets() -> None:
    targets = torch.zeros(1, 1, 16, 16, 8)
    targets[0, 0, 5, 6, 3] = 1  # one voxel: still visible at /8 with max-pooling
    assert downsample_targets(targets, (2, 2, 1))[0, 0, 0, 0, 0] == 1
    assert downsample_targets(targets, (2, 2, 1)).sum() == 1
    torch.manual_seed(1)
    outputs = [torch.randn(1, 1, 16 // s, 16 // s, 8 // s) for s in (1, 2, 4, 8)]
    valid = torch.ones(1, 1, dtype=torch.bool)
    levels = [segmentation_loss(o, downsample_targets(targets, o.shape[2:]), valid).total for o in outputs]
    expected = sum(w * level for w, level in zip(DEEP_SUPERVISION_WEIGHTS, levels, strict=True)) / 1.875
    torch.testing.assert_close(deep_supervision_loss(outputs, targets, valid).total, expected)
    torch.testing.assert_close(deep_supervision_loss(outputs[0], targets, valid).total, levels[0])


def test_learning_rate_warms_up_then_follows_a_cosine() -> None:
    factor = [learning_rate_factor(step, 4, 20, 0.01) for step in range(21)]
    assert factor[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factor[4] == pytest.approx(1.0)
    assert factor[12] == pytest.approx(0.01 + 0.99 * 0.5)
    assert factor[20] == pytest.approx(0.01)
    assert all(a >= b for a, b in itertools.pairwise(factor[4:]))
    assert learning_rate_factor(0, 0, 10, 0.0) == 1.0


# --- config -------------------------------------------------------------------------------------------


def test_configs_load_and_overrides_are_typed() -> None:
    smoke = load_config(CONFIGS / "smoke.toml", ["train.steps=3", "model.patch_size=[64,64,32]"])
    assert smoke.train.steps == 3 and smoke.model.sat_config().patch_size == (64, 64, 32)
    assert smoke.data.phantom and smoke.train.mixed_precision is None
    demo = load_config(CONFIGS / "demo.toml")
    assert demo.model.size == "tiny" and len(demo.data.holdout) == 4 and demo.data.roots
    stage4 = load_config(CONFIGS / "demo_t1.toml")
    assert stage4.data.t1_contrast_probability == 0.5 and demo.data.t1_contrast_probability == 0.0
    with pytest.raises(SatInputError, match=r"data\.t1_contrast_probability must be in \[0, 1\]"):
        load_config(CONFIGS / "smoke.toml", ["data.t1_contrast_probability=1.5"])
    assert parse_override("train.mixed_precision=bf16") == ("train", "mixed_precision", "bf16")
    assert parse_override("train.learning_rate=1e-4") == ("train", "learning_rate", 1e-4)
    with pytest.raises(SatInputError, match=r"unknown key\(s\) \['step'\] in \[train\]"):
        load_config(CONFIGS / "smoke.toml", ["train.step=3"])
    with pytest.raises(SatInputError, match=r"train\.steps = '4': expected a value of type int"):
        load_config(CONFIGS / "smoke.toml", ['train.steps="4"'])
    assert load_config(CONFIGS / "smoke.toml", ["data.weights={phantom=2}"]).data.weights == {"phantom": 2.0}
    with pytest.raises(SatInputError, match=r"data\.weights = \{'phantom': 'x'\}: expected"):
        load_config(CONFIGS / "smoke.toml", ['data.weights={phantom="x"}'])
    with pytest.raises(SatInputError, match="must be divisible by 32"):
        load_config(CONFIGS / "smoke.toml", ["model.patch_size=[64,64,30]"])
    with pytest.raises(SatInputError, match="leaves 1 bottleneck voxel"):
        load_config(CONFIGS / "smoke.toml", ["model.patch_size=[32,32,32]"])
    with pytest.raises(SatInputError, match=r"not section\.key=value"):
        parse_override("steps=3")


def test_demo_stages_chain_in_the_justfile() -> None:
    """``just train-demo`` runs stages that each start from the previous one's checkpoint, ``bundle-demo`` defaults
    to the last stage's and ``evaluate-demo`` to the bundled model: a stage added or renamed in one place only
    fails here."""
    justfile = (CONFIGS.parents[1] / "Justfile").read_text()
    recipe = justfile.split("\ntrain-demo:", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
    stages = re.findall(r"--config (\S+) --output (\S+)(?:\s+'?model\.init_from=\"([^\"]+)\"'?)?", recipe)
    assert len(stages) >= 2
    previous = None
    for config_path, output, override in stages:
        config = load_config(CONFIGS.parents[1] / config_path)
        init_from = override or config.model.init_from
        if previous is not None:
            assert init_from == f"{previous}/checkpoint", f"{config_path} starts from {init_from}"
        previous = output
    last = f'checkpoint="{previous}/checkpoint"'
    assert f"bundle-demo {last}" in justfile
    assert 'evaluate-demo checkpoint="models/demo"' in justfile


# --- patches and prompts ------------------------------------------------------------------------------


def test_crop_pads_short_axes_and_prompts_are_capped() -> None:
    rng = np.random.default_rng(0)
    array = np.arange(4 * 10 * 3).reshape(4, 10, 3)
    start = crop_start(array.shape, (6, 6, 3), centre=(0, 9, 1), rng=rng)
    assert start[1] == 4 and start[2] == 0 and -2 <= start[0] <= 0
    edges = {crop_start((20, 20, 9), (8, 8, 3), None, rng, overhang=(4, 4, 1)) for _ in range(400)}
    assert min(start[0] for start in edges) == -4 and max(start[0] for start in edges) == 16  # past both edges
    assert {start[2] for start in edges} == set(range(-1, 8))
    # Centred on an edge voxel: the patch is centred on it (past the edge), not moved inside.
    assert crop_start((20, 20, 9), (8, 8, 3), centre=(0, 19, 4), rng=rng, overhang=(4, 4, 1))[:2] == (-4, 15)
    patch = crop(array, (-1, 4, 0), (6, 6, 3), fill=-7)
    assert patch.shape == (6, 6, 3)
    assert (patch[0] == -7).all() and (patch[5] == -7).all()
    np.testing.assert_array_equal(patch[1:5], array[:, 4:10])
    present = [f"t{i:02d}" for i in range(40)]
    positives, negatives = pick_prompts(present, ["a", "b", "c"], 32, rng)
    assert len(positives) == 32 and set(positives) <= set(present) and negatives == ["a", "b", "c"]
    assert pick_prompts([], ["a", "b"], 32, rng)[1] in (["a"], ["b"])
    assert pick_prompts(["x", "y", "z", "w"], ["a", "b", "c"], 32, rng)[1].__len__() == 2
    assert pick_prompts(["x", "y", "z", "w"], ["a", "b", "c"], 32, rng, negative_ratio=100)[1] == ["a", "b", "c"]
    assert len(pick_prompts(["x", "y", "z", "w"], ["a", "b", "c"], 32, rng, negative_ratio=0.0)[1]) == 1


def test_phantom_patches_are_deterministic_and_prompts_follow_the_labels() -> None:
    vocabulary = Vocabulary.load()
    terms = [term.name for term in vocabulary.terms]
    pool = PhantomPool()
    dataset = PatchDataset([pool], np.ones(1), terms, vocabulary, SMALL_PATCH, DataSettings(phantom=True), 4)
    first, again, other = dataset[0], dataset[0], dataset[1]
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["image"], other["image"])
    for sample in (first, other):
        assert sample["image"].shape == (1, *SMALL_PATCH) and sample["image"].dtype == torch.float32
        positive = sample["positive"]
        names = [terms[i] for i in sample["term_ids"].tolist()]
        assert all(sample["masks"][row].any() for row in range(len(names)) if positive[row])
        assert not sample["masks"][~positive].any()
        assert int((~positive).sum()) == max(1, int(positive.sum()) // 2)
        # Negatives are phantom organs (dataset pool) absent from the patch; positives are organs in it.
        assert set(names) <= pool.labelled_terms
        assert sample["modality"].item() == 0
    batch = collate_patches([first, other])
    prompts = max(len(first["term_ids"]), len(other["term_ids"]))
    assert batch["masks"].shape == (2, prompts, *SMALL_PATCH)
    assert batch["valid"].sum().item() == len(first["term_ids"]) + len(other["term_ids"])


def test_negatives_are_never_parents_of_present_terms() -> None:
    vocabulary = Vocabulary(
        [
            Term("kidney", (), ("ct",), "abdomen", ("left kidney", "right kidney")),
            Term("left kidney", (), ("ct",), "abdomen"),
            Term("right kidney", (), ("ct",), "abdomen"),
            Term("liver", (), ("ct",), "abdomen"),
            Term("brain", (), ("ct", "mri"), "head"),
        ]
    )
    terms = [term.name for term in vocabulary.terms]
    pool = SimpleNamespace(name="abdomen", size=1, labelled_terms=frozenset({"left kidney", "right kidney", "liver"}))
    for negatives, expected in (
        ("modality", ["brain", "liver", "right kidney"]),
        ("dataset", ["liver", "right kidney"]),
    ):
        settings = DataSettings(phantom=True, negatives=negatives)
        dataset = PatchDataset([pool], np.ones(1), terms, vocabulary, SMALL_PATCH, settings, 1)
        assert dataset.absent_terms(pool, "ct", {"left kidney"}) == expected
    # A crop holding every labelled term falls back to the modality's terms.
    assert dataset.absent_terms(pool, "ct", {"left kidney", "right kidney", "liver"}) == ["brain"]


@pytest.fixture(scope="module")
def standardised_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small phantom CTs (dataset "torso") and one label-only brain map (dataset "synthseg")."""
    folder = tmp_path_factory.mktemp("sources")
    names = folder / "names.json"
    names.write_text(json.dumps({"1": "liver", "2": "spleen", "3": "stomach", "4": "kidney_right", "5": "kidney_left"}))
    sources = []
    for seed in range(3):
        shape = (40, 40, 12)
        volume, labels, _ = make_torso_phantom(shape, centred_affine(shape, (4.0, 4.0, 8.0), 10.0 * seed), seed=seed)
        nib.save(nib.Nifti1Image(volume.array, volume.affine), folder / f"ct{seed}.nii.gz")
        nib.save(nib.Nifti1Image(labels, volume.affine), folder / f"ct{seed}_seg.nii.gz")
        sources.append(
            labelmap_case(
                folder / f"ct{seed}.nii.gz", folder / f"ct{seed}_seg.nii.gz", names, modality="ct", dataset="torso"
            )
        )
    brain = folder / "synthseg"
    brain.mkdir()
    (brain / "labels.json").write_text(json.dumps({"17": "left hippocampus", "53": "right hippocampus"}))
    head = np.zeros((40, 40, 30), dtype=np.float32)
    head[5:35, 5:35, 3:27] = 502  # unnamed extra-cerebral tissue: painted, never prompted
    head[10:20, 12:28, 8:22] = 17
    head[21:31, 12:28, 8:22] = 53
    nib.save(nib.Nifti1Image(head, np.diag([1.0, 1.0, 1.0, 1.0])), brain / "training_seg_01.nii.gz")
    sources += synthseg_cases(brain)
    root = tmp_path_factory.mktemp("standardised")
    result = standardise(sources, root, progress=False)
    assert not result.failed
    return root


def test_standardised_pools_weights_holdout_and_synthesis(
    standardised_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pools = standardised_pools([standardised_root], ["torso/ct2"], cached_cases=2)
    assert [(pool.name, pool.size) for pool in pools] == [("synthseg", 1), ("torso", 2)]
    assert pools[0].labelled_terms == {"left hippocampus", "right hippocampus"}
    weights = sampling_weights(pools, {})
    assert weights == pytest.approx(np.array([1.0, 1 / math.sqrt(2)]) / (1.0 + 1 / math.sqrt(2)))
    assert sampling_weights(pools, {"torso": 3.0}) == pytest.approx([0.25, 0.75])
    with pytest.raises(SatInputError, match="unknown datasets"):
        sampling_weights(pools, {"tosro": 1.0})
    with pytest.raises(SatInputError, match="holdout names cases in no manifest"):
        standardised_pools([standardised_root], ["torso/ct9"], cached_cases=2)

    vocabulary = Vocabulary.load()
    terms = [term.name for term in vocabulary.terms]
    settings = DataSettings(roots=(str(standardised_root),), positive_centre_probability=1.0)
    brain = PatchDataset(pools[:1], np.ones(1), terms, vocabulary, SMALL_PATCH, settings, 3)
    sample = brain[0]  # the map is 40x40x10 on the model grid: padded up to the patch
    image = sample["image"].numpy()
    assert image.shape == (1, *SMALL_PATCH) and np.isfinite(image).all()
    assert abs(float(image.mean())) < 1e-3 and float(image.std()) == pytest.approx(1.0, rel=1e-2)
    assert {terms[i] for i in sample["term_ids"][sample["positive"]].tolist()} == {
        "left hippocampus",
        "right hippocampus",
    }
    assert sample["modality"].item() == 1
    assert not torch.equal(brain[1]["image"], sample["image"])  # a new contrast per sample
    # The T1 prior reaches the real synthesis: wrapped only to see the ranges it is called with.
    calls: list[object] = []

    def recording(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(kwargs.get("mean_ranges"))
        return real_synthesis(*args, **kwargs)

    real_synthesis = synthseg.synthesize_image
    monkeypatch.setattr(synthseg, "synthesize_image", recording)
    for probability in (0.0, 1.0):
        t1_settings = DataSettings(positive_centre_probability=1.0, t1_contrast_probability=probability)
        PatchDataset(pools[:1], np.ones(1), terms, vocabulary, SMALL_PATCH, t1_settings, 3)[0]
    hippocampus = synthseg.T1_TISSUE_MEAN_RANGES["hippocampus"]
    assert calls[0] is None and calls[1] and set(calls[1].values()) == {hippocampus}  # type: ignore[union-attr]
    torso = PatchDataset(pools[1:], np.ones(1), terms, vocabulary, SMALL_PATCH, settings, 2)
    assert torso[0]["positive"].any()  # centred on a labelled voxel


def test_structures_limit_prompts_and_centring(standardised_root: Path) -> None:
    vocabulary = Vocabulary.load()
    terms = [term.name for term in vocabulary.terms]
    pools = standardised_pools([standardised_root], [], cached_cases=2)
    torso = [pool for pool in pools if pool.name == "torso"]
    # Prompts are normalised to their term; every crop is centred on the spleen, the only prompt.
    settings = DataSettings(roots=(str(standardised_root),), structures=("Spleen",), positive_centre_probability=1.0)
    dataset = PatchDataset(torso, np.ones(1), terms, vocabulary, SMALL_PATCH, settings, 6)
    for index in range(6):
        sample = dataset[index]
        assert [terms[i] for i in sample["term_ids"].tolist()] == ["spleen"]
        assert sample["positive"].all() and sample["masks"].any()
    # A listed parent is trained on the union of its labelled children; unlisted children are not prompted.
    settings = DataSettings(roots=(str(standardised_root),), structures=("kidney", "liver"))
    dataset = PatchDataset(torso, np.ones(1), terms, vocabulary, SMALL_PATCH, settings, 1)
    assert dataset.targets_of("left kidney") == ["kidney"] and dataset.targets_of("spleen") == []
    for index in range(40):
        sample = dataset[index]
        names = [terms[i] for i in sample["term_ids"].tolist()]
        assert set(names) <= {"kidney", "liver"}
        if "kidney" in names and sample["positive"][names.index("kidney")]:
            break
    else:
        pytest.fail("no crop in 40 held a kidney")
    kidneys = sample["masks"][names.index("kidney")].bool()
    assert kidneys.any()
    with pytest.raises(SatInputError, match="unknown prompt"):
        PatchDataset(torso, np.ones(1), terms, vocabulary, SMALL_PATCH, DataSettings(structures=("spleeen",)), 1)


def test_synthesis_strips_the_skull_in_some_samples() -> None:
    labels = np.zeros((32, 32, 12), np.uint16)
    labels[2:30, 2:30, 1:11] = 502  # head tissue
    labels[8:24, 8:24, 3:9] = 2  # brain
    brain = labels == 2
    stripped = 0
    for seed in range(16):
        image = synthesize_image(labels, np.random.default_rng(seed), brain=brain)
        outside = image[~brain]
        if np.ptp(outside) == 0:  # one value outside the brain: the zero before normalisation
            stripped += 1
            assert float(outside[0]) < float(np.median(image[brain])) or np.ptp(image[brain]) == 0
    assert 3 <= stripped <= 13
    with pytest.raises(ValueError, match="brain mask shape"):
        synthesize_image(labels, np.random.default_rng(0), brain=brain[:4])


# --- queries ------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, two spinning threads per process run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_sat() -> SAT:
    torch.manual_seed(0)
    return build_sat("tiny")


def test_queries_match_the_text_tower_and_only_trainable_parts_get_gradients(tiny_sat: SAT, one_thread: None) -> None:
    terms = ["liver", "left kidney", "right hippocampus"]
    tokenizer = PromptTokenizer(resolve_text_encoder(tiny_sat.config.text_encoder))
    model = PromptedSegmentation(tiny_sat, terms, tokenizer)
    encoder_hash = tensor_sha256(tiny_sat.text.encoder.state_dict())
    assert model.pooled.shape == (3, tiny_sat.config.text_hidden_size)
    tokens = tokenizer(terms)
    modality = torch.tensor([0, 0, 1])
    with torch.no_grad():
        expected = tiny_sat.text.eval()(tokens["input_ids"], tokens["attention_mask"], modality)
    queries = model.queries(torch.tensor([[0, 1, 2]]), torch.tensor([0]))
    queries_mri = model.queries(torch.tensor([[2]]), torch.tensor([1]))
    torch.testing.assert_close(queries[0, :2], expected[:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(queries_mri[0, 0], expected[2], atol=1e-5, rtol=1e-5)

    model.train()
    outputs = model(torch.randn(1, 1, *SMALL_PATCH), torch.tensor([[0, 2]]), torch.tensor([1]))
    assert isinstance(outputs, list) and [o.shape[-1] for o in outputs] == [32, 16, 8, 4]
    sum(output.mean() for output in outputs).backward()
    text = tiny_sat.text
    assert not any(name.startswith("encoder") for name, _ in model.named_parameters())
    assert all(parameter.grad is None for parameter in text.encoder.parameters())
    assert all(parameter.grad is not None for parameter in text.projection.parameters())
    assert text.modality_embedding.weight.grad[1].abs().sum() > 0
    assert text.modality_embedding.weight.grad[0].abs().sum() == 0
    assert tiny_sat.vision.mask_head.mlp[0].weight.grad is not None
    assert "pooled" not in model.state_dict()
    assert tensor_sha256(text.encoder.state_dict()) == encoder_hash


# --- the training entry point -------------------------------------------------------------------------


def _text_pretraining(folder: Path) -> Path:
    """What ``training/pretrain_text.py`` writes (see ``load_text_pretraining``): one changed top layer."""
    encoder = build_sat("tiny").text.encoder
    prefix = "encoder.layer.5."
    folder.mkdir()
    layers = {key: value + 0.01 for key, value in encoder.state_dict().items() if key.startswith(prefix)}
    save_file(layers, str(folder / TEXT_PRETRAINING_WEIGHTS))
    base = {"base": "minilm-l6", "base_sha256": tensor_sha256(encoder.state_dict()), "trained_prefixes": [prefix]}
    (folder / CONFIG_FILE).write_text(json.dumps(base))
    return folder


def _train(output: Path, *extra: str) -> int:
    overrides = ["train.steps=4", "model.patch_size=[64,32,32]", "train.gradient_accumulation=2"]
    return main(["--config", str(CONFIGS / "smoke.toml"), "--output", str(output), *extra, *overrides])


def test_resume_continues_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None) -> None:
    """4 steps straight and 2 steps + resume + 2 steps end with bit-identical weights and the same log."""
    pretraining = f"model.text_pretraining={json.dumps(str(_text_pretraining(tmp_path / 'text')))}"
    assert _train(tmp_path / "straight", pretraining) == 0
    assert _train(tmp_path / "split", pretraining, "--stop-after", "2") == 0
    assert not (tmp_path / "split" / "checkpoint").exists()
    assert _train(tmp_path / "split", pretraining) == 2
    assert "already holds training states; pass --resume" in capsys.readouterr().err
    assert _train(tmp_path / "split", pretraining, "--resume") == 0
    assert "resumed from" in capsys.readouterr().out

    straight = load_file(str(tmp_path / "straight" / "state" / "step_4" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "state" / "step_4" / "model.safetensors"))
    assert straight.keys() == split.keys()
    assert all(torch.equal(straight[key], split[key]) for key in straight)
    torch.manual_seed(0)  # the run's initialisation (train.seed = 0)
    initial = build_sat("tiny").vision.state_dict()
    assert not any(key.startswith("encoder") for key in straight)  # the frozen encoder is rebuilt, not saved
    assert not torch.equal(straight["vision.mask_head.mlp.0.weight"], initial["mask_head.mlp.0.weight"])

    def log(run: str) -> list[dict[str, str]]:
        with (tmp_path / run / "metrics.csv").open() as file:
            return list(csv.DictReader(file))

    assert [row["step"] for row in log("split")] == ["1", "2", "3", "4"]
    for ours, theirs in zip(log("straight"), log("split"), strict=True):
        assert (ours["loss"], ours["lr"]) == (theirs["loss"], theirs["lr"])

    model, metadata = load_checkpoint(tmp_path / "split" / "checkpoint")
    extra = metadata.extra
    assert extra["trained"] is True and extra["steps"] == 4
    assert extra["config"]["train"]["gradient_accumulation"] == 2
    assert extra["trained_terms"] and set(extra["trained_terms"]) <= PhantomPool.labelled_terms
    assert metadata.trained_encoder_prefixes == ("encoder.layer.5.",)
    assert model.config.patch_size == (64, 32, 32)
