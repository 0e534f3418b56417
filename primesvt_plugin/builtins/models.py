"""Model builders for the SViTs SpikingJelly ships (recipe ``model.name``)."""
from __future__ import annotations

from spikingjelly.activation_based.model import maxformer, qkformer, spike_driven_transformer, spikformer

from ..plugins import hookimpl


@hookimpl
def primesvt_model_builders():
    return {
        "spikformer": spikformer.Spikformer,
        "spikformer_cifar10": spikformer.spikformer_cifar10,
        "spike_driven_transformer": spike_driven_transformer.SpikeDrivenTransformer,
        "qkformer": qkformer.QKFormer,
        "maxformer": maxformer.MaxFormer,
    }
