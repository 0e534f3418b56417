"""Scoring a spiking classifier: class scores from a fresh state, top-1 accuracy (sharded under torchrun)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional
from torch.utils.data import DataLoader

from .. import distributed
from ..errors import DataError
from ..pruning.spiking import class_scores, first_tensor, inference, model_device


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


def sharded_accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy over ``loader``'s whole dataset, each rank scoring its shard (``accuracy``).

    Use it as ``prime()``'s ``evaluate`` under torchrun: ``lambda m: sharded_accuracy(m, val_loader)``.
    Every rank must call it (it is a collective), and every rank gets the same number.
    """
    return accuracy(model, loader)


def chance_accuracy(labels: np.ndarray, num_classes: int) -> float:
    """What a model guessing (or always predicting the commonest class) scores on ``labels``."""
    return max(1.0 / num_classes, float(np.bincount(labels).max() / len(labels)))


def artifact_accuracy(artifact, loader: DataLoader) -> float:
    """Top-1 accuracy of a quantized artifact (anything with ``predict(images) -> scores``) over ``loader``."""
    correct = total = 0
    for images, labels in loader:
        correct += int((class_scores(artifact.predict(images.numpy())).argmax(1) == labels.numpy()).sum())
        total += len(labels)
    return correct / total
