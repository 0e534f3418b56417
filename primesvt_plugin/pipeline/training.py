"""Train, fine-tune and evaluate spiking classifiers (SpikingJelly conventions)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import functional
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import DataError
from ..pruning.spiking import class_scores, inference




def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class scores of ``model`` for a batch, from a fresh state."""
    functional.reset_net(model)
    out = model(x)
    functional.reset_net(model)
    return class_scores(out)


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in [0, 1]; the model's train/eval mode is restored afterwards."""
    correct = total = 0
    with inference(model):
        for x, y in loader:
            correct += int((logits(model, x).argmax(1) == y).sum())
            total += len(y)
    if total == 0:
        raise DataError("cannot measure accuracy on an empty dataset: the split has no samples")
    return correct / total


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float = 1e-3, weight_decay: float = 0.0,
          seed: int = 0, progress: bool = True, desc: str = "train") -> list[float]:
    """AdamW with cosine decay and cross-entropy; returns the mean loss of each epoch."""
    if epochs <= 0:
        return []
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    was_training = model.training
    model.train()
    losses = []
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        total, batches = 0.0, 0
        for x, y in loader:
            loss = F.cross_entropy(logits(model, x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, batches = total + loss.item(), batches + 1
        losses.append(total / max(batches, 1))
    model.train(was_training)
    return losses
