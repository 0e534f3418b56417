"""The memory ledger on the toy model (tests/toy_net.py): it predicts the measured footprint, flash and RAM
at each deployment's precision, and budgets in bytes are targets of the search."""
from __future__ import annotations



import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron

from primesvt_plugin import SpikingGraph, footprint
from primesvt_plugin.errors import ArgumentError
from primesvt_plugin.pruning.memory import Footprint, LedgerState, flash_bytes, layer_outputs, one_sample
from primesvt_plugin.targets import FP32, INT4, INT8
from primesvt_plugin.pruning.pruner import apply_plan

from toy_net import (INT8_FLASH, FP32_RAM, INT8_RAM, CONV2_INT8_FLASH, INT4_FLASH, INT4_RAM, U, CONV1_PARAM_BYTES,
                     PARAMS, STATE, net, inputs, per_channel, stored, run_prime, records)


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
    # flash needs no forward pass: flash_bytes counts it from the weights alone, the same
    calibrated = INT8.calibrated(INT8_FLASH, INT8_FLASH + 300)
    assert [flash_bytes(model, d) for d in (FP32, INT8, INT4, calibrated)] == [PARAMS, INT8_FLASH, INT4_FLASH,
                                                                              INT8_FLASH + 300]


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
