"""NIR export (the Neuromorphic Intermediate Representation), through SpikingJelly's ``nir_exchange``.

A NIR graph is the network of *one time step* (convolutions, linear layers, neurons
with their state); the runtime that reads it drives the time loop. So a model can be
written as NIR when it runs multi-step on a time-major input ``[T, N, ...]`` and every
layer has a NIR node. Spiking self-attention multiplies two spike tensors, which NIR
has no node for (refused naming the attention modules, as the attention plugins
describe them), and models that repeat an image over time inside ``forward`` have no
per-step form: both are refused with that reason. The written graph is read back with
``import_from_nir`` and stepped through time on the example input; it must take the
same decisions as the PyTorch model before the file is written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import ExportError, first_line
from ..plugins import get_plugin_manager
from ..pruning.spiking import has_time_axis, inference
from .export import DEFAULT_MIN_AGREEMENT, Verification, cpu_model, predict_frame_batches, predict_torch

NIR_DT = 1e-4  # seconds per time step written into the graph's neuron parameters (SpikingJelly's default)
VERIFY_CHUNK = 64  # samples stepped through the graph at a time (event frames are large)


def _nir_exchange():
    try:
        import nir
        from spikingjelly.activation_based import nir_exchange
    except ImportError:
        raise ExportError("the nir export needs the NIR packages: pip install 'primesvt-plugin[nir]'") from None
    return nir, nir_exchange


def run_nir_graph(graph, inputs: torch.Tensor) -> np.ndarray:
    """Outputs ``[T, N, ...]`` of a NIR graph read back into PyTorch, stepped over ``inputs``' time axis."""
    _, nir_exchange = _nir_exchange()
    module = nir_exchange.import_from_nir(graph)
    state, outputs = None, []
    with torch.no_grad():
        for step in inputs:
            output, state = module(step, state)
            outputs.append(output)
    return torch.stack(outputs).numpy()


def attention_blocks(model: nn.Module, pm=None) -> list[str]:
    """Names of the modules an attention plugin describes (``primesvt_attention_layout``)."""
    pm = pm or get_plugin_manager()
    return [name for name, module in model.named_modules() if pm.hook.primesvt_attention_layout(module=module)]


def to_nir(model: nn.Module, example_input: torch.Tensor, path: Path, verification: Verification | None = None,
           dt: float = NIR_DT, pm=None) -> list[Path]:
    """Write ``path`` (.nir, HDF5) for a model stepped over a time-major ``example_input`` ``[T, N, ...]``.

    Traced on one sample; verified by decisions on ``verification``'s frames when it holds time-major
    frames (a recipe's test frames), else on ``example_input`` (with ``verification``'s agreement bar
    when one is given), ``VERIFY_CHUNK`` samples at a time.
    """
    nir, nir_exchange = _nir_exchange()
    model, example_input = cpu_model(model), example_input.cpu()
    name = type(model).__name__
    attention = attention_blocks(model, pm)
    if attention:
        raise ExportError(f"NIR cannot represent {name}'s spiking self-attention ({', '.join(attention)}): it "
                          "multiplies two spike tensors, and NIR graphs hold convolution, linear, pooling and neuron "
                          "nodes only")
    if not has_time_axis(model, example_input):
        raise ExportError(f"NIR holds the network of one time step, and {name} takes {tuple(example_input.shape)} "
                          "inputs it repeats over time itself; a NIR export needs a model stepped over a time-major "
                          "[T, N, ...] input (every SpikingJelly layer in step_mode 'm', no T attribute)")
    if verification is not None and verification.time_major:
        check = verification
    else:
        frames = example_input.numpy()
        check = Verification(frames, predict_torch(model, frames, VERIFY_CHUNK, time_major=True),
                             verification.min_agreement if verification else DEFAULT_MIN_AGREEMENT, time_major=True)
    try:
        with inference(model):  # eval mode and fresh state, restored afterwards
            graph = nir_exchange.export_to_nir(model, example_input[:, :1], dt=dt)
        outputs = predict_frame_batches(lambda batch: run_nir_graph(graph, torch.from_numpy(batch)), check.images,
                                        VERIFY_CHUNK)
    except Exception as error:
        raise ExportError(f"NIR cannot represent {name}: {first_line(error)} (NIR graphs hold convolution, linear, "
                          "pooling and neuron nodes)") from error
    check.check("NIR export", outputs, "f32")
    if verification is not None and check is not verification:
        verification.results.update(check.results)
    nir.write(str(path), graph)
    return [path]
