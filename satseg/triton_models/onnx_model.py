"""A Triton python-backend model that runs its version folder's ``model.onnx`` with onnxruntime on the CPU.

It is the CPU stand-in for a TensorRT plan (``configs/cpu.pbtxt`` of ``text_encoder`` and ``vision``): same
inputs and outputs, read from the model config, so the ensemble above it cannot tell them apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ONNX_FILE = "model.onnx"


class OnnxTritonModel:
    """Lifecycle: ``initialize`` once per instance, ``execute`` per batch of requests, ``finalize`` at unload."""

    def initialize(self, args: dict[str, str]) -> None:
        """Open ``<model>/<version>/model.onnx``; the config's ``intra_op_threads`` parameter sets ORT threads."""
        import onnxruntime

        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "0"))
        path = Path(args["model_repository"]) / args["model_version"] / ONNX_FILE
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [item["name"] for item in config["input"]]
        self.output_names = [item["name"] for item in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        """One onnxruntime run per request; a failing request gets its own error and the others still succeed."""
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
                outputs = self.session.run(self.output_names, feeds)
                tensors = [pb_utils.Tensor(name, value) for name, value in zip(self.output_names, outputs, strict=True)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as error:  # any failure answers this request only
                message = " ".join(str(error).split())
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
        return responses

    def finalize(self) -> None:
        """Drop the session (frees its memory before the stub exits)."""
        self.session = None
