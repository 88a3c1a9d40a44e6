"""What the load test sends: named scenarios, each a weighted mix of request kinds.

Volumes are synthetic torso CTs (``satseg.phantom``: organ-shaped ellipsoids with CT-like HU), so a
load test needs no data and any machine sends the same bytes. A request kind is built once per user.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from satseg.geometry import Volume
from satseg.phantom import centred_affine, make_torso_phantom
from satseg.text import Vocabulary

MALFORMED_SHARE = 0.05
"""Share of ``bad_inputs`` requests that are malformed (a NaN voxel in an FP32 CT)."""
MANY_PROMPT_COUNT = 32


def many_prompts(count: int = MANY_PROMPT_COUNT) -> tuple[str, ...]:
    """The first ``count`` CT terms of the vocabulary (alphabetical: the same on every machine)."""
    return tuple(sorted(Vocabulary.load().for_modality("ct"))[:count])


@dataclass(frozen=True)
class RequestKind:
    """One kind of request: a CT of ``shape`` voxels of ``spacing`` mm and the prompts asked of it."""

    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    prompts: tuple[str, ...]
    malformed: bool = False

    def volume(self, seed: int = 0) -> Volume:
        """The CT (INT16 HU; FP32 with one NaN voxel when malformed) on a 10-degree oblique grid."""
        affine = centred_affine(self.shape, self.spacing, 10.0)
        phantom, _, _ = make_torso_phantom(self.shape, affine, seed=seed)
        if not self.malformed:
            return Volume(phantom.array.astype(np.int16), affine, "ct")
        array = phantom.array.astype(np.float32)
        array[tuple(size // 2 for size in self.shape)] = np.nan
        return Volume(array, affine, "ct")


SMALL = RequestKind("ct_small", (48, 40, 24), (5.0, 5.0, 8.0), ("liver", "spleen", "left kidney"))
LARGE = RequestKind("ct_large", (512, 512, 300), (0.8, 0.8, 1.0), ("liver",))
MANY = RequestKind("many_prompts", SMALL.shape, SMALL.spacing, many_prompts())
MALFORMED = RequestKind("malformed", SMALL.shape, SMALL.spacing, SMALL.prompts, malformed=True)

SCENARIOS: dict[str, list[tuple[float, RequestKind]]] = {
    "ct_small": [(1.0, SMALL)],
    "ct_large": [(1.0, LARGE)],
    "many_prompts": [(1.0, MANY)],
    "mixed": [(0.7, SMALL), (0.2, MANY), (0.1, LARGE)],
    "bad_inputs": [(1.0 - MALFORMED_SHARE, SMALL), (MALFORMED_SHARE, MALFORMED)],
}


def mix_weights(mix: list[tuple[float, RequestKind]], malformed_share: float = MALFORMED_SHARE) -> list[float]:
    """The weights to draw ``mix`` with: where it holds malformed kinds, they get ``malformed_share`` in all and
    the valid kinds the rest, in their own proportions."""
    if not 0.0 <= malformed_share <= 1.0:
        raise ValueError(f"malformed share {malformed_share} is outside [0, 1]")
    malformed = [weight for weight, kind in mix if kind.malformed]
    if not malformed:
        return [weight for weight, _ in mix]
    valid_total = sum(weight for weight, kind in mix if not kind.malformed)
    return [
        malformed_share * weight / sum(malformed) if kind.malformed else (1.0 - malformed_share) * weight / valid_total
        for weight, kind in mix
    ]
