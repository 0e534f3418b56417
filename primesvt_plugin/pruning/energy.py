"""Energy per image: operations, spike rates and an energy estimate, from SpikingJelly's op_counter.

``estimate_energy`` runs the model on real images through SpikingJelly's
``op_counter.estimate_simple_energy`` (Horowitz 2014, 45 nm: a multiply-accumulate
for every non-spike input, an accumulate for every spike that reaches a synapse,
plus parameter and neuron-state traffic) and divides by the batch. Spike rates are
the mean output of every spiking layer. The memory ledger (``memory.py``) predicts
bytes without running anything, which the search needs; energy needs spikes, so it
is measured, on the validation images, before and after each stage.

``layer_energy_pj`` splits the same estimate by layer (op_counter records every
count under the module that ran it), so ``prime(rank_by="energy")`` can rank the
pruning groups by the energy of the layers their channels touch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, neuron
from spikingjelly.activation_based.op_counter import SimpleEnergyConfig, SimpleEnergyCostConfig
from spikingjelly.activation_based.op_counter.simple_energy import SimpleEnergyProfiler

from ..errors import ArgumentError
from ..targets import Deployment, quantized_weights
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


def _profiled(model: nn.Module, images: torch.Tensor, precision: str) -> tuple[SimpleEnergyProfiler, float]:
    """op_counter's profiler after one pass of ``model`` on ``images``, and the per-image factor."""
    if precision not in PRECISIONS:
        raise ArgumentError(f"energy precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    profiler = SimpleEnergyProfiler(config=SimpleEnergyConfig(cost_config=PRECISIONS[precision]()))
    profiler.bind_model(model)
    with inference(model), profiler:
        model(images)
    functional.reset_net(model)
    return profiler, 1.0 / (images.shape[1] if has_time_axis(model, images) else len(images))


def estimate_energy(model: nn.Module, images: torch.Tensor, precision: str = "fp32",
                    deployment: Deployment | None = None) -> Energy:
    """Operations and energy per image of ``model`` on ``images`` (one batch), at ``precision``.

    op_counter counts memory traffic in the bytes PyTorch holds each tensor in (4 B per float32
    entry); with ``deployment`` each parameter and the neuron state are counted at the bytes the
    deployed model stores them in instead (INT8 weights 1 B, INT4 matmul weights 0.5 B, batch
    norms folded away under INT8), which is what a quantized stage's traffic is.
    """
    profiler, per_image = _profiled(model, images, precision)
    report = profiler.get_report()
    counts, breakdown = dict(report.counts), dict(report.breakdown_pj)
    if deployment is not None:
        counts.update(_deployed_traffic(model, profiler, deployment))
        cost = profiler.config.cost_config
        parameters = counts["weight_read_bytes"] + counts["bias_read_bytes"]
        state = counts["neuron_state_read_bytes"] + counts["neuron_state_write_bytes"]
        counts["memory_access_bytes"] = parameters + state
        breakdown.update(parameter_memory_pj=parameters * cost.e_memory_pj_per_byte,
                         neuron_state_memory_pj=state * cost.e_memory_pj_per_byte,
                         memory_pj=(parameters + state) * cost.e_memory_pj_per_byte)
    memory_pj = breakdown["memory_pj"]
    return Energy(precision=precision, macs=counts["mac"] * per_image,
                  synaptic_ops=(counts["ac"] + counts.get("synop", 0)) * per_image,
                  memory_access_bytes=counts["memory_access_bytes"] * per_image,
                  energy_pj=(report.energy_compute_pj + memory_pj) * per_image,
                  compute_pj=report.energy_compute_pj * per_image, memory_pj=memory_pj * per_image,
                  spike_rates=spike_rates(model, images),
                  breakdown_pj={term: pj * per_image for term, pj in breakdown.items()})


MEMORY_COUNTS = ("weight_read_bytes", "bias_read_bytes", "neuron_state_read_bytes", "neuron_state_write_bytes")
STATE_COUNTS = MEMORY_COUNTS[2:]


def _deployed_traffic(model: nn.Module, profiler: SimpleEnergyProfiler, deployment: Deployment) -> dict[str, float]:
    """op_counter's parameter and neuron-state traffic, counted at ``deployment``'s bytes per entry."""
    traffic = profiler.memory_counter.get_counts()
    total = {key: float(traffic.get("Global", {}).get(key, 0)) for key in MEMORY_COUNTS}
    quantized = quantized_weights(model, deployment)
    prefix = type(model).__name__
    for name, module in model.named_modules():
        counts = traffic.get(f"{prefix}.{name}" if name else prefix, {})
        weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
        layer_quantized = weight is not None and id(weight) in quantized
        for key, tensor in (("weight_read_bytes", weight), ("bias_read_bytes", bias)):
            if tensor is None or not counts.get(key):
                continue
            if layer_quantized:  # a quantized layer's weight at its precision; its bias stays as it is
                entry_bytes = quantized[id(weight)][1] if tensor is weight else tensor.element_size()
            else:  # batch norms and other parameters: other_bytes (0 under INT8: folded into the layer)
                entry_bytes = deployment.other_bytes
            total[key] += counts[key] * (entry_bytes / tensor.element_size() - 1)
    for key in STATE_COUNTS:  # membrane potentials are float32 in PyTorch
        total[key] *= deployment.activation_bytes / 4
    return total


def layer_energy_pj(model: nn.Module, images: torch.Tensor, precision: str = "fp32") -> dict[nn.Module, float]:
    """Estimated energy per image (pJ) of every module of ``model`` on ``images``, its submodules included.

    The same terms as ``estimate_energy`` (MACs, accumulates, parameter and neuron-state
    traffic), taken from the scope op_counter records each count under.
    """
    profiler, per_image = _profiled(model, images, precision)
    cost = profiler.config.cost_config
    macs, accumulates = profiler.mac_counter.get_counts(), profiler.ac_counter.get_counts()
    traffic = profiler.memory_counter.get_counts()
    prefix = type(model).__name__
    energy = {}
    for name, module in model.named_modules():
        scope = f"{prefix}.{name}" if name else prefix  # op_counter names scopes after the model's class
        pj = (sum(macs.get(scope, {}).values()) * cost.e_mac_pj + sum(accumulates.get(scope, {}).values()) * cost.e_ac_pj
              + sum(traffic.get(scope, {}).get(key, 0) for key in MEMORY_COUNTS) * cost.e_memory_pj_per_byte)
        energy[module] = pj * per_image
    return energy
