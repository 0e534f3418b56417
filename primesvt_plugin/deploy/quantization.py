"""Quantization: NNCF INT8 on the OpenVINO IR, and the artifact a quantizer hands back
(it saves itself, predicts, and knows its size and speed); NNCF INT4 weight compression of
the matmul-like layers (mixed INT4/INT8 weights); NNCF INT8 on ONNX (QDQ) for runtimes other
than OpenVINO, checked on onnxruntime.

A quantizer carries the ``Deployment`` its files count bytes by (``quantizer.deployment``):
flash budgets are searched at that precision."""
from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import copy

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError, ExportError, first_line
from ..targets import INT4, INT8, matmul_like
from .export import (Verification, compile_openvino, compiled_precision, cpu_model, predict_batches, predict_compiled,
                     removed_unless_verified, save_openvino, to_onnx, to_openvino_model, verification_or_example)
from .latency import median_ms


@dataclass
class OpenVINOArtifact:
    """A (quantized) OpenVINO model, compiled for the CPU at ``precision`` on first use.

    ``precision`` applies to the operations left in floating point (INT8 ones stay INT8).
    """

    ov_model: object
    precision: str = "f32"

    @functools.cached_property
    def compiled(self):
        return compile_openvino(self.ov_model, self.precision)

    @property
    def compiled_precision(self) -> str:
        """The precision the CPU really runs the floating-point operations at (read back)."""
        return compiled_precision(self.compiled)

    def save(self, path: Path) -> list[Path]:
        """Write ``path`` (.xml) and the .bin holding the weights."""
        return save_openvino(self.ov_model, path.with_suffix(".xml"))

    def predict(self, images: np.ndarray) -> np.ndarray:
        return predict_compiled(self.compiled, images)

    def latency_ms(self, image: np.ndarray) -> float:
        """Median latency of one inference on ``image`` (a batch of one)."""
        return median_ms(lambda: self.compiled(image))

    @staticmethod
    def weight_bytes(files: list[Path]) -> int:
        """Bytes of stored weights: the .bin files written by ``save``."""
        return sum(f.stat().st_size for f in files if f.suffix == ".bin")


def load_quantized(path: str | Path, precision: str = "f32") -> OpenVINOArtifact:
    """Load ``model_int8.xml`` / ``model_int4.xml`` (with its .bin) written by a recipe run, to run at ``precision``."""
    import openvino as ov

    path = Path(path)
    if path.suffix != ".xml":
        raise CheckpointError(f"{path}: load_quantized reads OpenVINO IR, model_<precision>.xml with its .bin "
                              f"(not {path.suffix or 'a file without a suffix'}); an ONNX file runs on onnxruntime")
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise CheckpointError(f"{path} and its .bin are needed to load a quantized model")
    try:
        ov_model = ov.Core().read_model(str(path))
    except RuntimeError as error:
        raise CheckpointError(f"{path} is not a readable OpenVINO model (truncated or another format?): "
                              f"{first_line(error)}") from None
    if not ov_model.get_parameters() or not ov_model.get_results():
        raise CheckpointError(f"{path} holds no model (no inputs or no outputs); it is not a file a run wrote")
    artifact = OpenVINOArtifact(ov_model, precision)
    try:
        artifact.compiled  # a truncated .bin only shows when the weights are read
    except RuntimeError as error:
        raise CheckpointError(f"{path} is not a readable OpenVINO model (truncated or another format?): "
                              f"{first_line(error)}") from None
    return artifact


def quantize_int8(model: nn.Module, example_input: torch.Tensor, calibration: Iterable[np.ndarray],
                  subset_size: int = 300, pm=None):
    """Post-training INT8 quantization (weights and activations) with NNCF, on OpenVINO IR."""
    import nncf

    ov_model = to_openvino_model(model, example_input, pm)
    batches = [np.asarray(batch, dtype=np.float32) for batch in calibration]
    if not batches:
        raise ExportError("INT8 quantization needs at least one calibration batch")
    return nncf.quantize(ov_model, nncf.Dataset(batches), subset_size=subset_size)


class NoArguments(BaseModel):
    """``quantize.args`` of a quantizer taking none."""

    model_config = ConfigDict(extra="forbid")


def nncf_int8(model: nn.Module, example_input: torch.Tensor, calibration: Iterable[np.ndarray], *,
              subset_size: int = 300, inference_precision: str = "f32", pm=None) -> OpenVINOArtifact:
    """NNCF INT8 (weights and activations) on the OpenVINO IR of ``model``; float ops run at ``inference_precision``."""
    return OpenVINOArtifact(quantize_int8(model, example_input, calibration, subset_size, pm), inference_precision)


nncf_int8.deployment, nncf_int8.precisions, nncf_int8.arguments = INT8, ("int8",), NoArguments


class PointwiseMatMul(nn.Module):
    """A kernel-1 convolution written as the matrix product it is, so that the exported graph holds a MatMul
    (NNCF compresses only MatMul weights below 8 bits); same outputs as the convolution."""

    def __init__(self, conv: nn.modules.conv._ConvNd):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.spatial_dims = len(conv.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.dim() - 1 - self.spatial_dims  # 1, or 2 with a leading time axis (multi-step layers)
        lead, spatial = x.shape[:channels], x.shape[channels + 1:]
        y = torch.matmul(self.weight, x.reshape(*lead, x.shape[channels], -1)).reshape(*lead, -1, *spatial)
        return y if self.bias is None else y + self.bias.view(-1, *[1] * self.spatial_dims)


def with_matmuls(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every matmul-like convolution (``targets.matmul_like``) as a ``PointwiseMatMul``."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) and matmul_like(child):
                setattr(parent, name, PointwiseMatMul(child))
    return model


class Int4Arguments(BaseModel):
    """``quantize.args`` of ``nncf_int4``."""

    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(1.0, gt=0, le=1, description="the share of matmul-like weights at INT4 (NNCF keeps the ones "
                                                      "its sensitivity criterion finds most sensitive at INT8)")
    group_size: int = Field(-1, description="-1: one scale per output channel; else inputs per scale (widths must "
                                            "stay multiples of it: prune.round_to)")


def nncf_int4(model: nn.Module, example_input: torch.Tensor, calibration: Iterable[np.ndarray], *,
              subset_size: int = 300, ratio: float = 1.0, group_size: int = -1,
              inference_precision: str = "f32", pm=None) -> OpenVINOArtifact:
    """Mixed INT4/INT8 weights with NNCF's weight compression on the OpenVINO IR of ``model``.

    Matmul-like layers (linear, kernel-1 convolutions, exported as MatMul) get INT4 weights (symmetric,
    per output channel, or per ``group_size`` inputs), the other convolutions INT8; activations stay
    floating point. With ``ratio`` < 1 NNCF keeps the matmul weights it finds most sensitive on the
    calibration images at INT8 until only ``ratio`` of them are INT4.
    """
    import nncf

    if not 0 < ratio <= 1:
        raise ExportError(f"nncf_int4: quantize.args.ratio must be in (0, 1], got {ratio}")
    ov_model = to_openvino_model(with_matmuls(cpu_model(model)), example_input, pm)  # one copy, on the CPU
    dataset = None
    if ratio < 1:  # NNCF ranks the layers on activations only when some must stay INT8
        batches = [np.asarray(batch, dtype=np.float32) for batch in calibration]
        dataset = nncf.Dataset(batches) if batches else None
    try:
        compressed = nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT4_SYM, ratio=ratio,
                                           group_size=group_size, all_layers=True, dataset=dataset,
                                           subset_size=subset_size)
    except nncf.errors.ParameterNotSupportedError as error:
        raise ExportError(f"nncf_int4: {first_line(error)}") from None
    except nncf.errors.InvalidGroupSizeError as error:
        raise ExportError(f"nncf_int4 with quantize.args.group_size {group_size}: {first_line(error)}; use "
                          "group_size: -1 (one scale per output channel, the default) or keep every width a multiple "
                          "of it (prune.round_to)") from None
    return OpenVINOArtifact(compressed, inference_precision)


nncf_int4.deployment, nncf_int4.precisions, nncf_int4.arguments = INT4, ("int8", "int4"), Int4Arguments


def onnx_int8(model: nn.Module, example_input: torch.Tensor, path: Path, calibration: Iterable[np.ndarray],
              verification: Verification | None = None, subset_size: int | None = None, pm=None) -> list[Path]:
    """Write ``path`` (.onnx): INT8 in QDQ form (NNCF on the ONNX graph: QuantizeLinear/DequantizeLinear
    pairs any ONNX runtime folds into INT8 kernels), verified by decisions on onnxruntime.
    Calibrated on ``subset_size`` of the ``calibration`` batches (all of them by default).

    The INT8 model is held to ``verification.min_int8_agreement`` with the PyTorch model: rounding
    weights and activations to 8 bits flips some spikes, which the FP32 exports' bar would refuse.
    """
    import nncf
    import onnx

    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("the onnx_int8 export is checked on onnxruntime: pip install 'primesvt-plugin[onnx]'") from None
    batches = [np.asarray(batch, dtype=np.float32) for batch in calibration]
    if not batches:
        raise ExportError("the onnx_int8 export needs at least one calibration batch")
    verification = verification_or_example(model, example_input, verification)
    with tempfile.TemporaryDirectory() as folder:
        fp32 = Path(folder) / "fp32.onnx"
        # the FP32 graph is an intermediate: only the INT8 file is judged (and written)
        to_onnx(model, example_input, fp32, pm, Verification.of(model, example_input.cpu().numpy(), min_agreement=0.0))
        try:
            quantized = nncf.quantize(onnx.load(str(fp32)), nncf.Dataset(batches, lambda batch: {"images": batch}),
                                      subset_size=subset_size or len(batches))
        except Exception as error:
            raise ExportError(f"NNCF could not quantize the ONNX model: {first_line(error)}") from error
    onnx.save(quantized, str(path))
    with removed_unless_verified(path, "the INT8 ONNX file does not run on onnxruntime"):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = predict_batches(lambda batch: session.run(None, {"images": batch})[0], verification.images,
                                  len(example_input))
        verification.check("INT8 ONNX (QDQ) export", outputs, "int8 on onnxruntime",
                           min_agreement=verification.min_int8_agreement)
    return [path]
