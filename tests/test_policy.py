"""The PrimeSVT policy on a real spiking model trained on real data (scikit-learn digits)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from spikingjelly.activation_based.model import spikformer

from primesvt_plugin import SpikingGraph, footprint
from primesvt_plugin.pipeline.readers import digits_splits
from primesvt_plugin.pruning.masking import Masks
from primesvt_plugin.pruning.memory import LedgerState, layer_outputs
from primesvt_plugin.pruning.policy import EvaluationError, prime
from primesvt_plugin.pruning.pruner import apply_plan
from primesvt_plugin.pipeline.evaluation import accuracy
from primesvt_plugin.pipeline.training import train

from svits import SMALL_SVITS, build, run


@pytest.fixture(scope="module")
def digits():
    return digits_splits(image_size=16)


@pytest.fixture(scope="module")
def trained(digits_checkpoint):
    """The session's digits Spikformer (tests/conftest.py), built here from its weights."""
    model = spikformer.Spikformer(T=2, in_channels=1, img_size_h=16, img_size_w=16, patch_size=4,
                                  num_classes=10, embed_dims=64, num_heads=4, mlp_ratio=4, depths=1)
    model.load_state_dict(torch.load(digits_checkpoint, weights_only=True))
    return model


def val_accuracy(digits):
    loader = digits.loader("val", 512)
    return lambda model: accuracy(model, loader)


def test_constraints_are_respected(trained, digits):
    x = torch.from_numpy(digits.x_val[:2])
    original = copy.deepcopy(trained.state_dict())
    result = prime(trained, x, val_accuracy(digits), memory_saving=0.2, max_accuracy_drop=0.03, progress=False)
    report = result.report
    assert report.constraints_met, report.reason
    assert report.pruned.memory_saving >= 0.2
    # the default measure is parameter bytes: the saving measured here, independently of the report
    measured = 1 - footprint(result.model, x).param_bytes / footprint(trained, x).param_bytes
    assert report.pruned.memory_saving == pytest.approx(measured, abs=1e-12)
    assert measured >= 0.2
    assert report.pruned.accuracy >= report.baseline.accuracy - 0.03
    # the report's memory is the returned model's measured memory, and the prediction was exact
    assert report.pruned.memory == footprint(result.model, x)
    assert report.pruned.predicted_memory == report.pruned.memory
    assert report.evaluations == 2 + sum(g.evaluations for g in report.groups)  # baseline and pruned besides
    assert all(len(g.sensitivity) <= g.evaluations for g in report.groups)
    # the input model is untouched
    assert all(torch.equal(v, original[k]) for k, v in trained.state_dict().items())
    assert result.model is not trained


def test_groups_are_compressed_largest_first(trained, digits):
    x = torch.from_numpy(digits.x_val[:2])
    report = prime(trained, x, val_accuracy(digits), memory_saving=0.3, max_accuracy_drop=0.05,
                   progress=False).report
    sizes = [g.param_bytes for g in report.groups]  # the default measure: parameters
    assert sizes == sorted(sizes, reverse=True)
    assert all(0 < g.param_bytes <= g.memory_bytes for g in report.groups)
    assert any(g.param_bytes < g.memory_bytes for g in report.groups)  # neuron state counted
    for g in report.groups:
        assert g.chosen_rate <= g.target_rate
        assert all(s.accuracy >= report.baseline.accuracy - 0.05
                   for s in g.sensitivity if s.rate <= g.target_rate)


def test_impossible_target_gives_best_feasible_with_reason(trained, digits):
    x = torch.from_numpy(digits.x_val[:2])
    report = prime(trained, x, val_accuracy(digits), memory_saving=0.95, max_accuracy_drop=0.0,
                   progress=False).report
    assert not report.constraints_met
    assert report.reason.startswith("best feasible")
    assert report.pruned.memory_saving < 0.95
    assert report.pruned.accuracy >= report.baseline.accuracy


def test_footprint_measure_and_minimum_accuracy(trained, digits):
    x = torch.from_numpy(digits.x_val[:2])
    evaluate = val_accuracy(digits)
    floor = evaluate(trained) - 0.04
    result = prime(trained, x, evaluate, memory_saving=0.25, min_accuracy=floor, memory="footprint", progress=False)
    report = result.report
    assert report.constraints.accuracy_floor == floor
    before, after = footprint(trained, x), footprint(result.model, x)
    assert report.pruned.memory_saving == pytest.approx(1 - after.total_bytes / before.total_bytes, abs=1e-12)
    assert report.pruned.memory_saving >= 0.25
    assert report.pruned.accuracy >= floor
    assert report.search_in_evaluation_passes > 0 and report.evaluations > 2


def test_finetune_is_called_and_reported(trained, digits):
    x = torch.from_numpy(digits.x_val[:2])
    calls = []

    def finetune(model):
        calls.append(model.training)
        train(model, digits.loader("train", 64, shuffle=True), epochs=1, lr=1e-3, progress=False)

    report = prime(trained, x, val_accuracy(digits), memory_saving=0.2, max_accuracy_drop=0.03,
                   finetune=finetune, progress=False).report
    assert calls == [True]
    assert 0.0 <= report.finetuned.accuracy <= 1.0
    assert "finetune" in report.timings_s


def test_nan_from_evaluate_is_a_clear_error(trained, digits):
    x = torch.from_numpy(digits.x_val[:2])
    with pytest.raises(EvaluationError, match="nan"):
        prime(trained, x, lambda model: float("nan"), memory_saving=0.2, max_accuracy_drop=0.01, progress=False)


@pytest.mark.parametrize("name", list(SMALL_SVITS))
def test_masking_equals_pruning_and_ledger_predicts_memory(name, images):
    """Masked trials give the pruned model's outputs; the ledger predicts its measured footprint."""
    model = build(name)
    graph = SpikingGraph(model, images)
    groups = graph.groups()
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    plan = {g.name: g.select(imp(g.importance_group), g.removable(0.4)) for g in groups}
    masks, ledger = Masks(), LedgerState(model, graph.state_bytes, layer_outputs(model, images))
    for g in groups:
        masks.trial(g.channel_ops(plan[g.name]))
        masks.commit()
        for op in g.channel_ops(plan[g.name]):
            ledger.remove(op)
    masked_out, predicted = run(model, images), ledger.footprint()
    masks.clear()
    apply_plan(graph, plan, groups)
    torch.testing.assert_close(run(model, images), masked_out, rtol=1e-4, atol=1e-4)
    assert predicted == footprint(model, images)


def test_bisection_reaches_the_sweeps_plan_on_the_digits_model_and_the_target_is_met_closely(trained, digits):
    """On a real trained SViT: the cheaper search gives the full sweep's plan, for both objectives, and
    the default objective stops near the asked saving where the paper's overshoots it."""
    x = torch.from_numpy(digits.x_val[:2])
    runs = {(objective, search): prime(trained, x, val_accuracy(digits), memory_saving=0.3, max_accuracy_drop=0.03,
                                       objective=objective, search=search, progress=False).report
            for objective in ("target", "max_saving") for search in ("sweep", "bisect")}
    for objective in ("target", "max_saving"):
        sweep, bisect = runs[(objective, "sweep")], runs[(objective, "bisect")]
        assert bisect.plan == sweep.plan and bisect.pruned == sweep.pruned
        assert bisect.evaluations < sweep.evaluations
    target, paper = runs[("target", "bisect")], runs[("max_saving", "bisect")]
    assert target.constraints_met and 0.3 <= target.pruned.memory_saving < 0.33
    assert paper.pruned.memory_saving >= target.pruned.memory_saving
