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

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pluggy
import torch
import torch.nn as nn

from .errors import CheckpointError, first_line
from .pipeline.output import umask_mode
from .plugins import build_model
from .pruning.graph import SpikingGraph
from .pruning.pruner import apply_plan

FORMAT = "primesvt-pruned-model/1"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move it to ``path``: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, umask_mode(False))  # mkstemp makes 0600; the user's umask decides
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


def read_tensors(path: str | Path, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)``: tensors and plain data only, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, foreign, or a pickle that would run code
        first = first_line(error)
        raise CheckpointError(f"{path} is not a readable {what} (truncated, another format, or a pickle "
                              f"carrying code, which is never loaded): {first}") from None


def load_state_dict_file(model: nn.Module, path: str | Path) -> None:
    """Load the state dict in ``path`` into ``model`` strictly; ``CheckpointError`` if it does not fit."""
    state = read_tensors(path, "state dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict (a mapping of names to tensors)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit the model: {first_line(error)} "
                              "(was it saved from a model with other arguments?)") from None


# An example input is one batch of samples: at most 6 dimensions ([T, N, C, D, H, W]) and 2**28 entries
# (1 GiB of float32), so a damaged or hostile file cannot make loading allocate any amount.
MAX_EXAMPLE_DIMS = 6
MAX_EXAMPLE_ENTRIES = 2 ** 28

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
    plan_ok = all(isinstance(v, list) and all(type(i) is int for i in v) for v in payload["plan"].values())
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
    groups = graph.groups()
    unknown = set(payload["plan"]) - {g.name for g in groups}
    if unknown:
        raise CheckpointError(f"{path}: plan names groups the rebuilt model lacks: {sorted(unknown)} "
                              "(was the builder or a plugin changed?)")
    apply_plan(model, graph.sample_inputs, groups, payload["plan"], graph.output_shape)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit the rebuilt model: {first_line(error)}") from None
    return model.eval()
