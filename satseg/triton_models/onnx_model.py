"""A Triton python-backend model that runs its version folder's ``model.onnx`` on the CPU, with onnxruntime or
OpenVINO (:mod:`satseg.runtimes`).

It is the CPU stand-in for a TensorRT plan (``configs/cpu.pbtxt`` of ``text_encoder`` and ``vision``): same
inputs and outputs, read from the model config, so the ensemble above it cannot tell them apart. The config's
parameters choose ``runtime`` (``onnxruntime`` or ``openvino``), ``precision`` (``fp32``; ``bf16`` for
OpenVINO on a CPU with native BF16; ``int8`` for OpenVINO on the INT8 graph ``sat-export --int8`` gated)
and ``intra_op_threads`` (0: the runtime's choice).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from satseg.runtimes import INT8_GRAPH, GraphSession

ONNX_FILE = "model.onnx"


class OnnxTritonModel:
    """Lifecycle: ``initialize`` once per instance, ``execute`` per batch of requests, ``finalize`` at unload."""

    def initialize(self, args: dict[str, str]) -> None:
        """Open ``<model>/<version>/model.onnx`` (``model.int8.xml`` for precision int8) with the runtime, precision
        and threads the config names."""
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        precision = parameters.get("precision", "fp32")
        graph = INT8_GRAPH if precision == "int8" else ONNX_FILE  # sat-export --int8 installs it where it gated
        self.session: GraphSession | None = GraphSession(
            Path(args["model_repository"]) / args["model_version"] / graph,
            parameters.get("runtime", "onnxruntime"),
            precision,
            threads=int(parameters.get("intra_op_threads", "0")),
        )
        self.input_names = [item["name"] for item in config["input"]]
        self.output_names = [item["name"] for item in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        """One run per request; a failing request gets its own error and the others still succeed."""
        import triton_python_backend_utils as pb_utils

        assert self.session is not None
        responses = []
        for request in requests:
            try:
                feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
                outputs = self.session.run(feeds, self.output_names)
                tensors = [pb_utils.Tensor(name, value) for name, value in zip(self.output_names, outputs, strict=True)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as error:  # any failure answers this request only
                message = " ".join(str(error).split())
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
        return responses

    def finalize(self) -> None:
        """Drop the session (frees its memory before the stub exits)."""
        self.session = None
