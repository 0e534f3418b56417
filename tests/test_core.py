"""The core decisions, pinned on small models where the right answer is known by construction.

The toy model ``Net`` (conv1 -> LIF -> conv2 -> LIF -> pool -> fc) has two pruning groups
whose bytes are computed by hand below:

=========  ========  =====================================================  ==============
group      channels  bytes one channel frees                                group bytes
=========  ========  =====================================================  ==============
``conv1``  4         conv1 out 10 floats (40 B) + conv2 in 144 floats       params 2464
                     (576 B) + LIF1 state 16x16 floats (1024 B) = 1640 B     memory 6560
``conv2``  16        conv2 out 37 floats (148 B) + fc in 3 floats (12 B)     params 2560
                     + LIF2 state 4x4 floats (64 B) = 224 B                  memory 3584
=========  ========  =====================================================  ==============

So ranked by parameters ``conv2`` comes first, by footprint ``conv1``. The whole model
holds 2732 parameter bytes and 5120 bytes of neuron state (footprint 7852).

Weights identify channels: conv1's output channel ``i`` is all ``i + 1`` and conv2's
output channel ``j`` is all ``(j + 1) / 16``, so the group L2 order is the index order
and ``evaluate`` can tell which channels are still there (masked rows are zero, pruned
rows are gone). ``scored(cost)`` turns a cost of the removed channels into an accuracy,
in multiples of 1/64 so every comparison with the floor is exact.

Every test here is fast (the whole file runs in seconds): mutation testing runs it
once per mutant (docs/testing.md).
"""
from __future__ import annotations

import copy

import json
import math

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from hypothesis import given
from hypothesis import strategies as st
from spikingjelly.activation_based import neuron
from spikingjelly.activation_based.model import spikformer

from primesvt_plugin import MemoryAwareImportance, SpikingGraph, footprint
from primesvt_plugin.pruning.channels import (IN, OUT, ChannelOp, bytes_per_channel, channel_slices, expand_chunks,
                                      prune_channels, restore, tp_pruning_fn, zero_channels)
from primesvt_plugin.errors import ArgumentError, UnhandledLayerError
from primesvt_plugin.pruning.accounting import direction_of, ops_bytes
from primesvt_plugin.pruning.graph import PruningGroup
from primesvt_plugin.pruning.importance import KIB, example_gradients, gradient_loss, needs_gradients, rank_shares
from primesvt_plugin.pruning.spiking import fresh_forward
from primesvt_plugin.pruning.masking import Masks
from primesvt_plugin.pruning.memory import FP32, INT4, INT8, Footprint, LedgerState, layer_outputs, one_sample, state_bytes
from primesvt_plugin.pruning.policy import prime
from primesvt_plugin.plugins import hookimpl
from primesvt_plugin.pruning.pruner import apply_plan
from primesvt_plugin.pruning.search import highest_feasible, rate_grid, removal_counts
from primesvt_plugin.pruning.records import Constraints, PrimeReport, Scored, Trial

U = 1 / 64  # one unit of "accuracy"
CONV1_BYTES, CONV2_BYTES = 1640, 224  # bytes one channel of each group frees (module docstring)
CONV1_PARAM_BYTES, CONV2_PARAM_BYTES = 616, 160
PARAMS, STATE = 2732, 5120


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.lif1 = neuron.LIFNode()
        self.conv2 = nn.Conv2d(4, 16, 3, stride=4, padding=1)
        self.lif2 = neuron.LIFNode()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.lif1(self.conv1(x))
        x = self.lif2(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


def net() -> Net:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        for i in range(4):
            model.conv1.weight[i] = i + 1
        for j in range(16):
            model.conv2.weight[j] = (j + 1) / 16
        model.fc.weight.fill_(1 / 16)
        for layer in (model.conv1, model.conv2, model.fc):
            layer.bias.zero_()
    return model


def inputs() -> torch.Tensor:
    return torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def alive(layer: nn.Module, scale: float) -> frozenset[int]:
    """Identities of the output channels still present and not masked."""
    rows = layer.weight.detach().flatten(1).abs().amax(1)
    return frozenset(round(float(v) / scale) - 1 for v in rows if v > 0)


def removed(model: Net) -> tuple[frozenset[int], frozenset[int]]:
    return frozenset(range(4)) - alive(model.conv1, 1.0), frozenset(range(16)) - alive(model.conv2, 1 / 16)


def scored(cost):
    """``evaluate``: 1 - cost(removed conv1 channels, removed conv2 channels)."""
    def evaluate(model):
        return 1.0 - cost(*removed(model))
    return evaluate


def per_channel(cost1: float, cost2: float):
    return scored(lambda r1, r2: cost1 * len(r1) + cost2 * len(r2))


def stored(footprint: Footprint) -> Footprint:
    """The bytes the model holds in memory now (parameters, buffers, neuron state), without the deployed ones."""
    return Footprint(footprint.param_bytes, footprint.buffer_bytes, footprint.state_bytes)


def run_prime(evaluate, rates=(0.25, 0.5, 0.75), model=None, **kwargs):
    """prime() on the toy model; by default the paper's exact algorithm (every rate tried in
    order, chosen groups at their highest feasible rate); the tests of the cheaper search and of
    the exact target pass ``search`` / ``objective`` themselves."""
    kwargs.setdefault("memory_saving", 0.2)
    kwargs.setdefault("objective", "max_saving")
    kwargs.setdefault("search", "sweep")
    if "min_accuracy" not in kwargs:
        kwargs.setdefault("max_accuracy_drop", 8 * U)
    return prime(model or net(), inputs(), evaluate, rates=rates, progress=False, **kwargs)


def records(report) -> dict[str, dict]:
    return {g.name: g for g in report.groups}


# -- (a) MemoryAwareImportance ------------------------------------------------------


def test_memory_aware_scores_are_l2_shares_per_kib_freed():
    model, x = net(), inputs()
    graph = SpikingGraph(model, x)
    l2 = tp.importance.GroupMagnitudeImportance(p=2)
    freed = {"conv1": CONV1_BYTES, "conv2": CONV2_BYTES}
    for weight in (1.0, 0.5, 2.0):
        imp = MemoryAwareImportance(graph, memory_weight=weight)
        for group in graph.groups():
            assert imp.bytes_per_channel(group.importance_group) == freed[group.name]
            expected = rank_shares(l2(group.importance_group)) / (freed[group.name] / KIB) ** weight
            torch.testing.assert_close(imp(group.importance_group), expected, rtol=0, atol=0)
    plain = MemoryAwareImportance(graph, memory_weight=0)
    for group in graph.groups():
        assert torch.equal(plain(group.importance_group), l2(group.importance_group))


def test_memory_aware_passes_p_and_options_to_group_l2():
    model, x = net(), inputs()
    graph = SpikingGraph(model, x)
    for kwargs in (dict(p=1), dict(group_reduction="max"), dict(normalizer=None)):
        imp = MemoryAwareImportance(graph, **kwargs)
        plain = tp.importance.GroupMagnitudeImportance(**{"p": 2, **kwargs})
        for group in graph.groups():
            expected = rank_shares(plain(group.importance_group)) / (imp.bytes_per_channel(group.importance_group) / KIB)
            torch.testing.assert_close(imp(group.importance_group), expected, rtol=0, atol=0)
    assert (MemoryAwareImportance(graph).p, MemoryAwareImportance(graph, p=1).p) == (2, 1)


def test_memory_aware_without_graph_counts_parameter_bytes_only():
    model, x = net(), inputs()
    graph = SpikingGraph(model, x)
    imp, l2 = MemoryAwareImportance(), tp.importance.GroupMagnitudeImportance(p=2)
    params = {"conv1": CONV1_PARAM_BYTES, "conv2": CONV2_PARAM_BYTES}
    for group in graph.groups():
        assert imp.bytes_per_channel(group.importance_group) == params[group.name]
        torch.testing.assert_close(imp(group.importance_group),
                                   rank_shares(l2(group.importance_group)) / (params[group.name] / KIB), rtol=0, atol=0)


def test_memory_aware_ranks_groups_differently_from_l2_in_global_pruning():
    """Global pruning of 5 of 20 channels: L2 takes conv2's weakest five; memory-aware takes conv1's three
    weakest (each frees 1640 B, 7x a conv2 channel: shares 1/4, 2/4, 3/4 over 7) and conv2's two weakest
    (1/16, 2/16): the group whose channels free more memory loses the larger share, none is emptied."""
    chosen = {}
    for name in ("l2", "memory"):
        model, x = net(), inputs()
        graph = SpikingGraph(model, x)
        imp = tp.importance.GroupMagnitudeImportance(p=2) if name == "l2" else MemoryAwareImportance(graph)
        tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.25, global_pruning=True,
                             **graph.metapruner_kwargs()).step()
        chosen[name] = removed(model)
    assert chosen["l2"] == (frozenset(), frozenset(range(5)))
    assert chosen["memory"] == (frozenset({0, 1, 2}), frozenset({0, 1}))


def test_memory_aware_ranks_within_a_group_like_l2():
    """Inside one group every channel frees the same bytes: prime() chooses the same channels."""
    plans = [run_prime(per_channel(U, U), importance=imp, memory_saving=0.5).report.plan
             for imp in (None, MemoryAwareImportance())]
    assert plans[0] == plans[1] and plans[0]


def test_ops_bytes_counts_neuron_state_per_channel():
    model, x = net(), inputs()
    state = state_bytes(model, x)
    ops = [ChannelOp(model.conv1, OUT, (0, 2)), ChannelOp(model.lif1, OUT, (0, 2), of=4),
           ChannelOp(model.conv2, IN, (0, 2))]
    assert state[model.lif1] == 4096 and state[model.lif2] == 1024
    assert ops_bytes(ops, state) == 2 * CONV1_BYTES
    assert ops_bytes(ops[:1] + ops[2:], {}) == 2 * CONV1_PARAM_BYTES


# -- (b) largest first, by the configured measure -------------------------------------


@pytest.mark.parametrize("memory, order", [("parameters", ["conv2", "conv1"]), ("footprint", ["conv1", "conv2"])])
def test_groups_are_taken_largest_first_by_the_measure(memory, order):
    """Every rate is free; the first group alone reaches 20%, so only it is pruned."""
    report = run_prime(per_channel(0, 0), memory=memory, memory_saving=0.2).report
    assert [g.name for g in report.groups] == order
    groups = records(report)
    assert (groups["conv1"].param_bytes, groups["conv1"].memory_bytes) == (4 * CONV1_PARAM_BYTES, 4 * CONV1_BYTES)
    assert (groups["conv2"].param_bytes, groups["conv2"].memory_bytes) == (16 * CONV2_PARAM_BYTES,
                                                                               16 * CONV2_BYTES)
    assert groups["conv1"].bytes_per_channel == CONV1_BYTES
    assert list(report.plan) == [order[0]]
    first = groups[order[0]]
    assert first.chosen_rate == 0.75 and groups[order[1]].chosen_rate == 0.0
    freed = {"conv1": 3 * (CONV1_PARAM_BYTES if memory == "parameters" else CONV1_BYTES),
             "conv2": 12 * (CONV2_PARAM_BYTES if memory == "parameters" else CONV2_BYTES)}[order[0]]
    assert first.freed_bytes == freed
    total = PARAMS if memory == "parameters" else PARAMS + STATE
    assert report.pruned.memory_saving == 1 - (total - freed) / total


# -- (c) the stricter floor wins -------------------------------------------------------


@pytest.mark.parametrize("drop, minimum", [(8 * U, 1 - 4 * U), (4 * U, 1 - 8 * U)])
def test_the_stricter_accuracy_floor_wins(drop, minimum):
    """conv2 channels cost 1/64 each: floor 1 - 4/64 allows 4 of them (rate 0.25), 1 - 8/64 allows 8."""
    report = run_prime(per_channel(1.0, U), max_accuracy_drop=drop, min_accuracy=minimum, memory_saving=0.5).report
    assert report.constraints.accuracy_floor == 1 - 4 * U
    assert report.plan == {"conv2": [0, 1, 2, 3]}
    assert records(report)["conv2"].target_rate == 0.25
    assert report.pruned.accuracy == 1 - 4 * U
    assert not report.constraints_met


@pytest.mark.parametrize("kwargs, floor", [(dict(max_accuracy_drop=4 * U), 1 - 4 * U),
                                           (dict(min_accuracy=1 - 8 * U), 1 - 8 * U)])
def test_either_floor_alone(kwargs, floor):
    report = run_prime(per_channel(1.0, U), memory_saving=0.5, **kwargs).report
    assert report.constraints.accuracy_floor == floor
    assert report.baseline.accuracy == 1.0


# -- (d) compression stops at the target; the highest feasible rate ---------------------------


def test_compression_stops_once_the_saving_is_reached():
    """conv2 (first by parameters) at its target 0.5 saves 8 x 160 / 2732 = 46.9% >= 30%:
    conv1, free to prune, is left whole."""
    report = run_prime(per_channel(0, U), memory_saving=0.3).report
    groups = records(report)
    assert report.plan == {"conv2": list(range(8))}
    assert groups["conv2"].target_rate == groups["conv2"].chosen_rate == 0.5
    # conv1 is never reached, so never measured: no trial, no target
    assert groups["conv1"].sensitivity == [] and groups["conv1"].evaluations == 0
    assert groups["conv1"].target_rate == 0.0 and groups["conv1"].chosen_rate == 0.0
    assert groups["conv1"].removed_channels == 0 and groups["conv2"].removed_channels == 8
    assert report.constraints_met
    assert report.pruned.memory_saving == 8 * CONV2_PARAM_BYTES / PARAMS
    assert report.reason.startswith("memory saving 46.85% >= 30.00%")


def test_compression_goes_on_to_the_next_group_until_the_saving_is_reached():
    """conv2 at 0.5 (46.9%) is not 60%: conv1 then loses its highest feasible count (3)."""
    report = run_prime(per_channel(0, U), memory_saving=0.6).report
    assert report.plan == {"conv2": list(range(8)), "conv1": [0, 1, 2]}
    # conv1 loses 3 output rows and 3 of conv2's (now 8) input columns
    freed = 3 * 40 + 3 * 8 * 9 * 4
    assert records(report)["conv1"].freed_bytes == freed
    assert report.pruned.memory_saving == (8 * CONV2_PARAM_BYTES + freed) / PARAMS
    assert report.constraints_met


def test_combined_accuracy_lowers_the_rate_of_a_later_group():
    """Alone, conv1 may lose 3 channels (cost 2/64 each = 6/64 <= 8/64); on top of conv2's
    8/64 only a rate with a combined score above the floor is kept: none, so conv1 stays whole
    while conv2 keeps its highest feasible rate."""
    report = run_prime(per_channel(2 * U, U), memory_saving=0.9).report
    groups = records(report)
    assert groups["conv1"].target_rate == 0.75 and groups["conv2"].target_rate == 0.5
    assert report.plan == {"conv2": list(range(8))}
    assert report.pruned.accuracy == 1 - 8 * U
    assert not report.constraints_met and report.reason.startswith("best feasible")


def test_combined_accuracy_picks_the_highest_rate_that_still_fits():
    """conv2 channels cost 1/128, conv1 channels 2/64; the floor is 1 - 8/64."""
    report = run_prime(per_channel(2 * U, U / 2), memory_saving=0.9).report
    groups = records(report)
    # conv2: 0.25 -> 2/64, 0.5 -> 4/64, 0.75 -> 6/64: all feasible, 0.75 chosen (6/64)
    # conv1 on top: 0.25 -> 8/64 fits, 0.5 -> 10/64 does not: chosen 0.25 (target 0.75)
    assert groups["conv2"].chosen_rate == 0.75
    assert groups["conv1"].target_rate == 0.75 and groups["conv1"].chosen_rate == 0.25
    assert report.plan == {"conv2": list(range(12)), "conv1": [0]}
    assert report.pruned.accuracy == 1 - 8 * U


def test_sensitivity_sweep_stops_at_the_first_rate_below_the_floor():
    """conv1 scores 1/64 below the floor at 2 channels and back above it at 3: the sweep stops at 0.5."""
    table = {0: 0, 1: 0, 2: 9 * U, 3: 0}
    report = run_prime(scored(lambda r1, r2: table[len(r1)] + U * len(r2)), memory_saving=0.9).report
    sweep = records(report)["conv1"].sensitivity
    assert sweep == [Trial(0.25, 1, 1.0), Trial(0.5, 2, 1 - 9 * U)]
    assert records(report)["conv1"].target_rate == 0.25
    conv2 = records(report)["conv2"].sensitivity
    assert [s.removed for s in conv2] == [4, 8, 12] and conv2[-1].accuracy == 1 - 12 * U
    assert records(report)["conv2"].target_rate == 0.5
    # baseline, conv2's sweep (3), conv2's compression at 0.5 (= its sweep trial: reused), conv1's sweep (2)
    # on top of conv2 lifted, conv1's compression at 0.25 (combined: evaluated), pruned
    assert report.evaluations == 1 + 3 + 0 + 2 + 1 + 1
    assert records(report)["conv2"].evaluations == 3 and records(report)["conv1"].evaluations == 3


def test_rates_that_round_to_the_same_count_are_tried_once():
    report = run_prime(per_channel(0, U), rates=(0.1, 0.2, 0.3, 0.4), memory_saving=0.9).report
    # conv1 (4 channels): 0.1, 0.2 -> 0 channels; 0.3, 0.4 -> 1 channel (tried once)
    assert records(report)["conv1"].sensitivity == [Trial(0.3, 1, 1.0)]
    assert [s.removed for s in records(report)["conv2"].sensitivity] == [1, 3, 4, 6]


def test_zero_saving_searches_nothing():
    report = run_prime(per_channel(0, 0), memory_saving=0.0).report
    assert report.plan == {} and report.evaluations == 1 and report.constraints_met
    assert all(g.sensitivity == [] for g in report.groups)


# -- (e) the ledger predicts the measured footprint ---------------------------------------


def test_ledger_predicts_the_measured_footprint_after_pruning():
    model, x = net(), inputs()
    assert stored(footprint(model, x)) == Footprint(PARAMS, 0, STATE)
    result = run_prime(per_channel(0, 0), model=model, memory="footprint", memory_saving=0.7)
    report = result.report
    assert report.plan == {"conv1": [0, 1, 2], "conv2": list(range(12))}
    # conv1: 1 channel (40 B), conv2: 4 x [1, 3, 3] + 4 (160 B), fc: 3 x 4 + 3 (60 B); state 1024 + 256
    measured = footprint(result.model, x)
    assert stored(measured) == Footprint(40 + 160 + 60, 0, 1024 + 256)
    assert report.pruned.predicted_memory == report.pruned.memory == measured
    assert report.pruned.memory_saving == report.pruned.footprint_saving == 1 - measured.total_bytes / (
        PARAMS + STATE)
    assert stored(footprint(model, x)) == Footprint(PARAMS, 0, STATE)  # the input model is a copy's source, untouched


def test_ledger_counts_each_removed_entry_once():
    model, x = net(), inputs()
    graph = SpikingGraph(model, x)
    ledger = LedgerState(model, graph.state_bytes, layer_outputs(model, x))
    assert stored(ledger.footprint()) == Footprint(PARAMS, 0, STATE)
    conv1 = next(g for g in graph.groups() if g.name == "conv1")
    for _ in range(2):  # the same removal twice frees its bytes once
        for op in conv1.channel_ops([1, 3]):
            ledger.remove(op)
    assert stored(ledger.footprint()) == Footprint(PARAMS - 2 * CONV1_PARAM_BYTES, 0, STATE - 2 * 1024)
    for op in conv1.channel_ops([0]):
        ledger.remove(op)
    assert stored(ledger.footprint()) == Footprint(PARAMS - 3 * CONV1_PARAM_BYTES, 0, STATE - 3 * 1024)
    assert stored(footprint(model, x)) == Footprint(PARAMS, 0, STATE)  # predicted, not done

# -- (e2) flash and RAM at the deployed precision, and budgets as targets ------------------
# The toy net: weights 36 + 576 + 48 entries, 4 + 16 + 3 output channels, biases 23 entries. One sample's
# largest layer output: conv1's (and lif1's) 4 x 16 x 16 = 1024 entries; neuron state 5120 B.
INT8_FLASH = 660 * 1 + 23 * 8  # INT8: 1 B per weight entry, 8 B per output channel (scale, bias)
FP32_RAM, INT8_RAM = STATE + 1024 * 4, STATE + 1024 * 1
CONV2_INT8_FLASH = 36 + 8 + 3  # one conv2 channel: its 4 x 3 x 3 weights, scale and bias, fc's input column
# INT4 (nncf_int4): fc is matmul-like (half a byte per weight entry), the 3x3 convolutions stay INT8; 9.2 B per
# output channel; weight-only, so activations stay FP32 (no buffers: batch norms fold)
INT4_FLASH, INT4_RAM = round(612 * 1 + 48 * 0.5 + 23 * 9.2), STATE + 1024 * 4


def test_flash_and_ram_are_counted_at_the_deployment_precision():
    model, x = net(), inputs()
    assert max(layer_outputs(model, x).values()) == 1024
    fp32, int8 = footprint(model, x, FP32), footprint(model, x, INT8)
    assert (fp32.flash_bytes, fp32.ram_bytes) == (PARAMS, FP32_RAM)
    assert (int8.flash_bytes, int8.ram_bytes) == (INT8_FLASH, INT8_RAM)
    assert footprint(model, x, INT8.calibrated(INT8_FLASH, INT8_FLASH + 300)).flash_bytes == INT8_FLASH + 300
    assert int8.bytes_of("flash") == INT8_FLASH and int8.bytes_of("ram") == INT8_RAM
    int4 = footprint(model, x, INT4)
    assert (int4.flash_bytes, int4.ram_bytes) == (INT4_FLASH, INT4_RAM)
    assert [INT4.precision_of(m) for m in (model.conv1, model.conv2, model.fc)] == ["int8", "int8", "int4"]
    assert {INT8.precision_of(m) for m in (model.conv1, model.fc)} == {"int8"} and FP32.precision_of(model.fc) == "fp32"


@pytest.mark.parametrize("deployment", [FP32, INT8, INT4], ids=["fp32", "int8", "int4"])
def test_ledger_predicts_flash_and_ram_after_removals(deployment):
    model, x = net(), inputs()
    graph = SpikingGraph(model, x)
    ledger = LedgerState(model, graph.state_bytes, layer_outputs(model, x), deployment)
    assert ledger.footprint() == footprint(model, x, deployment)
    groups = {g.name: g for g in graph.groups()}
    plan = {"conv1": [1, 3], "conv2": [0, 5, 9]}
    for name, idxs in plan.items():
        for op in groups[name].channel_ops(idxs):
            ledger.remove(op)
    predicted = ledger.footprint()
    # conv1 halved: its output (the RAM peak) and lif1's state (4096 B) halve; lif2 loses 3 of 16 channels
    assert predicted.state_bytes == 4096 // 2 + 1024 - 3 * 64
    assert predicted.ram_bytes == predicted.state_bytes + 512 * deployment.activation_bytes
    apply_plan(graph, plan)
    assert footprint(model, x, deployment) == predicted


def test_a_flash_budget_alone_is_the_target_and_the_search_stops_at_it():
    budget = INT8_FLASH - 100  # three conv2 channels (43 B each) reach it, two do not
    report = run_prime(per_channel(0, 0), memory_saving=None, flash_budget=budget, deployment=INT8,
                       objective="target", search="bisect").report
    assert report.constraints_met and report.constraints.flash_budget == budget
    assert report.plan == {"conv2": [0, 1, 2]}
    assert report.pruned.memory.flash_bytes == INT8_FLASH - 3 * CONV2_INT8_FLASH <= budget
    assert report.pruned.predicted_memory == report.pruned.memory
    assert report.reason.startswith(f"flash {INT8_FLASH - 3 * CONV2_INT8_FLASH:,} B <= budget {budget:,} B (int8)")
    # a deployment whose prediction is uncertain by 50 B: the search aims 50 B lower (150 B: four channels)
    uncertain = INT8.calibrated(INT8_FLASH, INT8_FLASH, margin_bytes=50)
    careful = run_prime(per_channel(0, 0), memory_saving=None, flash_budget=budget, deployment=uncertain,
                        objective="target", search="bisect").report
    assert careful.plan == {"conv2": [0, 1, 2, 3]} and careful.constraints.flash_margin == 50
    assert careful.reason.startswith(f"flash {INT8_FLASH - 4 * CONV2_INT8_FLASH:,} B <= budget {budget:,} B "
                                     "(int8, 50 B margin)")


def test_every_target_must_hold_saving_and_budgets_together():
    # 5% of the parameters: one conv2 channel would do. The RAM budget: conv2 frees 64 B of lif2's state a
    # channel (768 B at most), so conv1 must lose one channel too (1024 B of lif1's state, 1024 B of the peak).
    # The search takes conv2 (largest) at its target (12), then conv1's one channel; conv1's channel alone
    # meets both targets (616 B of parameters, 2048 B of RAM), so conv2 is trimmed back to nothing.
    budget = FP32_RAM - 1000
    report = run_prime(per_channel(0, 0), memory_saving=0.05, ram_budget=budget, objective="target",
                       search="bisect").report
    assert report.constraints_met and report.plan == {"conv1": [0]}
    assert report.pruned.memory.ram_bytes == FP32_RAM - 2048 <= budget
    assert report.pruned.predicted_memory == report.pruned.memory
    conv2 = records(report)["conv2"]
    assert conv2.target_rate == 0.75 and conv2.removed_channels == 0 and conv2.freed_bytes == 0
    assert records(report)["conv1"].removed_channels == 1 and records(report)["conv1"].freed_bytes == CONV1_PARAM_BYTES
    assert report.reason.startswith("memory saving") and "ram" in report.reason
    # the paper's objective keeps every chosen group at its highest feasible rate: no trimming
    paper = run_prime(per_channel(0, 0), memory_saving=0.05, ram_budget=budget, objective="max_saving").report
    assert len(paper.plan["conv2"]) == 12 and len(paper.plan["conv1"]) == 3


def test_an_impossible_budget_applies_the_best_feasible_plan_and_says_why():
    report = run_prime(per_channel(0, U), memory_saving=None, flash_budget=100, deployment=INT8,
                       objective="target", search="bisect").report
    assert not report.constraints_met and report.plan  # pruned as far as the accuracy budget allows
    assert report.pruned.memory.flash_bytes < INT8_FLASH
    assert report.reason.startswith(f"best feasible: flash {report.pruned.memory.flash_bytes:,} B > budget 100 B")


@pytest.mark.parametrize("kwargs, message", [
    ({"memory_saving": None}, "give memory_saving"),
    ({"flash_budget": 0}, "flash_budget must be a positive whole number of bytes"),
    ({"ram_budget": "50KB"}, "ram_budget must be a positive whole number of bytes"),
    ({"flash_budget": 1000, "deployment": "int8"}, "deployment must be a primesvt_plugin.Deployment"),
])
def test_budget_arguments_are_checked(kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        run_prime(per_channel(0, 0), **kwargs)



def test_ledger_with_buffers_and_batch_norm():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), neuron.IFNode(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 2))
    x = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    graph = SpikingGraph(model, x)
    before = footprint(model, x)
    assert stored(before) == Footprint((36 + 8 + 128 + 2) * 4, 8 * 4, 4 * 16 * 4)
    (group,) = graph.groups()
    ledger = LedgerState(model, graph.state_bytes, layer_outputs(model, x))
    for op in group.channel_ops([2]):
        ledger.remove(op)
    apply_plan(graph, {group.name: [2]}, [group])
    assert stored(ledger.footprint()) == stored(footprint(model, x)) == Footprint((27 + 6 + 96 + 2) * 4, 6 * 4,
                                                                                  3 * 16 * 4)


def test_footprint_measures():
    f = Footprint(10, 20, 30, 40, 50)
    assert f.total_bytes == 60 and f.as_dict() == {"param_bytes": 10, "buffer_bytes": 20, "state_bytes": 30,
                                                   "flash_bytes": 40, "ram_bytes": 50, "total_bytes": 60}
    assert f.bytes_of("parameters") == 10 and f.bytes_of("footprint") == 60
    assert f.bytes_of("flash") == 40 and f.bytes_of("ram") == 50
    with pytest.raises(ValueError, match="memory measure"):
        f.bytes_of("params")


def test_one_sample_takes_the_first_sample():
    model = net()
    x = inputs()
    assert torch.equal(one_sample(model, x), x[:1])
    multi = nn.Sequential(nn.Linear(3, 3), neuron.LIFNode(step_mode="m"))
    for m in multi.modules():
        if hasattr(m, "step_mode"):
            m.step_mode = "m"
    seq = torch.rand(4, 2, 3)
    assert torch.equal(one_sample(multi, seq), seq[:, :1])


# -- (f) head-aligned selection ----------------------------------------------------------


def group_of(size: int, heads: int) -> PruningGroup:
    return PruningGroup("g", size, heads, None, None, None)


def test_select_takes_the_least_important_per_head_block():
    group = group_of(8, 2)
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5, 0.1, 9.0, 2.0, 2.0])
    assert group.select(scores, 2) == [3, 4]
    assert group.select(scores, 4) == [1, 3, 4, 6]  # ties: the first index goes first (6 before 7)
    assert group.select(scores, 3) == [3, 4]  # rounded down to whole blocks
    assert group.select(scores, 1) == []
    assert group.select(scores, 8) == [1, 2, 3, 4, 6, 7]  # never a whole head block
    assert group.select(scores, 6) == [1, 2, 3, 4, 6, 7]
    assert group_of(8, 1).select(scores, 8) == [0, 1, 2, 3, 4, 6, 7]
    assert group_of(8, 1).select(scores, 3) == [1, 3, 4]


def test_removable_rounds_down_to_whole_head_blocks():
    group = group_of(12, 3)  # blocks of 4
    assert [group.removable(r) for r in (0.1, 0.25, 0.3, 0.5, 0.74, 0.75, 0.9, 1.0)] == [0, 3, 3, 6, 6, 9, 9, 9]
    assert [group_of(10, 1).removable(r) for r in (0.1, 0.3, 0.7, 0.99)] == [1, 3, 7, 9]
    assert group_of(2, 2).removable(0.9) == 0  # one channel per head: nothing can go
    assert group_of(4, 1).removable(0.0) == 0


def tiny_spikformer() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = spikformer.Spikformer(T=2, in_channels=1, img_size_h=16, img_size_w=16, patch_size=4, num_classes=4,
                                  embed_dims=16, num_heads=2, mlp_ratio=1, depths=1)
    return model, torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))


RESIDUAL = "blocks.0.mlp.fc2.0"  # the residual stream's group (attention width included)
QKV = "blocks.0.attn:qkv"


def test_attention_qkv_group_is_head_aligned_on_spikformer():
    model, x = tiny_spikformer()
    graph = SpikingGraph(model, x)
    groups = {g.name: g for g in graph.groups()}
    qkv = groups[QKV]
    assert (qkv.size, qkv.channel_groups, qkv.kind) == (16, 2, "attention-inner")
    assert groups[RESIDUAL].kind == "channels" and groups[RESIDUAL].channel_groups == 1
    scores = tp.importance.GroupMagnitudeImportance(p=2)(qkv.importance_group)
    idxs = qkv.select(scores, qkv.removable(0.5))
    assert idxs == qkv.select(scores, 8) and len(idxs) == 8 and len([i for i in idxs if i < 8]) == 4
    assert set(groups) == {QKV, RESIDUAL, "blocks.0.mlp.fc1.0", "patch_embed.stages.0.conv_bn.block.0",
                           "patch_embed.stages.1.conv_bn.block.0", "patch_embed.stages.2.conv_bn.block.0"}
    assert {g.name for g in graph.groups(include_attention_inner=False)} == set(groups) - {QKV}
    assert QKV not in {g.name for g in SpikingGraph(model, x, ignored_layers=[model.blocks[0].attn]).groups()}


def test_masking_equals_pruning_and_ledger_on_spikformer_with_inner_width_apart(masked_equals_pruned):
    """Round one leaves the residual width 8 and the q/k/v width 12; round two prunes both again."""
    model, x = tiny_spikformer()
    masked_equals_pruned(model, x, {RESIDUAL: 0.5, QKV: 0.25})
    attn = model.blocks[0].attn
    assert attn.qkv_conv_bn[0].out_channels == 3 * 12 and attn.proj_conv_bn[0].in_channels == 12
    assert attn.qkv_conv_bn[0].in_channels == 8 and attn.proj_conv_bn[0].out_channels == 8
    masked_equals_pruned(model, x, {RESIDUAL: 0.5, QKV: 0.5})
    assert attn.qkv_conv_bn[0].out_channels == 3 * 6 and attn.proj_conv_bn[0].out_channels == 4


def test_attention_ops_count_inner_neuron_state_with_the_inner_width(masked_equals_pruned):
    model, x = tiny_spikformer()
    masked_equals_pruned(model, x, {RESIDUAL: 0.5, QKV: 0.25})  # width 8, inner 12
    graph = SpikingGraph(model, x)
    groups = {g.name: g for g in graph.groups()}
    attn = model.blocks[0].attn
    neurons = {op.layer: op for op in groups[QKV].channel_ops([1, 4]) if op.layer in graph.state_bytes}
    assert neurons[attn.qkv_lif].idxs == (1, 4, 13, 16, 25, 28) and neurons[attn.qkv_lif].of == 36
    assert neurons[attn.qkv_lif].direction == OUT
    width = {op.layer: op for op in groups[RESIDUAL].channel_ops([2]) if op.layer in graph.state_bytes}
    assert width[attn.proj_lif].idxs == (2,) and width[attn.proj_lif].of == 8


def test_pruning_an_inner_group_off_the_heads_is_refused_by_name():
    from primesvt_plugin.errors import LayoutError

    model, x = tiny_spikformer()
    qkv = next(g for g in SpikingGraph(model, x).groups() if g.name == QKV)
    with pytest.raises(LayoutError, match="attention blocks.0.attn: inner width 15 is not 2 equal heads"):
        qkv.prune([0])


def test_memory_aware_bytes_are_the_groups_bytes_attention_included():
    """What MemoryAwareImportance divides by is what the policy's records and ledger count."""
    model, x = tiny_spikformer()
    graph = SpikingGraph(model, x)
    imp = MemoryAwareImportance(graph)
    for group in graph.groups():
        expected = ops_bytes(group.channel_ops(range(group.size)), graph.state_bytes) / group.size
        assert imp.bytes_per_channel(group.importance_group) == expected, group.name


# -- (g) masking, channels -------------------------------------------------------------


def test_masking_equals_pruning_on_the_toy_model():
    model, x = net(), inputs()
    with torch.no_grad():  # make every channel matter to the output
        model.conv2.weight.mul_(torch.linspace(0.5, 1.5, 36).reshape(1, 4, 3, 3).repeat(16, 1, 1, 1))
        model.fc.weight.copy_(torch.randn(3, 16, generator=torch.Generator().manual_seed(2)))
    graph = SpikingGraph(model, x)
    groups = graph.groups()
    plan = {"conv1": [1, 2], "conv2": [0, 5, 7, 9, 15]}
    original = fresh_forward(model, x)
    masks = Masks()
    for group in groups:
        masks.trial(group.channel_ops(plan[group.name]))
        masks.commit()
    masked = fresh_forward(model, x)
    masks.clear()
    assert torch.equal(fresh_forward(model, x), original)
    assert not torch.equal(masked, original)
    apply_plan(graph, plan, groups)
    torch.testing.assert_close(fresh_forward(model, x), masked, rtol=1e-6, atol=1e-6)
    assert alive(model.conv1, 1.0) == {0, 3} and model.conv2.weight.shape == (11, 2, 3, 3)


def test_masks_trial_undo_commit_clear_restore_exactly():
    model, x = net(), inputs()
    graph = SpikingGraph(model, x)
    groups = {g.name: g for g in graph.groups()}
    original = {k: v.clone() for k, v in model.state_dict().items()}
    masks = Masks()
    masks.trial(groups["conv1"].channel_ops([0]))
    assert removed(model) == (frozenset({0}), frozenset())
    assert model.conv2.weight[:, 0].abs().sum() == 0 and model.conv2.weight[:, 1:].abs().sum() > 0
    masks.undo_trial()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    masks.trial(groups["conv1"].channel_ops([0]))
    masks.commit()
    masks.trial(groups["conv1"].channel_ops([1]))  # the same tensors again, on top of a committed mask
    masks.trial(groups["conv2"].channel_ops([3]))
    assert removed(model) == (frozenset({0, 1}), frozenset({3}))
    masks.undo_trial()
    assert removed(model) == (frozenset({0}), frozenset())  # back to the committed mask only
    masks.trial(groups["conv1"].channel_ops([2]))
    masks.commit()
    assert removed(model) == (frozenset({0, 2}), frozenset())
    masks.undo_trial()  # nothing left to undo
    assert removed(model) == (frozenset({0, 2}), frozenset())
    masks.trial(groups["conv2"].channel_ops([4]))
    masks.clear()  # the trial and both commits
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    masks.clear()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_zero_channels_and_restore():
    layer = nn.Linear(3, 4)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    saved = {}
    zero_channels(ChannelOp(layer, OUT, (1, 3)), saved)
    zero_channels(ChannelOp(layer, IN, (0,)), saved)  # the weight is saved once, before any zeroing
    assert set(map(id, saved)) == {id(layer.weight), id(layer.bias)}
    assert torch.equal(saved[layer.weight], before["weight"])
    assert layer.weight[[1, 3]].abs().sum() == 0 and layer.bias[[1, 3]].abs().sum() == 0
    assert layer.weight[:, 0].abs().sum() == 0 and layer.weight[[0, 2]][:, 1:].abs().sum() > 0
    restore(saved)
    assert saved == {}
    assert all(torch.equal(p, before[n]) for n, p in layer.named_parameters())


def slices(layer, direction):
    names = {id(t): n for n, t in list(layer.named_parameters()) + list(layer.named_buffers())}
    return [(names[id(t)], dim) for t, dim in channel_slices(layer, direction)]


def test_channel_slices_and_bytes_of_standard_layers():
    conv = nn.Conv2d(3, 8, (3, 5))
    assert slices(conv, OUT) == [("weight", 0), ("bias", 0)] and bytes_per_channel(conv, OUT) == (45 + 1) * 4
    assert slices(conv, IN) == [("weight", 1)] and bytes_per_channel(conv, IN) == 8 * 15 * 4
    nobias = nn.Conv2d(3, 8, 3, bias=False)
    assert slices(nobias, OUT) == [("weight", 0)] and bytes_per_channel(nobias, OUT) == 27 * 4
    depthwise = nn.Conv2d(4, 4, 3, groups=4)
    assert slices(depthwise, IN) == [("weight", 0), ("bias", 0)] == slices(depthwise, OUT)
    assert bytes_per_channel(depthwise, IN) == bytes_per_channel(depthwise, OUT) == (9 + 1) * 4
    grouped = nn.Conv2d(4, 8, 3, groups=2)  # not depthwise: weight [8, 2, 3, 3]
    assert slices(grouped, IN) == [("weight", 1)] and bytes_per_channel(grouped, IN) == 8 * 9 * 4
    transposed = nn.ConvTranspose2d(4, 6, 3)  # weight [4, 6, 3, 3]
    assert slices(transposed, OUT) == [("weight", 1), ("bias", 0)] and bytes_per_channel(transposed, OUT) == 37 * 4
    assert slices(transposed, IN) == [("weight", 0)] and bytes_per_channel(transposed, IN) == 54 * 4
    nobias_t = nn.ConvTranspose1d(4, 6, 3, bias=False)
    assert slices(nobias_t, OUT) == [("weight", 1)]
    linear = nn.Linear(5, 7)
    assert slices(linear, OUT) == [("weight", 0), ("bias", 0)] and bytes_per_channel(linear, OUT) == 6 * 4
    assert slices(linear, IN) == [("weight", 1)] and bytes_per_channel(linear, IN) == 7 * 4
    half = nn.Linear(5, 7).half()
    assert bytes_per_channel(half, OUT) == 6 * 2
    bn = nn.BatchNorm2d(6)  # num_batches_tracked is an integer: not a channel's memory
    assert slices(bn, OUT) == [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]
    assert bytes_per_channel(bn, OUT) == 16
    plif = neuron.ParametricLIFNode()  # a 0-d parameter is no channel's
    assert channel_slices(plif, OUT) == [] and bytes_per_channel(plif, OUT) == 0


def test_channel_slices_keep_only_tensors_with_one_entry_per_channel():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 2))
            self.table = nn.Parameter(torch.ones(3))  # not per channel
            self.register_buffer("scale", torch.ones(4))

    odd = Odd()
    assert slices(odd, OUT) == [("weight", 0), ("scale", 0)] and bytes_per_channel(odd, OUT) == 12


def test_prune_channels_and_pruning_functions():
    conv = nn.Conv2d(3, 8, 3)
    prune_channels(ChannelOp(conv, OUT, ()))
    assert conv.out_channels == 8
    prune_channels(ChannelOp(conv, OUT, (0, 5)))
    prune_channels(ChannelOp(conv, IN, (1,)))
    assert tuple(conv.weight.shape) == (6, 2, 3, 3) and (conv.out_channels, conv.in_channels) == (6, 2)
    assert tp_pruning_fn(conv, OUT) == tp.pruner.function.prune_conv_out_channels
    assert tp_pruning_fn(conv, IN) == tp.pruner.function.prune_conv_in_channels
    assert direction_of(tp_pruning_fn(conv, OUT)) == OUT and direction_of(tp_pruning_fn(conv, IN)) == IN
    with pytest.raises(TypeError, match="no pruner for LIFNode"):
        tp_pruning_fn(neuron.LIFNode(), OUT)


def test_expand_chunks():
    assert expand_chunks([0, 2], 4, 3) == (0, 2, 4, 6, 8, 10)
    assert expand_chunks([1], 5, 1) == (1,)
    assert expand_chunks([], 5, 2) == ()


# -- the graph ----------------------------------------------------------------------------


def test_graph_groups_output_layers_and_ignored_layers():
    model, x = net(), inputs()
    graph = SpikingGraph(model, x)
    assert graph.output_layers == [model.fc]
    assert graph.spiking_layers == [model.lif1, model.lif2]
    assert [g.name for g in graph.groups()] == ["conv2", "conv1"]
    conv1 = next(g for g in graph.groups() if g.name == "conv1")
    ops = conv1.channel_ops([1, 3])
    assert [(op.layer, op.direction, op.idxs, op.of) for op in ops] == [
        (model.conv1, OUT, (1, 3), 0), (model.lif1, OUT, (1, 3), 4), (model.conv2, IN, (1, 3), 0)]
    kwargs = graph.metapruner_kwargs()
    assert kwargs["ignored_layers"] == [model.fc] and kwargs["out_channel_groups"] == {}
    assert set(kwargs["customized_pruners"]) == {neuron.LIFNode}
    ignored = SpikingGraph(model, x, ignored_layers=[model.conv2])
    assert [g.name for g in ignored.groups()] == ["conv1"]
    assert ignored.metapruner_kwargs()["ignored_layers"] == [model.fc, model.conv2]
    conv1.prune([0])
    assert model.conv1.out_channels == 3 and model.conv2.in_channels == 3


def test_graph_refuses_unknown_stateful_layers():
    from spikingjelly.activation_based import base

    class Memory(base.MemoryModule):
        def __init__(self):
            super().__init__()
            self.register_memory("v", 0.0)

        def forward(self, x):
            self.v = self.v + x
            return self.v

    class Stateless(base.MemoryModule):  # a MemoryModule with no memory keeps nothing
        def forward(self, x):
            return x

    SpikingGraph(nn.Sequential(nn.Conv2d(1, 2, 1), Stateless(), nn.Conv2d(2, 2, 1)), torch.rand(1, 1, 2, 2))
    model = nn.Sequential(nn.Conv2d(1, 2, 1), Memory(), nn.Conv2d(2, 2, 1))
    with pytest.raises(UnhandledLayerError, match=r"layer '1' \(test_core\.[\w.<>]*Memory\) keeps state \(v\)"):
        SpikingGraph(model, torch.rand(1, 1, 2, 2))
    model[1].register_memory("i", 0.0)
    with pytest.raises(UnhandledLayerError) as error:
        SpikingGraph(model, torch.rand(1, 1, 2, 2))
    assert str(error.value).endswith(
        "Memory) keeps state (v, i) and no primesvt plugin handles it; write a plugin implementing "
        "primesvt_spiking_layer_types / primesvt_prune_spiking_layer (see examples/primesvt-example-neuron) "
        "for it, or replace the layer")


def test_graph_refuses_attention_without_a_layout():
    class Attention(nn.Module):
        num_heads = 2

        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 12)

        def forward(self, x):
            return self.qkv(x)[..., :4]

    model = nn.Sequential(nn.Linear(4, 4), Attention(), nn.Linear(4, 2))
    with pytest.raises(UnhandledLayerError) as error:
        SpikingGraph(model, torch.rand(1, 4))
    assert str(error.value).startswith("attention block '1' (test_core.")
    assert str(error.value).endswith(
        "Attention): its layout could not be inferred: layer qkv both reads its input and writes its output: no "
        "output projection reads the heads back; write a plugin implementing primesvt_attention_layout for it "
        "(docs/plugins.md)")


def test_graph_refuses_untraced_per_channel_parameters():
    class Threshold(nn.Module):
        def __init__(self):
            super().__init__()
            self.level = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return x * (x > self.level.view(1, -1)).float()

    model = nn.Sequential(nn.Linear(3, 4), Threshold(), nn.Linear(4, 2))
    with pytest.raises(UnhandledLayerError, match=r"per-channel parameters \(level\)"):
        SpikingGraph(model, torch.rand(1, 3))


# -- Taylor importance in prime() -------------------------------------------------------


def test_needs_gradients():
    assert needs_gradients(tp.importance.GroupTaylorImportance())
    assert needs_gradients(tp.importance.TaylorImportance())
    assert not needs_gradients(tp.importance.GroupMagnitudeImportance(p=2))
    assert not needs_gradients(MemoryAwareImportance())

    class Says(tp.importance.GroupMagnitudeImportance):
        needs_gradients = True

    class Refuses(tp.importance.GroupTaylorImportance):
        needs_gradients = False

    assert needs_gradients(Says()) and not needs_gradients(Refuses())


def test_taylor_importance_in_prime_without_gradients():
    """Gradients come from mean(output ** 2) on the example batch; .grad is left as it was."""
    model, x = net(), inputs()
    model.conv1.weight.requires_grad_(False)
    assert all(p.grad is None for p in model.parameters())
    report = run_prime(per_channel(0, U), model=model, importance=tp.importance.GroupTaylorImportance(),
                       memory_saving=0.3, inplace=True).report
    assert all(p.grad is None for p in model.parameters())
    assert not model.conv1.weight.requires_grad and model.conv2.weight.requires_grad
    # the same channels as Taylor scores from those gradients, computed here
    reference, graph_x = net(), inputs()
    graph = SpikingGraph(reference, graph_x)
    fresh_forward(reference, graph_x)
    reference.eval()
    out = reference(graph_x)
    out.float().pow(2).mean().backward()
    conv2 = next(g for g in graph.groups() if g.name == "conv2")
    scores = tp.importance.GroupTaylorImportance()(conv2.importance_group)
    assert report.plan == {"conv2": conv2.select(scores, 8)}


def test_gradient_loss_is_the_mean_square_output():
    assert gradient_loss(torch.tensor([[1.0, -2.0], [0.5, 0.0]], dtype=torch.float16)).item() == 5.25 / 4
    assert gradient_loss(torch.tensor([[1.0, -2.0]])).dtype == torch.float32


def test_example_gradients_restore_the_users_gradients():
    model, x = net(), inputs()
    model.eval()
    user = torch.full_like(model.conv2.weight, 7.0)
    model.conv2.weight.grad = user
    with example_gradients(model, x):
        assert all(p.grad is not None for p in model.parameters())
        assert model.conv2.weight.grad is not user
    assert model.conv2.weight.grad is user and model.conv1.weight.grad is None
    assert all(p.requires_grad for p in model.parameters())


# -- prime()'s arguments and evaluate's results --------------------------------------------


def refused(message: str, **kwargs):
    from primesvt_plugin.errors import ArgumentError

    arguments = dict(model=net(), example_inputs=inputs(), evaluate=per_channel(0, 0), memory_saving=0.2,
                     max_accuracy_drop=0.1, progress=False)
    arguments.update(kwargs)
    with pytest.raises(ArgumentError) as error:
        prime(**arguments)
    assert str(error.value) == message


@pytest.mark.parametrize("kwargs, message", [
    (dict(memory_saving=-0.1), "memory_saving must be a finite number >= 0.0, got -0.1"),
    (dict(memory_saving=True), "memory_saving must be a finite number >= 0.0, got True"),
    (dict(memory_saving="0.2"), "memory_saving must be a finite number >= 0.0, got '0.2'"),
    (dict(memory_saving=float("nan")), "memory_saving must be a finite number >= 0.0, got nan"),
    (dict(memory_saving=1.0), "memory_saving must be a fraction in [0, 1), got 1.0"),
    (dict(memory_saving=1.5), "memory_saving must be a fraction in [0, 1), got 1.5"),
    (dict(max_accuracy_drop=None), "give max_accuracy_drop and/or min_accuracy: the accuracy budget"),
    (dict(max_accuracy_drop=-0.01), "max_accuracy_drop must be a finite number >= 0.0, got -0.01"),
    (dict(max_accuracy_drop=float("inf")), "max_accuracy_drop must be a finite number >= 0.0, got inf"),
    (dict(min_accuracy="high"), "min_accuracy must be a finite number >= -inf, got 'high'"),
    (dict(chance_accuracy=float("nan")), "chance_accuracy must be a finite number >= -inf, got nan"),
    (dict(memory="bytes"), "memory measure must be one of ('parameters', 'footprint'), got 'bytes'"),
    (dict(rates=()), "rates must be fractions in (0, 1), got []"),
    (dict(rates=(0.0, 0.5)), "rates must be fractions in (0, 1), got [0.0, 0.5]"),
    (dict(rates=(0.5, 1.0)), "rates must be fractions in (0, 1), got [0.5, 1.0]"),
    (dict(example_inputs=[1.0]), "example_inputs must be a torch.Tensor (one batch the model accepts), got list"),
    (dict(example_inputs=torch.rand(1, 2, 16, 16)), "the model cannot run on example_inputs of shape (1, 2, 16, 16): "
     "RuntimeError: Given groups=1, weight of size [4, 1, 3, 3], expected input[1, 2, 16, 16] to have 1 channels, "
     "but got 2 channels instead"),
])
def test_prime_refuses_wrong_arguments_by_name(kwargs, message):
    refused(message, **kwargs)


def test_prime_accepts_limit_values():
    report = run_prime(per_channel(0, 0), memory_saving=0, max_accuracy_drop=0, min_accuracy=-5,
                       rates=(0.5, 0.5)).report
    assert report.constraints == Constraints(memory_saving=0, memory="parameters", max_accuracy_drop=0,
                                             min_accuracy=-5, accuracy_floor=1.0, objective="max_saving")
    assert report.rates == [0.5]


@pytest.mark.parametrize("value", [torch.tensor(0.75), torch.tensor(0.75, dtype=torch.float64), 0.75,
                                   __import__("numpy").float32(0.75), 3 / 4])
def test_evaluate_may_return_any_real_scalar(value):
    report = run_prime(lambda model: value, memory_saving=0.0).report
    assert report.baseline.accuracy == 0.75 and type(report.baseline.accuracy) is float


@pytest.mark.parametrize("value, message", [
    ("0.9", "evaluate must return a number (e.g. an accuracy), got '0.9' of type str (call 1)"),
    (True, "evaluate must return a number (e.g. an accuracy), got True of type bool (call 1)"),
    (None, "evaluate must return a number (e.g. an accuracy), got None of type NoneType (call 1)"),
    (torch.tensor([0.5]), "evaluate must return a number (e.g. an accuracy), got tensor([0.5000]) of type Tensor "
     "(call 1)"),
    (float("inf"), "evaluate returned inf (call 1); check the model and data"),
])
def test_evaluate_returning_no_number_is_a_clear_error(value, message):
    from primesvt_plugin.errors import EvaluationError

    with pytest.raises(EvaluationError) as error:
        run_prime(lambda model: value)
    assert str(error.value) == message


def test_evaluate_error_names_the_call():
    from primesvt_plugin.errors import EvaluationError

    values = iter([1.0, 1.0, float("nan")])
    with pytest.raises(EvaluationError) as error:
        run_prime(lambda model: next(values))
    assert str(error.value) == "evaluate returned nan (call 3); check the model and data"


@pytest.mark.parametrize("chance, warned", [(0.99, True), (1.0, True), (0.98, False), (None, False)])
def test_a_baseline_at_chance_level_is_flagged(chance, warned, caplog):
    with caplog.at_level("WARNING", logger="primesvt_plugin.pruning.policy"):
        report = run_prime(per_channel(0, 0), chance_accuracy=chance, memory_saving=0.1).report
    assert caplog.messages == report.warnings
    warning = ("baseline accuracy 1.0000 is at chance level ({:.4f}): the model has not learned the task, so its "
               "accuracy says nothing about what pruning removes; train the model first").format(chance or 0)
    assert report.warnings == ([warning] if warned else [])
    assert report.constraints_met is not warned
    assert (report.reason == warning) is warned


@pytest.mark.parametrize("inplace", [False, True])
def test_prime_leaves_ignored_layers_whole(inplace):
    """The user's layers are ignored in the copy prime() prunes, too."""
    model = net()
    report = run_prime(per_channel(0, 0), model=model, ignored_layers=[model.conv2], inplace=inplace,
                       memory_saving=0.5).report
    assert [g.name for g in report.groups] == ["conv1"] and list(report.plan) == ["conv1"]


def test_prime_uses_the_given_plugin_manager():
    from primesvt_plugin.plugins import new_plugin_manager

    with pytest.raises(UnhandledLayerError, match="layer 'lif1'"):
        run_prime(per_channel(0, 0), pm=new_plugin_manager(load_entry_points=False))


def test_prime_ranks_channels_by_l2_by_default():
    """conv1 channel 0 is one weight of 3, channel 1 nine weights of 1.1: L2 (9 < 10.89) says 0 is weaker, L3 (27 > 11.98) says 1."""
    model = net()
    with torch.no_grad():
        model.conv1.weight[0] = 0
        model.conv1.weight[0, 0, 0, 0] = 3.0
        model.conv1.weight[1] = 1.1
    plans = {name: run_prime(lambda m: 1.0, model=model, rates=(0.25,), memory_saving=0.9, importance=imp,
                             ignored_layers=[model.conv2], inplace=False).report.plan
             for name, imp in [("default", None), ("l1", tp.importance.GroupMagnitudeImportance(p=1)),
                               ("l3", tp.importance.GroupMagnitudeImportance(p=3))]}
    assert plans == {"default": {"conv1": [0]}, "l1": {"conv1": [0]}, "l3": {"conv1": [1]}}


def test_report_timings_are_within_the_call():
    import time

    clock = time.perf_counter()
    report = run_prime(per_channel(0, U), memory_saving=0.3, finetune=lambda model: None).report
    wall = time.perf_counter() - clock
    assert set(report.timings_s) == {"trace_and_rank", "one_evaluation", "search", "prune", "finetune"}
    assert all(0 <= t <= wall + 0.001 for t in report.timings_s.values())
    assert 0 < report.search_in_evaluation_passes


def test_the_whole_report_on_a_known_case():
    """Every field, from the hand-computed bytes (module docstring) and the cost of each channel,
    with prime()'s defaults: bisection, and a plan that stops at the asked saving.

    conv2 (first by parameters) frees 160 B a channel: 30% of 2732 B needs 6 channels
    (5 free 29.3%). Bisection over its rates' counts [4, 8, 12]: 8 feasible (1 - 8/64 is the
    floor), 12 not: target 8. Capped at 6, checked once on the model; conv1 is never reached."""
    calls = []
    typed = run_prime(per_channel(0, U), memory_saving=0.3, objective="target", search="bisect",
                      finetune=lambda model: calls.append(model.training)).report
    assert calls == [True]  # fine-tuned once, in train mode
    assert PrimeReport.from_dict(json.loads(json.dumps(typed.to_dict()))) == typed  # report.json reads back
    report = typed.to_dict()
    report.pop("timings_s")
    assert report.pop("search_in_evaluation_passes") > 0
    # FP32 flash: the parameters; RAM: state + conv1's output (the peak, 1024 entries), unpruned
    after = Footprint(PARAMS - 6 * CONV2_PARAM_BYTES, 0, STATE - 6 * 64, PARAMS - 6 * CONV2_PARAM_BYTES,
                      STATE - 6 * 64 + 1024 * 4)
    conv2 = {"name": "conv2", "kind": "channels", "channels": 16, "channel_groups": 1, "memory_bytes": 16 * CONV2_BYTES,
             "param_bytes": 16 * CONV2_PARAM_BYTES, "bytes_per_channel": float(CONV2_BYTES),
             "sensitivity": [{"rate": 0.5, "removed": 8, "accuracy": 1 - 8 * U},
                             {"rate": 0.75, "removed": 12, "accuracy": 1 - 12 * U}],
             "target_rate": 0.5, "chosen_rate": 6 / 16, "removed_channels": 6, "freed_bytes": 6 * CONV2_PARAM_BYTES,
             "evaluations": 3, "energy_pj": None}
    conv1 = {"name": "conv1", "kind": "channels", "channels": 4, "channel_groups": 1, "memory_bytes": 4 * CONV1_BYTES,
             "param_bytes": 4 * CONV1_PARAM_BYTES, "bytes_per_channel": float(CONV1_BYTES), "sensitivity": [],
             "target_rate": 0.0, "chosen_rate": 0.0, "removed_channels": 0, "freed_bytes": 0, "evaluations": 0,
             "energy_pj": None}
    saving = 1 - after.param_bytes / PARAMS
    assert report == {
        "constraints": {"memory_saving": 0.3, "memory": "parameters", "max_accuracy_drop": 8 * U, "min_accuracy": None,
                        "accuracy_floor": 1 - 8 * U, "objective": "target", "round_to": 1, "flash_budget": None,
                        "ram_budget": None, "deployment": "fp32", "flash_margin": 0},
        "constraints_met": True,
        "reason": f"memory saving {saving:.2%} >= 30.00% with accuracy {1 - 6 * U:.4f} >= {1 - 8 * U:.4f}",
        "warnings": [],
        "baseline": {"accuracy": 1.0, "memory": Footprint(PARAMS, 0, STATE, PARAMS, FP32_RAM).as_dict()},
        "pruned": {"accuracy": 1 - 6 * U, "memory": after.as_dict(), "memory_saving": saving,
                   "footprint_saving": 1 - after.total_bytes / (PARAMS + STATE), "parameter_saving": saving,
                   "predicted_memory": after.as_dict()},
        "finetuned": {"accuracy": 1 - 6 * U},
        "groups": [conv2, conv1],
        "plan": {"conv2": list(range(6))},
        "evaluations": 1 + 3 + 1 + 1,  # baseline, conv2's trials, pruned, fine-tuned
        "rates": [0.25, 0.5, 0.75],
        "search": "bisect",
        "rank_by": "memory",
    }
    assert 0.3 <= saving < 0.3 + CONV2_PARAM_BYTES / PARAMS  # one channel fewer would miss the target


def test_fine_tuning_that_loses_accuracy_is_reported():
    def finetune(model):  # "forgets" conv2's channels 8 and 9
        with torch.no_grad():
            model.conv2.weight[[0, 1]] = 0  # the pruned model's rows 0, 1 hold channels 8, 9

    report = run_prime(per_channel(0, U), memory_saving=0.3, finetune=finetune).report
    assert report.pruned.accuracy == 1 - 8 * U and report.finetuned == Scored(1 - 10 * U)
    assert not report.constraints_met
    assert report.reason == ("memory saving 46.85% >= 30.00%, but accuracy 0.8438 after structural pruning "
                                "is below 0.8750 (masked trials stayed above it)")


def test_no_finetune_and_empty_plans():
    report = run_prime(per_channel(1.0, 1.0), memory_saving=0.3, finetune=lambda model: 1 / 0).report
    assert report.plan == {} and report.finetuned is None  # nothing pruned: nothing to fine-tune
    assert report.pruned.accuracy == 1.0 and report.evaluations == 1 + 1 + 1  # each sweep stops at once
    assert report.reason == ("best feasible: memory saving 0.00% < 30.00%; going further costs more accuracy than "
                                "the budget allows: every further rate tried fell below the floor 0.8750")
    model = net()
    nothing = run_prime(per_channel(0, 0), model=model, ignored_layers=[model.conv1, model.conv2]).report
    assert nothing.groups == [] and nothing.plan == {} and not nothing.constraints_met
    assert nothing.reason == ("nothing to prune: the model has no prunable groups (every conv/linear is ignored, "
                                 "an output layer, or too narrow to keep whole heads)")


def test_compression_stops_at_exactly_the_wanted_saving():
    wanted = 1.0 - (PARAMS - 8 * CONV2_PARAM_BYTES) / PARAMS  # conv2 at 0.5, computed as prime() does
    report = run_prime(per_channel(0, U), memory_saving=wanted).report
    assert report.plan == {"conv2": list(range(8))} and report.constraints_met
    assert report.evaluations == 1 + 3 + 1  # baseline, conv2's sweep (its compression trial reused), pruned


# -- more layers: tied attention, neurons with a batch norm, time steps ----------------------


def test_tied_attention_on_spike_driven_transformer(masked_equals_pruned):
    from primesvt_plugin.plugins import build_model

    torch.manual_seed(0)
    model = build_model("spike_driven_transformer", dict(T=1, in_channels=1, num_classes=4, embed_dims=16,
                                                         num_heads=2, depths=1))
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    graph = SpikingGraph(model, x)
    groups = {g.name: (g.size, g.channel_groups, g.kind) for g in graph.groups()}
    residual = "patch_embed.final_stage.0"
    assert groups[residual] == (16, 2, "channels")  # tied: the residual width is cut head-aligned
    assert len(groups) == 5 and all(kind == "channels" for _, _, kind in groups.values())
    attn = model.blocks[0].attn
    assert graph.metapruner_kwargs()["out_channel_groups"] == {attn: 2}
    assert residual not in {g.name for g in SpikingGraph(model, x, ignored_layers=[attn]).groups()}
    from primesvt_plugin.errors import LayoutError

    with pytest.raises(LayoutError, match="^attention blocks.0.attn: inner width 15 is not 2 equal heads of the "
                                          "residual width 15$"):
        next(g for g in SpikingGraph(copy.deepcopy(model), x).groups() if g.name == residual).prune([0])
    masked_equals_pruned(model, x, {residual: 0.5})
    assert (attn.num_heads, attn.head_dim, attn.q_conv.out_channels, attn.proj_conv.out_channels) == (2, 4, 8, 8)


def test_a_neurons_batch_norm_goes_with_its_channels():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), neuron.MPBNLIFNode(out_channels=4), nn.Flatten(), nn.Linear(64, 2))
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    graph = SpikingGraph(model, x)
    (group,) = graph.groups()
    bn = model[1].vbn
    assert [(op.layer, op.direction, op.idxs) for op in group.channel_ops([1])] == [
        (model[0], OUT, (1,)), (model[1], OUT, (1,)), (bn, OUT, (1,)), (model[3], IN, tuple(range(16, 32)))]
    ledger = LedgerState(model, graph.state_bytes, layer_outputs(model, x))
    for op in group.channel_ops([1, 2]):
        ledger.remove(op)
    apply_plan(graph, {group.name: [1, 2]}, [group])
    assert bn.num_features == 2 and model[0].out_channels == 2
    assert ledger.footprint() == footprint(model, x)


def test_one_sample_of_time_major_inputs():
    class Clocked(nn.Module):
        def __init__(self):
            super().__init__()
            self.T = 4
            self.lif = neuron.LIFNode(step_mode="m")

        def forward(self, x):
            return self.lif(x)

    clocked, seq = Clocked(), torch.rand(4, 3, 1, 2, 2)
    assert torch.equal(one_sample(clocked, seq), seq[:, :1])
    assert torch.equal(one_sample(clocked, seq[:3]), seq[:1])  # 3 is no time-step count of the model
    assert torch.equal(one_sample(clocked, seq[0]), seq[0, :1])  # 4-D: samples first
    stepped = nn.Sequential(neuron.LIFNode(step_mode="m"))
    assert torch.equal(one_sample(stepped, seq[:, :, 0, 0, 0]), seq[:, :1, 0, 0, 0])  # [T, N]


def test_ledger_bytes_are_whole_numbers():
    model, x = net(), inputs()
    graph = SpikingGraph(model, x)
    ledger = LedgerState(model, graph.state_bytes, layer_outputs(model, x))
    conv1 = next(g for g in graph.groups() if g.name == "conv1")
    for op in conv1.channel_ops([1]):
        ledger.remove(op)
    predicted = ledger.footprint()
    assert all(type(v) is int for v in vars(predicted).values())
    assert stored(predicted) == Footprint(PARAMS - CONV1_PARAM_BYTES, 0, STATE - 1024)


def test_channel_slices_of_more_convolutions():
    assert slices(nn.Conv2d(1, 4, 3), IN) == [("weight", 1)]  # one input channel, groups=1: not depthwise
    assert slices(nn.Conv2d(2, 2, 3, groups=2), IN) == [("weight", 0), ("bias", 0)]  # depthwise with 2 channels
    assert slices(nn.Conv1d(4, 4, 3, groups=2), IN) == [("weight", 1)]  # grouped, not depthwise
    assert type(bytes_per_channel(nn.Conv2d(3, 8, 3), OUT)) is int

    class Parent(nn.Module):  # a child's tensors are the child's channels, not the parent's
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 2))
            self.child = nn.BatchNorm1d(4)

    assert slices(Parent(), OUT) == [("weight", 0)]


def test_fine_tuning_below_the_floor_at_exactly_the_wanted_saving():
    wanted = 1.0 - (PARAMS - 8 * CONV2_PARAM_BYTES) / PARAMS

    def finetune(model):
        with torch.no_grad():
            model.conv2.weight[0] = 0

    report = run_prime(per_channel(0, U), memory_saving=wanted, finetune=finetune).report
    assert report.pruned.memory_saving == wanted and not report.constraints_met
    assert report.reason.startswith("memory saving 46.85% >= 46.85%, but accuracy 0.8594 after structural pruning")


def test_the_progress_bar_counts_the_sweep(capsys):
    prime(net(), inputs(), per_channel(0, U), memory_saving=0.3, max_accuracy_drop=8 * U, rates=(0.25, 0.5, 0.75))
    err = capsys.readouterr().err
    assert err.startswith("\rsearch:   0%|") and "| 0/2 [" in err  # 2 groups
    assert not err.endswith("\n")  # the bar leaves no line behind
    run_prime(per_channel(0, U), memory_saving=0.3)
    assert capsys.readouterr().err == ""


def test_graph_accepts_scalar_and_traced_parameters_and_refuses_untraced_ones():
    class Gate(nn.Module):  # per-channel, but only compared with: no grad_fn, Torch-Pruning cannot see them
        def __init__(self, width, shape):
            super().__init__()
            self.level = nn.Parameter(torch.zeros(shape))
            self.gain = nn.Parameter(torch.zeros(shape))

        def forward(self, x):
            return x * (x > self.level).float() * (x > self.gain).float()

    class Scale(nn.Module):  # per-channel and multiplied in: traced (an unwrapped parameter)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.weight

    x = torch.rand(1, 3)
    with pytest.raises(UnhandledLayerError) as error:
        SpikingGraph(nn.Sequential(nn.Linear(3, 2), Gate(2, (2,)), nn.Linear(2, 2)), x)
    assert str(error.value).startswith("layer '1' (test_core.")
    assert str(error.value).endswith(
        "Gate) has per-channel parameters (level, gain) Torch-Pruning cannot prune and no primesvt plugin handles "
        "it; write a plugin implementing primesvt_spiking_layer_types / primesvt_prune_spiking_layer for it, "
        "or replace the layer")
    SpikingGraph(nn.Sequential(nn.Linear(3, 2), Gate(2, ()), nn.Linear(2, 2)), x)  # scalars: nothing per channel
    SpikingGraph(nn.Sequential(nn.Linear(3, 2), Gate(2, (1,)), nn.Linear(2, 2)), x)
    SpikingGraph(nn.Sequential(nn.Linear(3, 2), Scale(), nn.Linear(2, 2)), x)


def test_output_layers_are_found_through_the_layers_after_them():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.lif = neuron.LIFNode()
            self.head_a, self.head_b = nn.Linear(64, 2), nn.Linear(64, 3)
            self.out_lif = neuron.LIFNode()

        def forward(self, x):
            x = self.lif(self.conv(x)).flatten(1)
            return self.out_lif(torch.cat([self.head_a(x), self.head_b(x)], 1))

    model = TwoHeads()
    graph = SpikingGraph(model, torch.rand(1, 1, 6, 6))
    assert set(graph.output_layers) == {model.head_a, model.head_b}
    assert [g.name for g in graph.groups()] == ["conv"]


def test_a_spiking_layer_no_plugin_prunes_is_refused():
    from primesvt_plugin.plugins import new_plugin_manager

    class OnlyTypes:
        @hookimpl
        def primesvt_spiking_layer_types(self):
            return [neuron.LIFNode]

    pm = new_plugin_manager(load_entry_points=False)
    pm.register(OnlyTypes())
    model, x = net(), inputs()
    conv1 = next(g for g in SpikingGraph(model, x, pm=pm).groups() if g.name == "conv1")
    with pytest.raises(UnhandledLayerError, match="^no plugin pruned spiking layer LIFNode$"):
        conv1.prune([0])


def test_removable_counts_are_whole_numbers_and_ops_bytes_too():
    assert all(type(group_of(12, 3).removable(r)) is int for r in (0.1, 0.5, 1.0, 1.5))
    model, x = net(), inputs()
    state = state_bytes(model, x)
    assert type(ops_bytes([ChannelOp(model.lif1, OUT, (0,), of=3)], state)) is int
    assert ops_bytes([ChannelOp(model.lif1, OUT, (0,), of=3)], state) == 4096 // 3
    assert ops_bytes([ChannelOp(model.lif1, OUT, (0,), of=1)], {model.lif1: 4}) == 4


# -- exact targets and the cheaper search (search.py) -------------------------------------------


@pytest.mark.parametrize("cost1, cost2", [(0, U), (2 * U, U), (2 * U, U / 2), (U, 0), (0, 0), (4 * U, 2 * U)])
@pytest.mark.parametrize("objective", ["target", "max_saving"])
@pytest.mark.parametrize("saving", [0.1, 0.3, 0.6, 0.9])
def test_bisection_finds_the_sweeps_plan_with_no_more_evaluations(cost1, cost2, objective, saving):
    """Accuracy falls with every removed channel here, so bisection must reach the plan the full sweep
    reaches, at no more evaluations (rates 0.1 ... 0.9: 9 rates, up to 4 distinct counts on conv1)."""
    rates = [r / 10 for r in range(1, 10)]
    runs = {search: run_prime(per_channel(cost1, cost2), rates=rates, memory_saving=saving, objective=objective,
                              search=search).report for search in ("sweep", "bisect")}
    assert runs["bisect"].plan == runs["sweep"].plan
    assert runs["bisect"].pruned == runs["sweep"].pruned
    assert runs["bisect"].evaluations <= runs["sweep"].evaluations


def test_target_objective_stops_at_the_asked_saving_and_max_saving_overshoots():
    """conv2's target is 0.5 (8 channels, 46.9%); 20% needs only 4 channels (23.4%)."""
    target = run_prime(per_channel(0, U), memory_saving=0.2, objective="target").report
    paper = run_prime(per_channel(0, U), memory_saving=0.2, objective="max_saving").report
    assert target.plan == {"conv2": [0, 1, 2, 3]} and paper.plan == {"conv2": list(range(8))}
    assert 0.2 <= target.pruned.memory_saving < 0.2 + CONV2_PARAM_BYTES / PARAMS
    assert paper.pruned.memory_saving == 8 * CONV2_PARAM_BYTES / PARAMS
    assert target.pruned.accuracy > paper.pruned.accuracy and target.constraints_met and paper.constraints_met


def test_round_to_keeps_aligned_widths_and_the_ledger_counts_them():
    """round_to=8: conv2 (16) may keep 8 only, so 30% (6 channels exactly) takes 8; conv1 (4) cannot keep a
    multiple of 8 and is never pruned."""
    result = run_prime(per_channel(0, U), memory_saving=0.3, objective="target", search="bisect", round_to=8)
    assert result.report.plan == {"conv2": list(range(8))}
    assert result.model.conv2.out_channels == 8 and result.model.conv1.out_channels == 4
    assert result.report.pruned.predicted_memory == result.report.pruned.memory
    assert result.report.constraints.round_to == 8


def test_removal_counts_are_whole_heads_leave_a_channel_and_respect_round_to():
    model, x = net(), inputs()
    conv2 = {g.name: g for g in SpikingGraph(model, x).groups()}["conv2"]
    assert removal_counts(conv2) == list(range(1, 16))
    assert removal_counts(conv2, round_to=4) == [4, 8, 12]
    headed = PruningGroup("h", 12, 3, None, None, None)  # 3 heads of 4: every head loses the same count
    assert removal_counts(headed) == [3, 6, 9] and removal_counts(headed, round_to=6) == [6]
    assert removal_counts(PruningGroup("w", 12, 1, None, None, None), round_to=8) == [4]  # keeps 8, not removes 8
    assert rate_grid(headed, [0.1, 0.3, 0.5, 0.55, 0.9], removal_counts(headed)) == [(0.3, 3), (0.5, 6), (0.9, 9)]


@given(st.lists(st.booleans(), max_size=12).map(lambda flags: sorted(flags, reverse=True)))
def test_highest_feasible_by_bisection_equals_the_scan(flags):
    """On any monotone predicate (True then False) both find the last True; bisection asks fewer questions."""
    asked = {True: [], False: []}

    def feasible_for(bisect):
        return lambda i: asked[bisect].append(i) or flags[i]

    indices = list(range(len(flags)))
    expected = sum(flags) - 1
    assert highest_feasible(indices, feasible_for(True), bisect=True) == expected
    assert highest_feasible(indices, feasible_for(False), bisect=False) == expected
    assert len(asked[True]) <= max(len(asked[False]), math.ceil(math.log2(len(flags) + 1)))


@pytest.mark.parametrize("bad", [dict(objective="most"), dict(search="random"), dict(round_to=0),
                                 dict(round_to=2.0), dict(round_to=True)], ids=repr)
def test_search_options_are_checked(bad):
    from primesvt_plugin.errors import ArgumentError

    with pytest.raises(ArgumentError, match=next(iter(bad))):
        run_prime(per_channel(0, 0), **bad)
