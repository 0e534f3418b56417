"""Where a spiking model's memory goes: parameters, buffers and neuron state.

``footprint`` measures a real model. ``LedgerState`` predicts the footprint of
the same model after any set of channel removals without touching it, so the
policy can try many pruning plans cheaply; tests check prediction == measurement.

Neuron state is the membrane potential (and any other registered memory) a
spiking layer keeps between time steps for *one* input sample; on a device it
must live in RAM next to the weights for the whole inference.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch
import torch.nn as nn

from ..errors import ArgumentError
from .channels import ChannelOp, channel_slices
from .spiking import inference, one_sample, stateful_modules, to_model_device


@dataclass
class Footprint:
    param_bytes: int
    buffer_bytes: int
    state_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.buffer_bytes + self.state_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}

    def bytes_of(self, measure: str) -> int:
        """``parameters``: parameter bytes (the paper's memory); ``footprint``: + buffers + neuron state."""
        if measure not in MEASURES:
            raise ArgumentError(f"memory measure must be one of {MEASURES}, got {measure!r}")
        return self.param_bytes if measure == "parameters" else self.total_bytes


MEASURES = ("parameters", "footprint")




def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)




def state_bytes(model: nn.Module, example_inputs: torch.Tensor) -> dict[nn.Module, int]:
    """Bytes of state each stateful module holds after a forward pass of one sample."""
    with inference(model):
        model(one_sample(model, to_model_device(model, example_inputs)))
        return {m: _tensor_bytes(v for v in m._memories.values() if isinstance(v, torch.Tensor))
                for m in stateful_modules(model)}


def footprint(model: nn.Module, example_inputs: torch.Tensor) -> Footprint:
    """Measure parameter, buffer and per-sample neuron-state bytes of ``model``."""
    return Footprint(
        param_bytes=_tensor_bytes(p for p in model.parameters() if p.is_floating_point()),
        buffer_bytes=_tensor_bytes(b for b in model.buffers() if b.is_floating_point()),
        state_bytes=sum(state_bytes(model, example_inputs).values()),
    )


class LedgerState:
    """Which tensor entries and neuron channels are still alive under a pruning plan.

    Predicts the footprint after removing channels, from the model's current shapes,
    without modifying the model.
    """

    def __init__(self, model: nn.Module, neuron_state: dict[nn.Module, int]):
        self.model = model
        self.neuron_state = dict(neuron_state)
        # Beside each tensor: a model on a GPU keeps its masks there (no copies between devices)
        self.alive = {id(t): torch.ones(t.shape, dtype=torch.bool, device=t.device) for t in _float_tensors(model)}
        # (key, bytes per entry, is a parameter): the plan is judged on the shapes seen now
        self.entries = [(id(t), t.element_size(), isinstance(t, nn.Parameter)) for t in _float_tensors(model)]
        self.neuron_removed: dict[nn.Module, set[int]] = {}
        self.neuron_width: dict[nn.Module, int] = {}

    def copy(self) -> "LedgerState":
        """An independent ledger in the same state (for "what if" predictions)."""
        twin = LedgerState.__new__(LedgerState)
        twin.model, twin.neuron_state, twin.entries = self.model, self.neuron_state, self.entries
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
        return Footprint(params, buffers, state)


def _float_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
