"""Save and load pruned models in one call.

A pruned model's shapes differ from what its builder makes, so the file keeps
the recipe for rebuilding it: builder name and arguments, the example input
shape, and the pruning plan (channels removed per group). Loading builds the
model, replays the plan through the same pruning engine, and loads the
weights strictly, so the result is bit-for-bit the saved model. The file holds
only tensors and plain data: it loads with ``torch.load(weights_only=True)``,
and its builder name resolves to a registered builder only (a ``module:function``
builder needs ``trust_code=True``): a file never runs code by itself.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import pluggy
import torch
import torch.nn as nn
import torch_pruning as tp

from .errors import ArgumentError, CheckpointError, first_line
from .files import atomic_write
from .plugins import build_model
from .pruning.graph import SpikingGraph
from .pruning.pruner import apply_plan, check_repaired, structural_change

FORMAT = "primesvt-pruned-model/1"


def save_pruned(model: nn.Module, path: str | Path, builder: str, builder_args: dict[str, Any],
                example_shape: tuple[int, ...] | None = None, plan: dict[str, list[int]] | None = None, *,
                pruner=None) -> Path:
    """Write ``model`` (pruned from ``builder(**builder_args)``) to ``path``, with what rebuilding it needs.

    What was pruned is ``plan`` (what ``SpikingPruner.step()`` or ``prime()`` returned), or comes from
    ``pruner``: a ``SpikingPruner`` (its ``pruning_history()``, every step, and its example's shape) or a
    Torch-Pruning pruner built with ``spiking_pruner_kwargs`` (its ``pruning_history()``; give
    ``example_shape``).
    """
    history = _history_of(plan, pruner)
    if example_shape is None:
        example = getattr(pruner, "example_inputs", None)
        if not isinstance(example, torch.Tensor):
            raise ArgumentError("save_pruned needs example_shape (the shape of the example input the model was "
                                "pruned with): give it, or pass the SpikingPruner as pruner=")
        example_shape = tuple(example.shape)
    payload = {"format": FORMAT, "builder": builder, "builder_args": dict(builder_args),
               "example_shape": list(example_shape), "state_dict": model.state_dict(), **history}
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))
    return Path(path)


def _plain_plan(plan) -> dict[str, list[int]]:
    if not isinstance(plan, dict):
        raise ArgumentError(f"plan must be the dict of removed channels per group that step() or prime() returned, "
                            f"got {type(plan).__name__}" + ("; to save what a pruner did, pass pruner=the pruner"
                                                            if callable(plan) else ""))
    return {name: [int(i) for i in idxs] for name, idxs in plan.items()}


def _history_of(plan, pruner) -> dict:
    """The payload fields saying what was pruned: ``plan`` (one plan), ``plans`` (several SpikingPruner steps)
    or ``tp_history`` (a Torch-Pruning pruner's history)."""
    if (plan is None) == (pruner is None):
        raise ArgumentError("save_pruned needs what was pruned: plan= (what step() or prime() returned) or pruner=")
    if plan is not None:
        return {"plan": _plain_plan(plan)}
    if isinstance(pruner, tp.pruner.BasePruner):
        return {"plan": {}, "tp_history": [[str(name), bool(out), [int(i) for i in idxs]]
                                           for name, out, idxs in pruner.pruning_history()]}
    if not callable(getattr(pruner, "pruning_history", None)):
        raise ArgumentError(f"pruner must be a SpikingPruner or a Torch-Pruning pruner, got {type(pruner).__name__}")
    plans = [_plain_plan(step) for step in pruner.pruning_history()]
    if len(plans) <= 1:
        return {"plan": plans[0] if plans else {}}
    return {"plan": {}, "plans": plans}  # "plan" too: files stay readable by 0.2 (which then refuses the plans)


# What ``torch.load(weights_only=True)`` may create besides tensors and plain data: training scripts built on
# timm save their command line as an argparse.Namespace under "args".
SAFE_GLOBALS = [argparse.Namespace]


def read_tensors(path: str | Path, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)``: tensors and plain data only (and an ``argparse.Namespace``),
    never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, foreign, or a pickle that would run code
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if refused:
            raise CheckpointError(f"{path} holds a {refused.group(1)} object, which loading never creates or calls "
                                  "(a pickle can run code); if you trust the file, load it yourself in Python and save its "
                                  "weights alone: torch.save(<its state dict>, 'weights.pt')") from None
        raise CheckpointError(f"{path} is not a readable {what} (truncated, another format, or a pickle "
                              f"carrying code, which is never loaded): {first_line(error)}") from None


STATE_DICT_KEYS = ("state_dict", "model", "module")  # timm's CheckpointSaver, MAE/DeiT's save_model, others
DDP_PREFIX = "module."


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights in ``path``: a plain state dict, or the one a training checkpoint holds under
    ``state_dict``, ``model`` or ``module`` (timm's training scripts, MAE/DeiT-style ones), with a
    ``module.`` prefix from DistributedDataParallel removed."""
    payload = read_tensors(path, "checkpoint")
    if _is_state_dict(payload):
        state = payload
    elif isinstance(payload, dict) and any(_is_state_dict(payload.get(key)) for key in STATE_DICT_KEYS):
        state = next(payload[key] for key in STATE_DICT_KEYS if _is_state_dict(payload.get(key)))
    else:
        found = f"a dict with keys {', '.join(map(str, list(payload)[:8]))}" if isinstance(payload, dict) \
            else f"a {type(payload).__name__}"
        raise CheckpointError(f"{path} holds {found}, and no state dict: expected a mapping of names to tensors, or "
                              f"one under {', '.join(map(repr, STATE_DICT_KEYS))}")
    if all(name.startswith(DDP_PREFIX) for name in state):
        state = {name[len(DDP_PREFIX):]: tensor for name, tensor in state.items()}
    return state


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights in ``path`` into ``model`` strictly (``read_state_dict``: plain state dicts and training
    checkpoints alike); a missing or unexpected weight refuses in one line naming up to 5 of each."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    reshaped = [f"{name} {list(state[name].shape)} vs {list(tensor.shape)}" for name, tensor in expected.items()
                if name in state and state[name].shape != tensor.shape]
    if missing or unexpected or reshaped:
        raise CheckpointError(f"{path} does not fit the model: " + "; ".join(
            f"{len(names)} {kind} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
            for kind, names in (("missing", missing), ("unexpected", unexpected),
                                ("of another shape, file vs model", reshaped)) if names)
            + " (was it saved from a model with other arguments?)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit the model: {first_line(error)} "
                              "(was it saved from a model with other arguments?)") from None
    return model


# An example input is one batch of samples: at most 6 dimensions ([T, N, C, D, H, W]) and 2**28 entries
# (1 GiB of float32), so a damaged or hostile file cannot make loading allocate any amount.
MAX_EXAMPLE_DIMS = 6
MAX_EXAMPLE_ENTRIES = 2 ** 28

def _replay_history(graph: SpikingGraph, history: list, path) -> None:
    """A Torch-Pruning pruner's history replayed on the rebuilt model (through our graph's pruners), checked."""
    model = graph.model
    names = {name for name, _ in model.named_modules()}
    unknown = sorted({name for name, _, _ in history} - names)
    if unknown:
        raise CheckpointError(f"{path}: the pruning history names layers the rebuilt model lacks: {unknown[:5]} "
                              "(was the builder or a plugin changed?)")
    with structural_change(model):
        graph.DG.load_pruning_history([tuple(step) for step in history])
        check_repaired(model, graph.sample_inputs, graph.width_calls, graph.output_shape,
                       "replaying the pruning history", graph.output_transform, graph.call)


# Each field of a pruned-model file and the type it must have.
FIELDS = {"builder": str, "builder_args": dict, "example_shape": list, "plan": dict, "state_dict": dict}


def read_checkpoint(path: str | Path) -> dict:
    """The payload of a ``save_pruned`` file, every field checked."""
    payload = read_tensors(path, "primesvt pruned model")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a primesvt pruned model (expected format {FORMAT!r}); "
                              "plain state dicts load with model.load_state_dict(torch.load(path))")
    for field, kind in FIELDS.items():
        if not isinstance(payload.get(field), kind):
            raise CheckpointError(f"{path}: field {field!r} is missing or not a {kind.__name__}; "
                                  "the file is damaged or was not written by save_pruned")
    plans = payload.get("plans", [payload["plan"]])
    history = payload.get("tp_history", [])
    plan_ok = isinstance(plans, list) and all(isinstance(plan, dict) and all(
        isinstance(v, list) and all(type(i) is int for i in v) for v in plan.values()) for plan in plans)
    plan_ok = plan_ok and isinstance(history, list) and all(
        isinstance(step, list) and len(step) == 3 and isinstance(step[0], str) and isinstance(step[1], bool)
        and isinstance(step[2], list) and all(type(i) is int for i in step[2]) for step in history)
    shape = payload["example_shape"]
    shape_ok = 0 < len(shape) <= MAX_EXAMPLE_DIMS and all(type(d) is int and d > 0 for d in shape)
    if not (plan_ok and shape_ok):
        raise CheckpointError(f"{path}: plan or example_shape is malformed; the file is damaged")
    if math.prod(shape) > MAX_EXAMPLE_ENTRIES:  # loading builds a zero example of this shape
        raise CheckpointError(f"{path}: example_shape {shape} has {math.prod(shape):,} entries, more than the "
                              f"{MAX_EXAMPLE_ENTRIES:,} an example input is allowed; the file is damaged or not "
                              "from save_pruned")
    return payload


def load_pruned(path: str | Path, pm: pluggy.PluginManager | None = None, trust_code: bool = False,
                search_path: str | Path | None = None) -> nn.Module:
    """Rebuild, re-prune and load the model saved by ``save_pruned`` (eval mode).

    A file whose builder is ``module:function`` imports and runs that code: pass
    ``trust_code=True`` only for files from a source you trust, and ``search_path``
    when the module lives in a folder Python does not search (e.g. the recipe's).
    """
    payload = read_checkpoint(path)
    model = build_model(payload["builder"], payload["builder_args"], pm,
                        Path(search_path) if search_path else None, trust_code=trust_code)
    example = torch.zeros(payload["example_shape"])
    graph = SpikingGraph(model, example, pm=pm)
    if payload.get("tp_history"):
        _replay_history(graph, payload["tp_history"], path)
    for plan in payload.get("plans", [payload["plan"]]):
        groups = graph.groups()
        unknown = set(plan) - {g.name for g in groups}
        if unknown:
            raise CheckpointError(f"{path}: plan names groups the rebuilt model lacks: {sorted(unknown)} "
                                  "(was the builder or a plugin changed?)")
        apply_plan(graph, plan, groups)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit the rebuilt model: {first_line(error)}") from None
    return model.eval()
