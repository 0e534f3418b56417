"""Knowledge distillation from the unpruned model while fine-tuning (Hinton et al., 2015)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import functional

from ..errors import ArgumentError
from ..pruning.spiking import inference, model_device
from .evaluation import logits


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
