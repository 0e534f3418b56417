"""The plugin manager: loads every ``primesvt`` entry point, builtins included."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from .errors import PluginError
from . import hookspecs

hookimpl = pluggy.HookimplMarker("primesvt")

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
    return pm


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


# Hooks asked about one module at a time (firstresult), as ``primesvt plugins`` lists them.
PER_MODULE_HOOKS = ("primesvt_prune_spiking_layer", "primesvt_attention_layout", "primesvt_export_forward")
# What each named registry is called -> the hook returning its ``{name: factory}``.
REGISTRIES = {
    "models": "primesvt_model_builders",
    "datasets": "primesvt_datasets",
    "importances": "primesvt_importances",
    "quantizers": "primesvt_quantizers",
    "exporters": "primesvt_exporters",
}


@dataclass
class PluginDetails:
    """What one loaded plugin registers, for ``primesvt plugins``."""

    name: str  # entry-point (registration) name
    module: str
    distribution: str  # "project version", or "(registered in code)"
    hooks: list[str]  # every primesvt hook it implements
    layer_types: list[str]  # "module.QualName" of each class from primesvt_spiking_layer_types
    per_module_hooks: list[str]  # which of PER_MODULE_HOOKS it implements
    registries: dict[str, list[str]] = field(default_factory=dict)  # REGISTRIES key -> names it registers


def plugin_details(pm: pluggy.PluginManager) -> list[PluginDetails]:
    """One ``PluginDetails`` per plugin loaded in ``pm``, in ``plugin_table`` order."""
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
            registries={what: sorted(impls[hook].function() or {}) for what, hook in REGISTRIES.items()
                        if hook in impls},
        ))
    return rows


def merged_registry(pm: pluggy.PluginManager, hook_name: str) -> dict[str, Callable[..., Any]]:
    """Merge the ``{name: factory}`` dicts every plugin returns for ``hook_name``."""
    merged: dict[str, Callable[..., Any]] = {}
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):  # registration order
        for name, factory in (impl.function() or {}).items():
            if name in merged:
                raise PluginError(
                    f"{hook_name}: name {name!r} is registered twice (again by plugin "
                    f"{impl.plugin_name!r}); rename one of them"
                )
            merged[name] = factory
    return merged


def lookup(pm: pluggy.PluginManager, hook_name: str, name: str, what: str) -> Callable[..., Any]:
    """The factory called ``name`` in ``hook_name``'s registry, or a clear error listing choices."""
    registry = merged_registry(pm, hook_name)
    if name not in registry:
        raise PluginError(f"unknown {what} {name!r}; available: {', '.join(sorted(registry)) or 'none'}")
    return registry[name]
