"""Train, fine-tune and evaluate spiking classifiers (SpikingJelly conventions).

``train`` runs AdamW on the cross-entropy of the time-averaged class scores, or on
a distillation loss from a frozen teacher (the unpruned model, when fine-tuning
after pruning). The learning rate follows a per-step schedule: a linear warm-up,
then constant or cosine down to 0. On CUDA it can run in mixed precision. Given
a ``checkpoint`` file it saves everything the next epoch depends on after every
epoch (weights, optimizer, schedule, random number generators), and with
``resume=True`` continues from it: the epochs it records are skipped and the
result is the same as a run that was never interrupted (docs/training.md).
"""
from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import functional
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import ArgumentError, CheckpointError, DataError, first_line
from .. import distributed
from ..pruning.spiking import class_scores, first_tensor, inference, model_device
from ..serialization import atomic_write, read_tensors

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
CHECKPOINT_FORMAT = "primesvt-training-checkpoint/1"


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when torch sees one, else the CPU; ``cuda`` is refused without a GPU."""
    if name not in DEVICES:
        raise ArgumentError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                            "use auto (the GPU when there is one) or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class scores of ``model`` for a batch, from a fresh state (of its first output tensor, for a model
    returning a tuple such as SDT's ``(logits, hook)``)."""
    functional.reset_net(model)
    out = first_tensor(model(x))
    functional.reset_net(model)
    return class_scores(out)


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in [0, 1] (batches moved to the model's device); the train/eval mode is restored.

    Under torchrun each rank scores its shard of the loader's dataset and the counts are
    summed, so every rank gets the same number: a collective, every rank must call it.
    """
    correct = total = 0
    device = model_device(model)
    with inference(model):
        for x, y in distributed.shard(loader):
            x, y = x.to(device), y.to(device)
            correct += int((logits(model, x).argmax(1) == y).sum())
            total += len(y)
    correct, total = distributed.all_sum(correct, total)
    if total == 0:
        raise DataError("cannot measure accuracy on an empty dataset: the split has no samples")
    return correct / total


# -- distillation ------------------------------------------------------------------


@dataclass(frozen=True)
class Distillation:
    """Learn from ``teacher`` too: loss = (1 - weight) * CE + weight * T^2 * KL(teacher || student) at T."""

    teacher: nn.Module
    weight: float = 0.5
    temperature: float = 4.0

    def __post_init__(self):
        if not 0.0 <= self.weight <= 1.0:
            raise ArgumentError(f"distillation weight must be in [0, 1], got {self.weight}")
        if not self.temperature > 0:
            raise ArgumentError(f"distillation temperature must be > 0, got {self.temperature}")


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for a teacher: eval mode, no gradients, fresh neuron state."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    functional.reset_net(teacher)
    return teacher


def teacher_scores(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The teacher's class scores for ``x`` (eval mode, no autograd, state reset before and after)."""
    with inference(teacher):
        return logits(teacher, x.to(model_device(teacher))).to(x.device)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, weight: float,
                      temperature: float) -> torch.Tensor:
    """``(1 - weight) * CE(student, labels) + weight * T^2 * KL(softmax(teacher/T) || softmax(student/T))``.

    T^2 keeps the soft term's gradients on the scale of the hard one's as T grows (Hinton et al., 2015).
    """
    hard = F.cross_entropy(student, labels)
    soft = F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    return (1 - weight) * hard + weight * temperature ** 2 * soft


# -- learning-rate schedule ----------------------------------------------------------


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine") -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of the base rate.

    Warm-up rises linearly to 1 at its last step (never 0: a step at rate 0 is wasted);
    then ``constant`` stays at 1 and ``cosine`` falls to 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 schedule: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler following ``lr_factor`` (call ``step()`` after each optimizer step)."""
    if schedule not in SCHEDULES:
        raise ArgumentError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    # A closed form, not CosineAnnealingLR's recursion: the rate at any step is known, which resuming
    # needs; for warmup 0 it gives the same weights as CosineAnnealingLR did (checked on digits).
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, schedule))


# -- training --------------------------------------------------------------------------


@dataclass
class _Step:
    """One optimization step: forward (autocast on CUDA if asked), loss, backward, update, schedule."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    distill: Distillation | None
    autocast: bool

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast):
            scores = logits(self.model, x)
            target = None if self.distill is None else teacher_scores(self.distill.teacher, x)
        scores = scores.float()  # losses in float32, also under autocast
        if target is None:
            loss = F.cross_entropy(scores, y)
        else:
            loss = distillation_loss(scores, target.float(), y, self.distill.weight, self.distill.temperature)
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)  # a plain optimizer.step() when the scaler is off
        self.scaler.update()
        self.scheduler.step()
        return loss.item()


def _epoch(step: _Step, loader: DataLoader, device: torch.device) -> float:
    total, batches = 0.0, 0
    for x, y in loader:
        total += step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        batches += 1
    return total / max(batches, 1)


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float = 1e-3, weight_decay: float = 0.0,
          seed: int = 0, progress: bool = True, desc: str = "train", *, schedule: str = "cosine",
          warmup_epochs: int = 0, distill: Distillation | None = None, amp: bool = False,
          checkpoint: str | Path | None = None, resume: bool = False,
          meta: dict[str, Any] | None = None) -> list[float]:
    """AdamW on cross-entropy (or ``distill``'s loss), rate per step; returns each epoch's mean loss.

    Batches go to the model's device. ``schedule`` (``cosine`` or ``constant``) follows
    ``warmup_epochs`` of linear warm-up. ``amp``: float16 autocast with gradient scaling,
    on CUDA only (ignored on the CPU). ``checkpoint``: a file rewritten after every epoch;
    with ``resume`` an existing one is loaded and its epochs are skipped (its losses are
    returned too), and it must come from the same settings and ``meta`` (plain data the
    caller wants matched, e.g. the recipe), else ``CheckpointError``.
    """
    if schedule not in SCHEDULES:
        raise ArgumentError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if warmup_epochs < 0:
        raise ArgumentError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if epochs <= 0:
        return []
    torch.manual_seed(seed)
    device = model_device(model)
    autocast = amp and device.type == "cuda"
    if amp and not autocast:
        log.info("amp: mixed precision runs on CUDA only; training on the %s in float32", device.type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    # under torchrun: this rank's shard of every batch, and the model wrapped to average gradients over the
    # ranks; the schedule is planned on the steps taken, which are the sharded loader's
    loader, sampler, trained = distributed.data_parallel(model, loader, seed)
    steps = len(loader)
    scheduler = lr_scheduler(optimizer, epochs * steps, warmup_epochs * steps, schedule)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast)
    step = _Step(trained, optimizer, scheduler, scaler, distill, autocast)
    settings = {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "seed": seed, "schedule": schedule,
                "warmup_epochs": warmup_epochs, "steps_per_epoch": steps, "amp": autocast,
                "distill": None if distill is None else [distill.weight, distill.temperature]}
    state = TrainingState(model, optimizer, scheduler, scaler, loader)
    losses: list[float] = []
    if checkpoint is not None and resume:
        losses = state.resume(Path(checkpoint), settings, meta or {})
    was_training = model.training
    model.train()
    try:
        for _ in tqdm(range(len(losses), epochs), desc=desc, disable=not progress, leave=False,
                      initial=len(losses), total=epochs):
            if sampler is not None:
                sampler.set_epoch(len(losses))  # a new shuffle each epoch, the same on every rank
            losses.append(distributed.mean_over_ranks(_epoch(step, loader, device)))
            if checkpoint is not None and distributed.is_main():
                state.save(Path(checkpoint), losses, settings, meta or {})
    finally:
        model.train(was_training)
    return losses


# -- checkpoints -------------------------------------------------------------------------


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
