"""PrimeSVT for Torch-Pruning, SpikingJelly and NNCF: memory-aware structured pruning of SViTs."""
from .attention import AttentionLayout
from .graph import PruningGroup, SpikingGraph, UnhandledLayerError
from .importance import MemoryAwareImportance
from .memory import Footprint, footprint
from .plugins import get_plugin_manager, hookimpl
from .policy import PrimeResult, prime
from .pruner import PruningFailed, SpikingPruner, spiking_pruner_kwargs, verified_step
from .quantized import load_quantized
from .serialization import load_pruned, save_pruned

__all__ = [
    "AttentionLayout", "Footprint", "MemoryAwareImportance", "PrimeResult", "PruningFailed", "PruningGroup",
    "SpikingGraph", "SpikingPruner", "UnhandledLayerError", "footprint", "get_plugin_manager",
    "hookimpl", "load_pruned", "load_quantized", "prime", "save_pruned", "spiking_pruner_kwargs", "verified_step",
]
__version__ = "0.1.0"
