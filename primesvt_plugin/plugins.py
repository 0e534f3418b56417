"""The plugin manager, the registries it fills, and building models by name.

Our builtins are listed here by module name (``DEFAULT_PLUGINS``, as pytest's
``default_plugins``) and registered through the same calls as any plugin; third parties
come through the ``primesvt`` entry-point group. Every registration is checked against
the contract (``hookspecs.py``): a ``primesvt_*`` function with no specification is refused
with a "did you mean", one without ``@hookimpl`` warns, a removed 0.1 hook names its
replacement. What the hooks return is checked where it is used, naming the plugin.

Models are built from a registered name, or from ``package.module:function`` when
running code is allowed: recipes and saved models are data, and a ``module:function``
name imports and runs code from wherever Python finds that module, so it needs the
caller's explicit opt-in (``trust_code=True`` in Python, ``--allow-code`` on the command line).
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pluggy
import torch.nn as nn

from . import hookspecs
from .errors import PluginError, UntrustedCodeError, first_line, shorten
from .hookspecs import hookimpl  # noqa: F401  (plugins import the marker from here)
from .registry import Registrar

ENTRY_POINT_GROUP = "primesvt"
# Our own plugins, registered by module name under these names before any entry point is loaded.
DEFAULT_PLUGINS = {name: f"primesvt_plugin.builtins.{name}" for name in
                   ("neurons", "attention", "importances", "models", "datasets", "quantizers", "exporters")}
# The 0.1 hooks returning {name: factory}, removed in 0.3: what replaces each (docs/plugins.md, migration).
REMOVED_HOOKS = {f"primesvt_{kind}": f"primesvt_register(registrar): registrar.{attribute}.add(name, factory)"
                 for kind, attribute in (("model_builders", "models"), ("datasets", "datasets"),
                                         ("importances", "importances"), ("quantizers", "quantizers"),
                                         ("exporters", "exporters"))}
HOOK_PREFIX = "primesvt_"


class PrimeSVTPluginManager(pluggy.PluginManager):
    """pluggy's manager, checking every plugin as it is registered (entry point or ``pm.register``)."""

    def register(self, plugin: object, name: str | None = None) -> str | None:
        check_plugin(plugin, name or self.get_canonical_name(plugin), self)
        return super().register(plugin, name)


def check_plugin(plugin: object, name: str, pm: pluggy.PluginManager) -> None:
    """Refuse a ``primesvt_*`` hook that no specification names (a misspelling, or a removed 0.1 hook) with one
    line naming the plugin; warn about a ``primesvt_*`` function that lacks ``@hookimpl``."""
    hooks = [h for h in dir(pm.hook) if h.startswith(HOOK_PREFIX) and getattr(pm.hook, h).spec is not None]
    for attribute in dir(plugin):
        if not attribute.startswith(HOOK_PREFIX):
            continue
        marked = pm.parse_hookimpl_opts(plugin, attribute) is not None
        if attribute in REMOVED_HOOKS:
            raise PluginError(f"plugin {name!r}: hook {attribute} was removed in primesvt-plugin 0.3; implement "
                              f"{REMOVED_HOOKS[attribute]} instead (docs/plugins.md)")
        if attribute not in hooks:
            if not marked and not callable(getattr(plugin, attribute, None)):
                continue
            close = difflib.get_close_matches(attribute, hooks, n=1)
            raise PluginError(f"plugin {name!r}: {attribute} is no primesvt hook"
                              + (f"; did you mean {close[0]}?" if close else "")
                              + f" (the hooks: {', '.join(sorted(hooks))})")
        if not marked and callable(getattr(plugin, attribute, None)):
            warnings.warn(f"plugin {name!r}: {attribute} is not decorated with @primesvt_plugin.hookimpl and is "
                          "never called", UserWarning, stacklevel=3)


def new_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager with the hook specs, our builtins and (by default) every installed plugin."""
    pm = PrimeSVTPluginManager("primesvt")
    pm.add_hookspecs(hookspecs)
    for name, module in DEFAULT_PLUGINS.items():
        pm.register(importlib.import_module(module), name=name)
    if load_entry_points:
        _load_entry_points(pm)
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Every ``primesvt`` entry point; one that fails to import is refused naming it and its distribution."""
    from importlib import metadata

    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(entry_point.name) is not None or pm.is_blocked(entry_point.name):
            continue  # a builtin of the same name, or blocked
        try:
            plugin = entry_point.load()
        except Exception as error:
            distribution = getattr(entry_point.dist, "name", "an installed distribution")
            raise PluginError(f"plugin {entry_point.name!r} ({entry_point.value}, from {distribution}) fails to "
                              f"import: {type(error).__name__}: {first_line(error)}; fix or uninstall it") from None
        pm.register(plugin, name=entry_point.name)
        pm._plugin_distinfo.append((plugin, entry_point.dist))  # what pluggy's own loader records


@functools.lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager (created once; pass your own to the APIs to isolate)."""
    return new_plugin_manager()


def plugin_table(pm: pluggy.PluginManager) -> list[tuple[str, str, str]]:
    """(registration name, module, distribution) for each loaded plugin."""
    dists = {id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()}
    builtins = set(DEFAULT_PLUGINS.values())
    return [(name, module, dists.get(id(plugin), "primesvt-plugin (builtin)" if module in builtins else
                                      "(registered in code)"))
            for name, plugin in pm.list_name_plugin() for module in [getattr(plugin, "__name__", repr(plugin))]]


# -- registries -----------------------------------------------------------------

_REGISTRARS: "weakref.WeakKeyDictionary[pluggy.PluginManager, tuple[tuple, Registrar]]" = weakref.WeakKeyDictionary()


def registries(pm: pluggy.PluginManager) -> Registrar:
    """Every plugin's named factories, collected through ``primesvt_register``: built once per plugin manager
    (again only when a plugin was registered or removed since)."""
    # the plugins themselves, compared by identity: an id() is reused once an unregistered plugin is freed
    plugins = tuple(pm.list_name_plugin())
    cached = _REGISTRARS.get(pm)
    if cached is not None and len(cached[0]) == len(plugins) and all(
            name == old_name and plugin is old for (name, plugin), (old_name, old) in zip(plugins, cached[0])):
        return cached[1]
    registrar = Registrar()
    for impl in reversed(pm.hook.primesvt_register.get_hookimpls()):  # the order pluggy calls them in
        with registrar.adding_for(impl.plugin_name):
            returned = impl.function(registrar=registrar)
        if returned is not None:
            raise PluginError(f"plugin {impl.plugin_name!r}: primesvt_register returned a {type(returned).__name__}; "
                              "it adds its factories with registrar.<kind>.add(name, factory) and returns nothing")
    _REGISTRARS[pm] = (plugins, registrar)
    return registrar


def spiking_layer_types(pm: pluggy.PluginManager) -> tuple[type, ...]:
    """Every plugin's ``primesvt_spiking_layer_types``, each checked to be a list of classes."""
    found: list[type] = []
    for impl in pm.hook.primesvt_spiking_layer_types.get_hookimpls():
        types = impl.function()
        if not isinstance(types, (list, tuple)) or not all(isinstance(t, type) for t in types):
            shown = shorten(" ".join(repr(types).split()), 200)  # one line: a module's repr spans several
            raise PluginError(f"plugin {impl.plugin_name!r}: primesvt_spiking_layer_types returned {shown}; it "
                              "returns a list of classes (e.g. [MyNeuron])")
        found += types
    return tuple(found)


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
    spiking_layer_types(pm)  # a wrong answer is one line naming the plugin, not a crash while listing
    rows = []
    for name, module, dist in plugin_table(pm):
        plugin = pm.get_plugin(name)
        if plugin is None:  # a blocked name
            continue
        impls = {caller.name: impl for caller in pm.get_hookcallers(plugin) or []
                 for impl in caller.get_hookimpls() if impl.plugin is plugin}
        types_impl = impls.get("primesvt_spiking_layer_types")
        types = (types_impl.function() or []) if types_impl else []  # checked: spiking_layer_types(pm) ran above
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
