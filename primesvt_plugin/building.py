"""Build models by name: a registered builder, or ``package.module:function``."""
from __future__ import annotations

import importlib
from typing import Any

import pluggy
import torch.nn as nn

from .plugins import PluginError, get_plugin_manager, merged_registry


def resolve_builder(name: str, pm: pluggy.PluginManager | None = None):
    """The callable a model name refers to."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise PluginError(f"cannot import model builder {name!r}: {error}") from None
    builders = merged_registry(pm or get_plugin_manager(), "primesvt_model_builders")
    if name not in builders:
        raise PluginError(f"unknown model {name!r}; available: {', '.join(sorted(builders))}, "
                          "or give 'package.module:function'")
    return builders[name]


def build_model(name: str, args: dict[str, Any] | None = None, pm: pluggy.PluginManager | None = None) -> nn.Module:
    """Call the builder ``name`` with ``args``; its result must be an ``nn.Module``."""
    try:
        model = resolve_builder(name, pm)(**(args or {}))
    except TypeError as error:
        raise PluginError(f"model {name!r} rejected its arguments {sorted(args or {})}: {error}") from None
    if not isinstance(model, nn.Module):
        raise PluginError(f"model builder {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
