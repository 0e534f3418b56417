"""PrimeSVT for Torch-Pruning, SpikingJelly and NNCF: memory-aware structured pruning of SViTs.

Everything a user script or a plugin needs is importable from here; the
subpackages (``pruning``, ``deploy``, ``pipeline``) are the implementation.
"""
from .deploy.export import Verification, exportable, to_onnx, to_openvino, to_openvino_model
from .deploy.nir import to_nir
from .deploy.quantization import OpenVINOArtifact, load_quantized, nncf_int4, nncf_int8, onnx_int8, quantize_int8
from .errors import (CheckpointError, DataError, ExportError, InputError, PluginError, PrimeSVTError, PruningFailed,
                     RecipeError, RunFailed, UnhandledLayerError)
from .hookspecs import hookimpl
from .pipeline.datasets import DataSplits, Datasets
from .pipeline.readers import digits_splits
from .pipeline.evaluation import sharded_accuracy
from .plugins import build_model, get_plugin_manager, new_plugin_manager, registries
from .registry import Registrar, Registry
from .pruning.attention import AttentionLayout
from .pruning.graph import PruningGroup, SpikingGraph
from .pruning.importance import MemoryAwareImportance
from .pruning.memory import Footprint, footprint
from .targets import Deployment, FP32, INT4, INT8
from .pruning.policy import PrimeReport, PrimeResult, prime
from .pruning.pruner import SpikingPruner, spiking_pruner_kwargs, verified_step
from .serialization import load_checkpoint, load_pruned, save_pruned

__all__ = [
    # pruning
    "AttentionLayout", "Deployment", "FP32", "Footprint", "INT4", "INT8", "MemoryAwareImportance", "PrimeReport", "PrimeResult", "PruningGroup",
    "SpikingGraph", "SpikingPruner", "footprint", "prime", "spiking_pruner_kwargs", "verified_step",
    # saving and loading
    "load_checkpoint", "load_pruned", "load_quantized", "save_pruned",
    # torchrun
    "sharded_accuracy",
    # plugins
    "DataSplits", "Datasets", "OpenVINOArtifact", "Registrar", "Registry", "Verification", "build_model", "digits_splits",
    "exportable", "get_plugin_manager", "hookimpl", "new_plugin_manager", "nncf_int4", "nncf_int8", "onnx_int8", "quantize_int8",
    "registries", "to_nir", "to_onnx", "to_openvino", "to_openvino_model",
    # errors
    "CheckpointError", "DataError", "ExportError", "InputError", "PluginError", "PrimeSVTError", "PruningFailed",
    "RecipeError", "RunFailed", "UnhandledLayerError",
]
__version__ = "0.3.0"
