"""Run a recipe: train -> PrimeSVT prune (+ fine-tune) -> NNCF INT8 -> export, all at once or nothing.

Everything a recipe names (model, data, importance, quantizer, exporters, files)
is checked by ``preflight`` before anything runs; ``probe`` then builds the
model and runs it on one sample of the data, so a wrong argument is one line
naming the field, never a traceback half-way through a run.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import io
import json
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pluggy
import torch
import torch.distributed as dist
import torch.nn as nn

from .. import distributed
from ..deploy.export import Verification, cpu_description
from ..deploy.latency import model_latency_ms
from ..errors import ArgumentError, DataError, InputError, PluginError, RecipeError, first_line, shorten
from ..plugins import build_model, get_plugin_manager, registries, resolve_builder
from ..pruning.energy import estimate_energy
from ..pruning.memory import FP32, INT8, Deployment, flash_bytes, footprint
from ..pruning.policy import prime
from ..pruning.pruner import SpikingPruner
from ..pruning.spiking import (class_scores, describe_output, first_tensor, fresh_forward, model_device, read_output,
                               to_model_device)
from ..serialization import load_checkpoint, save_pruned
from .data import Datasets, as_datasets
from .output import RUN_FORMAT, resume_folder, staged_output
from .recipe import Recipe
from .report import plot_sensitivity, plot_spike_rates, write_markdown
from .training import Distillation, accuracy, check_resumable, frozen_copy, resolve_device, train

log = logging.getLogger(__name__)

ENERGY_SAMPLES = 16  # validation images the energy per image is measured on
CALIBRATION_SIZE = 300  # INT8 calibration images when the recipe has no quantize section
FLASH_HEADROOM = 0.005  # of the unpruned weight file, kept free when a flash budget is the target

# Optional keyword arguments a plugin's function receives when its signature accepts them.
EXPORT_OPTIONS = ("verification", "calibration")
QUANTIZE_OPTIONS = ("inference_precision",)


def accepted(fn: Callable, options: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that ``fn`` accepts as keyword arguments (all, for ``**kwargs``)."""
    parameters = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in parameters}


def _check_arguments(where: str, field: str, fn: Callable, *args, **kwargs) -> None:
    """Refuse arguments ``fn`` cannot take, naming the recipe field."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as error:
        raise RecipeError(f"{where}: {field}: {error}") from None


def preflight(recipe: Recipe, pm: pluggy.PluginManager, allow_code: bool = False) -> None:
    """Check every name, argument and file the recipe refers to, before anything runs or is written."""
    where = recipe.source or "recipe"
    registrar = registries(pm)
    checks = [(registrar.datasets, recipe.data.name)]
    if recipe.prune:
        checks.append((registrar.importances, recipe.prune.importance))
    if recipe.quantize:
        checks.append((registrar.quantizers, recipe.quantize.method))
    for fmt in recipe.export.formats if recipe.export else []:
        checks.append((registrar.exporters, fmt))
    try:
        resolve_builder(recipe.model.name, pm, recipe_folder(recipe), trust_code=allow_code)
    except InputError as error:
        raise RecipeError(f"{where}: model.name: {error}") from None
    for registry, name in checks:
        if name not in registry:
            raise RecipeError(f"{where}: {registry.recipe_field}: unknown {registry.kind} {name!r}; "
                              f"available: {', '.join(registry.names())}")
    _check_arguments(where, "data.args", registrar.datasets[recipe.data.name],
                     **_data_args(recipe))
    if recipe.quantize:
        quantizer = registrar.quantizers[recipe.quantize.method]
        _check_arguments(where, "quantize.args", quantizer, None, None, None,
                         subset_size=recipe.quantize.calibration_size, **recipe.quantize.args)
    for field, path in recipe.input_files().items():
        missing = not path.is_file() if field == "model.checkpoint" else not path.exists()
        if missing:
            raise RecipeError(f"{where}: {field}: {path} does not exist "
                              "(relative paths start at the recipe's folder)")
    if recipe.finetune and not recipe.prune:
        raise RecipeError(f"{where}: finetune: needs a prune section (fine-tuning repairs pruning)")


def _check_data_layout(recipe: Recipe, data: Datasets, pm, where: str) -> None:
    """Quantizers and most exporters check their results on [N, ...] images; an exporter marked ``time_major``
    (nir) only on time-major event frames [T, N, ...]."""
    formats = recipe.export.formats if recipe.export else []
    wrong = [fmt for fmt in formats if getattr(registries(pm).exporters[fmt], "time_major", False) != data.time_major]
    frames = f"dataset {recipe.data.name!r} gives time-major event frames [T, N, ...]"
    if data.time_major and recipe.quantize:
        raise RecipeError(f"{where}: quantize: {frames}; quantization calibrates and checks on [N, ...] images "
                          "only so far: remove the quantize section")
    if data.time_major and wrong:
        raise RecipeError(f"{where}: export.formats: {frames}, and {', '.join(wrong)} export and check [N, ...] "
                          "image models: remove them (nir exports models stepped over event frames)")
    if wrong:
        raise RecipeError(f"{where}: export.formats: {', '.join(wrong)} exports models stepped over time-major event "
                          f"frames [T, N, ...] (NIR holds one time step), and dataset {recipe.data.name!r} gives "
                          "[N, ...] images: remove it (onnx, openvino, torchscript export image models) or use "
                          "event-frame data such as dvs_frames")


@dataclass
class Probe:
    """The recipe's data and model, checked to run together on one sample."""

    data: Datasets
    model: nn.Module
    example: torch.Tensor
    output: str = "one tensor"  # what the model returns, and which tensor the run reads (the report says it)


def probe(recipe: Recipe, pm: pluggy.PluginManager, allow_code: bool = False) -> Probe:
    """Load the data, build the model (and its checkpoint) and run it on one sample; errors name the field."""
    where = recipe.source or "recipe"
    data = _load_data(recipe, pm)
    try:
        model = build_model(recipe.model.name, recipe.model.args, pm, recipe_folder(recipe), trust_code=allow_code)
    except PluginError as error:
        raise RecipeError(f"{where}: model.args: {error}") from None
    if recipe.model.checkpoint is not None:
        load_checkpoint(model, recipe.input_files()["model.checkpoint"])
    try:
        model.to(resolve_device(recipe.device))  # the example stays on the CPU: who runs it moves it
    except ArgumentError as error:
        raise RecipeError(f"{where}: device: {error}") from None
    example = data.example()
    _check_data_layout(recipe, data, pm, where)
    try:
        output = fresh_forward(model, to_model_device(model, example))
    except Exception as error:
        first = first_line(error)
        raise RecipeError(f"{where}: model.args: {recipe.model.name} does not run on {recipe.data.name} images of "
                          f"shape {tuple(example.shape)}: {first}") from None
    described, output = _read_output(recipe, model, output, where)
    if class_scores(output).shape[-1] < data.num_classes:
        raise RecipeError(f"{where}: model.args: {recipe.model.name} gives {class_scores(output).shape[-1]} class "
                          f"scores, but dataset {recipe.data.name!r} has {data.num_classes} classes; build the model "
                          f"with {data.num_classes} outputs (e.g. num_classes: {data.num_classes})")
    return Probe(data, model, example, described)


def _read_output(recipe: Recipe, model: nn.Module, output, where) -> tuple[str, torch.Tensor]:
    """``(what the model returns, in words; the tensor the run reads)``; with ``model.output`` the model is set
    to answer that element of its tuple from now on (``spiking.read_output``)."""
    index = recipe.model.output
    if index is None:
        tensor = first_tensor(output)
        if not isinstance(tensor, torch.Tensor):
            raise RecipeError(f"{where}: model.name: {recipe.model.name} returns a {type(output).__name__} holding no "
                              "tensor; a model must return its class scores (or a tuple holding them)")
        return describe_output(output), tensor
    if not isinstance(output, (tuple, list)) or index >= len(output) or not isinstance(output[index], torch.Tensor):
        what = "one tensor" if isinstance(output, torch.Tensor) else f"a {type(output).__name__} of {len(output)}" \
            if isinstance(output, (tuple, list)) else f"a {type(output).__name__}"
        raise RecipeError(f"{where}: model.output: {index} names no tensor of what {recipe.model.name} returns "
                          f"({what}); remove model.output, or give the index of the class scores")
    read_output(model, index)
    return f"a {type(output).__name__} of {len(output)}: element {index} is read (model.output)", output[index]


def recipe_folder(recipe: Recipe) -> Path | None:
    return recipe.source.parent if recipe.source else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _data_args(recipe: Recipe) -> dict[str, Any]:
    files = recipe.input_files()
    args = {key: files.get(f"data.args.{key}", value) for key, value in recipe.data.args.items()}
    args.setdefault("seed", recipe.seed)
    return args


def _load_data(recipe: Recipe, pm) -> Datasets:
    loader = registries(pm).datasets[recipe.data.name]
    try:
        data = as_datasets(loader(**_data_args(recipe)), f"dataset {recipe.data.name!r}")
        data.workers = recipe.data.workers
        return data
    except InputError:
        raise
    except Exception as error:  # a plugin's loader: say which field to look at
        first = first_line(error)
        raise DataError(f"{recipe.source or 'recipe'}: data.args: dataset {recipe.data.name!r} failed with "
                        f"{shorten(repr(dict(recipe.data.args)), 200)}: {first}") from None


def _predict_accuracy(artifact, loader) -> float:
    """Top-1 accuracy of a quantized artifact over ``loader``, batch by batch."""
    correct = total = 0
    for images, labels in loader:
        correct += int((class_scores(artifact.predict(images.numpy())).argmax(1) == labels.numpy()).sum())
        total += len(labels)
    return correct / total


def chance_accuracy(labels: np.ndarray, num_classes: int) -> float:
    """What a model guessing (or always predicting the commonest class) scores on ``labels``."""
    return max(1.0 / num_classes, float(np.bincount(labels).max() / len(labels)))


def run_recipe(recipe: Recipe, out: Path | None = None, pm: pluggy.PluginManager | None = None,
               progress: bool = True, allow_code: bool = False, resume: bool = False) -> dict:
    """Run every section of ``recipe``; all files appear in ``out`` at once, or none do.

    ``allow_code`` lets a ``module:function`` model name import and run that code.
    Fine-tuning saves a checkpoint after every epoch beside ``out`` (``.NAME.resume/``);
    ``resume`` continues from it, skipping the epochs it holds (docs/training.md).
    """
    pm = pm or get_plugin_manager()
    preflight(recipe, pm, allow_code)
    out = Path(recipe.out if out is None else out)
    started = time.perf_counter()
    seed_everything(recipe.seed)
    # under torchrun rank 0 alone writes the output; the other ranks work in a scratch folder
    with (staged_output(out) if distributed.is_main() else tempfile.TemporaryDirectory()) as stage:
        stage = Path(stage)
        probed = probe(recipe, pm, allow_code)
        checkpoint = {"checkpoint": resume_folder(out) / FINETUNE_CHECKPOINT, "resume": resume,
                      "meta": _resume_meta(recipe, probed.model)}
        if resume:  # a checkpoint of another recipe is refused now, not after training and pruning
            check_resumable(checkpoint["checkpoint"], checkpoint["meta"])
        try:
            report = _run(recipe, probed, stage, pm, progress, checkpoint)
        except InputError as error:  # bad input found while running (a bad file deep in the data)
            error.while_running = True
            raise
        report["seconds"] = time.perf_counter() - started
        written = {str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file()}
        report["files"] = sorted(written | {"report.json", "report.md"})
        (stage / "report.json").write_text(json.dumps(report, indent=2, default=str))
        write_markdown(report, stage / "report.md")
        if distributed.is_main():
            shutil.rmtree(resume_folder(out), ignore_errors=True)  # done: the output supersedes any checkpoint
    report["out"] = str(out.resolve())
    return report


def failed_checks(report: dict) -> list[str]:
    """Names of the report's checks that did not pass."""
    return [name for name, check in report["checks"].items() if not check["ok"]]


def _run(recipe: Recipe, probed: Probe, stage: Path, pm, progress: bool, checkpoint: dict | None = None) -> dict:
    data, model, example = probed.data, probed.model, probed.example
    val = data.loader("val", recipe.data.batch_size, limit=recipe.data.val_subset)
    test = data.loader("test", recipe.data.batch_size)
    stages, checks = [], {}
    report = {"format": RUN_FORMAT, "recipe": str(recipe.source), "finished": None, "stages": stages,
              "checks": checks, "warnings": [], "recipe_data": recipe.model_dump(mode="json"),
              "model_output": probed.output, "environment": {"cpu": cpu_description(), "torch": torch.__version__}}
    if distributed.active():
        report["distributed"] = {"world_size": distributed.world_size(), "backend": dist.get_backend()}

    if recipe.train:
        t = recipe.train
        report["train_loss"] = train(model, data.loader("train", t.batch_size, shuffle=True, seed=recipe.seed),
                                     t.epochs, t.lr, t.weight_decay, seed=recipe.seed, progress=progress,
                                     schedule=t.schedule, warmup_epochs=t.warmup_epochs, amp=t.amp)
    model.eval()
    # the calibration images are read once a run, when a quantizer or an exporter first needs them;
    # each user gets its own list
    calibration_images = functools.cache(functools.partial(_calibration, recipe, data))

    def calibration() -> list[np.ndarray]:
        return list(calibration_images())
    deployment = _deployment(recipe, model, example, calibration, pm, progress, report)
    shapes_before = layer_shapes(model)
    baseline = footprint(model, example, deployment)
    baseline_test = accuracy(model, test)
    param_bytes = baseline.param_bytes
    energy_images = to_model_device(model, torch.from_numpy(data.images("val", ENERGY_SAMPLES)))
    stages.append({"stage": "fp32", "test_accuracy": baseline_test, "val_accuracy": accuracy(model, val),
                   "memory_bytes": baseline.total_bytes, "weight_bytes": param_bytes, "memory": baseline.as_dict(),
                   "latency_ms": model_latency_ms(model, example),
                   "energy": estimate_energy(model, energy_images).as_dict()})

    plan: dict[str, list[int]] = {}
    if recipe.prune:
        chance = chance_accuracy(data.labels("val"), data.num_classes)
        plan = _prune(recipe, model, example, val, data, chance, report, stage, pm, progress, deployment, checkpoint,
                      energy_images)
        distributed.same_on_every_rank(plan, "the pruning plan")
        model.eval()
        pruned = footprint(model, example, deployment)
        saving = 1 - pruned.bytes_of(recipe.prune.memory) / baseline.bytes_of(recipe.prune.memory)
        stages.append({"stage": "pruned" + (" + finetuned" if recipe.finetune else ""),
                       "test_accuracy": accuracy(model, test), "val_accuracy": accuracy(model, val),
                       "memory_bytes": pruned.total_bytes, "weight_bytes": pruned.param_bytes,
                       "memory": pruned.as_dict(), "memory_saving": saving,
                       "parameter_saving": 1 - pruned.param_bytes / baseline.param_bytes,
                       "footprint_saving": 1 - pruned.total_bytes / baseline.total_bytes,
                       "latency_ms": model_latency_ms(model, example),
                       "energy": estimate_energy(model, energy_images).as_dict()})
        if recipe.prune.method == "prime":
            if recipe.prune.memory_saving > 0:
                checks[f"{recipe.prune.memory} memory saving"] = {
                    "ok": saving >= recipe.prune.memory_saving - 1e-9,
                    "detail": f"{saving:.2%} (wanted {recipe.prune.memory_saving:.2%})"}
            baseline_val = report["prune"]["baseline"]["accuracy"]
            checks["baseline above chance level"] = {
                "ok": baseline_val > chance + 0.01,
                "detail": f"validation accuracy {baseline_val:.2%}, chance {chance:.2%}"}
            report["warnings"] += report["prune"].get("warnings", [])
        if recipe.prune.ram_budget is not None:
            checks[f"ram <= {recipe.prune.ram_budget} B"] = _budget_check(pruned.ram_bytes, recipe.prune.ram_budget,
                                                                         baseline.ram_bytes, deployment)
        if recipe.prune.flash_budget is not None and not recipe.quantize:  # FP32: the tensors state_dict.pt holds
            checks[f"flash <= {recipe.prune.flash_budget} B"] = _budget_check(
                pruned.flash_bytes, recipe.prune.flash_budget, baseline.flash_bytes, deployment)
    report["layers"] = layer_table(shapes_before, model, deployment)
    if recipe.prune and distributed.is_main():
        plot_spike_rates(stages, stage / "spike_rates.png")
    save_pruned(model, stage / "model.pt", recipe.model.name, recipe.model.args, tuple(example.shape), plan)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, stage / "state_dict.pt")  # loads without a GPU

    if recipe.quantize and distributed.is_main():  # the other ranks' work ends with the pruned model
        q = recipe.quantize
        artifact = _quantize(recipe, model, example, calibration(), pm, progress)
        files = artifact.save(stage / f"model_{deployment.name}")  # model_int8, model_int4
        weight_bytes = artifact.weight_bytes(files)
        quantized_test = _predict_accuracy(artifact, data.loader("test", recipe.data.batch_size))
        stages.append({"stage": f"{q.method}", "test_accuracy": quantized_test, "weight_bytes": weight_bytes,
                       "latency_ms": artifact.latency_ms(example.numpy()),
                       "inference_precision": getattr(artifact, "compiled_precision", None),
                       # the same operations at the deployment's costs (op_counter cannot run an OpenVINO model)
                       "energy": estimate_energy(model, energy_images, deployment.energy_precision,
                                                 deployment).as_dict()})
        if recipe.prune:  # the embedded budget: pruning + quantization
            checks[f"{deployment.name} weights <= {q.max_weight_fraction:.0%} of unpruned fp32 params"] = {
                "ok": weight_bytes <= q.max_weight_fraction * param_bytes,
                "detail": f"{weight_bytes} B = {weight_bytes / param_bytes:.2%} of {param_bytes} B"}
        if recipe.prune and recipe.prune.flash_budget is not None:  # measured on the written weight file
            checks[f"flash <= {recipe.prune.flash_budget} B"] = _budget_check(
                weight_bytes, recipe.prune.flash_budget, report["deployment"].get("unpruned_flash_bytes"), deployment)
        checks[f"test accuracy drop <= {100 * q.max_accuracy_drop:g} points"] = {
            "ok": baseline_test - quantized_test <= q.max_accuracy_drop,
            "detail": f"{100 * baseline_test:.2f}% -> {100 * quantized_test:.2f}%"}

    if recipe.export and distributed.is_main():
        e = recipe.export
        samples = data.images("test", e.verify_samples)
        verification = Verification.of(model, samples, time_major=data.time_major, min_agreement=e.min_agreement,
                                       precision=e.inference_precision, min_int8_agreement=e.min_int8_agreement)
        exporters = [registries(pm).exporters[fmt] for fmt in e.formats]
        if data.time_major:  # a per-step export (nir) is traced and verified on the frames themselves
            example = torch.from_numpy(samples)
        options = {"verification": verification}
        if any("calibration" in accepted(exporter, {"calibration": None}) for exporter in exporters):
            options["calibration"] = calibration()
        exported = []
        for exporter in exporters:
            with _quiet(not progress):  # NNCF draws progress bars for onnx_int8
                exported += exporter(model, example, stage / "model", **accepted(exporter, options))
        report["exports"] = [str(Path(p).name) for p in exported]
        report["export_checks"] = verification.results
    report["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    return report


@contextlib.contextmanager
def _quiet(quiet: bool):
    """Inside, when ``quiet``: third-party progress bars (NNCF draws one on stdout) and INFO logs are hidden."""
    if not quiet:
        yield
        return
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nncf_log.setLevel(level)


def _quantize(recipe: Recipe, model: nn.Module, example: torch.Tensor, calibration: list[np.ndarray], pm,
              progress: bool):
    """The recipe's quantizer on ``model``, calibrated on ``calibration`` (``_calibration``)."""
    q = recipe.quantize
    quantizer = registries(pm).quantizers[q.method]
    precision = recipe.export.inference_precision if recipe.export else "f32"
    with _quiet(not progress):
        return quantizer(model, example, calibration, subset_size=q.calibration_size, **q.args,
                         **accepted(quantizer, {"inference_precision": precision}))


def _calibration(recipe: Recipe, data: Datasets) -> list[np.ndarray]:
    """One-image batches of training images (as they are: no augmentation) for INT8 calibration."""
    images = data.images("train", recipe.quantize.calibration_size if recipe.quantize else CALIBRATION_SIZE)
    return [images[i:i + 1] for i in range(len(images))]


def _deployment(recipe: Recipe, model: nn.Module, example: torch.Tensor, calibration: Callable[[], list[np.ndarray]],
                pm, progress: bool, report: dict) -> Deployment:
    """The precision flash and RAM are counted at: the recipe's quantizer's (``quantizer.deployment``, INT8
    when it says none), else FP32.

    With a flash budget and a quantizer, the unpruned model is quantized once and its weight
    file measured, so the prediction the search works with equals that file (``calibrated``).
    """
    deployment = getattr(registries(pm).quantizers[recipe.quantize.method], "deployment", INT8) \
        if recipe.quantize else FP32
    report["deployment"] = {"precision": deployment.name}
    if recipe.quantize and recipe.prune and recipe.prune.flash_budget is not None:
        with tempfile.TemporaryDirectory() as folder:
            artifact = _quantize(recipe, model, example, calibration(), pm, progress)
            measured = artifact.weight_bytes(artifact.save(Path(folder) / "unpruned"))
        predicted = flash_bytes(model, deployment)
        # the search keeps a margin below the budget for what the formula cannot see (OpenVINO stores equal
        # constants once): it was within 0.1% of the written pruned files on the digits Spikformer
        deployment = deployment.calibrated(predicted, measured, margin_bytes=math.ceil(FLASH_HEADROOM * measured))
        report["deployment"].update(unpruned_flash_bytes=measured, file_bytes=deployment.file_bytes,
                                    headroom_bytes=deployment.margin_bytes)
    return deployment


def _budget_check(measured: int, budget: int, unpruned: int | None, deployment: Deployment) -> dict:
    of = f" ({measured / unpruned:.1%} of the unpruned {unpruned} B)" if unpruned else ""
    return {"ok": measured <= budget, "detail": f"{measured} B at {deployment.name}{of}, budget {budget} B"}


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(output, input) channels of each conv/linear layer, by name."""
    return {name: (getattr(m, "out_channels", None) or m.out_features, getattr(m, "in_channels", None) or m.in_features)
            for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}


def layer_table(before: dict[str, tuple[int, int]], model: nn.Module, deployment: Deployment) -> list[dict]:
    """Each conv/linear layer: output and input channels kept of how many, and the precision its weights
    deploy at (``Deployment.precision_of``: INT4 for the matmul-like layers under ``nncf_int4``)."""
    after, layers = layer_shapes(model), dict(model.named_modules())
    return [{"layer": name, "out": [after[name][0], width[0]], "in": [after[name][1], width[1]],
             "precision": deployment.precision_of(layers[name])} for name, width in before.items() if name in after]


def _prune(recipe: Recipe, model, example, val, data: Datasets, chance: float, report: dict, stage: Path, pm,
           progress: bool, deployment: Deployment = FP32, checkpoint: dict | None = None,
           energy_images: torch.Tensor | None = None) -> dict[str, list[int]]:
    p = recipe.prune
    importance = registries(pm).importances[p.importance]()
    finetune = _finetune(recipe, model, data, report, progress, checkpoint) if recipe.finetune else None
    if p.method == "uniform":
        plan = SpikingPruner(model, example, importance=importance, pruning_ratio=p.ratio, pm=pm).step()
        if finetune is not None:
            finetune(model)
        report["prune"] = {"method": "uniform", "ratio": p.ratio, "plan_groups": sorted(plan)}
        return plan
    result = prime(model, example, lambda m: accuracy(m, val), memory_saving=p.memory_saving,
                   flash_budget=p.flash_budget, ram_budget=p.ram_budget, deployment=deployment,
                   max_accuracy_drop=p.max_accuracy_drop, min_accuracy=p.min_accuracy, rates=p.rates,
                   objective=p.objective, round_to=p.round_to, search=p.search, memory=p.memory,
                   rank_by=p.rank_by, energy_inputs=energy_images, importance=importance, finetune=finetune,
                   inplace=True, progress=progress, pm=pm, chance_accuracy=chance)
    report["prune"] = result.report.to_dict()
    if result.report.groups:
        plot_sensitivity(result.report, stage / "sensitivity.png")
    return result.report.plan


FINETUNE_CHECKPOINT = "finetune.pt"
# What the fine-tuned weights depend on: a checkpoint resumes only a run that agrees on all of it
# (quantize, export and out may change between the interrupted run and the resumed one).
RESUME_FIELDS = {"seed", "device", "model", "data", "train", "prune", "finetune"}


def _resume_meta(recipe: Recipe, model: nn.Module) -> dict:
    """What a fine-tuning checkpoint must agree on with the run resuming it: the recipe and the device."""
    fields = recipe.model_dump(mode="json", include=RESUME_FIELDS)
    fields["device"] = str(model_device(model).type)  # 'auto' may be another device on another machine
    return {"recipe": fields}


def _finetune(recipe: Recipe, model: nn.Module, data: Datasets, report: dict, progress: bool,
              checkpoint: dict | None = None):
    """The fine-tuning ``prime`` runs after pruning ``model`` (called before pruning: a teacher for
    distillation is a frozen copy of the model as it is now). ``checkpoint``: ``train``'s
    checkpoint, resume and meta arguments."""
    f = recipe.finetune
    distill = Distillation(frozen_copy(model), f.distill.weight, f.distill.temperature) if f.distill else None

    def finetune(pruned: nn.Module):
        report["finetune_loss"] = train(pruned, data.loader("train", f.batch_size, shuffle=True, seed=recipe.seed + 1), f.epochs, f.lr,
              seed=recipe.seed + 1, progress=progress, desc="finetune", schedule=f.schedule,
              warmup_epochs=f.warmup_epochs, distill=distill, **(checkpoint or {}))

    return finetune
