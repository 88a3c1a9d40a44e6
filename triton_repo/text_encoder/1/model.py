"""The text tower on CPU, standing in for its TensorRT plan: onnxruntime on model.onnx (configs/cpu.pbtxt)."""

from satseg.triton_models.onnx_model import OnnxTritonModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
