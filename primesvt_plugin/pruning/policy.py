"""The PrimeSVT policy: memory-ranked, sensitivity-guided, one-shot structured pruning.

1. *Rank* the pruning groups by the memory they hold (parameters, buffers and
   neuron state, see ``memory.py``), or by the energy of the layers they touch
   (``rank_by="energy"``, op_counter's estimate, see ``energy.py``), or by both.
2. *Measure robustness*: a group's *target* is its highest rate, alone, within
   the allowed drop.
3. *Compress by priority*: from the largest group to the smallest, keep the
   highest rate (at most the target) that keeps the *combined* accuracy within
   the allowed drop, until the wanted memory saving is reached (and, by default,
   no further: the last group loses only what reaches it).
4. *Prune once*: remove all chosen channels structurally (L2 per channel, heads
   aligned), verify, and optionally fine-tune.

Steps 2 and 3 are ``search.py`` (bisection, groups measured only when reached);
trials use channel masks (``masking.py``): no deep copies, no re-tracing.
This module validates the arguments, sets the search up, applies and reports.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pluggy
import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import ArgumentError, EvaluationError
from .accounting import ops_bytes, ops_energy
from .config import PrimeConfig
from .energy import layer_energy_pj
from .graph import PruningGroup, SpikingGraph
from .importance import example_gradients, needs_gradients
from .memory import Footprint, LedgerState, footprint, footprint_of
from .pruner import apply_plan
from .search import PlanSearch
from .records import Constraints, GroupRecord, Measured, PrimeReport, PrimeResult, Pruned, Scored
from .spiking import fresh_forward, inference, to_model_device

log = logging.getLogger(__name__)

CHANCE_MARGIN = 0.01  # a baseline this close to chance_accuracy counts as chance


class _Evaluator:
    """Calls the user's ``evaluate`` on a freshly reset model and counts the calls."""

    def __init__(self, evaluate: Callable[[nn.Module], float], model: nn.Module):
        self.evaluate, self.model, self.calls = evaluate, model, 0

    def __call__(self) -> float:
        with inference(self.model):
            value = self.evaluate(self.model)
        self.calls += 1
        return _as_score(value, self.calls)


def _as_score(value, call: int) -> float:
    """``value`` as a float if it is a finite real number (numpy scalars and 0-d tensors too).

    Strings ("0.9"), bools and None are refused rather than converted: they mean ``evaluate`` is wrong.
    """
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EvaluationError(f"evaluate must return a number (e.g. an accuracy), got {value!r} "
                              f"of type {type(value).__name__} (call {call})")
    if not math.isfinite(value):
        raise EvaluationError(f"evaluate returned {value} (call {call}); check the model and data")
    return float(value)


def _check_example_inputs(model: nn.Module, example_inputs) -> None:
    """Refuse an example input the model cannot run on, naming its shape and the model's error."""
    if not isinstance(example_inputs, torch.Tensor):
        raise ArgumentError(f"example_inputs must be a torch.Tensor (one batch the model accepts), "
                            f"got {type(example_inputs).__name__}")
    try:
        fresh_forward(model, example_inputs)
    except Exception as error:
        raise ArgumentError(f"the model cannot run on example_inputs of shape {tuple(example_inputs.shape)}: "
                            f"{type(error).__name__}: {error}") from error


def _chance_warnings(baseline: float, chance_accuracy: float | None) -> list[str]:
    if chance_accuracy is None or baseline > chance_accuracy + CHANCE_MARGIN:
        return []
    return [f"baseline accuracy {baseline:.4f} is at chance level ({chance_accuracy:.4f}): the model has not "
            "learned the task, so its accuracy says nothing about what pruning removes; train the model first"]


def prime(model: nn.Module, example_inputs: torch.Tensor, evaluate: Callable[[nn.Module], float],
          config: PrimeConfig | None = None, *, importance: tp.importance.Importance | None = None,
          finetune: Callable[[nn.Module], None] | None = None, ignored_layers: Sequence[nn.Module] = (),
          inplace: bool = False, progress: bool = True, pm: pluggy.PluginManager | None = None,
          energy_inputs: torch.Tensor | None = None, output_transform: Callable | None = None,
          **options) -> PrimeResult:
    """Prune ``model`` to save ``memory_saving`` of its memory within an accuracy budget.

    ``evaluate(model) -> float`` scores the model (higher is better, e.g. accuracy
    on a validation subset). The budget is ``max_accuracy_drop`` below the unpruned
    score and/or ``min_accuracy`` (the stricter wins), in the same unit. ``memory``
    is ``"parameters"`` (parameter bytes, the paper's measure) or ``"footprint"``
    (parameters + buffers + neuron state for one sample). Returns the pruned model
    (a copy unless ``inplace``) and a ``PrimeReport``. When the saving cannot be
    reached within the budget, the best feasible plan is applied and the report says why.
    ``flash_budget`` and ``ram_budget`` (bytes, with or instead of ``memory_saving``) bound
    the device's two memories under ``deployment`` (``targets.FP32``, ``targets.INT8``, or one
    ``calibrated`` on a written weight file): the search stops when every target holds.
    ``chance_accuracy`` is the score of guessing (e.g. the majority-class fraction):
    a baseline at or below it (+0.01) puts a warning in ``report.warnings`` and
    fails the constraints, since an untrained model's accuracy cannot guide pruning.
    An ``importance`` that reads gradients (Taylor) gets them from one forward and
    backward pass on ``example_inputs`` in eval mode, loss ``mean(output ** 2)``
    (``importance.example_gradients``); the parameters' ``.grad`` is put back afterwards.

    ``objective="target"`` stops at the asked saving (the last group chosen loses the
    fewest channels that reach it); ``"max_saving"`` takes every chosen group at its
    highest feasible rate, as the paper does (more saving, more accuracy spent).
    ``round_to`` keeps every pruned width a multiple of it (e.g. 8 or 16 for SIMD
    hardware). ``search="bisect"`` finds each highest feasible rate by bisection;
    ``"sweep"`` tries the rates in order (same plan when accuracy falls with the rate).

    ``rank_by`` orders the groups the compression visits: ``"memory"`` (the paper: the
    bytes of ``memory``), ``"energy"`` (the estimated energy per image of the layers the
    group's channels touch, SpikingJelly's op_counter on ``energy_inputs``, default
    ``example_inputs``: give real images, as spikes decide the energy; costs at
    ``deployment.energy_precision``) or ``"both"``
    (the sum of the group's share of all groups' bytes and of their energy). The target
    stays the memory saving and budgets; the ranking decides where it is taken first.

    The policy's options (``memory_saving`` ... ``chance_accuracy``, below) come as a ``PrimeConfig``
    (``config``) or as keyword arguments, validated there; keyword arguments given with a ``config``
    replace its fields.

    ``output_transform(output) -> tensor`` picks the output tensor the checks compare from what the
    model returns (as Torch-Pruning's); by default the output itself, or the first tensor of a tuple
    (SDT returns ``(logits, hook)``). ``evaluate`` receives the model as it is and reads its outputs itself.
    """
    config = PrimeConfig(**options) if config is None else dataclasses.replace(config, **options)
    was_training = model.training
    if not inplace:
        copies: dict[int, object] = {}
        model = copy.deepcopy(model, copies)
        ignored_layers = [copies.get(id(layer), layer) for layer in ignored_layers]  # the copy's own layers
    example_inputs = to_model_device(model, example_inputs)
    energy_inputs = None if config.rank_by == "memory" else to_model_device(
        model, example_inputs if energy_inputs is None else energy_inputs)
    model.eval()
    try:
        run = _PolicyRun.start(model, example_inputs, evaluate, config, ignored_layers, importance, pm, energy_inputs,
                               output_transform)
        constraints = run.constraints()
        warnings = _chance_warnings(run.baseline, config.chance_accuracy)
        for warning in warnings:
            log.warning(warning)
        plan, predicted = run.search(constraints, progress)
        outcome = run.apply(plan, finetune)
    finally:
        model.train(was_training)
    return PrimeResult(model, _report(run, constraints, warnings, plan, predicted, outcome))


@dataclass
class _Outcome:
    after: Footprint
    pruned_accuracy: float
    finetuned_accuracy: float | None


@dataclass
class _PolicyRun:
    """One run of the policy on a model: its groups ranked and scored, the trials, the plan applied."""

    model: nn.Module
    example_inputs: torch.Tensor
    config: PrimeConfig
    graph: SpikingGraph
    groups: list[PruningGroup]  # largest first
    scores: dict[str, torch.Tensor]
    records: dict[str, GroupRecord]
    before: Footprint
    evaluate: "_Evaluator"
    baseline: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, model, example_inputs, evaluate, config: PrimeConfig, ignored_layers, importance, pm,
              energy_inputs=None, output_transform=None) -> "_PolicyRun":
        """Trace, score and rank the groups; evaluate the unpruned model."""
        clock = time.perf_counter()
        _check_example_inputs(model, example_inputs)
        graph = SpikingGraph(model, example_inputs, ignored_layers, pm=pm, output_transform=output_transform)
        groups = graph.groups()
        importance = importance or tp.importance.GroupMagnitudeImportance(p=2)
        gradients = example_gradients(model, example_inputs, output_transform) if needs_gradients(importance) else None
        with gradients or contextlib.nullcontext():
            scores = {g.name: importance(g.importance_group) for g in groups}
        groups = [g for g in groups if scores[g.name] is not None]
        deployment = config.deployment
        energy = None if config.rank_by == "memory" else layer_energy_pj(model, energy_inputs,
                                                                         deployment.energy_precision)
        records = {g.name: _record(g, graph, energy) for g in groups}
        if energy is not None and groups and not any(r.energy_pj for r in records.values()):
            raise ArgumentError(f"rank_by={config.rank_by!r}: op_counter counted no energy in any layer the groups "
                                "touch, so energy cannot order them; use rank_by='memory' or layers op_counter counts")
        ranking = _ranking(list(records.values()), config.memory, config.rank_by)
        groups.sort(key=lambda g: ranking(records[g.name]), reverse=True)
        before = footprint_of(model, graph.state_bytes, graph.layer_outputs, deployment)  # the graph's own pass
        run = cls(model, example_inputs, config, graph, groups, scores, records, before, _Evaluator(evaluate, model))
        run.timings["trace_and_rank"] = time.perf_counter() - clock
        clock = time.perf_counter()
        run.baseline = run.evaluate()
        run.timings["one_evaluation"] = time.perf_counter() - clock
        return run

    def constraints(self) -> Constraints:
        c = self.config
        floors = [] if c.max_accuracy_drop is None else [self.baseline - c.max_accuracy_drop]
        floor = max(floors + ([] if c.min_accuracy is None else [c.min_accuracy]))  # the stricter wins
        return Constraints(c.saving, c.memory, c.max_accuracy_drop, c.min_accuracy, floor, c.objective, c.round_to,
                           c.flash_budget, c.ram_budget, c.deployment.name, c.deployment.margin_bytes)

    def search(self, constraints: Constraints, progress: bool) -> tuple[dict[str, list[int]], Footprint]:
        """Find the plan (``search.py``); returns it and its predicted footprint."""
        clock = time.perf_counter()
        ledger = LedgerState(self.model, self.graph.state_bytes, self.graph.layer_outputs, self.config.deployment)
        plan_search = PlanSearch(
            self.groups, self.records, lambda group, count: group.select(self.scores[group.name], count),
            self.evaluate, constraints.accuracy_floor, ledger, self.before, constraints.targets(self.before),
            self.config, progress=progress)
        result = plan_search.run()
        self.timings["search"] = time.perf_counter() - clock
        return result

    def apply(self, plan: dict[str, list[int]], finetune) -> _Outcome:
        """Prune the plan structurally, evaluate, and fine-tune if asked."""
        clock = time.perf_counter()
        apply_plan(self.graph, plan, self.groups)
        after = footprint(self.model, self.example_inputs, self.config.deployment)
        self.timings["prune"] = time.perf_counter() - clock
        pruned_accuracy = self.evaluate() if plan else self.baseline  # an empty plan leaves the model as it was
        finetuned_accuracy = None
        if finetune is not None and plan:
            clock = time.perf_counter()
            self.model.train()
            finetune(self.model)
            self.model.eval()
            finetuned_accuracy = self.evaluate()
            self.timings["finetune"] = time.perf_counter() - clock
        return _Outcome(after, pruned_accuracy, finetuned_accuracy)


def _report(run: _PolicyRun, constraints: Constraints, warnings: list[str], plan, predicted: Footprint,
            outcome: _Outcome) -> PrimeReport:
    config, before, after = run.config, run.before, outcome.after
    saving = 1.0 - after.bytes_of(config.memory) / before.bytes_of(config.memory)
    final = outcome.pruned_accuracy if outcome.finetuned_accuracy is None else outcome.finetuned_accuracy
    floor = constraints.accuracy_floor
    outcomes = constraints.outcomes(before, after)
    met = all(ok for ok, _ in outcomes) and final >= floor - 1e-9 and not warnings
    records = [run.records[g.name] for g in run.groups]
    at_highest_rate = all(r.chosen_rate == config.rates[-1] for r in records)  # every group at the last rate
    seconds = run.timings
    return PrimeReport(
        constraints=constraints, constraints_met=met,
        reason=warnings[0] if warnings else _reason(met, outcomes, final, floor, len(records),
                                                    at_highest_rate=at_highest_rate),
        warnings=warnings,
        baseline=Measured(run.baseline, before),
        pruned=Pruned(outcome.pruned_accuracy, after, memory_saving=saving,
                      footprint_saving=1.0 - after.total_bytes / before.total_bytes,
                      parameter_saving=1.0 - after.param_bytes / before.param_bytes, predicted_memory=predicted),
        finetuned=None if outcome.finetuned_accuracy is None else Scored(outcome.finetuned_accuracy),
        groups=records, plan=plan, evaluations=run.evaluate.calls,
        search_in_evaluation_passes=seconds.get("search", 0.0) / max(seconds["one_evaluation"], 1e-9),
        rates=list(config.rates), timings_s={k: round(v, 3) for k, v in seconds.items()}, search=config.search,
        rank_by=config.rank_by,
    )


def _record(group: PruningGroup, graph: SpikingGraph, layer_energy: dict | None = None) -> GroupRecord:
    ops = group.channel_ops(range(group.size))
    memory = ops_bytes(ops, graph.state_bytes)
    params = ops_bytes([op for op in ops if op.layer not in graph.state_bytes], {})
    return GroupRecord(group.name, group.kind, group.size, group.channel_groups, memory, params, memory / group.size,
                       energy_pj=None if layer_energy is None else ops_energy(ops, layer_energy))


def _ranking(records: list[GroupRecord], memory: str, rank_by: str) -> Callable[[GroupRecord], float]:
    """What the groups are sorted by, largest first: their bytes of ``memory``, their energy, or (``"both"``)
    their share of all groups' bytes plus their share of all groups' energy."""
    if rank_by == "memory":
        return lambda record: record.size_bytes(memory)
    if rank_by == "energy":
        return lambda record: record.energy_pj
    all_bytes = sum(r.size_bytes(memory) for r in records) or 1
    all_energy = sum(r.energy_pj for r in records) or 1.0
    return lambda record: record.size_bytes(memory) / all_bytes + record.energy_pj / all_energy


def _reason(met, outcomes: list[tuple[bool, str]], accuracy, floor, n_groups, at_highest_rate: bool = False) -> str:
    if n_groups == 0:
        return ("nothing to prune: the model has no prunable groups (every conv/linear is ignored, "
                "an output layer, or too narrow to keep whole heads)")
    if met:
        asked = ", ".join(text for _, text in outcomes) or "nothing to save (memory_saving=0)"
        return f"{asked} with accuracy {accuracy:.4f} >= {floor:.4f}"
    unmet = [text for ok, text in outcomes if not ok]
    missed = "; ".join(unmet)
    if unmet and at_highest_rate:  # the accuracy budget was never the limit
        return (f"best feasible: {missed}; every group is already at the highest rate tried, "
                f"so the target needs higher rates (rates=...) or more prunable layers")
    if unmet:
        return (f"best feasible: {missed}; going further costs more accuracy than the budget allows: "
                f"every further rate tried fell below the floor {floor:.4f}")
    return (f"{', '.join(text for _, text in outcomes)}, but accuracy {accuracy:.4f} after structural pruning "
            f"is below {floor:.4f} (masked trials stayed above it)")
