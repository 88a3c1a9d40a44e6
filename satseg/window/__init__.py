"""Sliding-window inference over a 3D volume with Gaussian blending (nnU-Net / SAT recipe)."""

from satseg.window.importance import IMPORTANCE_PEAK, gaussian_importance_map
from satseg.window.steps import (
    WindowSlices,
    covered_spans,
    economical_span,
    planned_windows,
    window_count,
    window_slices,
    window_starts,
)
from satseg.window.stitcher import Predictor, pad_to_patch, sliding_window_probabilities

__all__ = [
    "IMPORTANCE_PEAK",
    "Predictor",
    "WindowSlices",
    "covered_spans",
    "economical_span",
    "gaussian_importance_map",
    "pad_to_patch",
    "planned_windows",
    "sliding_window_probabilities",
    "window_count",
    "window_slices",
    "window_starts",
]
