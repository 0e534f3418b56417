"""Energy per image: operations, spike rates and an energy estimate, from SpikingJelly's op_counter.

``estimate_energy`` runs the model on real images through SpikingJelly's
``op_counter.estimate_simple_energy`` (Horowitz 2014, 45 nm: a multiply-accumulate
for every non-spike input, an accumulate for every spike that reaches a synapse,
plus parameter and neuron-state traffic) and divides by the batch. Spike rates are
the mean output of every spiking layer. The memory ledger (``memory.py``) predicts
bytes without running anything, which the search needs; energy needs spikes, so it
is measured, on the validation images, before and after each stage.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, neuron
from spikingjelly.activation_based.op_counter import SimpleEnergyConfig, SimpleEnergyCostConfig, estimate_simple_energy

from ..errors import ArgumentError
from .spiking import has_time_axis, inference, overridden_forward

PRECISIONS = {"fp32": SimpleEnergyCostConfig.fp32, "fp16": SimpleEnergyCostConfig.fp16,
              "int8": SimpleEnergyCostConfig.int8}


@dataclass
class Energy:
    """Per image: operations, memory traffic and the estimated energy (pJ) at ``precision``."""

    precision: str
    macs: float  # multiply-accumulates (non-spike inputs: the first layer, analog paths)
    synaptic_ops: float  # accumulates triggered by spikes
    memory_access_bytes: float
    energy_pj: float
    compute_pj: float
    memory_pj: float
    spike_rates: dict[str, float] = field(default_factory=dict)  # spiking layer -> mean firing rate
    breakdown_pj: dict[str, float] = field(default_factory=dict)  # op_counter's terms: MACs, ACs, weight and state traffic

    def as_dict(self) -> dict:
        return asdict(self)


def spike_rates(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Mean output (spikes per neuron per time step) of every SpikingJelly neuron, on ``images``."""
    names = {m: n for n, m in model.named_modules()}
    neurons = [m for m in model.modules() if isinstance(m, neuron.BaseNode)]
    totals: dict[nn.Module, list[float]] = {m: [0.0, 0.0] for m in neurons}

    def counting(layer):
        original = type(layer).forward

        def forward(*args, **kwargs):
            out = original(layer, *args, **kwargs)
            totals[layer][0] += float(out.detach().float().sum())
            totals[layer][1] += out.numel()
            return out
        return forward

    with inference(model), overridden_forward({m: counting(m) for m in neurons}):
        model(images)
    return {names[m]: s / n for m, (s, n) in totals.items() if n}


def estimate_energy(model: nn.Module, images: torch.Tensor, precision: str = "fp32") -> Energy:
    """Operations and energy per image of ``model`` on ``images`` (one batch), at ``precision``."""
    if precision not in PRECISIONS:
        raise ArgumentError(f"energy precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    config = SimpleEnergyConfig(cost_config=PRECISIONS[precision]())
    with inference(model):
        report = estimate_simple_energy(model, images, config=config)
    functional.reset_net(model)
    per_image = 1.0 / (images.shape[1] if has_time_axis(model, images) else len(images))
    counts = report.counts
    return Energy(precision=precision, macs=counts["mac"] * per_image,
                  synaptic_ops=(counts["ac"] + counts.get("synop", 0)) * per_image,
                  memory_access_bytes=counts["memory_access_bytes"] * per_image,
                  energy_pj=report.energy_total_pj * per_image, compute_pj=report.energy_compute_pj * per_image,
                  memory_pj=report.energy_memory_pj * per_image, spike_rates=spike_rates(model, images),
                  breakdown_pj={term: pj * per_image for term, pj in report.breakdown_pj.items()})
