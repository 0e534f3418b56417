"""Channel accounting: which layer channels a pruning group touches, and the bytes they free.

Torch-Pruning groups, attention layouts and spiking layers are all turned into
``ChannelOp`` lists here; pruning, masking, the memory ledger and the
memory-aware importance read them, so they can never disagree about what a group
touches or frees.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn
import torch_pruning as tp

from .attention import WIDTH, AttentionLayout
from .channels import IN, OUT, ChannelOp, bytes_per_channel, channels_of, expand_chunks

_REGISTERED_PRUNERS_ONLY = tp.DependencyGraph()  # knows Torch-Pruning's own pruning functions


def direction_of(handler, dg: tp.DependencyGraph | None = None) -> str:
    """OUT or IN for a Torch-Pruning pruning function, as ``dg`` (the graph whose group it is) tells.

    Coupled layers (batch norm, our neurons) use one function for both directions, which
    Torch-Pruning counts as an output-channel function.
    """
    return OUT if (dg or _REGISTERED_PRUNERS_ONLY).is_out_channel_pruning_fn(handler) else IN


def ops_of_tp_group(group: tp.dependency.Group, selected: set[int], layouts: dict[nn.Module, AttentionLayout],
                    spiking_types: tuple[type, ...], dg: tp.DependencyGraph | None = None) -> list[ChannelOp]:
    """The layer-level operations a Torch-Pruning group performs for root channels ``selected``."""
    ops, seen = [], set()
    for item in group:
        module, direction = item.dep.target.module, direction_of(item.dep.handler, dg)
        if (id(module), direction) in seen or not isinstance(module, nn.Module):
            continue
        seen.add((id(module), direction))
        idxs = tuple(i for i, r in zip(item.idxs, item.root_idxs) if r in selected)
        if module in layouts:
            ops += attention_ops(layouts[module], WIDTH, idxs)
        elif isinstance(module, spiking_types):
            ops.append(ChannelOp(module, OUT, idxs, of=len(item.idxs)))
            ops += [ChannelOp(bn, OUT, idxs) for bn in module.modules()
                    if isinstance(bn, nn.modules.batchnorm._BatchNorm)]  # e.g. MPBN neurons
        elif tp.ops.module2type(module) in tp.pruner.function.PrunerBox:
            ops.append(ChannelOp(module, direction, idxs))
    return ops


def attention_ops(layout: AttentionLayout, space: str, idxs: Sequence[int]) -> list[ChannelOp]:
    """Layer operations (neurons included) removing channels ``idxs`` of an attention ``space``."""
    ops = layout.channel_ops(space, idxs)
    width = layout.width if space == WIDTH else layout.inner
    for neuron, chunks in layout.neuron_channels(space):
        ops.append(ChannelOp(neuron, OUT, expand_chunks(sorted(idxs), width, chunks), of=chunks * width))
    return ops


def ops_bytes(ops, neuron_state: dict) -> int:
    """Bytes freed by a list of ChannelOps (parameters, buffers and neuron state)."""
    total = 0
    for op in ops:
        if op.layer in neuron_state:
            total += neuron_state[op.layer] * len(op.idxs) // max(op.of, 1)
        else:
            total += bytes_per_channel(op.layer, op.direction) * len(op.idxs)
    return total


def ops_energy(ops, layer_energy: dict) -> float:
    """Energy (pJ per image) of the layers a list of ChannelOps touches, in proportion to the channels it removes.

    ``layer_energy`` is ``energy.layer_energy_pj``: a layer's operations and traffic scale with its
    channels, so removing a share of them removes that share of its energy. A module's energy includes
    its submodules', so a layer inside another one the ops touch (a neuron's own batch norm) is not
    counted again.
    """
    touched = {op.layer for op in ops}
    inner = {m for layer in touched for m in layer.modules() if m is not layer}
    total = 0.0
    for op in ops:
        channels = channels_of(op)
        if channels and op.layer not in inner:
            total += layer_energy.get(op.layer, 0.0) * len(op.idxs) / channels
    return total
