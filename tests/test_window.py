"""Sliding-window inference: window grid, importance map, stitching, memory fallback."""

from __future__ import annotations

import math

import pytest
import torch

from satseg.errors import SatInputError
from satseg.window import (
    IMPORTANCE_PEAK,
    covered_spans,
    gaussian_importance_map,
    sliding_window_probabilities,
    stitcher,
    window_slices,
    window_starts,
)

PATCH = (8, 8, 8)


def coordinate_image(shape: tuple[int, int, int]) -> torch.Tensor:
    """``[H, W, D]`` float32 whose value at (i, j, k) encodes the global position uniquely."""
    i, j, k = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in shape), indexing="ij")
    return i * 10_000 + j * 100 + k


def position_logits(encoded: torch.Tensor) -> torch.Tensor:
    """A smooth function of the global (i, j, k) decoded from :func:`coordinate_image` values."""
    i, rest = torch.div(encoded, 10_000, rounding_mode="floor"), torch.remainder(encoded, 10_000)
    j, k = torch.div(rest, 100, rounding_mode="floor"), torch.remainder(rest, 100)
    return torch.sin(0.3 * i) + torch.cos(0.2 * j) - 0.05 * k


class PositionPredictor:
    """Logits per prompt ``n``: ``position_logits + n``; counts its calls and batch sizes."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        assert patches.dtype == torch.float32 and queries.dtype == torch.float32
        assert patches.shape[1] == 1 and queries.shape[0] == patches.shape[0]
        assert queries.shape[0] == 1 or queries.stride(0) == 0, "queries must be expanded, not copied"
        self.batch_sizes.append(patches.shape[0])
        offsets = queries[:, :, 0].reshape(*queries.shape[:2], 1, 1, 1)
        return position_logits(patches) + offsets  # [B, 1, ...] + [B, N, 1, 1, 1] -> [B, N, h, w, d]


def queries_with_offsets(*offsets: float) -> torch.Tensor:
    """``[N, 4]`` queries whose first channel is the logit offset of :class:`PositionPredictor`."""
    queries = torch.zeros(len(offsets), 4)
    queries[:, 0] = torch.tensor(offsets)
    return queries


@pytest.mark.parametrize(
    ("size", "patch", "overlap", "expected"),
    [
        # n = ceil(68 / 16) + 1 = 6, spacing 68 / 5 = 13.6
        (100, 32, 0.5, [0, 14, 27, 41, 54, 68]),
        # nnU-Net's own example: n = ceil(46 / 32) + 1 = 3, spacing 23
        (110, 64, 0.5, [0, 23, 46]),
        (32, 32, 0.5, [0]),
        (33, 32, 0.5, [0, 1]),
        (96, 32, 0.0, [0, 32, 64]),
        # n = ceil(18 / 2) + 1 = 10, spacing 2
        (26, 8, 0.75, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]),
    ],
)
def test_window_starts_follow_nnunet(size: int, patch: int, overlap: float, expected: list[int]) -> None:
    assert window_starts(size, patch, overlap) == expected


def test_window_starts_reject_bad_overlap() -> None:
    with pytest.raises(SatInputError):
        window_starts(100, 32, 1.0)


def test_window_slices_cover_the_volume() -> None:
    shape = (20, 9, 8)
    covered = torch.zeros(shape, dtype=torch.int32)
    slices = window_slices(shape, PATCH)
    for window in slices:
        covered[window] += 1
    assert len(slices) == 4 * 2 * 1
    assert bool((covered >= 1).all())


def test_importance_map_peak_and_floor() -> None:
    weights = gaussian_importance_map((16, 12, 9))
    assert weights.shape == (16, 12, 9) and weights.dtype == torch.float32
    assert weights.max().item() == pytest.approx(IMPORTANCE_PEAK, rel=1e-6)
    assert weights.min().item() > 0
    # Gaussian: the centre weighs much more than a corner.
    assert weights[0, 0, 0].item() < weights.max().item() / 100


@pytest.mark.parametrize("patch", [(96, 96, 32), (288, 288, 96), (7, 5, 3)])
def test_importance_map_is_monais(patch: tuple[int, int, int]) -> None:
    """Re-stated to keep MONAI's 3.8 s import out of inference: equal to its map, scaled to the peak, bit for bit."""
    from monai.data.utils import compute_importance_map

    monai = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125, device="cpu", dtype=torch.float32)
    assert torch.equal(gaussian_importance_map(patch), monai.mul_(IMPORTANCE_PEAK / monai.max()))


def test_importance_map_sigma_is_an_eighth_of_the_patch() -> None:
    weights = gaussian_importance_map((16, 24, 8)).double()
    # Voxel centres sit at -7.5 .. 7.5 around the patch centre; sigma = 16 / 8 = 2 on axis 0.
    ratio = weights[3, 11, 3] / weights[7, 11, 3]  # offsets 4.5 and 0.5
    assert ratio.item() == pytest.approx(math.exp(-(4.5**2 - 0.5**2) / (2 * 2.0**2)), rel=1e-5)
    ratio = weights[7, 5, 3] / weights[7, 11, 3]  # axis 1, sigma 3: offsets 6.5 and 0.5
    assert ratio.item() == pytest.approx(math.exp(-(6.5**2 - 0.5**2) / (2 * 3.0**2)), rel=1e-5)


@pytest.mark.parametrize("shape", [(20, 17, 13), (8, 8, 8), (23, 9, 16)])
def test_stitched_probability_is_sigmoid_of_global_function(shape: tuple[int, int, int]) -> None:
    image = coordinate_image(shape)
    queries = queries_with_offsets(0.0, 1.5)
    probabilities = sliding_window_probabilities(
        image, queries, PositionPredictor(), PATCH, accumulator_dtype=torch.float32
    )
    expected = torch.sigmoid(torch.stack([position_logits(image), position_logits(image) + 1.5]))
    assert probabilities.shape == (2, *shape)
    assert probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=0)


def test_an_edge_allowance_saves_windows_and_replicates_the_uncovered_edge() -> None:
    """17 voxels with 8-voxel windows need 4 windows; leaving one edge voxel uncovered needs 3."""
    shape = (17, 8, 8)
    image = coordinate_image(shape)
    queries = queries_with_offsets(0.0, 1.5)
    counted = {}
    results = {}
    for allowance in (0.0, 0.125):
        predictor = PositionPredictor()
        results[allowance] = sliding_window_probabilities(
            image, queries, predictor, PATCH, accumulator_dtype=torch.float32, edge_allowance=allowance
        )
        counted[allowance] = sum(predictor.batch_sizes)
    assert counted == {0.0: 4, 0.125: 3}
    assert covered_spans(shape, PATCH, 0.5, 0.125) == [(1, 17), (0, 8), (0, 8)]
    expected = torch.sigmoid(torch.stack([position_logits(image), position_logits(image) + 1.5]))
    torch.testing.assert_close(results[0.0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(results[0.125][:, 1:], expected[:, 1:], atol=1e-5, rtol=0)
    assert torch.equal(results[0.125][:, 0], results[0.125][:, 1]), "the uncovered voxel takes its neighbour's value"


@pytest.mark.parametrize("shape", [(20, 20, 20), (21, 18, 15)])
def test_fp16_accumulator_close_to_fp32(shape: tuple[int, int, int]) -> None:
    image = coordinate_image(shape)
    queries = queries_with_offsets(-1.0, 0.0, 2.0)
    fp32 = sliding_window_probabilities(image, queries, PositionPredictor(), PATCH, accumulator_dtype=torch.float32)
    fp16 = sliding_window_probabilities(image, queries, PositionPredictor(), PATCH)
    assert fp16.dtype == torch.float16
    # Every addition into the fp16 sum (a partial sum below 1) rounds by at most 2**-12.
    coverage = torch.zeros(shape)
    for window in window_slices(shape, PATCH):
        coverage[window] += 1
    error = (fp16.float() - fp32).abs()
    assert bool((error <= coverage * 2.0**-12 + 1e-6).all())
    assert error.max().item() < 4e-3
    assert error.mean().item() < 2e-4


def test_constant_logits_give_constant_probability() -> None:
    def constant(patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return torch.full((patches.shape[0], queries.shape[1], *patches.shape[2:]), 0.7)

    probabilities = sliding_window_probabilities(
        torch.randn(19, 12, 10),
        queries_with_offsets(0.0),
        constant,
        PATCH,
        overlap=0.3,
        accumulator_dtype=torch.float32,
    )
    expected = torch.sigmoid(torch.tensor(0.7)).item()
    torch.testing.assert_close(probabilities, torch.full_like(probabilities, expected), atol=1e-6, rtol=0)


def test_volume_smaller_than_patch_keeps_its_shape_and_values() -> None:
    image = coordinate_image((5, 20, 3))
    probabilities = sliding_window_probabilities(
        image, queries_with_offsets(0.0), PositionPredictor(), PATCH, accumulator_dtype=torch.float32
    )
    assert probabilities.shape == (1, 5, 20, 3)
    # The crop must select the original voxels, not padding.
    torch.testing.assert_close(probabilities[0], torch.sigmoid(position_logits(image)), atol=1e-5, rtol=0)


def test_padding_uses_the_image_minimum() -> None:
    seen: list[torch.Tensor] = []

    def record(patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        seen.append(patches.clone())
        return torch.zeros(patches.shape[0], queries.shape[1], *patches.shape[2:])

    image = torch.rand(4, 8, 8) + 3.0
    sliding_window_probabilities(image, queries_with_offsets(0.0), record, PATCH)
    (patch,) = seen
    # 4 short voxels split 2 before, 2 after.
    assert torch.equal(patch[0, 0, 2:6], image)
    assert bool((patch[0, 0, :2] == image.min()).all() and (patch[0, 0, 6:] == image.min()).all())


@pytest.mark.parametrize("shape", [(20, 17, 13), (8, 30, 8)])
def test_batch_size_does_not_change_result_and_sets_call_count(shape: tuple[int, int, int]) -> None:
    image = coordinate_image(shape)
    queries = queries_with_offsets(0.0, -2.0)
    num_windows = len(window_slices(shape, PATCH))
    results = {}
    for batch_size in (1, 3):
        predictor = PositionPredictor()
        results[batch_size] = sliding_window_probabilities(image, queries, predictor, PATCH, batch_size=batch_size)
        assert len(predictor.batch_sizes) == math.ceil(num_windows / batch_size)
        assert sum(predictor.batch_sizes) == num_windows
        assert max(predictor.batch_sizes) <= batch_size
    assert torch.equal(results[1], results[3])


def test_progress_bar_runs(capsys: pytest.CaptureFixture[str]) -> None:
    sliding_window_probabilities(
        coordinate_image((12, 8, 8)), queries_with_offsets(0.0), PositionPredictor(), PATCH, progress=True
    )
    assert "windows" in capsys.readouterr().err


def test_out_of_memory_falls_back_to_cpu_accumulators(monkeypatch: pytest.MonkeyPatch) -> None:
    allocate = stitcher._allocate_accumulators
    devices: list[torch.device] = []

    def fail_first(num_prompts, shape, dtype, device):  # type: ignore[no-untyped-def]
        devices.append(device)
        if len(devices) == 1:
            raise torch.OutOfMemoryError("simulated: no room on the accelerator")
        return allocate(num_prompts, shape, dtype, device)

    monkeypatch.setattr(stitcher, "_allocate_accumulators", fail_first)
    image = coordinate_image((14, 9, 8))
    with pytest.warns(UserWarning, match="out of memory"):
        probabilities = sliding_window_probabilities(
            image, queries_with_offsets(0.5), PositionPredictor(), PATCH, accumulator_dtype=torch.float32
        )
    assert devices == [torch.device("cpu"), torch.device("cpu")]
    assert probabilities.device.type == "cpu"
    torch.testing.assert_close(probabilities[0], torch.sigmoid(position_logits(image) + 0.5), atol=1e-5, rtol=0)


def test_wrong_logits_shape_is_reported() -> None:
    def wrong(patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return torch.zeros(patches.shape[0], 1, 4, 4, 4)

    with pytest.raises(ValueError, match="logits of shape"):
        sliding_window_probabilities(coordinate_image((8, 8, 8)), queries_with_offsets(0.0), wrong, PATCH)


@pytest.mark.parametrize(
    ("image", "queries", "patch"),
    [
        (torch.zeros(8, 8), torch.zeros(1, 4), PATCH),
        (torch.zeros(8, 8, 8), torch.zeros(4), PATCH),
        (torch.zeros(8, 8, 8), torch.zeros(0, 4), PATCH),
        (torch.zeros(8, 8, 8), torch.zeros(1, 4), (8, 8)),
        (torch.zeros(8, 8, 8), torch.zeros(1, 4), (8, 0, 8)),
    ],
)
def test_bad_arguments_raise_sat_input_error(
    image: torch.Tensor, queries: torch.Tensor, patch: tuple[int, int, int]
) -> None:
    with pytest.raises(SatInputError):
        sliding_window_probabilities(image, queries, PositionPredictor(), patch)


def test_sigmoid_is_applied_per_window_before_gaussian_blending() -> None:
    """Logits that differ between windows: compare with a float64 brute-force blend."""
    shape = (14, 11, 8)

    def local(patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        # Depends on the position inside the patch, so overlapping windows disagree.
        i = torch.arange(PATCH[0], dtype=torch.float32).reshape(1, 1, -1, 1, 1)
        return (4.0 - i + patches).expand(patches.shape[0], queries.shape[1], *PATCH)

    image = torch.randn(shape)
    probabilities = sliding_window_probabilities(
        image, queries_with_offsets(0.0), local, PATCH, accumulator_dtype=torch.float32
    )
    weights = gaussian_importance_map(PATCH).double()
    numerator = torch.zeros(shape, dtype=torch.float64)
    denominator = torch.zeros(shape, dtype=torch.float64)
    for window in window_slices(shape, PATCH):
        logits = local(image[window][None, None], queries_with_offsets(0.0)[None])[0, 0].double()
        numerator[window] += weights * torch.sigmoid(logits)
        denominator[window] += weights
    torch.testing.assert_close(probabilities[0].double(), numerator / denominator, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_chunked_accumulation_is_plus_equals_bit_for_bit(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blend adds a few prompts at a time, upcast (7x faster than a float16 ``+=``): the same sums and bits."""
    monkeypatch.setattr(stitcher, "ADD_CHUNK_BYTES", 3 * 7 * 6 * 5 * 4)  # 3 prompts a chunk: 7 prompts, 3 chunks
    generator = torch.Generator().manual_seed(0)
    window = (slice(2, 9), slice(1, 7), slice(0, 5))
    blended = torch.rand((7, 7, 6, 5), generator=generator) * 0.3
    expected = (torch.rand((7, 12, 9, 6), generator=generator) * 0.6).to(dtype)
    accumulated = expected.clone()
    expected[(slice(None), *window)] += blended
    stitcher._accumulate(accumulated, window, blended)
    assert torch.equal(accumulated, expected)
