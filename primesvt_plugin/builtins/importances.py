"""Named importance criteria: Torch-Pruning's and PrimeSVT's memory-aware one."""
from __future__ import annotations

import torch_pruning as tp

from ..plugins import hookimpl
from ..pruning.importance import MemoryAwareImportance


@hookimpl
def primesvt_register(registrar):
    registrar.importances.add("l2", lambda **kw: tp.importance.GroupMagnitudeImportance(p=2, **kw))
    registrar.importances.add("l1", lambda **kw: tp.importance.GroupMagnitudeImportance(p=1, **kw))
    registrar.importances.add("taylor", lambda **kw: tp.importance.GroupTaylorImportance(**kw))
    registrar.importances.add("random", lambda **kw: tp.importance.RandomImportance())
    registrar.importances.add("memory", lambda **kw: MemoryAwareImportance(**kw))
