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

from .graph import PruningGroup, SpikingGraph
from .errors import PruningFailed
from .inference import fresh_forward

log = logging.getLogger(__name__)


def spiking_pruner_kwargs(model: nn.Module, example_inputs, ignored_layers: Sequence[nn.Module] = (),
                          pm: pluggy.PluginManager | None = None) -> dict:
    """Keyword arguments that make ``tp.pruner.MetaPruner`` work on a SpikingJelly model.

    >>> pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.3,
    ...                               **spiking_pruner_kwargs(model, x))
    """
    return SpikingGraph(model, example_inputs, ignored_layers, pm=pm).metapruner_kwargs()


def restore_module(model: nn.Module, backup: nn.Module) -> None:
    """Make ``model`` (the same object) hold ``backup``'s submodules, tensors and attributes again."""
    model.__dict__.clear()
    model.__dict__.update(backup.__dict__)


@contextlib.contextmanager
def restored_on_failure(model: nn.Module) -> Iterator[None]:
    """If the block raises, ``model`` is put back as it was when the block started."""
    backup = copy.deepcopy(model)
    try:
        yield
    except BaseException:
        restore_module(model, backup)
        raise


def check_runs(model: nn.Module, example_inputs, expected_shape: torch.Size, what: str) -> None:
    """Run ``model`` on ``example_inputs`` (multi-step) and check the output shape and values."""
    try:
        out = fresh_forward(model, example_inputs)
    except Exception as error:
        raise PruningFailed(f"model no longer runs after {what}: {error}") from error
    if out.shape != expected_shape:
        raise PruningFailed(f"output shape changed from {tuple(expected_shape)} to {tuple(out.shape)} after {what}")
    if not torch.isfinite(out).all():
        raise PruningFailed(f"model outputs non-finite values after {what}")


class SpikingPruner:
    """Prune every group of a spiking model to a ratio in one shot, heads kept aligned.

    ``importance`` is any ``tp.importance.Importance`` (L2 by default). Ratios
    apply per group (``pruning_ratio_dict`` maps group names to their own ratio).
    After each group the model is run on ``example_inputs``; if anything
    breaks, the model is restored and ``PruningFailed`` is raised.
    """

    def __init__(self, model: nn.Module, example_inputs, importance: tp.importance.Importance | None = None,
                 pruning_ratio: float = 0.5, pruning_ratio_dict: dict[str, float] | None = None,
                 ignored_layers: Sequence[nn.Module] = (), prune_attention_inner: bool = True,
                 pm: pluggy.PluginManager | None = None):
        if not 0.0 <= pruning_ratio < 1.0:
            raise ValueError(f"pruning_ratio must be in [0, 1), got {pruning_ratio}")
        self.model = model
        self.example_inputs = example_inputs
        self.importance = importance or tp.importance.GroupMagnitudeImportance(p=2)
        self.pruning_ratio = pruning_ratio
        self.pruning_ratio_dict = dict(pruning_ratio_dict or {})
        self.graph = SpikingGraph(model, example_inputs, ignored_layers, pm=pm)
        self.groups = self.graph.groups(include_attention_inner=prune_attention_inner)
        unknown = set(self.pruning_ratio_dict) - {g.name for g in self.groups}
        if unknown:
            raise KeyError(f"pruning_ratio_dict names no group: {sorted(unknown)}; groups: {[g.name for g in self.groups]}")

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
        return apply_plan(self.model, self.example_inputs, self.groups, self.plan())


def verified_step(pruner: tp.pruner.MetaPruner, example_inputs) -> None:
    """``pruner.step()`` for a MetaPruner built with our kwargs, then check the model still runs.

    On failure the model is restored to its state before the step and ``PruningFailed``
    says why; build a new pruner before trying again (the old one's graph is stale).
    """
    model = pruner.model
    expected = fresh_forward(model, example_inputs).shape
    with restored_on_failure(model):
        pruner.step()
        check_runs(model, example_inputs, expected, "a Torch-Pruning step")


def apply_plan(model: nn.Module, example_inputs, groups: list[PruningGroup], plan: dict[str, list[int]]) -> dict:
    """Remove ``plan[name]`` channels from each named group, verifying after each; restore on failure."""
    expected = fresh_forward(model, example_inputs).shape
    with restored_on_failure(model):
        for group in groups:
            idxs = plan.get(group.name)
            if idxs:
                group.prune(idxs)
                check_runs(model, example_inputs, expected, f"pruning {len(idxs)} channels of group {group.name!r}")
                log.debug("pruned %d/%d channels of %s", len(idxs), group.size, group.name)
    return plan
