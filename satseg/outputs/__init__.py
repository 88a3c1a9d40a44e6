"""Results on the input grid: the result type, NIfTI masks and label maps, statistics, JSON and a PNG preview.

numpy, nibabel and matplotlib only (a client writes its results with it, without torch).
"""

from satseg.outputs.nifti import read_label_extension, write_nifti
from satseg.outputs.preview import PreviewView, preview_views, save_preview
from satseg.outputs.result import WARNINGS_KEY, SegmentationResult
from satseg.outputs.statistics import mask_statistics, write_json
from satseg.outputs.writer import OutputOptions, write_result

__all__ = [
    "WARNINGS_KEY",
    "OutputOptions",
    "PreviewView",
    "SegmentationResult",
    "mask_statistics",
    "preview_views",
    "read_label_extension",
    "save_preview",
    "write_json",
    "write_nifti",
    "write_result",
]
