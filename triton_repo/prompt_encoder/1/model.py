"""The prompt encoder of the sat ensemble: see satseg/triton_models/prompt_encoder.py."""

from satseg.triton_models.prompt_encoder import PromptEncoderModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
