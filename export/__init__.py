"""Export: ONNX graphs, parity gates, TensorRT engines and the Triton model repository of a checkpoint."""

if __name__ != "satseg_export":  # its installed name (pyproject.toml): one module, one name
    raise ImportError(f"import satseg_export, not {__name__}: the export/ folder installs as satseg_export")
