"""The segmenter of the sat ensemble (validation, geometry, sliding windows): see satseg/serving/segmenter.py."""

from satseg.serving.segmenter import SegmenterModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
