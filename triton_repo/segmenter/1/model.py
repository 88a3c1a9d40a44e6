"""The segmenter of the sat ensemble (validation, geometry, sliding windows): see satseg/triton_models/segmenter.py."""

from satseg.triton_models.segmenter import SegmenterModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
