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


import json
import math

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from hypothesis import given
from hypothesis import strategies as st

from primesvt_plugin import MemoryAwareImportance, SpikingGraph
from primesvt_plugin.pruning.channels import (IN, OUT, ChannelOp)
from primesvt_plugin.errors import UnhandledLayerError
from primesvt_plugin.pruning.accounting import ops_bytes
from primesvt_plugin.pruning.graph import PruningGroup
from primesvt_plugin.pruning.importance import KIB, example_gradients, gradient_loss, needs_gradients, rank_shares
from primesvt_plugin.pruning.spiking import fresh_forward
from primesvt_plugin.pruning.memory import Footprint, state_bytes
from primesvt_plugin.pruning.policy import prime
from primesvt_plugin.pruning.search import highest_feasible, rate_grid, removal_counts
from primesvt_plugin.pruning.records import Constraints, PrimeReport, Scored, Trial

from toy_net import (FP32_RAM, U, CONV1_BYTES, CONV2_BYTES, CONV1_PARAM_BYTES, CONV2_PARAM_BYTES, PARAMS, STATE, net,
                     inputs, removed, scored, per_channel, run_prime, records)


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


@pytest.mark.parametrize("l2, blocks, expected", [
    # order 1 < 2 < 3 < 4: rank r + half the value's fraction of the largest - 1/2, over n; the strongest never goes
    ([3.0, 1.0, 2.0, 4.0], 1, [2.875 / 4, 0.625 / 4, 1.75 / 4, math.inf]),
    # two heads: channel j of each head ranked by the heads' mean (2, 4), the same in both heads
    ([1.0, 5.0, 3.0, 3.0], 2, [0.375, math.inf, 0.375, math.inf]),
    ([2.0, 2.0, 2.0], 1, [1 / 3, 2 / 3, math.inf]),  # ties keep their order (stable), never share a score
    ([2.0, 1.0, 3.0], 2, [(2 + 1 / 3 - 0.5) / 3, (1 + 1 / 6 - 0.5) / 3, math.inf]),  # 3 is no 2 heads: one block
    ([2.0, 1.0, 3.0], 0, [(2 + 1 / 3 - 0.5) / 3, (1 + 1 / 6 - 0.5) / 3, math.inf]),
    ([0.0, 0.0], 1, [0.25, math.inf]),  # all zero: no division by zero
    ([0.2, 0.1], 1, [math.inf, (1 + 0.25 - 0.5) / 2]),  # small norms: the fraction is of the largest, not of 1
])
def test_rank_shares_are_hand_computed_ranks(l2, blocks, expected):
    torch.testing.assert_close(rank_shares(torch.tensor(l2, dtype=torch.float64), blocks),
                               torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


def test_memory_aware_scores_the_channels_of_every_head_alike():
    """On an attention inner group, a channel scores the same in every head (heads lose the same channels), and
    differently within a head."""
    from svits import build

    model = build("spikformer")
    graph = SpikingGraph(model, torch.rand(1, 3, 32, 32))
    imp = MemoryAwareImportance(graph)
    headed = [g for g in graph.groups() if graph.head_blocks(g.importance_group) > 1]
    assert headed
    for group in headed:
        blocks = graph.head_blocks(group.importance_group)
        assert imp.head_blocks(group.importance_group) == blocks
        scores = imp(group.importance_group).view(blocks, -1)
        assert torch.equal(scores, scores[:1].expand_as(scores)) and len(set(scores[0].tolist())) == scores.shape[1]


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


def test_ops_energy_counts_each_touched_layer_by_the_share_of_channels_removed():
    """A layer's energy scales with its channels: conv2's group losing 2 of 16 channels takes 2/16 of conv2's,
    lif2's (16 channels, from the op) and fc's (16 inputs) energy; conv1's losing 2 of 4 takes half of conv1's,
    lif1's and conv2's (4 inputs). A layer with no energy recorded counts 0; a layer inside another the ops
    touch is counted once, in its parent."""
    from primesvt_plugin.pruning.accounting import ops_energy

    model, x = net(), inputs()
    groups = {g.name: g for g in SpikingGraph(model, x).groups()}
    energy = {model.conv1: 64.0, model.lif1: 32.0, model.conv2: 160.0, model.lif2: 8.0, model.fc: 48.0}
    assert ops_energy(groups["conv2"].channel_ops([0, 1]), energy) == 160 * 2 / 16 + 8 * 2 / 16 + 48 * 2 / 16
    assert ops_energy(groups["conv1"].channel_ops([0, 1]), energy) == 64 / 2 + 32 / 2 + 160 / 2
    del energy[model.lif2]
    assert ops_energy(groups["conv2"].channel_ops([0, 1]), energy) == 160 * 2 / 16 + 48 * 2 / 16
    parent = nn.Sequential(model.conv1)
    ops = [ChannelOp(parent, OUT, (0,), 4), ChannelOp(model.conv1, OUT, (0,))]
    assert ops_energy(ops, {parent: 40.0, model.conv1: 64.0}) == 40 / 4


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


def test_a_group_is_reported_at_the_rate_asked_not_its_rounded_count():
    """rates (0.3,): conv2 (16 channels) can lose 4 at 0.3 (4.8 rounded down); its record says 0.3, the rate that
    was tried, with 4 channels removed (4/16 = 0.25 is what the count alone would say)."""
    report = run_prime(per_channel(0, U), rates=(0.3,), memory_saving=0.2).report
    conv2 = records(report)["conv2"]
    assert (conv2.target_rate, conv2.chosen_rate, conv2.removed_channels) == (0.3, 0.3, 4)
    assert report.plan["conv2"] == [0, 1, 2, 3]


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
    model = net()
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

    without_neurons = new_plugin_manager(load_entry_points=False)
    without_neurons.unregister(name="neurons")  # the builtin plugin that knows SpikingJelly's neurons
    with pytest.raises(UnhandledLayerError, match="layer 'lif1'"):
        run_prime(per_channel(0, 0), pm=without_neurons)
    assert run_prime(per_channel(0, 0), pm=new_plugin_manager(load_entry_points=False)).report.plan


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
    assert removal_counts(conv2, round_to=6) == [4, 10]  # keeps 12 or 6
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
