"""Connected-component clean-up of a probability map, for structures that are one connected body."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
"""26-connectivity: voxels touching by a corner are one piece, so thin diagonal parts stay attached."""


def keep_largest_component(probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """``probabilities [I, J, K]`` (in [0, 1]) with every other piece of ``> threshold`` set to 0, in place.

    The largest 26-connected piece of the mask is kept; voxels at or below ``threshold`` are untouched, so the
    mask and the label map built from the result lose only the smaller pieces. An empty or one-piece mask is
    returned as it is. Labelling runs on the CPU (scipy: MONAI's ``KeepLargestConnectedComponent`` needs
    scikit-image or cuCIM, neither a dependency here); the tensor stays on its device.
    """
    pieces, count = ndimage.label((probabilities > threshold).cpu().numpy(), structure=FULL_CONNECTIVITY)
    if count <= 1:
        return probabilities
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0  # the background is not a piece
    smaller = (pieces != 0) & (pieces != int(sizes.argmax()))
    return probabilities.masked_fill_(torch.from_numpy(smaller).to(probabilities.device), 0.0)
