"""Export: ONNX graphs, parity gates, TensorRT engines and the Triton model repository of a checkpoint."""
