"""Where a spiking model's memory goes: parameters, buffers and neuron state.

``footprint`` measures a real model. ``LedgerState`` predicts the footprint of
the same model after any set of channel removals without touching it, so the
policy can try many pruning plans cheaply; tests check prediction == measurement.

Neuron state is the membrane potential (and any other registered memory) a
spiking layer keeps between time steps for *one* input sample; on a device it
must live in RAM next to the weights for the whole inference.

A device has two memories, and a ``Deployment`` says how the model sits in them:

- *flash* (the weight file): conv/linear weight entries at ``weight_bytes`` each (those of
  layers a runtime runs as a matrix product, ``matmul_like``, at ``matmul_weight_bytes`` when
  the deployment compresses them further, e.g. INT4), plus
  ``channel_bytes`` per output channel of those weights (a quantizer's scale and the folded
  bias), plus the other parameters and buffers at ``other_bytes`` each, plus ``file_bytes``
  the runtime's file adds (measured once on the unpruned model: ``calibrated``);
- *RAM*: neuron state + buffers (at ``other_bytes``) + the largest output of any layer for
  one sample (all time steps, as a multi-step model holds it) at ``activation_bytes`` per entry.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Iterable, NamedTuple

import torch
import torch.nn as nn
from spikingjelly.activation_based import layer as sj_layer

from ..errors import ArgumentError
from .channels import ChannelOp, channel_slices
from .spiking import checked_output, inference, one_sample, run_model, stateful_modules, to_model_device


@dataclass(frozen=True)
class Deployment:
    """Bytes per entry of each kind of tensor on the target device (see the module docstring)."""

    name: str = "fp32"
    weight_bytes: float = 4  # per entry of a conv/linear weight
    channel_bytes: float = 0  # per output channel of a conv/linear weight
    other_bytes: float = 4  # per entry of the other parameters and buffers
    activation_bytes: float = 4  # per entry of a layer's output
    file_bytes: int = 0  # what the weight file adds beyond the tensors
    margin_bytes: int = 0  # how far below a flash budget the search aims: the prediction's uncertainty
    matmul_weight_bytes: float | None = None  # per entry of a matmul-like layer's weight (None: weight_bytes)
    energy_precision: str = "fp32"  # the op_counter costs its arithmetic is estimated at
    weight_precision: str = ""  # what conv/linear weights deploy at, in words ("": the name)
    matmul_precision: str = ""  # what matmul-like layers' weights deploy at ("": as the others)

    def precision_of(self, layer: nn.Module) -> str:
        """The precision ``layer``'s weights deploy at."""
        if self.matmul_precision and matmul_like(layer):
            return self.matmul_precision
        return self.weight_precision or self.name

    def calibrated(self, predicted_flash: int, measured_flash: int, margin_bytes: int = 0) -> "Deployment":
        """This deployment with ``file_bytes`` set so that its flash prediction equals a measured file,
        and ``margin_bytes`` kept free below a flash budget."""
        return replace(self, file_bytes=self.file_bytes + measured_flash - predicted_flash, margin_bytes=margin_bytes)


FP32 = Deployment()
# NNCF INT8 on OpenVINO IR, measured on trained Spikformers: 1 B per weight entry, about 8 B per output channel of a
# quantized layer (its scale and its bias, batch norms folded in), the other tensors no separate bytes.
INT8 = Deployment("int8", weight_bytes=1, channel_bytes=8, other_bytes=0, activation_bytes=1, energy_precision="int8")
# NNCF weight compression (``nncf_int4``): matmul-like weights INT4 (half a byte), the other conv weights INT8, per
# output channel a scale (and for INT8 a zero point) plus the folded batch norm: 9.2 B fitted on the digits Spikformer
# pruned 0-60% (within 40 B of those files, 170 B of PrimeSVT-pruned ones). Weight-only: activations and arithmetic
# stay FP32.
INT4 = Deployment("int4", weight_bytes=1, channel_bytes=9.2, other_bytes=0, activation_bytes=4, matmul_weight_bytes=0.5,
                  weight_precision="int8", matmul_precision="int4")


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


# Convolutions whose kernel-1 form is a matrix product over the channel axis (SpikingJelly's multi-step
# wrappers only fold time into the batch around the same convolution)
POINTWISE_CONVS = (nn.Conv1d, nn.Conv2d, sj_layer.Conv1d, sj_layer.Conv2d)


def matmul_like(layer: nn.Module) -> bool:
    """A linear layer, or a plain convolution that is one (kernel 1, stride 1, no padding, no groups): what a
    runtime can hold as a MatMul, the only weights NNCF compresses below 8 bits."""
    if isinstance(layer, nn.Linear):
        return True
    # exact types: another subclass may compute something else in its forward
    return (type(layer) in POINTWISE_CONVS and layer.groups == 1 and layer.padding_mode == "zeros"
            and set(layer.kernel_size) == set(layer.stride) == {1} and layer.padding in ("valid", (0,), (0, 0)))


def quantized_weights(model: nn.Module, deployment: Deployment) -> dict[int, tuple[int, float]]:
    """``id(weight) -> (its output-channel dim, bytes per entry)`` for every conv/linear weight (what a quantizer
    quantizes), at ``deployment``'s precision."""
    def entry_bytes(layer):
        low = deployment.matmul_weight_bytes
        return low if low is not None and matmul_like(layer) else deployment.weight_bytes
    return {id(m.weight): (1 if getattr(m, "transposed", False) else 0, entry_bytes(m)) for m in model.modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight is not None}


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
