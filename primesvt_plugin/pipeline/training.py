"""Train and fine-tune spiking classifiers (SpikingJelly conventions).

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

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import distributed
from ..errors import ArgumentError
from ..pruning.spiking import model_device
from .checkpoints import TrainingState
from .distillation import Distillation, distillation_loss, teacher_scores
from .evaluation import logits
from .schedule import SCHEDULES, lr_scheduler

log = logging.getLogger(__name__)


@dataclass
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
