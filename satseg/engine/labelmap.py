"""Merge per-prompt probabilities into one label map, one prompt at a time."""

from __future__ import annotations

import numpy as np
import torch

_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}
_MAX_LABEL = int(np.iinfo(np.uint16).max)


class LabelMapAccumulator:
    """Builds a uint16 label map from prompts added one by one.

    A voxel gets the label whose probability is above its threshold and highest among
    all prompts added so far (ties: the earlier prompt keeps the voxel); 0 is background.
    Membership is decided on the probabilities as given (``> threshold``, as the masks are cut), so a voxel
    inside a mask is never background in the label map; the float16 copy only ranks overlapping prompts.
    The caller assigns values 1..N to its N prompts in order and may drop each prompt's
    probabilities after :meth:`add`, so only two volumes are held: the best probability
    so far and its label.

    Args:
        shape: ``(I, J, K)`` of the label map.
        probability_dtype: float16 (default, half the memory; probabilities closer than
            ~5e-4 count as ties) or float32.
    """

    def __init__(self, shape: tuple[int, int, int], *, probability_dtype: type[np.floating] = np.float16) -> None:
        if np.dtype(probability_dtype) not in _TORCH_DTYPES:
            raise TypeError(f"probability dtype must be float16 or float32, got {probability_dtype}")
        self._best = np.zeros(shape, dtype=probability_dtype)
        self._labels = np.zeros(shape, dtype=np.uint16)
        self._added: list[int] = []

    def add(self, label_value: int, probabilities: np.ndarray | torch.Tensor, threshold: float = 0.5) -> None:
        """Claim the voxels where ``probabilities > threshold`` beats every earlier prompt.

        Args:
            label_value: this prompt's value in ``1..65535``, not used before.
            probabilities: ``[I, J, K]`` float in ``[0, 1]``, numpy or torch (any device).
            threshold: a voxel belongs to the prompt where its probability exceeds this,
                in ``[0, 1)`` (SAT thresholds sigmoid outputs at 0.5).
        """
        if not 1 <= label_value <= _MAX_LABEL or label_value in self._added:
            raise ValueError(f"label value must be a new value in 1..{_MAX_LABEL}, got {label_value}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        inside = _as_numpy(probabilities > threshold)
        candidate = self._as_best_dtype(probabilities)
        if candidate.shape != self._best.shape:
            raise ValueError(f"probabilities of shape {candidate.shape}, expected {self._best.shape}")
        wins = inside & ((candidate > self._best) | (self._labels == 0))
        self._best[wins] = candidate[wins]
        self._labels[wins] = label_value
        self._added.append(label_value)

    @property
    def labelmap(self) -> np.ndarray:
        """``[I, J, K]`` uint16: 0 background, else a value passed to :meth:`add`.

        A read-only view, not a copy (the volume can be large): later :meth:`add` calls show in it.
        """
        view = self._labels.view()
        view.flags.writeable = False
        return view

    def _as_best_dtype(self, probabilities: np.ndarray | torch.Tensor) -> np.ndarray:
        """``probabilities`` as numpy on the CPU in the dtype of the best-so-far volume."""
        if isinstance(probabilities, torch.Tensor):
            dtype = _TORCH_DTYPES[self._best.dtype]
            return probabilities.detach().to(device="cpu", dtype=dtype).numpy()
        return np.asarray(probabilities, dtype=self._best.dtype)


def _as_numpy(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """A bool mask as numpy on the CPU."""
    return mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
