"""Try a pruning plan without changing the model's structure.

Zeroing a channel's output slices (conv/linear rows, BN weight and bias) and its
input slices (the consumers' weight columns) makes the channel contribute
exactly nothing downstream: a zero input never makes a neuron fire, and every
consumer ignores it. For the SViTs we handle this gives the same outputs as
removing the channel (tests check it), at the cost of one tensor copy instead
of a deep copy and a re-trace per trial.
"""
from __future__ import annotations

import torch

from .channels import ChannelOp, restore, zero_channels


class Masks:
    """Channel masks on a model: ``trial`` ones can be undone, ``commit`` makes them stay until ``clear``."""

    def __init__(self):
        self._original: dict[torch.Tensor, torch.Tensor] = {}  # values before any committed mask
        self._trial: dict[torch.Tensor, torch.Tensor] = {}     # values before the current trial

    def trial(self, ops: list[ChannelOp]) -> None:
        for op in ops:
            zero_channels(op, self._trial)

    def undo_trial(self) -> None:
        restore(self._trial)

    def commit(self) -> None:
        for tensor, before in self._trial.items():
            self._original.setdefault(tensor, before)
        self._trial.clear()

    def clear(self) -> None:
        """Restore every masked tensor to its original values."""
        self.undo_trial()
        restore(self._original)
