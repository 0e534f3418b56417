"""Model builders for the SViTs SpikingJelly ships (recipe ``model.name``)."""
from __future__ import annotations

from spikingjelly.activation_based.model import maxformer, qkformer, spike_driven_transformer, spikformer

from ..plugins import hookimpl


@hookimpl
def primesvt_register(registrar):
    registrar.models.add("spikformer", spikformer.Spikformer)
    registrar.models.add("spike_driven_transformer", spike_driven_transformer.SpikeDrivenTransformer)
    registrar.models.add("qkformer", qkformer.QKFormer)
    registrar.models.add("maxformer", maxformer.MaxFormer)
    # SpikingJelly's published configurations (random weights: no download)
    for factory in (spikformer.spikformer_cifar10, spikformer.spikformer_ti, spikformer.spikformer_s,
                    spike_driven_transformer.sdt_8_384, qkformer.qkformer_10_384, maxformer.maxformer_10_384,
                    maxformer.maxformer_cifar):
        registrar.models.add(factory.__name__, factory)
