"""Results on the input grid: NIfTI masks and label maps, statistics, JSON and a PNG preview."""

from satseg.outputs.components import keep_largest_component
from satseg.outputs.labelmap import LabelMapAccumulator
from satseg.outputs.nifti import read_label_extension, write_nifti
from satseg.outputs.preview import PreviewView, preview_views, save_preview
from satseg.outputs.statistics import mask_statistics, write_json
from satseg.outputs.writer import OutputOptions, write_segmentation, write_thresholded

__all__ = [
    "LabelMapAccumulator",
    "OutputOptions",
    "PreviewView",
    "keep_largest_component",
    "mask_statistics",
    "preview_views",
    "read_label_extension",
    "save_preview",
    "write_json",
    "write_nifti",
    "write_segmentation",
    "write_thresholded",
]
