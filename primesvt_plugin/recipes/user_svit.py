"""A user-defined spiking ViT (not one SpikingJelly ships), built from SpikingJelly parts.

Recipes name it ``user_svit:build``; the recipe's folder is importable while the
recipe runs.
"""
import torch
import torch.nn as nn
from spikingjelly.activation_based import layer, neuron
from spikingjelly.activation_based.layer.attention import SpikingSelfAttention


class UserSViT(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, dim: int = 32, heads: int = 4, T: int = 2):
        super().__init__()
        self.T = T
        self.stem = nn.Sequential(
            layer.Conv2d(in_channels, dim, 3, padding=1, step_mode="m"),
            layer.BatchNorm2d(dim, step_mode="m"),
            neuron.LIFNode(step_mode="m", detach_reset=True),
            layer.MaxPool2d(4, step_mode="m"),
        )
        self.attn = SpikingSelfAttention(dim, heads)
        self.mlp = nn.Sequential(
            layer.Conv1d(dim, 2 * dim, 1, step_mode="m"),
            layer.BatchNorm1d(2 * dim, step_mode="m"),
            neuron.IFNode(step_mode="m"),
            layer.Conv1d(2 * dim, dim, 1, step_mode="m"),
            layer.BatchNorm1d(dim, step_mode="m"),
            neuron.LIFNode(step_mode="m"),
        )
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)   # [T, N, C, H, W]
        x = self.stem(x).flatten(3)                      # [T, N, D, L]
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean(3)).mean(0)               # [N, classes]


def build(**args) -> nn.Module:
    return UserSViT(**args)
