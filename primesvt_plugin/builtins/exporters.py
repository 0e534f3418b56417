"""Exporters (recipe ``export.formats``): TorchScript, ONNX, OpenVINO IR."""
from __future__ import annotations

import torch

from ..export import ExportError, check_agreement, exportable, reference_output, to_onnx, to_openvino
from ..plugins import hookimpl


def to_torchscript(model, example_input, path):
    """A traced TorchScript module (``torch.jit.load`` runs it without primesvt or SpikingJelly)."""
    target = path.with_suffix(".torchscript.pt")
    expected = reference_output(model, example_input)
    with exportable(model) as traceable, torch.no_grad():
        try:
            traced = torch.jit.trace(traceable, example_input)
        except Exception as error:
            raise ExportError(f"TorchScript export failed: {error}") from error
        check_agreement("TorchScript export", traced(example_input).numpy(), expected)
    torch.jit.save(traced, str(target))
    return [target]


@hookimpl
def primesvt_exporters():
    return {
        "torchscript": to_torchscript,
        "torch": to_torchscript,  # the PyTorch artifact a deployment loads: TorchScript
        "onnx": lambda model, example_input, path: to_onnx(model, example_input, path.with_suffix(".onnx")),
        "openvino": lambda model, example_input, path: to_openvino(model, example_input, path.with_suffix(".xml")),
    }
