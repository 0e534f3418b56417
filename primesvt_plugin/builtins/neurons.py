"""Every SpikingJelly neuron (``BaseNode`` and its subclasses) as a channel-wise spiking layer."""
from __future__ import annotations

from spikingjelly.activation_based import neuron

from ..plugins import hookimpl


@hookimpl
def primesvt_spiking_layer_types():
    return [neuron.BaseNode]


@hookimpl
def primesvt_prune_spiking_layer(layer, idxs):
    if not isinstance(layer, neuron.BaseNode):
        return None
    # SpikingJelly neurons keep only scalar parameters (tau, threshold, PLIF's w, PSN's
    # [T, T] time weights); their per-channel state is rebuilt by reset_net, which the
    # pruner calls after every structural change. Nothing per-channel to cut.
    return True
