"""The learning-rate schedule of training and fine-tuning: linear warm-up, then constant or cosine to 0, per step."""
from __future__ import annotations

import math

import torch

from ..errors import ArgumentError

SCHEDULES = ("constant", "cosine")


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
