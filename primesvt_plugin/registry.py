"""The registries plugins fill, and the protocol each kind of named factory follows.

One ``Registry`` per kind of factory (NNCF's ``Registry`` habit): ``add``, ``names``,
``[name]``. A factory is checked against its kind's protocol when it is added, so a
wrong plugin fails with one line naming it and what its factory lacks, before any
recipe runs. The protocols, with the exact calls the pipeline makes:

``ModelBuilder``
    ``builder(**model.args) -> nn.Module``.
``DatasetLoader``
    ``loader(*, seed, **data.args) -> Datasets | DataSplits`` (``seed``: the recipe's,
    for random splits).
``ImportanceFactory``
    ``factory(**prune.importance_args) -> torch_pruning.importance.Importance``.
``Quantizer``
    ``quantize(model, example_input, calibration, *, subset_size, inference_precision, pm,
    **quantize.args) -> artifact``; declares ``deployment`` (a ``targets.Deployment``: the
    bytes its files take, what flash budgets are searched at), ``precisions`` (the weight
    precisions it can write, e.g. ``("int8", "int4")``) and may declare ``arguments``, a
    pydantic model of its ``quantize.args``, checked before anything runs.
``Exporter``
    ``export(model, example_input, path, *, verification, calibration, pm) -> list[Path]``;
    declares ``time_major`` (True: it exports models stepped over event frames
    ``[T, N, ...]`` and gets them as its example).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

from .errors import PluginError
from .targets import Deployment


@runtime_checkable
class ModelBuilder(Protocol):
    def __call__(self, **args): ...


@runtime_checkable
class DatasetLoader(Protocol):
    def __call__(self, *, seed: int, **args): ...


@runtime_checkable
class ImportanceFactory(Protocol):
    def __call__(self, **importance_args): ...


@runtime_checkable
class Quantizer(Protocol):
    deployment: Deployment
    precisions: tuple[str, ...]

    def __call__(self, model, example_input, calibration, *, subset_size: int, inference_precision: str, pm,
                 **args): ...


@runtime_checkable
class Exporter(Protocol):
    time_major: bool

    def __call__(self, model, example_input, path, *, verification, calibration, pm) -> list: ...


# kind -> (registry attribute, recipe field, keywords the pipeline passes, attributes: type)
KINDS = {
    "models": ("model", "model.name", (), {}),
    "datasets": ("dataset", "data.name", ("seed",), {}),
    "importances": ("importance", "prune.importance", (), {}),
    "quantizers": ("quantizer", "quantize.method", ("subset_size", "inference_precision", "pm"),
                   {"deployment": Deployment, "precisions": tuple}),
    "exporters": ("exporter", "export.formats", ("verification", "calibration", "pm"), {"time_major": bool}),
}


def missing_keywords(factory: Callable, keywords: tuple[str, ...]) -> list[str]:
    """The ``keywords`` ``factory`` cannot be called with (none when it takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return []  # a builtin without a signature: called as it is
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return []
    return [k for k in keywords if k not in parameters or parameters[k].kind is inspect.Parameter.POSITIONAL_ONLY]


class Registry:
    """Named factories of one kind: ``add``, ``names``, ``[name]``; each name remembers its plugin."""

    def __init__(self, attribute: str, owner: Callable[[], str] = lambda: "(registered in code)"):
        self.kind, self.recipe_field, self.keywords, self.attributes = KINDS[attribute]
        self._factories: dict[str, Callable[..., Any]] = {}
        self._owners: dict[str, str] = {}
        self._owner = owner

    def add(self, name: str, factory: Callable[..., Any]) -> None:
        """Register ``factory`` under ``name`` (what recipes put in ``recipe_field``), checked against the
        kind's protocol (see the module docstring)."""
        plugin = self._owner()
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r}: a {self.kind} name must be a non-empty string, got {name!r}")
        what = f"plugin {plugin!r}: {self.kind} {name!r}"
        if not callable(factory):
            raise PluginError(f"{what} is not callable ({type(factory).__name__})")
        missing = missing_keywords(factory, self.keywords)
        if missing:
            raise PluginError(f"{what} cannot be called with the keyword argument(s) {', '.join(missing)} the "
                              f"pipeline passes; its signature must accept {', '.join(self.keywords)} (or **kwargs)")
        for attribute, kind in self.attributes.items():
            if not isinstance(getattr(factory, attribute, None), kind):
                raise PluginError(f"{what} declares no {attribute} ({kind.__name__}); set "
                                  f"{factory.__name__ if hasattr(factory, '__name__') else 'it'}.{attribute}")
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


class Registrar:
    """What ``primesvt_register(registrar)`` fills: one ``Registry`` per kind of factory
    (``models``, ``datasets``, ``importances``, ``quantizers``, ``exporters``)."""

    models: Registry
    datasets: Registry
    importances: Registry
    quantizers: Registry
    exporters: Registry

    def __init__(self):
        self._adding = "(registered in code)"
        for attribute in KINDS:
            setattr(self, attribute, Registry(attribute, lambda: self._adding))

    def all(self) -> dict[str, Registry]:
        """``{"models": Registry, ...}`` in a fixed order."""
        return {attribute: getattr(self, attribute) for attribute in KINDS}

    @contextlib.contextmanager
    def adding_for(self, plugin_name: str) -> Iterator[None]:
        """Inside: names added are owned by ``plugin_name`` (the plugin manager calls each plugin's
        ``primesvt_register`` inside, so a clash or a wrong factory names the plugin)."""
        self._adding = plugin_name
        try:
            yield
        finally:
            self._adding = "(registered in code)"
