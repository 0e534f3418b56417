"""Named importance criteria: Torch-Pruning's and PrimeSVT's memory-aware one."""
from __future__ import annotations

import functools

import torch_pruning as tp

from ..plugins import hookimpl
from ..pruning.importance import MemoryAwareImportance


@hookimpl
def primesvt_register(registrar):
    # the classes themselves (with p fixed for l1/l2): their signatures are what prune.importance_args is
    # checked against before a run
    registrar.importances.add("l2", functools.partial(tp.importance.GroupMagnitudeImportance, p=2))
    registrar.importances.add("l1", functools.partial(tp.importance.GroupMagnitudeImportance, p=1))
    registrar.importances.add("taylor", tp.importance.GroupTaylorImportance)
    registrar.importances.add("random", tp.importance.RandomImportance)
    registrar.importances.add("memory", MemoryAwareImportance)
