"""Channel operations on a single layer: remove, zero (mask) and count bytes.

A ``ChannelOp`` says "channels ``idxs`` of ``layer`` along ``direction``".
Groups, attention layouts and the memory ledger all speak in ChannelOps, so
pruning, masking and memory accounting can never disagree about what a
group touches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import UnhandledLayerError

OUT = "out"
IN = "in"


@dataclass(frozen=True)
class ChannelOp:
    layer: nn.Module
    direction: str  # OUT or IN
    idxs: tuple[int, ...]
    of: int = 0  # channels in the layer's space; needed for layers without weights (neurons)


def tp_pruning_fn(layer: nn.Module, direction: str):
    """Torch-Pruning's function removing ``direction`` channels of a standard layer."""
    pruner = tp.pruner.function.PrunerBox.get(tp.ops.module2type(layer))
    if pruner is None:
        raise UnhandledLayerError(f"Torch-Pruning has no pruner for {type(layer).__name__}: a layer an attention "
                                  "layout lists must be a conv, linear or batch norm")
    return pruner.prune_out_channels if direction == OUT else pruner.prune_in_channels


def prune_channels(op: ChannelOp) -> None:
    """Remove the channels of ``op`` from its layer (in place)."""
    if op.idxs:
        tp_pruning_fn(op.layer, op.direction)(op.layer, list(op.idxs))


def _is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.conv._ConvNd) and 1 < layer.groups == layer.in_channels


def channel_slices(layer: nn.Module, direction: str) -> list[tuple[torch.Tensor, int]]:
    """(tensor, dim) pairs whose slices along ``dim`` belong to one channel of ``layer``."""
    tensors = [t for t in list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False))
               if t.is_floating_point() and t.ndim >= 1]
    if direction == IN and isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)):
        if _is_depthwise(layer):  # a depthwise conv's input channel is its output channel
            return [(t, 0) for t in tensors]
        dim = 0 if getattr(layer, "transposed", False) else 1
        return [(layer.weight, dim)]
    if isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) and getattr(layer, "transposed", False):
        return [(layer.weight, 1)] + ([(layer.bias, 0)] if layer.bias is not None else [])
    n_out = tensors[0].shape[0] if tensors else 0
    return [(t, 0) for t in tensors if t.shape[0] == n_out]


def bytes_per_channel(layer: nn.Module, direction: str) -> int:
    """Bytes of parameters and buffers that one channel of ``layer`` owns along ``direction``."""
    return sum(t.numel() // t.shape[dim] * t.element_size() for t, dim in channel_slices(layer, direction))


def channels_of(op: ChannelOp) -> int:
    """How many channels ``op.layer`` has along ``op.direction`` (0 for a layer without channel tensors)."""
    if op.of:
        return op.of
    if op.direction == IN and isinstance(op.layer, nn.modules.conv._ConvNd):
        return op.layer.in_channels  # a grouped convolution's weight holds in_channels / groups
    slices = channel_slices(op.layer, op.direction)
    return slices[0][0].shape[slices[0][1]] if slices else 0


def zero_channels(op: ChannelOp, saved: dict[torch.Tensor, torch.Tensor]) -> None:
    """Zero the channels of ``op`` in place, first saving each touched tensor into ``saved``."""
    index = torch.tensor(op.idxs, dtype=torch.long)
    with torch.no_grad():
        for tensor, dim in channel_slices(op.layer, op.direction):
            if tensor not in saved:
                saved[tensor] = tensor.detach().clone()
            tensor.index_fill_(dim, index.to(tensor.device), 0.0)


def restore(saved: dict[torch.Tensor, torch.Tensor]) -> None:
    """Undo ``zero_channels``."""
    with torch.no_grad():
        for tensor, original in saved.items():
            tensor.copy_(original)
    saved.clear()


def expand_chunks(idxs: Sequence[int], width: int, chunks: int) -> tuple[int, ...]:
    """Indices of ``idxs`` repeated in each of ``chunks`` concatenated blocks of ``width``."""
    return tuple(c * width + i for c in range(chunks) for i in idxs)
