"""SAT's reference inference algorithm, re-implemented from its description, to measure ours against.

The steps, as the reference describes them (no code of it is copied):

- load the volume and reorient it to RAS, resample it to 1 x 1 x 3 mm (bilinear), crop it to the foreground
  (CT: HU > 0; other modalities: > 0);
- clip (CT: the model spec's HU window; MRI/PET: its percentiles) and z-score;
- slide 288 x 288 x 96 windows (the checkpoint's patch) at a stride of half a window, the last window of each
  axis snapped to the end, a short axis padded to one window;
- per window the model's logits, a sigmoid, weighted by a float16 Gaussian (sigma 1/8 of the window, peak 10);
- accumulate into float32 ``[prompts, H, W, D]`` prediction and weight arrays on the CPU, divide, threshold 0.5.

The masks stay on the reference's grid (RAS, 1 x 1 x 3 mm, cropped), each written with that grid's affine.
PyTorch fp32, one window per forward pass, under ``torch.no_grad`` as the reference runs.

    python benchmarks/reference_sat.py --checkpoint CKPT --image ct.nii.gz --prompts liver,spleen --output DIR
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import CropForeground, LoadImage, Orientation, Spacing, SpatialPad

from satseg.checkpoint import load_checkpoint
from satseg.pipeline import Segmenter

STRIDE_FRACTION = 0.5
GAUSSIAN_PEAK = 10.0
GAUSSIAN_SIGMA_FRACTION = 1 / 8
THRESHOLD = 0.5


def reference_starts(size: int, patch: int) -> list[int]:
    """Window starts along an axis of ``size >= patch`` voxels: every half window, the last snapped to the end."""
    stride = max(int(patch * STRIDE_FRACTION), 1)
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


def reference_window_count(shape: tuple[int, ...], patch_size: tuple[int, ...]) -> int:
    """Windows of the reference over a model-grid ``shape`` (short axes padded to one window)."""
    return math.prod(len(reference_starts(max(s, p), p)) for s, p in zip(shape, patch_size, strict=True))


def gaussian_fp16(patch_size: tuple[int, int, int]) -> torch.Tensor:
    """``[h, w, d]`` float16 Gaussian, sigma 1/8 of the window per axis, peak 10, no zeros."""
    axes = []
    for size in patch_size:
        offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        axes.append(torch.exp(-(offsets**2) / (2 * (size * GAUSSIAN_SIGMA_FRACTION) ** 2)))
    gaussian = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    gaussian = (gaussian / gaussian.max() * GAUSSIAN_PEAK).half()
    gaussian[gaussian == 0] = gaussian[gaussian > 0].min()
    return gaussian


def preprocess(path: Path, modality: str, ct_window: tuple[float, float], percentiles: tuple[float, float]):
    """RAS, 1 x 1 x 3 mm, foreground crop, clip and z-score: a ``[1, H, W, D]`` MONAI MetaTensor."""
    image = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    image = Spacing(pixdim=(1.0, 1.0, 3.0), mode="bilinear")(Orientation(axcodes="RAS")(image))
    image = CropForeground(select_fn=lambda x: x > 0)(image)
    if modality == "ct":
        image = image.clamp(*ct_window)
    else:
        low, high = np.percentile(image.numpy(), percentiles)
        image = image.clamp(float(low), float(high))
    return (image - image.mean()) / image.std().clamp_min(1e-8)


@torch.no_grad()
def segment(model: torch.nn.Module, image: torch.Tensor, queries: torch.Tensor, patch_size: tuple[int, int, int]):
    """``image [1, H, W, D]``, ``queries [N, C]`` -> bool masks ``[N, H, W, D]`` and the window count."""
    shape = tuple(image.shape[1:])
    padded = SpatialPad(spatial_size=patch_size, mode="constant", value=float(image.min()))(image).as_tensor()
    padded_shape = tuple(padded.shape[1:])
    prediction = torch.zeros((queries.shape[0], *padded_shape), dtype=torch.float32)
    weight = torch.zeros(padded_shape, dtype=torch.float32)
    gaussian = gaussian_fp16(patch_size)
    corners = [reference_starts(s, p) for s, p in zip(padded_shape, patch_size, strict=True)]
    windows = 0
    for h in corners[0]:
        for w in corners[1]:
            for d in corners[2]:
                box = (slice(h, h + patch_size[0]), slice(w, w + patch_size[1]), slice(d, d + patch_size[2]))
                logits = model(padded[(slice(None), *box)][None].float(), queries[None])[0]
                prediction[(slice(None), *box)] += torch.sigmoid(logits) * gaussian
                weight[box] += gaussian
                windows += 1
    probabilities = prediction / weight
    # SpatialPad centres the volume; crop it back.
    offsets = [(p - s) // 2 for s, p in zip(shape, padded_shape, strict=True)]
    crop = tuple(slice(o, o + s) for o, s in zip(offsets, shape, strict=True))
    return probabilities[(slice(None), *crop)] > THRESHOLD, windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--modality", default="ct")
    parser.add_argument("--prompts", required=True, help="comma-separated vocabulary terms")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    model, metadata = load_checkpoint(args.checkpoint)
    # The text tower is common to both algorithms: the same queries reach the vision model.
    segmenter = Segmenter(model.eval(), metadata=metadata)
    terms = segmenter.resolve_prompts(args.prompts.split(","))
    queries = segmenter.encode(terms, args.modality)
    spec = segmenter.spec.preprocess
    image = preprocess(args.image, args.modality, spec.ct_window_hu, spec.percentiles)
    masks, windows = segment(model.vision, image.as_tensor(), queries, segmenter.patch_size)
    args.output.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(image.affine, dtype=np.float64)
    for index in range(len(terms)):
        mask = masks[index].numpy().astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, affine), args.output / f"{index:02d}.nii.gz")
    summary = {"terms": terms, "windows": windows, "grid": list(image.shape[1:])}
    (args.output / "reference.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
