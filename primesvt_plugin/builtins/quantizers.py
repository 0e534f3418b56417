"""INT8 post-training quantization with NNCF (recipe ``quantize.method``)."""
from __future__ import annotations

from ..export import quantize_int8
from ..plugins import hookimpl
from ..quantized import OpenVINOArtifact


def nncf_int8(model, example_input, calibration, subset_size: int = 300, inference_precision: str = "f32"):
    """NNCF INT8 (weights and activations) on the OpenVINO IR of ``model``; float ops run at ``inference_precision``."""
    return OpenVINOArtifact(quantize_int8(model, example_input, calibration, subset_size), inference_precision)


@hookimpl
def primesvt_quantizers():
    return {"nncf_int8": nncf_int8}
