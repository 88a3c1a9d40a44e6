"""The text tower on CPU, standing in for its TensorRT plan: onnxruntime on model.onnx (configs/cpu.pbtxt)."""

from satseg.serving.onnx_model import OnnxTritonModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
