"""Build models by name: a registered builder, or ``package.module:function`` when code is allowed.

Recipes and saved models are data: a name in them resolves to a builder some
installed plugin registered. A ``module:function`` name imports and runs code
from wherever Python finds that module, so it needs the caller's explicit
opt-in (``trust_code=True`` in Python, ``--allow-code`` on the command line).
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any, Iterator

import pluggy
import torch.nn as nn

from .errors import PluginError, UntrustedCodeError
from .plugins import get_plugin_manager, merged_registry


@contextlib.contextmanager
def importable_from(folder: Path | None) -> Iterator[None]:
    """Inside: modules in ``folder`` (a recipe's folder) can be imported."""
    if folder is None:
        yield
        return
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))


CODE_OPT_IN = "--allow-code (primesvt run/validate) or trust_code=True (Python)"


def resolve_builder(name: str, pm: pluggy.PluginManager | None = None, search_path: Path | None = None,
                    trust_code: bool = False):
    """The callable a model name refers to (``search_path``: extra folder for 'module:function')."""
    if ":" in name:
        if not trust_code:
            raise UntrustedCodeError(f"model {name!r} is Python code to import and run; allow it with "
                                     f"{CODE_OPT_IN} if you trust its source, or use a registered model name")
        module_name, _, attr = name.partition(":")
        try:
            with importable_from(search_path):
                return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise PluginError(f"cannot import model builder {name!r}: {error}") from None
    builders = merged_registry(pm or get_plugin_manager(), "primesvt_model_builders")
    if name not in builders:
        raise PluginError(f"unknown model {name!r}; available: {', '.join(sorted(builders))}, "
                          "or give 'package.module:function' (with the code opt-in)")
    return builders[name]


def build_model(name: str, args: dict[str, Any] | None = None, pm: pluggy.PluginManager | None = None,
                search_path: Path | None = None, trust_code: bool = False) -> nn.Module:
    """Call the builder ``name`` with ``args``; its result must be an ``nn.Module``."""
    builder = resolve_builder(name, pm, search_path, trust_code)
    try:
        model = builder(**(args or {}))
    except (TypeError, ValueError, AssertionError) as error:
        raise PluginError(f"model {name!r} rejected its arguments {sorted(args or {})}: {error}") from None
    if not isinstance(model, nn.Module):
        raise PluginError(f"model builder {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
