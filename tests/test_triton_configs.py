"""Every model config in triton_repo/ parses as Triton's ModelConfig, and each variant of a model (GPU, the pip
server's CPU config, the container's native OpenVINO config) declares the inputs and outputs the graphs and
the ensemble use. The native OpenVINO backend cannot load here (it ships only in NVIDIA's container)."""

from __future__ import annotations

from pathlib import Path

import pytest

from satseg.onnx_graphs import TEXT_INPUTS, TEXT_OUTPUTS, VISION_INPUTS, VISION_OUTPUTS

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs the client extra")
text_format = pytest.importorskip("google.protobuf.text_format")

REPOSITORY = Path(__file__).resolve().parents[1] / "triton_repo"
CONFIGS = sorted(REPOSITORY.glob("*/config.pbtxt")) + sorted(REPOSITORY.glob("*/configs/*.pbtxt"))
GRAPHS = {"vision": (VISION_INPUTS, VISION_OUTPUTS), "text_encoder": (TEXT_INPUTS, TEXT_OUTPUTS)}


def parsed(path: Path) -> object:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def signature(config: object) -> tuple:
    """Names, data types and dims of the inputs and outputs."""
    return tuple(
        (tensor.name, tensor.data_type, tuple(tensor.dims))
        for tensor in (*config.input, *config.output)  # type: ignore[attr-defined]
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: str(path.relative_to(REPOSITORY)))
def test_every_config_parses_and_names_its_model(path: Path) -> None:
    config = parsed(path)
    model = path.parent.name if path.parent.name != "configs" else path.parent.parent.name
    assert config.name == model  # type: ignore[attr-defined]


@pytest.mark.parametrize("model", ["vision", "text_encoder", "segmenter"])
def test_the_variants_of_a_model_share_its_signature(model: str) -> None:
    variants = {
        path.name: parsed(path)
        for path in [REPOSITORY / model / "config.pbtxt", *(REPOSITORY / model).glob("configs/*.pbtxt")]
    }
    assert {"config.pbtxt", "cpu.pbtxt", "openvino.pbtxt"} <= set(variants)
    signatures = {name: signature(config) for name, config in variants.items()}
    assert len(set(signatures.values())) == 1, signatures


@pytest.mark.parametrize("model", list(GRAPHS))
def test_the_native_openvino_configs_run_the_exported_graph(model: str) -> None:
    config = parsed(REPOSITORY / model / "configs" / "openvino.pbtxt")
    assert config.backend == "openvino" and config.default_model_filename == "model.onnx"  # type: ignore[attr-defined]
    inputs, outputs = GRAPHS[model]
    assert [tensor.name for tensor in config.input] == list(inputs)  # type: ignore[attr-defined]
    assert [tensor.name for tensor in config.output] == list(outputs)  # type: ignore[attr-defined]
    assert all(group.kind == group.KIND_CPU for group in config.instance_group)  # type: ignore[attr-defined]
    parameters = dict(config.parameters)  # type: ignore[attr-defined]
    assert "HINT_BF16" not in parameters, "BF16 is opted into per site, after its own gate"
    assert parameters["PERFORMANCE_HINT"].string_value in {"LATENCY", "THROUGHPUT"}
