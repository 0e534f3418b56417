"""Named importance criteria: Torch-Pruning's and PrimeSVT's memory-aware one."""
from __future__ import annotations

import torch_pruning as tp

from ..importance import MemoryAwareImportance
from ..plugins import hookimpl


@hookimpl
def primesvt_importances():
    return {
        "l2": lambda **kw: tp.importance.GroupMagnitudeImportance(p=2, **kw),
        "l1": lambda **kw: tp.importance.GroupMagnitudeImportance(p=1, **kw),
        "taylor": lambda **kw: tp.importance.GroupTaylorImportance(**kw),
        "random": lambda **kw: tp.importance.RandomImportance(),
        "memory": lambda **kw: MemoryAwareImportance(**kw),
    }
