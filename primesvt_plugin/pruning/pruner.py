"""SpikingPruner: one-shot structured pruning of a spiking model, attention included."""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Iterator, Sequence

import pluggy
import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import ArgumentError, PruningFailed
from .graph import PruningGroup, SpikingGraph
from .spiking import fresh_forward, to_model_device

log = logging.getLogger(__name__)


def spiking_pruner_kwargs(model: nn.Module, example_inputs, ignored_layers: Sequence[nn.Module] = (),
                          pm: pluggy.PluginManager | None = None) -> dict:
    """Keyword arguments that make ``tp.pruner.MetaPruner`` work on a SpikingJelly model.

    >>> pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.3,
    ...                               **spiking_pruner_kwargs(model, x))
    """
    return SpikingGraph(model, example_inputs, ignored_layers, pm=pm).metapruner_kwargs()


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


def output_shape(output) -> torch.Size:
    """The shape of a model's output; an output that is not one tensor is refused (the checks compare one tensor)."""
    if not isinstance(output, torch.Tensor):
        raise ArgumentError(f"the model returns a {type(output).__name__}, not one tensor: pruning checks the shape "
                            "and values of its output; wrap the model so that its forward returns one tensor")
    return output.shape


def check_runs(model: nn.Module, example_inputs, expected_shape: torch.Size, what: str) -> None:
    """Run ``model`` on ``example_inputs`` (multi-step) and check the output shape and values."""
    try:
        out = fresh_forward(model, example_inputs)
    except Exception as error:
        raise PruningFailed(f"model no longer runs after {what}: {error}") from error
    if output_shape(out) != expected_shape:
        raise PruningFailed(f"output shape changed from {tuple(expected_shape)} to {tuple(out.shape)} after {what}")
    if not torch.isfinite(out).all():
        raise PruningFailed(f"model outputs non-finite values after {what}")


class SpikingPruner:
    """Prune every group of a spiking model to a ratio in one shot, heads kept aligned.

    ``importance`` is any ``tp.importance.Importance`` (L2 by default). Ratios
    apply per group (``pruning_ratio_dict`` maps group names to their own ratio).
    After the whole plan the model is run once, on the graph's one sample of
    ``example_inputs``, and checked against the output shape the graph recorded
    on it when it was built (so build the pruner on the model as it will be
    pruned); if anything breaks, the model is restored and ``PruningFailed`` is raised.
    """

    def __init__(self, model: nn.Module, example_inputs, importance: tp.importance.Importance | None = None,
                 pruning_ratio: float = 0.5, pruning_ratio_dict: dict[str, float] | None = None,
                 ignored_layers: Sequence[nn.Module] = (), prune_attention_inner: bool = True,
                 pm: pluggy.PluginManager | None = None):
        if not 0.0 <= pruning_ratio < 1.0:
            raise ArgumentError(f"pruning_ratio must be in [0, 1), got {pruning_ratio}")
        self.model = model
        self.example_inputs = to_model_device(model, example_inputs)
        self.importance = importance or tp.importance.GroupMagnitudeImportance(p=2)
        self.pruning_ratio = pruning_ratio
        self.pruning_ratio_dict = dict(pruning_ratio_dict or {})
        self.graph = SpikingGraph(model, example_inputs, ignored_layers, pm=pm)
        self.groups = self.graph.groups(include_attention_inner=prune_attention_inner)
        unknown = set(self.pruning_ratio_dict) - {g.name for g in self.groups}
        if unknown:
            raise ArgumentError(f"pruning_ratio_dict names no group: {sorted(unknown)}; groups: {[g.name for g in self.groups]}")

    def plan(self) -> dict[str, list[int]]:
        """Channels each group would lose (importance computed on the unpruned model)."""
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

    def step(self) -> dict[str, list[int]]:
        """Prune in place; returns the removed channels per group."""
        return apply_plan(self.model, self.graph.sample_inputs, self.groups, self.plan(), self.graph.output_shape)


def verified_step(pruner: tp.pruner.MetaPruner, example_inputs) -> None:
    """``pruner.step()`` for a MetaPruner built with our kwargs, then check the model still runs.

    On failure the model is restored to its state before the step and ``PruningFailed``
    says why; build a new pruner before trying again (the old one's graph is stale).
    """
    model = pruner.model
    example_inputs = to_model_device(model, example_inputs)
    expected = output_shape(fresh_forward(model, example_inputs))
    with structural_change(model):
        pruner.step()
        check_runs(model, example_inputs, expected, "a Torch-Pruning step")


def apply_plan(model: nn.Module, example_inputs, groups: list[PruningGroup], plan: dict[str, list[int]],
               expected_shape: torch.Size | None = None) -> dict:
    """Remove ``plan[name]`` channels from each named group and check the model runs; restore on failure.

    One check after the whole plan (a forward pass per group cost 9x Torch-Pruning's own
    step on spikformer_cifar10); when it fails, the plan is replayed group by group on the
    restored model, so the error names the group that breaks it. ``expected_shape`` is the
    model's output shape on ``example_inputs`` when the caller knows it (a ``SpikingGraph``
    records it for one sample: ``graph.sample_inputs``, ``graph.output_shape``); without it
    the unpruned model is run once more to learn it.
    """
    example_inputs = to_model_device(model, example_inputs)
    expected = output_shape(fresh_forward(model, example_inputs)) if expected_shape is None else expected_shape
    chosen = [(group, plan[group.name]) for group in groups if plan.get(group.name)]
    try:
        with structural_change(model):
            for group, idxs in chosen:
                group.prune(idxs)
            check_runs(model, example_inputs, expected, f"pruning {len(chosen)} groups")
    except PruningFailed:
        with structural_change(model):  # the model is back as it was: find the group to blame
            for group, idxs in chosen:
                group.prune(idxs)
                check_runs(model, example_inputs, expected, f"pruning {len(idxs)} channels of group {group.name!r}")
    for group, idxs in chosen:
        log.debug("pruned %d/%d channels of %s", len(idxs), group.size, group.name)
    return plan
