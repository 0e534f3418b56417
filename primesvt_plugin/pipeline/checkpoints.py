"""Fine-tuning checkpoints: everything the next epoch depends on, written after every epoch, and resumed
only by a run that agrees on what the weights depend on (docs/training.md)."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..errors import CheckpointError, first_line
from ..files import atomic_write
from ..serialization import read_tensors

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "primesvt-training-checkpoint/1"


@dataclass
@dataclass
class TrainingState:
    """Everything the next epoch depends on: what a checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loader: DataLoader

    def save(self, path: Path, losses: list[float], settings: dict, meta: dict) -> None:
        """Write the state after ``len(losses)`` epochs to ``path`` (atomically: a reader never sees half)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return  # under torchrun: one writer per file (rank 0, like the outputs); every rank reads it to resume
        payload = {"format": CHECKPOINT_FORMAT, "epoch": len(losses), "losses": list(losses),
                   "settings": settings, "meta": meta, "model": self.model.state_dict(),
                   "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                   "scaler": self.scaler.state_dict(), "rng": _rng_state(self.loader)}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(payload, tmp))

    def resume(self, path: Path, settings: dict, meta: dict) -> list[float]:
        """Load ``path`` if it exists (same settings and meta required); the losses of its finished epochs."""
        if not path.is_file():
            log.info("no checkpoint at %s to resume from: training starts at epoch 1", path)
            return []
        payload = read_checkpoint(path)
        _require_same(path, {"training": payload["settings"], **payload["meta"]}, {"training": settings, **meta})
        try:
            self.model.load_state_dict(payload["model"], strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"{path}: the weights do not fit the model ({first_line(error)}); it was written "
                                  "for another model: delete it, or run without resuming") from None
        self.optimizer.load_state_dict(payload["optimizer"])  # moves its tensors to the parameters' device
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        _set_rng_state(payload["rng"], self.loader)
        log.info("resuming from %s: %d of %d epochs done", path, payload["epoch"], settings["epochs"])
        return list(payload["losses"])


CHECKPOINT_FIELDS = {"epoch": int, "losses": list, "settings": dict, "meta": dict, "model": dict,
                     "optimizer": dict, "scheduler": dict, "scaler": dict, "rng": dict}


def read_checkpoint(path: str | Path) -> dict:
    """A training checkpoint's payload, its fields checked (tensors and plain data only, never code)."""
    payload = read_tensors(path, "training checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a primesvt training checkpoint (expected format "
                              f"{CHECKPOINT_FORMAT!r}); delete it, or run without resuming")
    for field, kind in CHECKPOINT_FIELDS.items():
        if not isinstance(payload.get(field), kind):
            raise CheckpointError(f"{path}: field {field!r} is missing or not a {kind.__name__}; the file is "
                                  "damaged: delete it, or run without resuming")
    return payload


def check_resumable(path: str | Path, meta: dict[str, Any]) -> int | None:
    """The epochs done by the checkpoint at ``path`` (None: there is none, a run starts over).

    ``CheckpointError`` if it is unreadable or was written with other ``meta``: callers
    check before spending time on what comes before training (``train`` checks again).
    """
    path = Path(path)
    if not path.is_file():
        log.info("nothing to resume: no checkpoint at %s; training will start at epoch 1", path)
        return None
    payload = read_checkpoint(path)
    _require_same(path, payload["meta"], meta)
    return payload["epoch"]


def first_difference(saved: Any, now: Any, where: str = "") -> str | None:
    """The first key path where ``saved`` and ``now`` differ (``None`` when equal), e.g. ``finetune.lr``."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in sorted(set(saved) | set(now), key=str):
            found = first_difference(saved.get(key), now.get(key), f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
        return None
    return None if saved == now else (where or "(value)")


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _require_same(path: Path, saved: dict, now: dict) -> None:
    """Refuse a checkpoint written with other settings: resuming it would mix two runs."""
    differs = first_difference(saved, now)
    if differs is not None:
        raise CheckpointError(f"{path} was written by a run with {differs}={_lookup(saved, differs)!r}, this run "
                              f"has {_lookup(now, differs)!r}; resume with the same settings, or run without "
                              "resuming to start over (the checkpoint is then replaced)")


def _rng_state(loader: DataLoader) -> dict:
    """Every random number generator the next epoch draws from (shuffling, augmentation, dropout)."""
    generator = getattr(loader, "generator", None)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader": None if generator is None else generator.get_state(),
            # numpy's and Python's states as tensors and plain data: the file loads with weights_only=True
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def _set_rng_state(state: dict, loader: DataLoader) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(loader, "generator", None)
    if generator is not None and state["loader"] is not None:
        generator.set_state(state["loader"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
