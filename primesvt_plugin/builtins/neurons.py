"""SpikingJelly's neurons: every stateful class in ``spikingjelly.activation_based.neuron``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch_pruning as tp
from spikingjelly.activation_based import base, neuron

from ..plugins import hookimpl

NEURON_TYPES = sorted({cls for cls in vars(neuron).values()
                       if isinstance(cls, type) and issubclass(cls, base.MemoryModule)}, key=lambda c: c.__name__)


@hookimpl
def primesvt_spiking_layer_types():
    return NEURON_TYPES


def per_channel_submodules(layer: nn.Module) -> list[nn.Module]:
    """Submodules of a neuron with one entry per channel (MPBN neurons normalise the membrane)."""
    return [m for m in layer.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@hookimpl
def primesvt_prune_spiking_layer(layer, idxs):
    if not isinstance(layer, tuple(NEURON_TYPES)):
        return None
    # Besides MPBN's batch norm, SpikingJelly neurons keep only scalars or time-step
    # weights (PSN's [T, T], GatedLIF's conduct[T]); their per-channel state is
    # rebuilt by reset_net, which the pruner calls after every structural change.
    for bn in per_channel_submodules(layer):
        tp.prune_batchnorm_out_channels(bn, list(idxs))
    return True


def _fire_and_reset(layer, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    spike = (h >= layer.v_threshold).to(h.dtype)
    if layer.v_reset is None:
        return spike, h - spike * layer.v_threshold
    return spike, spike * layer.v_reset + (1.0 - spike) * h


def _run(layer, x_seq: torch.Tensor, charge) -> torch.Tensor:
    v = torch.full_like(x_seq[0], 0.0 if layer.v_reset is None else float(layer.v_reset))
    spikes = []
    for x in x_seq:
        spike, v = _fire_and_reset(layer, charge(x, v))
        spikes.append(spike)
    return torch.stack(spikes)


def _leaky_charge(layer, decay: torch.Tensor | float):
    reset = 0.0 if layer.v_reset is None else layer.v_reset
    if layer.decay_input:
        return lambda x, v: v + (x - (v - reset)) * decay
    return lambda x, v: v - (v - reset) * decay + x


@hookimpl
def primesvt_export_forward(layer):
    kind = type(layer)
    if kind is neuron.IFNode:
        return lambda x_seq: _run(layer, x_seq, lambda x, v: v + x)
    if kind is neuron.LIFNode:
        return lambda x_seq: _run(layer, x_seq, _leaky_charge(layer, 1.0 / layer.tau))
    if kind is neuron.ParametricLIFNode:
        return lambda x_seq: _run(layer, x_seq, _leaky_charge(layer, layer.w.sigmoid()))
    return None
