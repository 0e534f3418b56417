"""Where a spiking model's memory goes: parameters, buffers and neuron state.

``footprint`` measures a real model. ``LedgerState`` predicts the footprint of
the same model after any set of channel removals without touching it, so the
policy can try many pruning plans cheaply; tests check prediction == measurement.

Neuron state is the membrane potential (and any other registered memory) a
spiking layer keeps between time steps for *one* input sample; on a device it
must live in RAM next to the weights for the whole inference.

A device has two memories: *flash* (the weight file) and *RAM* (neuron state, buffers
and the largest layer output); ``targets.Deployment`` says how the model sits in them,
and ``Footprint`` holds both next to the parameter, buffer and state bytes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, NamedTuple

import torch
import torch.nn as nn

from ..errors import ArgumentError
from ..targets import FP32, Deployment, quantized_weights
from .channels import ChannelOp, channel_slices
from .spiking import checked_output, inference, one_sample, run_model, stateful_modules, to_model_device


@dataclass
class Footprint:
    param_bytes: int
    buffer_bytes: int
    state_bytes: int
    flash_bytes: int = 0  # at the deployment's precision (see ``Deployment``)
    ram_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.buffer_bytes + self.state_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}

    def bytes_of(self, measure: str) -> int:
        """``parameters``: parameter bytes (the paper's memory); ``footprint``: + buffers + neuron state;
        ``flash`` / ``ram``: the device's two memories at the deployment's precision."""
        if measure not in MEASURES:
            raise ArgumentError(f"memory measure must be one of {MEASURES}, got {measure!r}")
        return {"parameters": self.param_bytes, "footprint": self.total_bytes, "flash": self.flash_bytes,
                "ram": self.ram_bytes}[measure]


MEASURES = ("parameters", "footprint", "flash", "ram")
SAVING_MEASURES = ("parameters", "footprint")  # what a memory_saving (and the ranking) may count


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _kept_rows(alive: torch.Tensor, dim: int) -> int:
    """Slices along ``dim`` with any entry alive."""
    return int(alive.movedim(dim, 0).reshape(alive.shape[dim], -1).any(1).sum())


def _flash(tensors: list[tuple[torch.Tensor, torch.Tensor | None]], quantized: dict[int, tuple[int, float]],
           deployment: Deployment) -> int:
    """Flash bytes of ``tensors`` (each with its alive mask, None: all alive) under ``deployment``."""
    flash = float(deployment.file_bytes)
    for tensor, alive in tensors:
        entries = tensor.numel() if alive is None else int(alive.sum())
        if id(tensor) in quantized:
            dim, entry_bytes = quantized[id(tensor)]
            rows = tensor.shape[dim] if alive is None else _kept_rows(alive, dim)
            flash += entries * entry_bytes + rows * deployment.channel_bytes
        else:
            flash += entries * deployment.other_bytes
    return round(flash)


def _ram(tensors: list[tuple[torch.Tensor, torch.Tensor | None]], state: int, outputs: Iterable[float],
         deployment: Deployment) -> int:
    """RAM bytes: neuron ``state``, the buffers among ``tensors`` and the largest of ``outputs`` under ``deployment``."""
    # a runtime folding batch norms keeps no buffers (INT8: other_bytes 0)
    buffers = sum(t.numel() if alive is None else int(alive.sum())
                  for t, alive in tensors if not isinstance(t, nn.Parameter)) * deployment.other_bytes
    return round(state + buffers + max(outputs, default=0) * deployment.activation_bytes)


def flash_bytes(model: nn.Module, deployment: Deployment) -> int:
    """Flash bytes of ``model`` under ``deployment`` (no forward pass needed)."""
    return _flash([(t, None) for t in _float_tensors(model)], quantized_weights(model, deployment), deployment)


class SamplePass(NamedTuple):
    """What one forward pass of one sample measured (``state_and_outputs``)."""

    state_bytes: dict[nn.Module, int]  # stateful module -> bytes of its state
    layer_outputs: dict[nn.Module, int]  # layer -> entries of its output, all time steps, in running order
    output_shape: torch.Size  # the shape of the model's output tensor (``spiking.checked_output``)


def state_and_outputs(model: nn.Module, example_inputs: torch.Tensor, record_outputs: bool = True,
                      output_transform=None, forward_fn=None) -> SamplePass:
    """One forward pass of one sample: the state bytes of each stateful module, (``record_outputs``)
    the entries of each layer's output, and the shape of the model's output (``spiking.model_output``).

    Layers: the leaf modules and the spiking neurons (whose inner modules are the neuron's business).
    """
    stateful = stateful_modules(model)
    outputs: dict[nn.Module, int] = {}

    def record(module, _inputs, output):
        tensors = output if isinstance(output, (tuple, list)) else [output]
        outputs[module] = max(outputs.get(module, 0), sum(t.numel() for t in tensors
                                                          if isinstance(t, torch.Tensor) and t.is_floating_point()))

    hooks = []
    if record_outputs:
        inner = {m for neuron in stateful for m in neuron.modules() if m is not neuron}
        hooks = [m.register_forward_hook(record) for m in model.modules()
                 if m not in inner and (m in stateful or not any(m.children()))]
    try:
        with inference(model):
            output = run_model(model, one_sample(model, to_model_device(model, example_inputs)), forward_fn)
            states = {m: _tensor_bytes(v for v in m._memories.values() if isinstance(v, torch.Tensor))
                      for m in stateful}
    finally:
        for hook in hooks:
            hook.remove()
    return SamplePass(states, outputs, checked_output(output, output_transform).shape)


def layer_outputs(model: nn.Module, example_inputs: torch.Tensor) -> dict[nn.Module, int]:
    """Entries of each layer's output for one sample (all time steps), in the order the layers first run."""
    return state_and_outputs(model, example_inputs).layer_outputs


def state_bytes(model: nn.Module, example_inputs: torch.Tensor) -> dict[nn.Module, int]:
    """Bytes of state each stateful module holds after a forward pass of one sample."""
    return state_and_outputs(model, example_inputs, record_outputs=False).state_bytes


def footprint(model: nn.Module, example_inputs: torch.Tensor, deployment: Deployment = FP32) -> Footprint:
    """Measure parameter, buffer and per-sample neuron-state bytes of ``model``, and its flash and RAM
    bytes under ``deployment``."""
    sample = state_and_outputs(model, example_inputs)
    return footprint_of(model, sample.state_bytes, sample.layer_outputs, deployment)


def footprint_of(model: nn.Module, states: dict[nn.Module, int], outputs: dict[nn.Module, int],
                 deployment: Deployment = FP32) -> Footprint:
    """``footprint`` from a one-sample pass already made (``state_and_outputs``)."""
    state = sum(states.values())
    tensors = [(t, None) for t in _float_tensors(model)]
    return Footprint(
        param_bytes=_tensor_bytes(p for p in model.parameters() if p.is_floating_point()),
        buffer_bytes=_tensor_bytes(b for b in model.buffers() if b.is_floating_point()),
        state_bytes=state, flash_bytes=_flash(tensors, quantized_weights(model, deployment), deployment),
        ram_bytes=_ram(tensors, state, outputs.values(), deployment),
    )


class LedgerState:
    """Which tensor entries and neuron channels are still alive under a pruning plan.

    Predicts the footprint after removing channels, from the model's current shapes,
    without modifying the model.
    """

    def __init__(self, model: nn.Module, neuron_state: dict[nn.Module, int], outputs: dict[nn.Module, int],
                 deployment: Deployment = FP32):
        self.model = model
        self.neuron_state = dict(neuron_state)  # ``state_bytes``
        self.outputs = outputs  # leaf layer -> output entries (``layer_outputs``), for the RAM peak
        self.deployment = deployment
        self.tensors = _float_tensors(model)
        self.quantized = quantized_weights(model, deployment)
        # Beside each tensor: a model on a GPU keeps its masks there (no copies between devices)
        self.alive = {id(t): torch.ones(t.shape, dtype=torch.bool, device=t.device) for t in self.tensors}
        # (key, bytes per entry, is a parameter): the plan is judged on the shapes seen now
        self.entries = [(id(t), t.element_size(), isinstance(t, nn.Parameter)) for t in self.tensors]
        # layer -> (its weight's key, output-channel dim), read now for the same reason
        self.output_weights = {layer: (id(layer.weight), self.quantized.get(id(layer.weight), (0,))[0])
                               for layer in self.outputs if isinstance(getattr(layer, "weight", None), torch.Tensor)
                               and id(layer.weight) in self.alive}
        self.neuron_removed: dict[nn.Module, set[int]] = {}
        self.neuron_width: dict[nn.Module, int] = {}

    def copy(self) -> "LedgerState":
        """An independent ledger in the same state (for "what if" predictions)."""
        twin = LedgerState.__new__(LedgerState)
        twin.model, twin.neuron_state, twin.entries = self.model, self.neuron_state, self.entries
        twin.deployment, twin.outputs, twin.tensors, twin.quantized, twin.output_weights = (
            self.deployment, self.outputs, self.tensors, self.quantized, self.output_weights)
        twin.alive = {key: alive.clone() for key, alive in self.alive.items()}
        twin.neuron_removed = {neuron: set(removed) for neuron, removed in self.neuron_removed.items()}
        twin.neuron_width = dict(self.neuron_width)
        return twin

    def remove(self, op: ChannelOp) -> None:
        """Account for removing the channels of ``op``."""
        if op.layer in self.neuron_state:
            self.neuron_removed.setdefault(op.layer, set()).update(op.idxs)
            self.neuron_width[op.layer] = op.of
            return
        index = torch.tensor(op.idxs, dtype=torch.long)
        for tensor, dim in channel_slices(op.layer, op.direction):
            self.alive[id(tensor)].index_fill_(dim, index.to(tensor.device), False)

    def footprint(self) -> Footprint:
        params = sum(int(self.alive[key].sum()) * size for key, size, is_param in self.entries if is_param)
        buffers = sum(int(self.alive[key].sum()) * size for key, size, is_param in self.entries if not is_param)
        state = sum(self.neuron_state.values())
        for neuron, removed in self.neuron_removed.items():
            state -= self.neuron_state[neuron] * len(removed) // self.neuron_width[neuron]
        tensors = [(t, self.alive[id(t)]) for t in self.tensors]
        return Footprint(params, buffers, state, _flash(tensors, self.quantized, self.deployment),
                         _ram(tensors, state, self._kept_outputs(), self.deployment))

    def _kept_outputs(self) -> list[float]:
        """Each layer's output entries under the plan: scaled by the share of output channels it keeps.

        A layer without channels of its own (flatten, dropout, an activation) whose output is as large
        as the layer before it shrinks with that layer; any other keeps its size (an upper bound).
        """
        kept, previous = [], (None, 1.0)
        for layer, entries in self.outputs.items():
            if layer in self.neuron_removed:
                fraction = 1 - len(self.neuron_removed[layer]) / self.neuron_width[layer]
            elif layer in self.output_weights:
                key, dim = self.output_weights[layer]
                fraction = _kept_rows(self.alive[key], dim) / self.alive[key].shape[dim]
            else:
                fraction = previous[1] if entries == previous[0] else 1.0
            kept.append(entries * fraction)
            previous = (entries, fraction)
        return kept


def _float_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
