"""The plugin manager, the registries plugins fill, and building models by name.

Every ``primesvt`` entry point is loaded, builtins included; see ``hookspecs.py``
for the contract. Models are built from a registered name, or from
``package.module:function`` when running code is allowed: recipes and saved
models are data, and a ``module:function`` name imports and runs code from
wherever Python finds that module, so it needs the caller's explicit opt-in
(``trust_code=True`` in Python, ``--allow-code`` on the command line).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pluggy
import torch.nn as nn

from . import hookspecs
from .errors import PluginError, UntrustedCodeError
from .hookspecs import hookimpl

ENTRY_POINT_GROUP = "primesvt"
BUILTIN_PREFIX = "primesvt_plugin.builtins."


def new_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager with the hook specs and (by default) all installed plugins."""
    pm = pluggy.PluginManager("primesvt")
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        if not any(name.startswith(BUILTIN_PREFIX) for name in _module_names(pm)):
            raise PluginError(
                "primesvt-plugin's builtin plugins were not found in the 'primesvt' entry-point "
                "group; install the package (pip install -e .) instead of running it from a "
                "source tree"
            )
        check_hooks(pm)
    return pm


def check_hooks(pm: pluggy.PluginManager) -> None:
    """Refuse a plugin implementing a ``primesvt_*`` hook that has no specification (a misspelling)."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as error:
        known = ", ".join(sorted(name for name in dir(pm.hook) if name.startswith("primesvt_")))
        raise PluginError(f"plugin {pm.get_name(error.plugin)!r}: {error}; the hooks are: {known}") from None


@functools.lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager (created once; pass your own to the APIs to isolate)."""
    return new_plugin_manager()


def _module_names(pm: pluggy.PluginManager) -> list[str]:
    return [getattr(p, "__name__", "") for p in pm.get_plugins()]


def plugin_table(pm: pluggy.PluginManager) -> list[tuple[str, str, str]]:
    """(entry-point name, module, distribution) for each loaded plugin."""
    dists = {id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()}
    return [(name, getattr(plugin, "__name__", repr(plugin)), dists.get(id(plugin), "(registered in code)"))
            for name, plugin in pm.list_name_plugin()]


# -- registries -----------------------------------------------------------------


class Registry:
    """Named factories of one kind (NNCF's ``Registry`` habit): ``add``, ``names``, ``[name]``.

    Each name remembers the plugin that added it, so a clash names both plugins.
    """

    def __init__(self, kind: str, recipe_field: str, adding_plugin: Callable[[], str] = lambda: "(registered in code)"):
        self.kind, self.recipe_field = kind, recipe_field
        self._factories: dict[str, Callable[..., Any]] = {}
        self._owners: dict[str, str] = {}
        self._adding_plugin = adding_plugin

    def add(self, name: str, factory: Callable[..., Any]) -> None:
        """Register ``factory`` under ``name`` (what recipes put in ``recipe_field``)."""
        plugin = self._adding_plugin()
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r}: a {self.kind} name must be a non-empty string, got {name!r}")
        if not callable(factory):
            raise PluginError(f"plugin {plugin!r}: {self.kind} {name!r} is not callable ({type(factory).__name__})")
        if name in self._factories:
            both = " and ".join(repr(p) for p in sorted({self._owners[name], plugin}))
            raise PluginError(f"{self.kind} {name!r} is registered twice, by plugins {both}; rename one of them")
        self._factories[name] = factory
        self._owners[name] = plugin

    def names(self, plugin: str | None = None) -> list[str]:
        """Sorted names, all or those ``plugin`` registered."""
        return sorted(n for n, owner in self._owners.items() if plugin is None or owner == plugin)

    def owner(self, name: str) -> str:
        """The plugin that registered ``name``."""
        return self._owners[name]

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __getitem__(self, name: str) -> Callable[..., Any]:
        if name not in self._factories:
            raise PluginError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names()) or 'none'}")
        return self._factories[name]


KINDS = {"models": ("model", "model.name"), "datasets": ("dataset", "data.name"),
         "importances": ("importance", "prune.importance"), "quantizers": ("quantizer", "quantize.method"),
         "exporters": ("exporter", "export.formats")}


class Registrar:
    """What ``primesvt_register(registrar)`` fills: one ``Registry`` per kind of factory
    (``models``, ``datasets``, ``importances``, ``quantizers``, ``exporters``)."""

    models: Registry
    datasets: Registry
    importances: Registry
    quantizers: Registry
    exporters: Registry

    def __init__(self, impls: list[pluggy.HookImpl] = ()):
        # pluggy calls each implementation itself; the registries find out which plugin is
        # adding by the implementation's code on the call stack (so a clash names both plugins).
        self._owner_by_code = {impl.function.__code__: impl.plugin_name for impl in impls
                               if hasattr(impl.function, "__code__")}
        self._forced_owner: str | None = None
        for attribute, (kind, recipe_field) in KINDS.items():
            setattr(self, attribute, Registry(kind, recipe_field, self._adding_plugin))

    def all(self) -> dict[str, Registry]:
        """``{"models": Registry, ...}`` in a fixed order."""
        return {attribute: getattr(self, attribute) for attribute in KINDS}

    def _adding_plugin(self) -> str:
        if self._forced_owner is not None:
            return self._forced_owner
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code in self._owner_by_code:
                return self._owner_by_code[frame.f_code]
            frame = frame.f_back
        return "(registered in code)"

    @contextlib.contextmanager
    def adding_for(self, plugin_name: str) -> Iterator[None]:
        """Inside: names added are owned by ``plugin_name``."""
        self._forced_owner = plugin_name
        try:
            yield
        finally:
            self._forced_owner = None


# The 0.1 hooks returning {name: factory}, adapted into the same registries.
DEPRECATED_HOOKS = {"models": "primesvt_model_builders", "datasets": "primesvt_datasets",
                    "importances": "primesvt_importances", "quantizers": "primesvt_quantizers",
                    "exporters": "primesvt_exporters"}


def registries(pm: pluggy.PluginManager) -> Registrar:
    """Every plugin's named factories, collected through ``primesvt_register``.

    Built afresh on each call, so plugins registered on ``pm`` later are included.
    """
    registrar = Registrar(pm.hook.primesvt_register.get_hookimpls())
    pm.hook.primesvt_register(registrar=registrar)
    for attribute, hook_name in DEPRECATED_HOOKS.items():
        for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):  # registration order
            with registrar.adding_for(impl.plugin_name):
                for name, factory in (impl.function() or {}).items():
                    getattr(registrar, attribute).add(name, factory)
    return registrar


# -- plugin details (``primesvt plugins``) -----------------------------------------

# Hooks asked about one module at a time (firstresult), as ``primesvt plugins`` lists them.
PER_MODULE_HOOKS = ("primesvt_prune_spiking_layer", "primesvt_attention_layout", "primesvt_export_forward")


@dataclass
class PluginDetails:
    """What one loaded plugin registers, for ``primesvt plugins``."""

    name: str  # entry-point (registration) name
    module: str
    distribution: str  # "project version", or "(registered in code)"
    hooks: list[str]  # every primesvt hook it implements
    layer_types: list[str]  # "module.QualName" of each class from primesvt_spiking_layer_types
    per_module_hooks: list[str]  # which of PER_MODULE_HOOKS it implements
    registries: dict[str, list[str]] = field(default_factory=dict)  # "models", ... -> names it registers


def plugin_details(pm: pluggy.PluginManager) -> list[PluginDetails]:
    """One ``PluginDetails`` per plugin loaded in ``pm``, in ``plugin_table`` order."""
    registrar = registries(pm)
    rows = []
    for name, module, dist in plugin_table(pm):
        plugin = pm.get_plugin(name)
        if plugin is None:  # a blocked name
            continue
        impls = {caller.name: impl for caller in pm.get_hookcallers(plugin) or []
                 for impl in caller.get_hookimpls() if impl.plugin is plugin}
        types_impl = impls.get("primesvt_spiking_layer_types")
        types = (types_impl.function() or []) if types_impl else []
        rows.append(PluginDetails(
            name=name, module=module, distribution=dist, hooks=sorted(impls),
            layer_types=[f"{t.__module__}.{t.__qualname__}" for t in types],
            per_module_hooks=[hook for hook in PER_MODULE_HOOKS if hook in impls],
            registries={what: names for what, registry in registrar.all().items() if (names := registry.names(name))},
        ))
    return rows


# -- building models by name -------------------------------------------------------


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
    models = registries(pm or get_plugin_manager()).models
    if name not in models:
        raise PluginError(f"unknown model {name!r}; available: {', '.join(models.names())}, "
                          "or give 'package.module:function' (with the code opt-in)")
    return models[name]


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
