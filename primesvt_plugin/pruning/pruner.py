"""SpikingPruner: one-shot structured pruning of a spiking model, attention included."""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import pluggy
import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import ArgumentError, PruningFailed
from .graph import PruningGroup, SpikingGraph
from .spiking import checked_output, fresh_forward, model_output, to_model_device
from .widths import WidthRepairError, repair_widths, width_trace

log = logging.getLogger(__name__)


def spiking_pruner_kwargs(model: nn.Module, example_inputs, ignored_layers: Sequence = (),
                          pm: pluggy.PluginManager | None = None, *, output_transform: Callable | None = None,
                          forward_fn: Callable | None = None, root_module_types: Sequence[type] = (),
                          customized_pruners: dict | None = None, unwrapped_parameters=None,
                          num_heads: dict | None = None, out_channel_groups: dict | None = None,
                          in_channel_groups: dict | None = None) -> dict:
    """Keyword arguments that make ``tp.pruner.MetaPruner`` work on a SpikingJelly model, merged with the
    script's own Torch-Pruning arguments (pass them here, not to MetaPruner: a key given twice is an error)::

        pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.3,
                                      **spiking_pruner_kwargs(model, x, ignored_layers=[model.head]))

    Every argument we set too is merged with ours: lists joined (``ignored_layers``,
    ``root_module_types``), dicts united (``customized_pruners``, ``num_heads``,
    ``out_channel_groups``; a key both give with another value is refused, naming it), the
    script's ``forward_fn(model, inputs)`` called inside ours (which traces at one time step),
    its ``output_transform`` used by our checks too; ``unwrapped_parameters`` and
    ``in_channel_groups`` are passed on.
    """
    graph = SpikingGraph(model, example_inputs, [m for m in ignored_layers if isinstance(m, nn.Module)], pm=pm,
                         output_transform=output_transform, forward_fn=forward_fn,
                         unwrapped_parameters=unwrapped_parameters)
    kwargs = graph.metapruner_kwargs()
    kwargs["ignored_layers"] += [p for p in ignored_layers if not isinstance(p, nn.Module)]  # parameters
    kwargs["root_module_types"] += [t for t in root_module_types if t not in kwargs["root_module_types"]]
    kwargs["customized_pruners"] = _united("customized_pruners", kwargs["customized_pruners"], customized_pruners,
                                           graph.names)
    kwargs["out_channel_groups"] = _united("out_channel_groups", kwargs["out_channel_groups"], out_channel_groups,
                                           graph.names)
    if num_heads:
        _united("num_heads", kwargs["out_channel_groups"], num_heads, graph.names)  # MetaPruner unites them
        kwargs["num_heads"] = dict(num_heads)
    if unwrapped_parameters is not None:
        kwargs["unwrapped_parameters"] = unwrapped_parameters
    if in_channel_groups:
        kwargs["in_channel_groups"] = dict(in_channel_groups)
    return kwargs


def _united(argument: str, ours: dict, theirs: dict | None, names: dict) -> dict:
    """``ours`` and ``theirs`` in one dict; a key both give with different values is refused by name."""
    for key, value in (theirs or {}).items():
        if key in ours and ours[key] is not value and ours[key] != value:
            what = names.get(key) or getattr(key, "__qualname__", None) or repr(key)
            raise ArgumentError(f"{argument}: primesvt sets {what!r} to {ours[key]!r} and you give {value!r}; "
                                f"drop it from your {argument} (primesvt handles {what!r} on spiking models)")
    return {**ours, **(theirs or {})}


class ModelSnapshot:
    """What a structural change may alter, kept so it can be undone into the *same* objects.

    Per module: its attributes and the contents of its dict/list attributes
    (``_parameters``, ``_buffers``, ``_modules``, hooks, neuron memories), by
    reference; per tensor: a clone of its values (and grad). Restoring puts the
    same module, parameter and buffer objects back and copies the values into
    them, so optimizers, hooks and references built before stay valid.
    """

    def __init__(self, model: nn.Module):
        self.modules = [(m, dict(m.__dict__), _container_contents(m)) for m in model.modules()]
        tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values()
        self.tensors = [(t, t.detach().clone(), None if t.grad is None else t.grad.detach().clone())
                        for t in tensors]

    def restore(self) -> None:
        for module, attributes, contents in self.modules:
            module.__dict__.clear()
            module.__dict__.update(attributes)
            for name, saved in contents.items():
                attributes[name].clear()
                (attributes[name].update if isinstance(saved, dict) else attributes[name].extend)(saved)
        for tensor, data, grad in self.tensors:
            tensor.data = data  # also undoes a change of shape made in place
            tensor.grad = grad


def _container_contents(module: nn.Module) -> dict:
    return {name: copy.copy(value) for name, value in module.__dict__.items() if isinstance(value, (dict, list))}


def requires_grad_flags(model: nn.Module) -> dict[tuple[nn.Module, str], bool]:
    """``requires_grad`` of every parameter, by owning module and parameter name."""
    return {(m, name): p.requires_grad for m in model.modules()
            for name, p in m._parameters.items() if p is not None}


def set_requires_grad_flags(flags: dict[tuple[nn.Module, str], bool]) -> None:
    """Put ``requires_grad`` back on parameters a pruning function replaced (tp's are always True)."""
    for (module, name), flag in flags.items():
        param = module._parameters.get(name)
        if param is not None:
            param.requires_grad_(flag)


@contextlib.contextmanager
def structural_change(model: nn.Module) -> Iterator[None]:
    """Around a structural change: ``requires_grad`` flags are kept; if the block raises,
    ``model`` is put back as it was when the block started (same objects, see ``ModelSnapshot``)."""
    snapshot, flags = ModelSnapshot(model), requires_grad_flags(model)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise
    finally:
        set_requires_grad_flags(flags)


def output_shape(output, output_transform: Callable | None = None) -> torch.Size:
    """The shape of a model's output tensor (``spiking.checked_output``: the first tensor of a tuple by default)."""
    return checked_output(output, output_transform).shape


def check_runs(model: nn.Module, example_inputs, expected_shape: torch.Size, what: str,
               output_transform: Callable | None = None, forward_fn: Callable | None = None) -> None:
    """Run ``model`` on ``example_inputs`` (multi-step) and check the output shape and values."""
    try:
        out = fresh_forward(model, example_inputs, forward_fn)
    except Exception as error:
        raise PruningFailed(f"model no longer runs after {what}: {error}") from error
    check_output(out, expected_shape, what, output_transform)


def check_output(out, expected_shape: torch.Size, what: str, output_transform: Callable | None = None) -> None:
    """The pruned model's output has the shape it had before and finite values."""
    out = model_output(out, output_transform)
    if output_shape(out) != expected_shape:
        raise PruningFailed(f"output shape changed from {tuple(expected_shape)} to {tuple(out.shape)} after {what}")
    if not torch.isfinite(out).all():
        raise PruningFailed(f"model outputs non-finite values after {what}")


def check_repaired(model: nn.Module, example_inputs, width_calls, expected_shape: torch.Size, what: str,
                   output_transform: Callable | None = None, forward_fn: Callable | None = None) -> None:
    """After a structural change: the width attributes the forward reads brought in line with the pruned layers
    (``widths.py``, from the reshapes ``width_calls`` recorded on ``example_inputs`` before it), then the model
    checked (``check_runs``); one forward pass when no attribute had to change."""
    try:
        repair = repair_widths(model, lambda m: fresh_forward(m, example_inputs, forward_fn), width_calls)
    except WidthRepairError as error:
        raise PruningFailed(f"{what}: {error}") from error
    for attribute, value in repair.fixes.items():
        log.debug("%s: set %s = %d", what, attribute, value)
    if repair.fixes or repair.error is not None:
        check_runs(model, example_inputs, expected_shape, what, output_transform, forward_fn)
    else:
        check_output(repair.output, expected_shape, what, output_transform)


class SpikingPruner:
    """Prune every group of a spiking model to a ratio in one shot, heads kept aligned.

    ``importance`` is any ``tp.importance.Importance`` (L2 by default). Ratios
    apply per group (``pruning_ratio_dict`` maps group names to their own ratio).
    After the whole plan the model is run once, on the graph's one sample of
    ``example_inputs``, and checked against the output shape the graph recorded
    on it when it was built (so build the pruner on the model as it will be
    pruned); if anything breaks, the model is restored and ``PruningFailed`` is raised.

    As Torch-Pruning's pruners: ``step(interactive=True)`` yields each group's planned
    removal to prune (or skip) one by one, ``step()`` may be called again (each step
    plans on the model as the previous one left it), and ``pruning_history()`` lists
    what each step removed (what ``save_pruned(..., pruner=)`` stores).
    """

    def __init__(self, model: nn.Module, example_inputs, importance: tp.importance.Importance | None = None,
                 pruning_ratio: float = 0.5, pruning_ratio_dict: dict[str, float] | None = None,
                 ignored_layers: Sequence[nn.Module] = (), prune_attention_inner: bool = True,
                 pm: pluggy.PluginManager | None = None, output_transform: Callable | None = None):
        if not 0.0 <= pruning_ratio < 1.0:
            raise ArgumentError(f"pruning_ratio must be in [0, 1), got {pruning_ratio}")
        self.model = model
        self.example_inputs = to_model_device(model, example_inputs)
        self.importance = importance or tp.importance.GroupMagnitudeImportance(p=2)
        self.pruning_ratio = pruning_ratio
        self.pruning_ratio_dict = dict(pruning_ratio_dict or {})
        self.prune_attention_inner = prune_attention_inner
        self.graph = SpikingGraph(model, example_inputs, ignored_layers, pm=pm, output_transform=output_transform)
        self.groups = self.graph.groups(include_attention_inner=prune_attention_inner)
        self._history: list[dict[str, list[int]]] = []
        unknown = set(self.pruning_ratio_dict) - {g.name for g in self.groups}
        if unknown:
            raise ArgumentError(f"pruning_ratio_dict names no group: {sorted(unknown)}; groups: {[g.name for g in self.groups]}")

    def plan(self) -> dict[str, list[int]]:
        """Channels each group would lose (importance computed on the model as it is now)."""
        plan = {}
        for group in self.groups:
            ratio = self.pruning_ratio_dict.get(group.name, self.pruning_ratio)
            n_remove = group.removable(ratio)
            if n_remove == 0:
                continue
            scores = self.importance(group.importance_group)
            if scores is None:
                continue
            plan[group.name] = group.select(scores, n_remove)
        return plan

    def step(self, interactive: bool = False):
        """Prune in place; returns the removed channels per group. With ``interactive=True``, a generator of
        ``PlannedPruning`` (one per group with channels to remove): call ``.prune()`` on those to prune; each
        is checked on its own (width attributes repaired) and undone if it breaks the model."""
        if self._history:  # a step pruned the model: plan on its groups as they are now
            self.groups = self.graph.groups(include_attention_inner=self.prune_attention_inner)
        plan = self.plan()
        if interactive:
            return self._planned(plan)
        apply_plan(self.graph, plan, self.groups)
        self._history.append(plan)
        return plan

    def _planned(self, plan: dict[str, list[int]]) -> Iterator["PlannedPruning"]:
        applied: dict[str, list[int]] = {}
        self._history.append(applied)
        for group in self.groups:
            if plan.get(group.name):
                yield PlannedPruning(group, plan[group.name], self.graph, applied)

    def pruning_history(self) -> list[dict[str, list[int]]]:
        """The channels each step removed, per group (a step pruning nothing is left out)."""
        return [dict(plan) for plan in self._history if plan]


@dataclass
class PlannedPruning:
    """One group's planned removal, as ``SpikingPruner.step(interactive=True)`` yields it."""

    group: PruningGroup
    idxs: list[int]
    graph: SpikingGraph
    applied: dict[str, list[int]]

    @property
    def name(self) -> str:
        return self.group.name

    def prune(self) -> None:
        """Remove the channels, repair the width attributes, check the model; undone if the check fails."""
        graph = self.graph
        with structural_change(graph.model):
            self.group.prune(self.idxs)
            check_repaired(graph.model, graph.sample_inputs, graph.width_calls, graph.output_shape,
                           f"pruning {len(self.idxs)} channels of group {self.name!r}", graph.output_transform,
                           graph.call)
        self.applied[self.name] = list(self.idxs)

    def __repr__(self) -> str:
        return f"PlannedPruning({self.name!r}: {len(self.idxs)} of {self.group.size} channels)"


def verified_step(pruner: tp.pruner.MetaPruner, example_inputs, output_transform: Callable | None = None,
                  forward_fn: Callable | None = None) -> None:
    """``pruner.step()`` for a MetaPruner built with our kwargs, then check the model still runs.

    Width attributes the forward reads (``self.c_hidden``, ``self.head_dim``) are brought in
    line with the pruned layers first (``widths.py``). On failure the model is restored to
    its state before the step and ``PruningFailed`` says why; build a new pruner before
    trying again (the old one's graph is stale).
    """
    model = pruner.model
    example_inputs = to_model_device(model, example_inputs)
    with width_trace(model) as trace:
        expected = output_shape(fresh_forward(model, example_inputs, forward_fn), output_transform)
    with structural_change(model):
        pruner.step()
        check_repaired(model, example_inputs, trace.calls, expected, "a Torch-Pruning step", output_transform,
                       forward_fn)


def apply_plan(graph: SpikingGraph, plan: dict[str, list[int]], groups: list[PruningGroup] | None = None) -> dict:
    """Remove ``plan[name]`` channels from each named group of ``graph``'s model (``groups``: the graph's
    groups, when the caller holds them already) and check the model runs; restore on failure.

    One check after the whole plan (a forward pass per group cost 9x Torch-Pruning's own
    step on spikformer_cifar10), on the graph's one sample against the output shape the
    graph recorded on it, after bringing the width attributes the forward reads in line
    (``widths.py``, from the reshapes the graph recorded); when it fails, the plan is
    replayed group by group on the restored model, so the error names the group that
    breaks it.
    """
    model, sample, expected = graph.model, graph.sample_inputs, graph.output_shape
    chosen = [(group, plan[group.name]) for group in (graph.groups() if groups is None else groups) if plan.get(group.name)]
    try:
        with structural_change(model):
            for group, idxs in chosen:
                group.prune(idxs)
            check_repaired(model, sample, graph.width_calls, expected, f"pruning {len(chosen)} groups",
                           graph.output_transform, graph.call)
    except PruningFailed:
        with structural_change(model):  # the model is back as it was: find the group to blame
            for group, idxs in chosen:
                group.prune(idxs)
                check_repaired(model, sample, graph.width_calls, expected,
                               f"pruning {len(idxs)} channels of group {group.name!r}", graph.output_transform,
                               graph.call)
    for group, idxs in chosen:
        log.debug("pruned %d/%d channels of %s", len(idxs), group.size, group.name)
    return plan
