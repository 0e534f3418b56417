"""Exporters (recipe ``export.formats``): TorchScript, ONNX, INT8 ONNX (QDQ), OpenVINO IR, NIR, each verified
before it is written.

An exporter marked ``time_major = True`` exports models stepped over event frames ``[T, N, ...]`` (NIR holds
one time step) and is given the test frames as its example; the others take ``[N, ...]`` images."""
from __future__ import annotations

import torch

from ..deploy.export import (ExportError, Verification, cpu_model, exportable, predict_batches, to_onnx, to_openvino,
                      verification_or_example)
from ..deploy.nir import to_nir
from ..deploy.quantization import onnx_int8
from ..plugins import hookimpl


def to_torchscript(model, example_input, path, *, verification: Verification | None = None, calibration=None,
                   pm=None):
    """A traced TorchScript module (``torch.jit.load`` runs it without primesvt or SpikingJelly)."""
    target = path.with_suffix(".torchscript.pt")
    model, example_input = cpu_model(model), example_input.cpu()  # a CPU artifact, like the others
    verification = verification_or_example(model, example_input, verification)
    with exportable(model, pm) as traceable, torch.no_grad():
        try:
            traced = torch.jit.trace(traceable, example_input)
        except Exception as error:
            raise ExportError(f"TorchScript export failed: {error}") from error
        outputs = predict_batches(lambda batch: traced(torch.from_numpy(batch)).numpy(), verification.images,
                                  len(example_input))
    verification.check("TorchScript export", outputs, "f32")  # PyTorch on the CPU: float32 throughout
    torch.jit.save(traced, str(target))
    return [target]


def to_onnx_file(model, example_input, path, *, verification=None, calibration=None, pm=None):
    """``model.onnx``, verified on OpenVINO's ONNX reader."""
    return to_onnx(model, example_input, path.with_suffix(".onnx"), pm, verification)


def to_openvino_files(model, example_input, path, *, verification=None, calibration=None, pm=None):
    """``model.xml`` + ``model.bin``, verified at the verification's precision."""
    return to_openvino(model, example_input, path.with_suffix(".xml"), pm, verification)


def to_onnx_int8_file(model, example_input, path, *, verification=None, calibration=None, pm=None):
    """``model_int8.onnx`` (QDQ), calibrated on ``calibration``, checked on onnxruntime."""
    return onnx_int8(model, example_input, path.with_name(path.name + "_int8.onnx"), calibration,
                     verification=verification, pm=pm)


def to_nir_file(model, example_input, path, *, verification: Verification | None = None, calibration=None, pm=None):
    """A NIR graph (``model.nir``) of a model stepped over time-major frames, read back and stepped through
    time on ``example_input`` before it is written (needs ``pip install 'primesvt-plugin[nir]'``)."""
    return to_nir(model, example_input, path.with_suffix(".nir"), verification)


for _exporter in (to_torchscript, to_onnx_file, to_openvino_files, to_onnx_int8_file):
    _exporter.time_major = False
to_nir_file.time_major = True


@hookimpl
def primesvt_register(registrar):
    registrar.exporters.add("torchscript", to_torchscript)
    registrar.exporters.add("torch", to_torchscript)  # the PyTorch artifact a deployment loads: TorchScript
    registrar.exporters.add("onnx", to_onnx_file)
    registrar.exporters.add("openvino", to_openvino_files)
    registrar.exporters.add("nir", to_nir_file)
    registrar.exporters.add("onnx_int8", to_onnx_int8_file)
