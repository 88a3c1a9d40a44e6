"""The prompt encoder of the sat ensemble: see satseg/serving/prompt_encoder.py."""

from satseg.serving.prompt_encoder import PromptEncoderModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
