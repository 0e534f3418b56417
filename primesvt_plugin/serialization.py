"""Save and load pruned models in one call.

A pruned model's shapes differ from what its builder makes, so the file keeps
the recipe for rebuilding it: builder name and arguments, the example input
shape, and the pruning plan (channels removed per group). Loading builds the
model, replays the plan through the same pruning engine, and loads the
weights strictly, so the result is bit-for-bit the saved model. The file holds
only tensors and plain data: it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pluggy
import torch
import torch.nn as nn

from .building import build_model
from .errors import CheckpointError
from .graph import SpikingGraph
from .pruner import apply_plan

FORMAT = "primesvt-pruned-model/1"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move it to ``path``: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_pruned(model: nn.Module, path: str | Path, builder: str, builder_args: dict[str, Any],
                example_shape: tuple[int, ...], plan: dict[str, list[int]]) -> Path:
    """Write ``model`` (pruned by ``plan`` from ``builder(**builder_args)``) to ``path``."""
    payload = {
        "format": FORMAT,
        "builder": builder,
        "builder_args": dict(builder_args),
        "example_shape": list(example_shape),
        "plan": {name: [int(i) for i in idxs] for name, idxs in plan.items()},
        "state_dict": model.state_dict(),
    }
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))
    return Path(path)


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or another format?): "
                              f"{str(error).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a primesvt pruned model (expected format {FORMAT!r}); "
                              "plain state dicts load with model.load_state_dict(torch.load(path))")
    return payload


def load_pruned(path: str | Path, pm: pluggy.PluginManager | None = None) -> nn.Module:
    """Rebuild, re-prune and load the model saved by ``save_pruned`` (eval mode)."""
    payload = read_checkpoint(path)
    model = build_model(payload["builder"], payload["builder_args"], pm)
    example = torch.zeros(payload["example_shape"])
    graph = SpikingGraph(model, example, pm=pm)
    groups = graph.groups()
    unknown = set(payload["plan"]) - {g.name for g in groups}
    if unknown:
        raise CheckpointError(f"{path}: plan names groups the rebuilt model lacks: {sorted(unknown)} "
                              "(was the builder or a plugin changed?)")
    apply_plan(model, example, groups, payload["plan"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit the rebuilt model: {str(error).splitlines()[0]}") from None
    return model.eval()
