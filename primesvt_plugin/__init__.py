"""PrimeSVT for Torch-Pruning, SpikingJelly and NNCF: memory-aware structured pruning of SViTs."""
from .attention import AttentionLayout
from .graph import PruningGroup, SpikingGraph, UnhandledLayerError
from .importance import MemoryAwareImportance
from .memory import Footprint, footprint
from .plugins import get_plugin_manager, hookimpl
from .pruner import PruningFailed, SpikingPruner, spiking_pruner_kwargs

__all__ = [
    "AttentionLayout", "Footprint", "MemoryAwareImportance", "PruningFailed", "PruningGroup",
    "SpikingGraph", "SpikingPruner", "UnhandledLayerError", "footprint", "get_plugin_manager",
    "hookimpl", "spiking_pruner_kwargs",
]
__version__ = "0.1.0"
