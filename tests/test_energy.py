"""Energy per image from SpikingJelly's op_counter, before and after pruning."""
from __future__ import annotations

import pytest
import torch

from primesvt_plugin import SpikingPruner, build_model
from primesvt_plugin.errors import ArgumentError
from primesvt_plugin.pruning.energy import estimate_energy, spike_rates

ARGS = dict(T=2, in_channels=1, img_size_h=16, img_size_w=16, patch_size=4, num_classes=10, embed_dims=32,
            num_heads=2, mlp_ratio=2, depths=1)


def firing_spikformer():
    """A small Spikformer whose neurons fire (low thresholds), so spikes reach every layer."""
    torch.manual_seed(0)
    model = build_model("spikformer", ARGS).eval()
    for module in model.modules():
        if hasattr(module, "v_threshold"):
            module.v_threshold = 0.05
    return model


def test_energy_per_image_counts_operations_and_falls_after_pruning():
    model, images = firing_spikformer(), torch.rand(8, 1, 16, 16)
    before = estimate_energy(model, images)
    half = estimate_energy(model, images[:4])
    assert before.macs == half.macs > 0  # per image: independent of the batch size
    assert before.synaptic_ops > 0 and before.energy_pj == pytest.approx(before.compute_pj + before.memory_pj)
    assert set(before.spike_rates) >= {"patch_embed.stages.0.neuron", "blocks.0.mlp.neuron1"}
    assert all(0.0 <= rate <= 1.0 for rate in before.spike_rates.values())
    assert any(rate > 0 for rate in before.spike_rates.values())
    terms = before.breakdown_pj  # per image, like the totals; neuron-state traffic is its own term
    assert terms["mac_pj"] + terms["ac_pj"] == pytest.approx(before.compute_pj)
    assert terms["parameter_memory_pj"] + terms["neuron_state_memory_pj"] == pytest.approx(before.memory_pj)
    assert terms["neuron_state_memory_pj"] > 0
    SpikingPruner(model, images[:2], pruning_ratio=0.5).step()
    after = estimate_energy(model, images)
    assert after.macs < before.macs and after.memory_access_bytes < before.memory_access_bytes
    assert after.energy_pj < before.energy_pj
    int8 = estimate_energy(model, images, precision="int8")
    assert int8.compute_pj < after.compute_pj and int8.macs == after.macs


def test_spike_rates_are_mean_outputs_and_the_model_is_left_as_it_was():
    model, images = firing_spikformer(), torch.rand(4, 1, 16, 16)
    rates = spike_rates(model, images)
    outputs = {}
    def record(name):
        def hook(module, inputs, output):
            outputs[name] = output.float().mean().item()  # returns None: the output is unchanged
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if name in rates]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    assert rates == pytest.approx(outputs)
    assert all("forward" not in vars(m) for m in model.modules())


def test_unknown_energy_precision_is_refused():
    with pytest.raises(ArgumentError, match="energy precision must be one of fp32, fp16, int8"):
        estimate_energy(firing_spikformer(), torch.rand(1, 1, 16, 16), precision="int4")


def test_our_neuron_state_bytes_agree_with_op_counters_state_traffic():
    """Cross-check of the ledger's neuron state (bytes per sample, from one forward) against op_counter,
    which counts the state every neuron reads at every time step of every sample."""
    from spikingjelly.activation_based.op_counter import estimate_simple_energy

    from primesvt_plugin.pruning.memory import state_bytes

    model, images = firing_spikformer(), torch.rand(4, 1, 16, 16)
    ours = sum(state_bytes(model, images).values())
    counts = estimate_simple_energy(model, images).counts
    assert counts["neuron_state_read_bytes"] == counts["neuron_state_write_bytes"] == ARGS["T"] * len(images) * ours
    SpikingPruner(model, images[:2], pruning_ratio=0.5).step()  # and after pruning, on the smaller model
    pruned = sum(state_bytes(model, images).values())
    assert pruned < ours
    assert estimate_simple_energy(model, images).counts["neuron_state_read_bytes"] == ARGS["T"] * len(images) * pruned


def test_layer_energies_add_up_to_the_models_estimate_and_follow_the_layers_ops():
    from primesvt_plugin.pruning.energy import layer_energy_pj

    model, images = firing_spikformer(), torch.rand(8, 1, 16, 16)
    energy = layer_energy_pj(model, images)
    assert energy[model] == pytest.approx(estimate_energy(model, images).energy_pj)
    children = list(model.children())
    assert sum(energy[child] for child in children) <= energy[model] * (1 + 1e-9)
    first_conv = model.patch_embed.stages[0].conv_bn.block[0]  # analog input: MACs and its weights' traffic
    assert energy[first_conv] > 0
    assert energy[model.patch_embed] == pytest.approx(sum(energy[m] for m in model.patch_embed.children()))


def agreement_with(model, images):
    """Top-1 agreement with ``model`` as it is now: the evaluate of prime() on unlabelled images."""
    from primesvt_plugin.pruning.spiking import fresh_forward

    def decisions(candidate):
        with torch.no_grad():
            out = fresh_forward(candidate.eval(), images)
        return (out.mean(0) if out.dim() == 3 else out).argmax(-1)
    reference = decisions(model)
    return lambda candidate: float((decisions(candidate) == reference).float().mean())


def test_ranking_by_energy_compresses_the_most_energetic_groups_first_and_saves_more_energy():
    from primesvt_plugin.pruning.accounting import ops_energy
    from primesvt_plugin.pruning.energy import layer_energy_pj
    from primesvt_plugin.pruning.graph import SpikingGraph
    from primesvt_plugin.pruning.policy import prime

    model, images = firing_spikformer(), torch.rand(8, 1, 16, 16)
    evaluate, before = agreement_with(model, images), estimate_energy(model, images).energy_pj
    asked = dict(memory_saving=0.3, max_accuracy_drop=0.5, energy_inputs=images, progress=False)
    by_memory = prime(model, images[:1], evaluate, rank_by="memory", **asked)
    by_energy = prime(model, images[:1], evaluate, rank_by="energy", **asked)
    both = prime(model, images[:1], evaluate, rank_by="both", **asked)
    # Each group's energy: its layers' energy in proportion to the channels it touches (whole layers here)
    layer_energy, graph = layer_energy_pj(model, images), SpikingGraph(model, images[:1])
    expected = {g.name: ops_energy(g.channel_ops(range(g.size)), layer_energy) for g in graph.groups()}
    groups = by_energy.report.groups
    assert {g.name: g.energy_pj for g in groups} == pytest.approx({g.name: expected[g.name] for g in groups})
    assert [g.energy_pj for g in groups] == sorted((g.energy_pj for g in groups), reverse=True)
    for group in graph.groups():  # a share of the channels carries that share of the energy
        half = ops_energy(group.channel_ops(range(0, group.size, 2)), layer_energy)
        assert half == pytest.approx(expected[group.name] * len(range(0, group.size, 2)) / group.size)
    assert [g.param_bytes for g in by_memory.report.groups] == sorted(
        (g.param_bytes for g in by_memory.report.groups), reverse=True)
    assert all(g.energy_pj is None for g in by_memory.report.groups)  # not measured when not ranked by
    shares = {g.name: g.param_bytes / sum(r.param_bytes for r in groups) + g.energy_pj / sum(r.energy_pj for r in groups)
              for g in groups}
    assert [g.name for g in both.report.groups] == sorted(shares, key=shares.get, reverse=True)
    assert [g.name for g in groups] != [g.name for g in by_memory.report.groups]  # the orders differ here
    for result in (by_memory, by_energy, both):  # the target is still the memory saving
        assert result.report.constraints_met and result.report.pruned.parameter_saving >= 0.3
    energy_after = {name: estimate_energy(r.model, images).energy_pj
                    for name, r in (("memory", by_memory), ("energy", by_energy))}
    assert energy_after["energy"] < 0.8 * before  # the input stage's spikes and MACs go first
    assert energy_after["energy"] < energy_after["memory"]
    assert by_energy.report.rank_by == "energy" and by_energy.report.to_dict()["rank_by"] == "energy"


def test_an_unknown_ranking_is_refused():
    from primesvt_plugin.pruning.policy import prime

    model, images = firing_spikformer(), torch.rand(2, 1, 16, 16)
    with pytest.raises(ArgumentError, match="rank_by must be one of"):
        prime(model, images[:1], agreement_with(model, images), memory_saving=0.2, max_accuracy_drop=0.1,
              rank_by="latency")


def test_a_deployed_stage_counts_its_traffic_at_the_bytes_it_stores():
    """Weights at INT8 are 1 B, INT4 matmul weights 0.5 B, INT8 membrane potentials 1 B: op_counter sees
    float32 tensors (4 B), so the deployed stage's traffic is counted at the deployment's bytes."""
    from spikingjelly.activation_based import neuron

    from primesvt_plugin.targets import FP32, INT4, INT8

    torch.manual_seed(0)
    conv, linear = torch.nn.Conv2d(1, 8, 3, bias=False), torch.nn.Linear(8 * 6 * 6, 10, bias=False)
    model = torch.nn.Sequential(conv, neuron.IFNode(v_threshold=0.05), torch.nn.Flatten(), linear).eval()
    images = torch.rand(4, 1, 8, 8)
    plain, fp32 = estimate_energy(model, images), estimate_energy(model, images, deployment=FP32)
    int8, int4 = (estimate_energy(model, images, deployment=d) for d in (INT8, INT4))
    assert fp32.memory_access_bytes == plain.memory_access_bytes  # FP32 stores what PyTorch holds
    assert fp32.energy_pj == pytest.approx(plain.energy_pj)
    terms = {name: e.breakdown_pj for name, e in (("fp32", fp32), ("int8", int8), ("int4", int4))}
    assert terms["fp32"]["parameter_memory_pj"] > 0 and terms["fp32"]["neuron_state_memory_pj"] > 0
    assert terms["int8"]["parameter_memory_pj"] == pytest.approx(terms["fp32"]["parameter_memory_pj"] / 4)
    assert terms["int8"]["neuron_state_memory_pj"] == pytest.approx(terms["fp32"]["neuron_state_memory_pj"] / 4)
    assert int8.memory_access_bytes == pytest.approx(fp32.memory_access_bytes / 4)
    # INT4: the linear layer's weights at half a byte, the 3x3 convolution's at INT8; state stays float32
    assert terms["int4"]["neuron_state_memory_pj"] == pytest.approx(terms["fp32"]["neuron_state_memory_pj"])
    assert terms["int8"]["parameter_memory_pj"] / 2 < terms["int4"]["parameter_memory_pj"] \
        < terms["int8"]["parameter_memory_pj"]
    assert int8.macs == fp32.macs and int8.synaptic_ops == fp32.synaptic_ops  # the same operations
