"""Export spiking models for embedded runtimes: ONNX, OpenVINO IR (INT8 is in ``quantization.py``).

SpikingJelly runs neurons through fused custom operators (``sj_lif::forward``)
that no exporter can convert. While exporting, every stateful layer runs the
plain-PyTorch forward its plugin gives (``primesvt_export_forward``) and the
model is traced from a fresh state with its time loop unrolled; the model is
restored afterwards.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pluggy
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional

from ..errors import ArgumentError, ExportError, first_line
from ..plugins import get_plugin_manager
from ..pruning.spiking import (class_scores, first_tensor, fresh_forward, inference, model_device,
                               overridden_forward, stateful_modules, to_model_device)


def cpu_model(model: nn.Module) -> nn.Module:
    """``model`` itself when it is on the CPU, else a CPU copy: exporters and OpenVINO work on the CPU,
    and the caller's model stays on its device."""
    return model if model_device(model).type == "cpu" else copy.deepcopy(model).cpu()


class FreshStateModel(nn.Module):
    """Runs the wrapped spiking model from a reset state and returns its one output tensor (the first of
    a tuple such as SDT's ``(logits, hook)``): what exporters should trace."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self.model)
        return first_tensor(self.model(x))


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
    with overridden_forward(forwards), inference(model), warnings.catch_warnings():
        # The unrolled time loop and shape checks are constants for a fixed input shape.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield FreshStateModel(model)


PRECISIONS = ("f32", "bf16", "f16")
DEFAULT_MIN_AGREEMENT = 0.995
DEFAULT_MIN_INT8_AGREEMENT = 0.95


def compile_openvino(ov_model, precision: str = "f32"):
    """Compile an OpenVINO model for the CPU at ``precision`` (its ``INFERENCE_PRECISION_HINT``).

    Never left to the default: OpenVINO computes in bf16 on CPUs with native BF16
    (f16 on GPUs), and a spiking model turns that rounding into flipped spikes.
    """
    import openvino as ov

    if precision not in PRECISIONS:
        raise ArgumentError(f"inference precision must be one of {PRECISIONS}, got {precision!r}")
    return ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": precision})


def compiled_precision(compiled) -> str:
    """The precision a compiled OpenVINO model really runs at (``f32``, ``bf16``, ...), read back."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def cpu_description() -> dict:
    """This CPU as OpenVINO sees it: name, capabilities (BF16, FP16, INT8) and default precision."""
    import openvino as ov

    core = ov.Core()
    return {"device": core.get_property("CPU", "FULL_DEVICE_NAME"),
            "capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
            "default_precision": core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()}


def predict_batches(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int) -> np.ndarray:
    """``run`` over ``images`` in batches of exactly ``batch_size`` (exports may fix the batch size:
    the last batch is padded), outputs joined on the batch axis (a leading time axis is kept)."""
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        n = len(batch)
        if n < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
        out = np.asarray(run(batch))
        outputs.append(out[:, :n] if out.ndim == 3 else out[:n])
    return np.concatenate(outputs, axis=1 if outputs[0].ndim == 3 else 0)


def predict_frame_batches(run: Callable[[np.ndarray], np.ndarray], frames: np.ndarray, batch_size: int) -> np.ndarray:
    """``run`` over time-major event ``frames`` ``[T, N, ...]`` in batches of ``batch_size`` samples, outputs
    ``[T, N, ...]`` joined along N."""
    return np.concatenate([run(np.ascontiguousarray(frames[:, start:start + batch_size]))
                           for start in range(0, frames.shape[1], batch_size)], axis=1)


def predict_torch(model: nn.Module, images: np.ndarray, batch_size: int = 128, time_major: bool = False) -> np.ndarray:
    """The PyTorch model's own outputs (SpikingJelly kernels, fresh state per batch) on ``images``
    (``time_major``: event frames ``[T, N, ...]``, batched along N)."""
    def run(batch: np.ndarray) -> np.ndarray:
        return first_tensor(fresh_forward(model, to_model_device(model, torch.from_numpy(batch)))).cpu().numpy()

    return (predict_frame_batches if time_major else predict_batches)(run, images, batch_size)


@dataclass
class Verification:
    """What an export must reproduce before it is written: the PyTorch model's decisions.

    A spiking model amplifies tiny numeric differences into flipped spikes, so an
    export is judged by top-1 agreement with the model on ``images`` (at least
    ``min_agreement``), and the largest logit gap is reported alongside.
    ``precision`` is the inference precision exporters compile for.
    """

    images: np.ndarray
    reference: np.ndarray
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    precision: str = "f32"
    min_int8_agreement: float = DEFAULT_MIN_INT8_AGREEMENT  # for exports quantized on the way
    results: dict[str, dict] = field(default_factory=dict)
    time_major: bool = False  # images are event frames [T, N, ...] (what exporters marked time_major get)

    @classmethod
    def of(cls, model: nn.Module, images: np.ndarray, time_major: bool = False, **options) -> "Verification":
        """Verification against ``model``'s outputs on ``images`` (``time_major``: frames ``[T, N, ...]``)."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        # The CPU model is what gets exported: a GPU's arithmetic (TF32 convolutions) would flip spikes
        # and blame the export for it.
        return cls(images, predict_torch(cpu_model(model), images, time_major=time_major), time_major=time_major,
                   **options)

    def check(self, what: str, outputs: np.ndarray, precision: str, min_agreement: float | None = None) -> dict:
        """Record how ``outputs`` (the export's, on ``images``) agree; refuse below ``min_agreement``
        (the verification's own unless given)."""
        min_agreement = self.min_agreement if min_agreement is None else min_agreement
        if outputs.shape != self.reference.shape:
            raise ExportError(f"{what} outputs shape {outputs.shape}, the PyTorch model {self.reference.shape}; "
                              "not written")
        decisions = class_scores(self.reference).argmax(-1)
        agreement = float((class_scores(outputs).argmax(-1) == decisions).mean())
        gap = float(np.abs(outputs - self.reference).max())
        samples = int(np.size(decisions))  # not len(images): event frames are [T, N, ...]
        result = {"agreement": agreement, "samples": samples, "max_logit_gap": gap, "precision": precision}
        if agreement < min_agreement:
            raise ExportError(f"{what} agrees with the PyTorch model on {agreement:.2%} of {samples} "
                              f"samples at {precision} (needs {min_agreement:.2%}; largest logit gap "
                              f"{gap:.3g}); not written")
        self.results[what] = result
        return result


def verification_or_example(model: nn.Module, example_input: torch.Tensor,
                            verification: Verification | None) -> Verification:
    """``verification``, or (called without one) a verification on the example input alone."""
    return verification or Verification.of(model, example_input.cpu().numpy())


def to_onnx(model: nn.Module, example_input: torch.Tensor, path: Path, pm=None,
            verification: Verification | None = None) -> list[Path]:
    """Write ``path`` (.onnx), verified on OpenVINO's ONNX reader; the batch size is the example's."""
    import openvino as ov

    model, example_input = cpu_model(model), example_input.cpu()
    verification = verification_or_example(model, example_input, verification)
    with exportable(model, pm) as traceable, torch.no_grad():
        try:
            torch.onnx.export(traceable, (example_input,), str(path), dynamo=False, opset_version=17,
                              input_names=["images"], output_names=["outputs"])
        except Exception as error:
            raise ExportError(f"ONNX export failed: {error}") from error
    with removed_unless_verified(path, "the exported ONNX file does not run"):
        compiled = compile_openvino(ov.Core().read_model(str(path)), verification.precision)
        outputs = predict_batches(lambda batch: compiled(batch)[0], verification.images, len(example_input))
        verification.check("ONNX export", outputs, compiled_precision(compiled))
    return [path]


@contextlib.contextmanager
def removed_unless_verified(path: Path, failure: str) -> Iterator[None]:
    """Inside: run and check the file just written at ``path``; any error deletes it (an unverified
    export is never left behind) and is raised as an ``ExportError`` starting with ``failure``."""
    try:
        yield
    except Exception as error:
        path.unlink(missing_ok=True)
        if isinstance(error, ExportError):
            raise
        raise ExportError(f"{failure}: {first_line(error)}") from error


def to_openvino_model(model: nn.Module, example_input: torch.Tensor, pm=None):
    """An ``openvino.Model`` of ``model`` (FP32)."""
    import openvino as ov

    model, example_input = cpu_model(model), example_input.cpu()
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


def to_openvino(model: nn.Module, example_input: torch.Tensor, path: Path, pm=None,
                verification: Verification | None = None) -> list[Path]:
    """Write ``path`` (.xml + .bin), verified at the verification's precision."""
    model, example_input = cpu_model(model), example_input.cpu()
    verification = verification_or_example(model, example_input, verification)
    ov_model = to_openvino_model(model, example_input, pm)
    compiled = compile_openvino(ov_model, verification.precision)
    verification.check("OpenVINO export", predict_compiled(compiled, verification.images),
                       compiled_precision(compiled))
    return save_openvino(ov_model, path)


def predict_compiled(compiled, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Outputs of a compiled OpenVINO model on ``images``, batch by batch."""
    return predict_batches(lambda batch: compiled(batch)[0], images, batch_size)


def run_openvino(ov_model, images: np.ndarray, precision: str = "f32", batch_size: int = 16) -> np.ndarray:
    """Outputs of an OpenVINO model on ``images``, compiled at ``precision``."""
    return predict_compiled(compile_openvino(ov_model, precision), images, batch_size)
