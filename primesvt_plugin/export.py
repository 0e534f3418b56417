"""Export spiking models for embedded runtimes: ONNX, OpenVINO IR, and INT8 through NNCF.

SpikingJelly runs neurons through fused custom operators (``sj_lif::forward``)
that no exporter can convert. While exporting, every stateful layer runs the
plain-PyTorch forward its plugin gives (``primesvt_export_forward``) and the
model is traced from a fresh state with its time loop unrolled; the model is
restored afterwards.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pluggy
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional

from .inference import fresh_forward, inference
from .errors import ExportError
from .memory import stateful_modules
from .plugins import get_plugin_manager


class FreshStateModel(nn.Module):
    """Runs the wrapped spiking model from a reset state: what exporters should trace."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self.model)
        return self.model(x)


@contextlib.contextmanager
def exportable(model: nn.Module, pm: pluggy.PluginManager | None = None) -> Iterator[nn.Module]:
    """Inside: ``model`` (eval mode) runs plain-PyTorch neuron forwards; yields a traceable wrapper."""
    pm = pm or get_plugin_manager()
    names = {m: n for n, m in model.named_modules()}
    layers = [m for m in stateful_modules(model) if len(m._memories) > 0]
    forwards = {}
    for layer in layers:
        forward = pm.hook.primesvt_export_forward(layer=layer)
        if forward is None:
            raise ExportError(
                f"layer {names[layer]!r} ({type(layer).__qualname__}) has no exportable forward; "
                "a plugin must implement primesvt_export_forward for it")
        if getattr(layer, "step_mode", "m") != "m":
            raise ExportError(f"layer {names[layer]!r} is in single-step mode; export needs multi-step ('m')")
        forwards[layer] = forward
    try:
        for layer, forward in forwards.items():
            layer.forward = forward
        with inference(model), warnings.catch_warnings():
            # The unrolled time loop and shape checks are constants for a fixed input shape.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            yield FreshStateModel(model)
    finally:
        for layer in forwards:
            layer.__dict__.pop("forward", None)


AGREEMENT_ATOL = 1e-4


def reference_output(model: nn.Module, example_input: torch.Tensor) -> np.ndarray:
    """The PyTorch model's own output (SpikingJelly kernels, fresh state) on the example."""
    return fresh_forward(model, example_input).numpy()


def check_agreement(what: str, got: np.ndarray, expected: np.ndarray) -> None:
    """Refuse an export whose output on the example differs from the PyTorch model's."""
    if got.shape != expected.shape or not np.allclose(got, expected, atol=AGREEMENT_ATOL):
        gap = np.abs(got - expected).max() if got.shape == expected.shape else f"shape {got.shape}"
        raise ExportError(f"{what} disagrees with the PyTorch model on the example input ({gap} vs "
                          f"{expected.shape}); not written")


def to_onnx(model: nn.Module, example_input: torch.Tensor, path: Path, pm=None) -> list[Path]:
    """Write ``path`` (.onnx), checked against the model; the batch size is the example's."""
    import openvino as ov

    expected = reference_output(model, example_input)
    with exportable(model, pm) as traceable, torch.no_grad():
        try:
            torch.onnx.export(traceable, (example_input,), str(path), dynamo=False, opset_version=17,
                              input_names=["images"], output_names=["outputs"])
        except Exception as error:
            raise ExportError(f"ONNX export failed: {error}") from error
    try:
        check_agreement("ONNX export", run_openvino(ov.Core().read_model(str(path)), example_input.numpy()), expected)
    except Exception as error:
        path.unlink()
        if isinstance(error, ExportError):
            raise
        raise ExportError(f"the exported ONNX file does not run: {error}") from error
    return [path]


def to_openvino_model(model: nn.Module, example_input: torch.Tensor, pm=None):
    """An ``openvino.Model`` of ``model`` (FP32)."""
    import openvino as ov

    with exportable(model, pm) as traceable, torch.no_grad():
        try:
            return ov.convert_model(traceable, example_input=example_input)
        except Exception as error:
            raise ExportError(f"OpenVINO conversion failed: {error}") from error


def save_openvino(ov_model, path: Path) -> list[Path]:
    """Write ``path`` (.xml) and its .bin, weights kept at their own precision."""
    import openvino as ov

    ov.save_model(ov_model, str(path), compress_to_fp16=False)
    return [path, path.with_suffix(".bin")]


def to_openvino(model: nn.Module, example_input: torch.Tensor, path: Path, pm=None) -> list[Path]:
    """Write ``path`` (.xml + .bin), checked against the model."""
    ov_model = to_openvino_model(model, example_input, pm)
    check_agreement("OpenVINO export", run_openvino(ov_model, example_input.numpy()),
                    reference_output(model, example_input))
    return save_openvino(ov_model, path)


def quantize_int8(model: nn.Module, example_input: torch.Tensor, calibration: Iterable[np.ndarray],
                  subset_size: int = 300, pm=None):
    """Post-training INT8 quantization (weights and activations) with NNCF, on OpenVINO IR."""
    import nncf

    ov_model = to_openvino_model(model, example_input, pm)
    batches = [np.asarray(batch, dtype=np.float32) for batch in calibration]
    if not batches:
        raise ExportError("INT8 quantization needs at least one calibration batch")
    return nncf.quantize(ov_model, nncf.Dataset(batches), subset_size=subset_size)


def predict_compiled(compiled, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Outputs of a compiled OpenVINO model on ``images``, batch by batch (time axis kept first)."""
    outputs = [compiled(images[i:i + batch_size])[0] for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs, axis=-2 if outputs[0].ndim == 3 else 0)


def run_openvino(ov_model, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Outputs of an OpenVINO model on ``images``."""
    import openvino as ov

    return predict_compiled(ov.Core().compile_model(ov_model, "CPU"), images, batch_size)
