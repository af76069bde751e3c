"""Shipping a trained checkpoint: the MLflow pyfunc model, the model registry, ONNX/TorchScript export."""
