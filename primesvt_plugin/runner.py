"""Run a recipe: train -> PrimeSVT prune (+ fine-tune) -> NNCF INT8 -> export, atomically."""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pluggy
import torch

from .building import build_model, resolve_builder
from .data import DataSplits
from .latency import model_latency_ms
from .memory import footprint
from .plugins import get_plugin_manager, lookup, merged_registry
from .policy import prime
from .pruner import SpikingPruner
from .recipe import Recipe, RecipeError
from .report import plot_sensitivity, write_markdown
from .serialization import save_pruned
from .training import accuracy, class_scores, train

log = logging.getLogger(__name__)


def preflight(recipe: Recipe, pm: pluggy.PluginManager) -> None:
    """Check every name and file the recipe refers to, before anything runs or is written."""
    where = recipe.source or "recipe"
    checks = [("model.name", recipe.model.name, "primesvt_model_builders"),
              ("data.name", recipe.data.name, "primesvt_datasets")]
    if recipe.prune:
        checks.append(("prune.importance", recipe.prune.importance, "primesvt_importances"))
    if recipe.quantize:
        checks.append(("quantize.method", recipe.quantize.method, "primesvt_quantizers"))
    for fmt in recipe.export.formats if recipe.export else []:
        checks.append(("export.formats", fmt, "primesvt_exporters"))
    for field, name, hook in checks:
        if field == "model.name" and ":" in name:
            try:
                resolve_builder(name, pm, recipe_folder(recipe))
            except Exception as error:
                raise RecipeError(f"{where}: {field}: {error}") from None
            continue
        registry = merged_registry(pm, hook)
        if name not in registry:
            raise RecipeError(f"{where}: {field}: unknown {name!r}; available: {', '.join(sorted(registry))}")
    for field, path in recipe.input_files().items():
        missing = not path.is_file() if field == "model.checkpoint" else not path.exists()
        if missing:
            raise RecipeError(f"{where}: {field}: {path} does not exist "
                              "(relative paths start at the recipe's folder)")
    if recipe.finetune and not recipe.prune:
        raise RecipeError(f"{where}: finetune: needs a prune section (fine-tuning repairs pruning)")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A scratch folder that becomes ``out`` only if the block succeeds (then replacing it)."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recipe_folder(recipe: Recipe) -> Path | None:
    return recipe.source.parent if recipe.source else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_data(recipe: Recipe, pm) -> DataSplits:
    files = recipe.input_files()
    args = {key: files.get(f"data.args.{key}", value) for key, value in recipe.data.args.items()}
    args.setdefault("seed", recipe.seed)
    return lookup(pm, "primesvt_datasets", recipe.data.name, "dataset")(**args)


def _predict_accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((class_scores(outputs).argmax(1) == labels).mean())


def run_recipe(recipe: Recipe, out: Path | None = None, pm: pluggy.PluginManager | None = None,
               progress: bool = True) -> dict:
    """Run every section of ``recipe``; all files appear in ``out`` at once, or none do."""
    pm = pm or get_plugin_manager()
    preflight(recipe, pm)
    out = Path(out or recipe.out)
    started = time.perf_counter()
    seed_everything(recipe.seed)
    with staged_output(out) as stage:
        report = _run(recipe, stage, pm, progress)
        report["seconds"] = time.perf_counter() - started
        written = {str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file()}
        report["files"] = sorted(written | {"report.json", "report.md"})
        (stage / "report.json").write_text(json.dumps(report, indent=2, default=str))
        write_markdown(report, stage / "report.md")
    report["out"] = str(out.resolve())
    return report


def _run(recipe: Recipe, stage: Path, pm, progress: bool) -> dict:
    data = _load_data(recipe, pm)
    model = build_model(recipe.model.name, recipe.model.args, pm, recipe_folder(recipe))
    if recipe.model.checkpoint is not None:
        state = torch.load(recipe.input_files()["model.checkpoint"], map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    example = torch.from_numpy(data.x_val[:1])
    val = data.loader("val", recipe.data.batch_size, limit=recipe.data.val_subset)
    test = data.loader("test", recipe.data.batch_size)
    stages, checks = [], {}
    report = {"recipe": str(recipe.source), "finished": None, "stages": stages, "checks": checks,
              "recipe_data": recipe.model_dump(mode="json")}

    if recipe.train:
        t = recipe.train
        report["train_loss"] = train(model, data.loader("train", t.batch_size, shuffle=True, seed=recipe.seed),
                                     t.epochs, t.lr, t.weight_decay, seed=recipe.seed, progress=progress)
    model.eval()
    baseline = footprint(model, example)
    baseline_test = accuracy(model, test)
    param_bytes = baseline.param_bytes
    stages.append({"stage": "fp32", "test_accuracy": baseline_test, "val_accuracy": accuracy(model, val),
                   "memory_bytes": baseline.total_bytes, "weight_bytes": param_bytes, "memory": baseline.as_dict(),
                   "latency_ms": model_latency_ms(model, example)})

    plan: dict[str, list[int]] = {}
    if recipe.prune:
        plan = _prune(recipe, model, example, val, data, report, stage, pm, progress)
        model.eval()
        pruned = footprint(model, example)
        saving = 1 - pruned.bytes_of(recipe.prune.memory) / baseline.bytes_of(recipe.prune.memory)
        stages.append({"stage": "pruned" + (" + finetuned" if recipe.finetune else ""),
                       "test_accuracy": accuracy(model, test), "val_accuracy": accuracy(model, val),
                       "memory_bytes": pruned.total_bytes, "weight_bytes": pruned.param_bytes,
                       "memory": pruned.as_dict(), "memory_saving": saving,
                       "parameter_saving": 1 - pruned.param_bytes / baseline.param_bytes,
                       "footprint_saving": 1 - pruned.total_bytes / baseline.total_bytes,
                       "latency_ms": model_latency_ms(model, example)})
        if recipe.prune.method == "prime":
            checks[f"{recipe.prune.memory} memory saving"] = {
                "ok": saving >= recipe.prune.memory_saving - 1e-9,
                "detail": f"{saving:.2%} (wanted {recipe.prune.memory_saving:.2%})"}
    save_pruned(model, stage / "model.pt", recipe.model.name, recipe.model.args, tuple(example.shape), plan)
    torch.save(model.state_dict(), stage / "state_dict.pt")

    if recipe.quantize:
        q = recipe.quantize
        quantizer = lookup(pm, "primesvt_quantizers", q.method, "quantizer")
        calibration = [data.x_train[i:i + 1] for i in range(min(q.calibration_size, len(data.x_train)))]
        artifact = quantizer(model, example, calibration, subset_size=q.calibration_size, **q.args)
        files = artifact.save(stage / "model_int8")
        weight_bytes = artifact.weight_bytes(files)
        int8_test = _predict_accuracy(artifact.predict(data.x_test), data.y_test)
        stages.append({"stage": f"{q.method}", "test_accuracy": int8_test, "weight_bytes": weight_bytes,
                       "latency_ms": artifact.latency_ms(example.numpy())})
        if recipe.prune:  # the embedded budget the default recipe promises: pruning + INT8
            checks["int8 weights <= 25% of unpruned fp32 params"] = {
                "ok": weight_bytes <= 0.25 * param_bytes,
                "detail": f"{weight_bytes} B = {weight_bytes / param_bytes:.2%} of {param_bytes} B"}
        checks["test accuracy drop <= 3 points"] = {
            "ok": baseline_test - int8_test <= 0.03,
            "detail": f"{100 * baseline_test:.2f}% -> {100 * int8_test:.2f}%"}

    if recipe.export:
        exported = []
        for fmt in recipe.export.formats:
            exported += lookup(pm, "primesvt_exporters", fmt, "exporter")(model, example, stage / "model")
        report["exports"] = [str(Path(p).name) for p in exported]
    report["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    return report


def _prune(recipe: Recipe, model, example, val, data: DataSplits, report: dict, stage: Path, pm,
           progress: bool) -> dict[str, list[int]]:
    p = recipe.prune
    importance = lookup(pm, "primesvt_importances", p.importance, "importance")()
    finetune = _finetune(recipe, data, progress) if recipe.finetune else None
    if p.method == "uniform":
        plan = SpikingPruner(model, example, importance=importance, pruning_ratio=p.ratio, pm=pm).step()
        if finetune is not None:
            finetune(model)
        report["prune"] = {"method": "uniform", "ratio": p.ratio, "plan_groups": sorted(plan)}
        return plan
    result = prime(model, example, lambda m: accuracy(m, val), p.memory_saving, p.max_accuracy_drop, p.min_accuracy,
                   rates=p.rates, memory=p.memory, importance=importance, finetune=finetune, inplace=True,
                   progress=progress, pm=pm)
    report["prune"] = result.report
    if result.report["groups"]:
        plot_sensitivity(result.report, stage / "sensitivity.png")
    return result.report["plan"]


def _finetune(recipe: Recipe, data: DataSplits, progress: bool):
    f = recipe.finetune

    def finetune(model):
        train(model, data.loader("train", f.batch_size, shuffle=True, seed=recipe.seed + 1), f.epochs, f.lr,
              seed=recipe.seed + 1, progress=progress, desc="finetune")

    return finetune
