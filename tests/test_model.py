"""The SAT architecture: sizes, shapes, prompt independence and deep supervision."""

from __future__ import annotations

import copy

import pytest
import torch

from satseg.model import SATVision, get_config
from satseg.model.config import SATConfig
from satseg.model.text_tower import mean_pool
from satseg.model.tokens import sinusoidal_position_encoding_3d
from satseg.model.unet import ConvBlock, InstanceNorm3d, SkipConvBlock


def count_parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def test_nano_vision_has_110m_parameters() -> None:
    with torch.device("meta"):
        vision = SATVision(get_config("nano"))
    inference = count_parameters(vision) - count_parameters(vision.deep_supervision_heads)
    assert inference == pytest.approx(110e6, rel=0.02)
    assert count_parameters(vision) == pytest.approx(110e6, rel=0.02)


def test_pro_is_wider_than_nano() -> None:
    with torch.device("meta"):
        nano, pro = SATVision(get_config("nano")), SATVision(get_config("pro"))
    assert count_parameters(pro.backbone) > 4 * count_parameters(nano.backbone)


def test_unknown_size_names_known_ones() -> None:
    with pytest.raises(ValueError, match="tiny, nano, pro"):
        get_config("huge")


def test_patch_must_fit_the_downsampling() -> None:
    bad = SATConfig(name="bad", unet_channels=(4, 4, 4, 4, 4, 4), convs_per_stage=1, patch_size=(48, 48, 20))
    with pytest.raises(ValueError, match="divisible by 32"):
        SATVision(bad)


@pytest.fixture(scope="module")
def tiny_vision() -> SATVision:
    torch.manual_seed(0)
    return SATVision(get_config("tiny")).eval()


def test_single_channel_input(tiny_vision: SATVision) -> None:
    first_conv = tiny_vision.backbone.encoder[0][0][0]
    assert first_conv.weight.shape[1] == 1


def test_logits_shape(tiny_vision: SATVision) -> None:
    config = tiny_vision.config
    image = torch.randn(2, 1, *config.patch_size)
    queries = torch.randn(2, 3, config.d_model)
    with torch.inference_mode():
        logits = tiny_vision(image, queries)
    assert logits.shape == (2, 3, *config.patch_size)
    assert torch.isfinite(logits).all()


def test_prompt_chunks_give_identical_logits(tiny_vision: SATVision) -> None:
    """No computation mixes prompts, so chunking changes nothing but BLAS blocking.

    Matrix products of different sizes may round the last bit differently, so the check runs in
    float64, where such rounding is ~1e-16, and also compares the thresholded float32 masks.
    """
    config = tiny_vision.config
    image = torch.randn(1, 1, *config.patch_size)
    queries = torch.randn(1, 7, config.d_model)
    split = [3, 1, 3]
    with torch.inference_mode():
        double = tiny_vision.double()
        whole = double(image.double(), queries.double())
        chunks = torch.cat([double(image.double(), part) for part in queries.double().split(split, dim=1)], 1)
        torch.testing.assert_close(whole, chunks, rtol=0, atol=1e-12)
        single = tiny_vision.float()
        masks = single(image, queries) > 0
        chunk_masks = torch.cat([single(image, part) > 0 for part in queries.split(split, dim=1)], dim=1)
    assert torch.equal(masks, chunk_masks)


def test_prompts_do_not_interact(tiny_vision: SATVision) -> None:
    config = tiny_vision.config
    image = torch.randn(1, 1, *config.patch_size)
    queries = torch.randn(1, 3, config.d_model)
    changed = queries.clone()
    changed[0, 1] = torch.randn(config.d_model)
    with torch.inference_mode():
        before, after = tiny_vision(image, queries), tiny_vision(image, changed)
    assert torch.equal(before[:, [0, 2]], after[:, [0, 2]])
    assert not torch.equal(before[:, 1], after[:, 1])


def test_deep_supervision_in_training_mode() -> None:
    torch.manual_seed(0)
    vision = SATVision(get_config("tiny"))
    vision.train()
    vision.deep_supervision = True
    size = vision.config.patch_size
    outputs = vision(torch.randn(1, 1, *size), torch.randn(1, 2, vision.config.d_model))
    assert [tuple(out.shape[2:]) for out in outputs] == [tuple(s // f for s in size) for f in (1, 2, 4, 8)]
    sum(out.mean() for out in outputs).backward()
    assert all(head.mlp[0].weight.grad is not None for head in vision.deep_supervision_heads)


def test_position_encoding_distinguishes_tokens() -> None:
    encoding = sinusoidal_position_encoding_3d((9, 9, 3), 768)
    assert encoding.shape == (243, 768)
    assert encoding.abs().max() <= 1.0
    assert torch.cdist(encoding, encoding).add(torch.eye(243) * 1e3).min() > 0.1


def test_position_encoding_pads_odd_widths() -> None:
    encoding = sinusoidal_position_encoding_3d((2, 2, 2), 100)
    assert encoding.shape == (8, 100)
    assert encoding[:, 96:].abs().sum() == 0


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(hidden, mask).item() == pytest.approx(2.0)


def test_skip_block_equals_the_block_on_the_concatenation_and_lets_go_of_its_parts() -> None:
    torch.manual_seed(1)
    block = SkipConvBlock(6, 4)
    plain = ConvBlock(6, 4)
    plain.load_state_dict(block.state_dict())
    upsampled, skip = torch.randn(1, 2, 8, 8, 4), torch.randn(1, 4, 8, 8, 4)
    parts = [upsampled, skip]
    with torch.inference_mode():
        expected = plain(torch.cat(parts, dim=1))
        assert torch.allclose(block(parts), expected, atol=1e-5)
    assert parts == []
    with pytest.raises(ValueError, match="do not hold the 6 channels"):
        block([skip])  # autograd: the concatenation
    with torch.inference_mode(), pytest.raises(ValueError, match="do not hold the 6 channels"):
        block([skip])  # eager inference: the split


def test_inference_forward_matches_the_autograd_forward_channels_last_or_not() -> None:
    """Outside autograd the norm runs in place; on channels-last weights every map stays channels-last."""
    torch.manual_seed(0)
    tiny_vision = SATVision(get_config("tiny")).eval()  # its own: the fixture was cast in inference mode
    config = tiny_vision.config
    generator = torch.Generator().manual_seed(2)
    image = torch.randn(1, 1, *config.patch_size, generator=generator) * 3 + 1
    queries = torch.randn(1, 3, config.d_model, generator=generator)
    with torch.enable_grad():
        expected = tiny_vision(image, queries).detach()
    lean = copy.deepcopy(tiny_vision).to(memory_format=torch.channels_last_3d)
    formats = []
    lean.backbone.decoder[0].register_forward_hook(
        lambda _module, _inputs, output: formats.append(output.is_contiguous(memory_format=torch.channels_last_3d))
    )
    for model in (tiny_vision, lean):
        with torch.inference_mode():
            assert torch.allclose(model(image, queries), expected, atol=1e-4, rtol=1e-4)
    assert formats == [True]


def test_the_in_place_norm_normalises_per_channel_with_its_affine() -> None:
    norm = InstanceNorm3d(3, eps=1e-5, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        norm.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    features = torch.randn(2, 3, 5, 6, 7) * 4 + 2
    expected = torch.nn.functional.instance_norm(features, weight=norm.weight, bias=norm.bias, eps=1e-5)
    with torch.inference_mode():
        normalised = norm(features.clone())
    assert torch.allclose(normalised, expected, atol=1e-5)
    assert torch.allclose(normalised.mean(dim=(2, 3, 4)), norm.bias.detach().expand(2, 3), atol=1e-5)
