"""Deployment: export (ONNX, OpenVINO, TorchScript), NNCF quantization, latency."""
