"""SpikingJelly's neurons (every stateful class in ``spikingjelly.activation_based.neuron``)
and its stateful element-wise ``layer.*`` wrappers (Dropout, SynapseFilter, Delay, ...)."""
from __future__ import annotations

import inspect
import re

import torch
import torch.nn as nn
import torch_pruning as tp
from spikingjelly.activation_based import base, layer as sj_layer, neuron

from ..plugins import hookimpl


def _memory_modules(namespace) -> list[type]:
    return sorted({cls for cls in vars(namespace).values()
                   if isinstance(cls, type) and issubclass(cls, base.MemoryModule)}, key=lambda c: c.__name__)


NEURON_TYPES = _memory_modules(neuron)

# A stateful layer.* class is element-wise (channel-transparent, nothing per channel to cut)
# when its constructor takes no width and wraps no module: Dropout(p), SynapseFilter(tau),
# Delay(delay_steps). NeuNorm(in_channels), DropConnectLinear(in_features), the
# BatchNormThroughTime (num_features) and the recurrent containers (sub_module) are not.
_SIZED_OR_WRAPPING = re.compile(r"channels|features|sub_module|height|width")
ELEMENTWISE_LAYER_TYPES = [cls for cls in _memory_modules(sj_layer)
                           if not any(_SIZED_OR_WRAPPING.search(arg)
                                      for arg in inspect.signature(cls.__init__).parameters)]


@hookimpl
def primesvt_spiking_layer_types():
    return NEURON_TYPES + ELEMENTWISE_LAYER_TYPES


def per_channel_submodules(layer: nn.Module) -> list[nn.Module]:
    """Submodules of a neuron with one entry per channel (MPBN neurons normalise the membrane)."""
    return [m for m in layer.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@hookimpl
def primesvt_prune_spiking_layer(layer, idxs):
    if isinstance(layer, tuple(ELEMENTWISE_LAYER_TYPES)):
        return True  # state only (masks, queues, currents), rebuilt by reset_net; no per-channel parameter
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
    if isinstance(layer, tuple(ELEMENTWISE_LAYER_TYPES)):
        # Plain PyTorch already (no fused kernel); in eval mode the dropouts are the identity.
        return lambda x_seq: type(layer).forward(layer, x_seq)
    kind = type(layer)
    if kind is neuron.IFNode:
        return lambda x_seq: _run(layer, x_seq, lambda x, v: v + x)
    if kind is neuron.LIFNode:
        return lambda x_seq: _run(layer, x_seq, _leaky_charge(layer, 1.0 / layer.tau))
    if kind is neuron.ParametricLIFNode:
        return lambda x_seq: _run(layer, x_seq, _leaky_charge(layer, layer.w.sigmoid()))
    return None
