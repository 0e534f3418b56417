"""Before a recipe runs: every name, argument and file it refers to is checked (``preflight``), then the data
is loaded and the model built and run on one sample (``probe``), so a wrong argument is one line naming the
field, never a traceback half-way through a run. ``primesvt validate`` runs both and stops."""
from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pluggy
import pydantic
import torch
import torch.nn as nn

from ..errors import ArgumentError, DataError, InputError, PluginError, RecipeError, first_line, shorten
from ..plugins import build_model, registries, resolve_builder
from ..pruning.spiking import (class_scores, describe_output, first_tensor, fresh_forward, read_output,
                               to_model_device)
from ..serialization import load_checkpoint
from .datasets import Datasets, as_datasets
from .devices import resolve_device
from .recipe import Recipe


def where(recipe: Recipe) -> str:
    """How errors name the recipe: its file."""
    return str(recipe.source or "recipe")


def recipe_folder(recipe: Recipe) -> Path | None:
    return recipe.source.parent if recipe.source else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_arguments(recipe: Recipe, field: str, fn: Callable, *args, **kwargs) -> None:
    """Refuse arguments ``fn`` cannot take, naming the recipe field."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as error:
        raise RecipeError(f"{where(recipe)}: {field}: {error}") from None


# What a run passes every quantizer itself (QuantizeSection.calibration_size, export.inference_precision)
RUN_QUANTIZE_ARGS = {"subset_size": "quantize.calibration_size", "inference_precision": "export.inference_precision",
                     "pm": "the run's plugin manager"}


def check_quantize_args(recipe: Recipe, quantizer: Callable) -> None:
    """``quantize.args`` checked against the quantizer's signature and its declared ``arguments`` model."""
    q = recipe.quantize
    reserved = sorted(set(q.args) & set(RUN_QUANTIZE_ARGS))
    if reserved:
        raise RecipeError(f"{where(recipe)}: quantize.args.{reserved[0]}: set by the run from "
                          f"{RUN_QUANTIZE_ARGS[reserved[0]]}; remove it from quantize.args")
    _check_arguments(recipe, "quantize.args", quantizer, None, None, None, subset_size=q.calibration_size,
                     inference_precision="f32", pm=None, **q.args)
    arguments = getattr(quantizer, "arguments", None)
    if arguments is not None:
        try:
            arguments.model_validate(q.args)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            raise RecipeError(f"{where(recipe)}: quantize.args.{field}: {first['msg']}") from None


def preflight(recipe: Recipe, pm: pluggy.PluginManager, allow_code: bool = False) -> None:
    """Check every name, argument and file the recipe refers to, before anything runs or is written."""
    registrar = registries(pm)
    checks = [(registrar.datasets, recipe.data.name)]
    if recipe.prune:
        checks.append((registrar.importances, recipe.prune.importance))
    if recipe.quantize:
        checks.append((registrar.quantizers, recipe.quantize.method))
    checks += [(registrar.exporters, fmt) for fmt in (recipe.export.formats if recipe.export else [])]
    try:
        resolve_builder(recipe.model.name, pm, recipe_folder(recipe), trust_code=allow_code)
    except InputError as error:
        raise RecipeError(f"{where(recipe)}: model.name: {error}") from None
    for registry, name in checks:
        if name not in registry:
            raise RecipeError(f"{where(recipe)}: {registry.recipe_field}: unknown {registry.kind} {name!r}; "
                              f"available: {', '.join(registry.names())}")
    _check_arguments(recipe, "data.args", registrar.datasets[recipe.data.name], **data_args(recipe))
    if recipe.quantize:
        check_quantize_args(recipe, registrar.quantizers[recipe.quantize.method])
    if recipe.prune:
        _check_importance_args(recipe, registrar.importances[recipe.prune.importance])
    for field, path in recipe.input_files().items():
        missing = not path.is_file() if field == "model.checkpoint" else not path.exists()
        if missing:
            raise RecipeError(f"{where(recipe)}: {field}: {path} does not exist "
                              "(relative paths start at the recipe's folder)")
    if recipe.finetune and not recipe.prune:
        raise RecipeError(f"{where(recipe)}: finetune: needs a prune section (fine-tuning repairs pruning)")


def _check_importance_args(recipe: Recipe, factory: Callable) -> None:
    """Build the importance once with ``prune.importance_args`` (cheap, no side effects): an argument its
    signature or its constructor refuses is one line naming the field."""
    _check_arguments(recipe, "prune.importance_args", factory, **recipe.prune.importance_args)
    try:
        factory(**recipe.prune.importance_args)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{where(recipe)}: prune.importance_args: importance {recipe.prune.importance!r} refused "
                          f"{recipe.prune.importance_args}: {first_line(error)}") from None


def quantize_args(recipe: Recipe, quantizer: Callable) -> dict[str, Any]:
    """``quantize.args`` as the quantizer receives them: parsed by its ``arguments`` model when it declares one
    (``"64"`` becomes 64), the fields the recipe gives only."""
    arguments = getattr(quantizer, "arguments", None)
    if arguments is None:
        return dict(recipe.quantize.args)
    return arguments.model_validate(recipe.quantize.args).model_dump(exclude_unset=True)


def data_args(recipe: Recipe) -> dict[str, Any]:
    """The dataset loader's keyword arguments: ``data.args`` (paths resolved) and the recipe's ``seed``."""
    files = recipe.input_files()
    args = {key: files.get(f"data.args.{key}", value) for key, value in recipe.data.args.items()}
    args.setdefault("seed", recipe.seed)
    return args


def load_data(recipe: Recipe, pm) -> Datasets:
    """The recipe's dataset, as ``Datasets``; a plugin loader's failure names ``data.args``."""
    loader = registries(pm).datasets[recipe.data.name]
    try:
        data = as_datasets(loader(**data_args(recipe)), f"dataset {recipe.data.name!r}")
        data.workers = recipe.data.workers
        return data
    except InputError:
        raise
    except Exception as error:  # a plugin's loader: say which field to look at
        raise DataError(f"{where(recipe)}: data.args: dataset {recipe.data.name!r} failed with "
                        f"{shorten(repr(dict(recipe.data.args)), 200)}: {first_line(error)}") from None


def check_data_layout(recipe: Recipe, data: Datasets, pm) -> None:
    """Quantizers and most exporters check their results on [N, ...] images; an exporter marked ``time_major``
    (nir) only on time-major event frames [T, N, ...]."""
    formats = recipe.export.formats if recipe.export else []
    wrong = [fmt for fmt in formats if registries(pm).exporters[fmt].time_major != data.time_major]
    frames = f"dataset {recipe.data.name!r} gives time-major event frames [T, N, ...]"
    if data.time_major and recipe.quantize:
        raise RecipeError(f"{where(recipe)}: quantize: {frames}; quantization calibrates and checks on [N, ...] "
                          "images only so far: remove the quantize section")
    if data.time_major and wrong:
        raise RecipeError(f"{where(recipe)}: export.formats: {frames}, and {', '.join(wrong)} export and check "
                          "[N, ...] image models: remove them (nir exports models stepped over event frames)")
    if wrong:
        raise RecipeError(f"{where(recipe)}: export.formats: {', '.join(wrong)} exports models stepped over "
                          f"time-major event frames [T, N, ...] (NIR holds one time step), and dataset "
                          f"{recipe.data.name!r} gives [N, ...] images: remove it (onnx, openvino, torchscript "
                          "export image models) or use event-frame data such as dvs_frames")


@dataclass
class Probe:
    """The recipe's data and model, checked to run together on one sample."""

    data: Datasets
    model: nn.Module
    example: torch.Tensor
    output: str = "one tensor"  # what the model returns, and which tensor the run reads (the report says it)


def probe(recipe: Recipe, pm: pluggy.PluginManager, allow_code: bool = False) -> Probe:
    """Load the data, build the model (and its checkpoint) and run it on one sample; errors name the field."""
    data = load_data(recipe, pm)
    try:
        model = build_model(recipe.model.name, recipe.model.args, pm, recipe_folder(recipe), trust_code=allow_code)
    except PluginError as error:
        raise RecipeError(f"{where(recipe)}: model.args: {error}") from None
    if recipe.model.checkpoint is not None:
        load_checkpoint(model, recipe.input_files()["model.checkpoint"])
    try:
        model.to(resolve_device(recipe.device))  # the example stays on the CPU: who runs it moves it
    except ArgumentError as error:
        raise RecipeError(f"{where(recipe)}: device: {error}") from None
    example = data.example()
    check_data_layout(recipe, data, pm)
    try:
        output = fresh_forward(model, to_model_device(model, example))
    except Exception as error:
        raise RecipeError(f"{where(recipe)}: model.args: {recipe.model.name} does not run on {recipe.data.name} "
                          f"images of shape {tuple(example.shape)}: {first_line(error)}") from None
    described, output = _read_output(recipe, model, output)
    if class_scores(output).shape[-1] < data.num_classes:
        raise RecipeError(f"{where(recipe)}: model.args: {recipe.model.name} gives {class_scores(output).shape[-1]} "
                          f"class scores, but dataset {recipe.data.name!r} has {data.num_classes} classes; build the "
                          f"model with {data.num_classes} outputs (e.g. num_classes: {data.num_classes})")
    return Probe(data, model, example, described)


def _read_output(recipe: Recipe, model: nn.Module, output) -> tuple[str, torch.Tensor]:
    """``(what the model returns, in words; the tensor the run reads)``; with ``model.output`` the model is set
    to answer that element of its tuple from now on (``spiking.read_output``)."""
    index = recipe.model.output
    if index is None:
        tensor = first_tensor(output)
        if not isinstance(tensor, torch.Tensor):
            raise RecipeError(f"{where(recipe)}: model.name: {recipe.model.name} returns a {type(output).__name__} "
                              "holding no tensor; a model must return its class scores (or a tuple holding them)")
        return describe_output(output), tensor
    if not isinstance(output, (tuple, list)) or index >= len(output) or not isinstance(output[index], torch.Tensor):
        what = "one tensor" if isinstance(output, torch.Tensor) else f"a {type(output).__name__} of {len(output)}" \
            if isinstance(output, (tuple, list)) else f"a {type(output).__name__}"
        raise RecipeError(f"{where(recipe)}: model.output: {index} names no tensor of what {recipe.model.name} "
                          f"returns ({what}); remove model.output, or give the index of the class scores")
    read_output(model, index)
    return f"a {type(output).__name__} of {len(output)}: element {index} is read (model.output)", output[index]
