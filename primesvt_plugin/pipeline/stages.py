"""The stages of a recipe run, in order: train, calibrate, measure the baseline, prune (+ fine-tune), save,
quantize, export, check, write.

Each stage reads and adds to one ``RunContext`` (the model, the data, the ``RunReport``) and may
return a ``StageRecord`` (a row of the report's stage table). A stage that writes files meant
for the user is ``main_rank_only``: under torchrun the runner skips it on the other ranks, so
no stage checks ranks itself. The checks are judged once, at the end, by ``Check``.
"""
from __future__ import annotations

import abc
import contextlib
import datetime
import functools
import io
import json
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import pluggy
import torch
import torch.nn as nn

from .. import distributed
from ..deploy.export import ExportError, Verification
from ..deploy.latency import model_latency_ms
from ..plugins import registries
from ..pruning.energy import estimate_energy
from ..pruning.memory import Footprint, flash_bytes, footprint
from ..pruning.policy import prime
from ..pruning.pruner import SpikingPruner
from ..pruning.records import Constraints, PrimeReport
from ..pruning.spiking import to_model_device
from ..serialization import save_pruned
from ..targets import FP32, Deployment
from .datasets import Datasets
from .distillation import Distillation, frozen_copy
from .evaluation import accuracy, artifact_accuracy, chance_accuracy
from .preflight import quantize_args
from .recipe import Recipe
from .report import plot_sensitivity, plot_spike_rates, write_markdown
from .run_report import Check as CheckResult
from .run_report import RunReport, StageRecord
from .training import train

ENERGY_SAMPLES = 16  # validation images the energy per image is measured on
CALIBRATION_SIZE = 300  # calibration images when the recipe has no quantize section (an exporter may ask)
FLASH_HEADROOM = 0.005  # of the unpruned weight file, kept free when a flash budget is the target


@dataclass
class RunContext:
    """What the stages of one run share: its inputs, the model as it is now, and what was measured so far."""

    recipe: Recipe
    pm: pluggy.PluginManager
    data: Datasets
    model: nn.Module
    example: torch.Tensor
    folder: Path  # the output being written (a scratch folder until the run succeeds)
    report: RunReport
    progress: bool = True
    checkpoint: dict = field(default_factory=dict)  # ``train``'s checkpoint, resume and meta for fine-tuning
    started: float = field(default_factory=time.perf_counter)  # when the run began (``report.seconds``)
    deployment: Deployment = FP32
    before: Footprint | None = None  # the unpruned model's memory at ``deployment``
    baseline_test: float = 0.0
    layers_before: dict[str, tuple[int, int]] = field(default_factory=dict)
    after: Footprint | None = None  # the pruned model's
    plan: dict[str, list[int]] = field(default_factory=dict)
    prime_report: PrimeReport | None = None
    chance: float | None = None  # the validation accuracy of guessing (PrimeSVT's baseline must beat it)
    unpruned_artifact: Any = None  # the quantized unpruned model, when the flash budget needed it
    quantized_bytes: int | None = None  # the pruned model's weight file(s), as written
    quantized_test: float | None = None

    def __post_init__(self):
        recipe = self.recipe
        self.val = self.data.loader("val", recipe.data.batch_size, limit=recipe.data.val_subset)
        self.test = self.data.loader("test", recipe.data.batch_size)
        self.energy_images = to_model_device(self.model, torch.from_numpy(self.data.images("val", ENERGY_SAMPLES)))

    def calibration(self) -> list[np.ndarray]:
        """One-image batches of training images (as they are: no augmentation), read once a run; a fresh list."""
        return list(self._calibration_images)

    # a cached property, not functools.cache of a bound method: that would be a reference cycle keeping the
    # context (its OpenVINO artifacts, the model) alive until the cyclic collector frees it at a random point
    # of the next run or test (a SIGSEGV in the full test suite, once per run, was traced to that)
    @functools.cached_property
    def _calibration_images(self) -> list[np.ndarray]:
        size = self.recipe.quantize.calibration_size if self.recipe.quantize else CALIBRATION_SIZE
        images = self.data.images("train", size)
        return [images[i:i + 1] for i in range(len(images))]

    def quantize(self):
        """The recipe's quantizer on the model as it is now (a quantizer is called with exactly these)."""
        q, export = self.recipe.quantize, self.recipe.export
        quantizer = registries(self.pm).quantizers[q.method]
        with quiet(not self.progress):
            return quantizer(self.model, self.example, self.calibration(), subset_size=q.calibration_size,
                             inference_precision=export.inference_precision if export else "f32", pm=self.pm,
                             **quantize_args(self.recipe, quantizer))

    def measured_row(self, stage: str) -> StageRecord:
        """A row for the PyTorch model as it is now."""
        memory = footprint(self.model, self.example, self.deployment)
        return StageRecord(stage, accuracy(self.model, self.test), val_accuracy=accuracy(self.model, self.val),
                           memory_bytes=memory.total_bytes, weight_bytes=memory.param_bytes, memory=memory.as_dict(),
                           latency_ms=model_latency_ms(self.model, self.example),
                           energy=estimate_energy(self.model, self.energy_images).as_dict())

    def artifact_row(self, stage: str, artifact, weight_bytes: int) -> StageRecord:
        """A row for a quantized artifact of the model as it is now (its energy: the model's operations at the
        deployment's costs, since op_counter cannot run an OpenVINO model)."""
        energy = estimate_energy(self.model, self.energy_images, self.deployment.energy_precision, self.deployment)
        return StageRecord(stage, artifact_accuracy(artifact, self.test), weight_bytes=weight_bytes,
                           latency_ms=artifact.latency_ms(self.example.numpy()),
                           inference_precision=getattr(artifact, "compiled_precision", None), quantized=True,
                           energy=energy.as_dict())


@contextlib.contextmanager
def quiet(hide: bool):
    """Inside, when ``hide``: third-party progress bars (NNCF draws one on stdout) and INFO logs are hidden."""
    if not hide:
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


class Stage(abc.ABC):
    """One step of a run. ``main_rank_only``: under torchrun only rank 0 runs it (it writes the user's files)."""

    main_rank_only = False

    def wanted(self, recipe: Recipe) -> bool:
        """Whether ``recipe`` asks for this stage."""
        return True

    @abc.abstractmethod
    def run(self, ctx: RunContext) -> StageRecord | None:
        """Do this stage's work on ``ctx``; return the report row it measured, if any."""


def quantizes_the_unpruned_model(recipe: Recipe) -> bool:
    """A flash budget with a quantizer: the unpruned model's weight file is measured (``Calibrate``) and
    reported (``QuantizedUnpruned``)."""
    return bool(recipe.quantize and recipe.prune and recipe.prune.flash_budget is not None)


class Train(Stage):
    def wanted(self, recipe):
        return recipe.train is not None

    def run(self, ctx):
        t, recipe = ctx.recipe.train, ctx.recipe
        ctx.report.train_loss = train(ctx.model, ctx.data.loader("train", t.batch_size, shuffle=True, seed=recipe.seed),
                                      t.epochs, t.lr, t.weight_decay, seed=recipe.seed, progress=ctx.progress,
                                      schedule=t.schedule, warmup_epochs=t.warmup_epochs, amp=t.amp)


class Calibrate(Stage):
    """The precision flash and RAM are counted at: the recipe's quantizer's ``deployment``, else FP32.

    With a flash budget and a quantizer, the unpruned model is quantized once and its weight file
    measured, so that the prediction the search works with equals that file (``Deployment.calibrated``).
    """

    def run(self, ctx):
        ctx.model.eval()
        recipe = ctx.recipe
        ctx.deployment = registries(ctx.pm).quantizers[recipe.quantize.method].deployment if recipe.quantize else FP32
        ctx.report.deployment = {"precision": ctx.deployment.name}
        if quantizes_the_unpruned_model(recipe):
            ctx.unpruned_artifact = ctx.quantize()
            with tempfile.TemporaryDirectory() as folder:
                measured = ctx.unpruned_artifact.weight_bytes(ctx.unpruned_artifact.save(Path(folder) / "unpruned"))
            # the search keeps a margin below the budget for what the formula cannot see (OpenVINO stores
            # equal constants once): it was within 0.1% of the written pruned files on the digits Spikformer
            ctx.deployment = ctx.deployment.calibrated(flash_bytes(ctx.model, ctx.deployment), measured,
                                                       margin_bytes=math.ceil(FLASH_HEADROOM * measured))
            if not distributed.is_main():  # its row is rank 0's
                ctx.unpruned_artifact = None
            ctx.report.deployment.update(unpruned_flash_bytes=measured, file_bytes=ctx.deployment.file_bytes,
                                         headroom_bytes=ctx.deployment.margin_bytes)


class Baseline(Stage):
    """The unpruned FP32 model: the row every later stage is compared with."""

    def run(self, ctx):
        ctx.layers_before = layer_shapes(ctx.model)
        ctx.before = footprint(ctx.model, ctx.example, ctx.deployment)
        row = ctx.measured_row("fp32")
        ctx.baseline_test = row.test_accuracy
        return row


class QuantizedUnpruned(Stage):
    """The unpruned model as the quantizer wrote it (quantized by ``Calibrate`` anyway): what quantization
    alone gives, next to pruning + quantization."""

    main_rank_only = True

    def wanted(self, recipe):
        return quantizes_the_unpruned_model(recipe)

    def run(self, ctx):
        artifact, ctx.unpruned_artifact = ctx.unpruned_artifact, None  # not kept through pruning
        return ctx.artifact_row(f"{ctx.recipe.quantize.method} (not pruned)", artifact,
                                ctx.report.deployment["unpruned_flash_bytes"])


class Prune(Stage):
    """The recipe's pruning (PrimeSVT, or one uniform ratio), with its fine-tuning; the pruned model's row."""

    def wanted(self, recipe):
        return recipe.prune is not None

    def run(self, ctx):
        p = ctx.recipe.prune
        importance = registries(ctx.pm).importances[p.importance](**p.importance_args)
        finetune = _finetune(ctx) if ctx.recipe.finetune else None
        if p.method == "uniform":
            ctx.plan = SpikingPruner(ctx.model, ctx.example, importance=importance, pruning_ratio=p.ratio,
                                     pm=ctx.pm).step()
            if finetune is not None:
                finetune(ctx.model)
            ctx.report.prune = {"method": "uniform", "ratio": p.ratio, "plan_groups": sorted(ctx.plan)}
        else:
            ctx.chance = chance_accuracy(ctx.data.labels("val"), ctx.data.num_classes)
            config = p.to_config(deployment=ctx.deployment, chance_accuracy=ctx.chance)
            result = prime(ctx.model, ctx.example, lambda m: accuracy(m, ctx.val), config,
                           energy_inputs=ctx.energy_images, importance=importance, finetune=finetune, inplace=True,
                           progress=ctx.progress, pm=ctx.pm)
            ctx.prime_report, ctx.plan = result.report, result.report.plan
            ctx.report.prune = result.report.to_dict()
            ctx.report.warnings += result.report.warnings
        distributed.same_on_every_rank(ctx.plan, "the pruning plan")
        ctx.model.eval()
        ctx.after = footprint(ctx.model, ctx.example, ctx.deployment)
        row = ctx.measured_row("pruned" + (" + finetuned" if ctx.recipe.finetune else ""))
        row.memory_saving = 1 - ctx.after.bytes_of(p.memory) / ctx.before.bytes_of(p.memory)
        row.parameter_saving = 1 - ctx.after.param_bytes / ctx.before.param_bytes
        row.footprint_saving = 1 - ctx.after.total_bytes / ctx.before.total_bytes
        return row


def _finetune(ctx: RunContext) -> Callable[[nn.Module], None]:
    """The fine-tuning run after pruning (made before it: a teacher for distillation is a frozen copy of
    the model as it is now)."""
    f, seed = ctx.recipe.finetune, ctx.recipe.seed + 1
    distill = Distillation(frozen_copy(ctx.model), f.distill.weight, f.distill.temperature) if f.distill else None

    def finetune(pruned: nn.Module) -> None:
        ctx.report.finetune_loss = train(pruned, ctx.data.loader("train", f.batch_size, shuffle=True, seed=seed),
                                         f.epochs, f.lr, seed=seed, progress=ctx.progress, desc="finetune",
                                         schedule=f.schedule, warmup_epochs=f.warmup_epochs, distill=distill,
                                         **ctx.checkpoint)

    return finetune


class Save(Stage):
    """``model.pt`` (``load_pruned`` rebuilds it), ``state_dict.pt`` (CPU tensors) and the per-layer table."""

    def run(self, ctx):
        ctx.report.layers = layer_table(ctx.layers_before, ctx.model, ctx.deployment)
        recipe = ctx.recipe
        save_pruned(ctx.model, ctx.folder / "model.pt", recipe.model.name, recipe.model.args,
                    tuple(ctx.example.shape), ctx.plan)
        torch.save({k: v.cpu() for k, v in ctx.model.state_dict().items()}, ctx.folder / "state_dict.pt")


class Quantize(Stage):
    """The recipe's quantizer on the pruned model, written as ``model_<deployment>`` (``model_int8``, ...)."""

    main_rank_only = True

    def wanted(self, recipe):
        return recipe.quantize is not None

    def run(self, ctx):
        artifact = ctx.quantize()
        ctx.quantized_bytes = artifact.weight_bytes(artifact.save(ctx.folder / f"model_{ctx.deployment.name}"))
        row = ctx.artifact_row(ctx.recipe.quantize.method, artifact, ctx.quantized_bytes)
        ctx.quantized_test = row.test_accuracy
        return row


class Export(Stage):
    """Each of ``export.formats``, verified against the PyTorch model; a result below its bar fails the run."""

    main_rank_only = True

    def wanted(self, recipe):
        return recipe.export is not None

    def run(self, ctx):
        e, data = ctx.recipe.export, ctx.data
        samples = data.images("test", e.verify_samples)
        verification = Verification.of(ctx.model, samples, time_major=data.time_major, min_agreement=e.min_agreement,
                                       precision=e.inference_precision, min_int8_agreement=e.min_int8_agreement)
        # a per-step export (nir) is traced and verified on the frames themselves
        example = torch.from_numpy(samples) if data.time_major else ctx.example
        exported = []
        for fmt in e.formats:
            exporter, known = registries(ctx.pm).exporters[fmt], dict(verification.results)
            with quiet(not ctx.progress):  # NNCF draws progress bars for onnx_int8
                exported += exporter(ctx.model, example, ctx.folder / "model", verification=verification,
                                     calibration=Calibration(ctx.calibration), pm=ctx.pm)
            for what, result in verification.results.items():
                if known.get(what) is not result:  # recorded (or recorded again) by this exporter
                    _enforce(fmt, what, verification)
        ctx.report.exports = [Path(p).name for p in exported]
        ctx.report.export_checks = verification.results


class Calibration(Sequence):
    """The calibration batches an exporter receives, read when it first uses them (most exporters never do, and
    time-major event frames would be read for nothing)."""

    def __init__(self, read: Callable[[], list[np.ndarray]]):
        self._read, self._batches = read, None

    def _all(self) -> list[np.ndarray]:
        if self._batches is None:
            self._batches = self._read()
        return self._batches

    def __getitem__(self, index):
        return self._all()[index]

    def __len__(self) -> int:
        return len(self._all())


def _enforce(fmt: str, what: str, verification: Verification) -> None:
    """A result an exporter recorded must say its agreement and meet the recipe's bar for its precision (an
    exporter may not lower it: one that recorded a failure, or checked itself against a bar of its own, still
    fails the run)."""
    result = verification.results[what]
    precision = str(result.get("precision", ""))
    integer = re.search(r"int|(^|[^a-z])[ui]\d", precision.lower())  # int8, u8, i4: quantized on the way
    bar = verification.min_int8_agreement if integer else verification.min_agreement
    agreement = result.get("agreement")
    if not isinstance(agreement, (int, float)):
        raise ExportError(f"export.formats: exporter {fmt!r} recorded {what!r} without an agreement; record results "
                          "with verification.check(what, outputs, precision)")
    if agreement < bar:
        raise ExportError(f"export.formats: exporter {fmt!r}: {what} agrees with the PyTorch model on "
                          f"{agreement:.2%} at {precision or 'an unnamed precision'} (needs {bar:.2%}); not written")


class Check(Stage):
    """Every promise the recipe makes, judged once on what was measured and written (``report.checks``)."""

    def run(self, ctx):
        recipe, checks = ctx.recipe, ctx.report.checks
        if recipe.prune:
            checks.update(_target_checks(ctx))
        q = recipe.quantize
        if q and ctx.quantized_test is not None:
            if recipe.prune:  # the embedded budget: pruning + quantization
                weights, params = ctx.quantized_bytes, ctx.before.param_bytes
                checks[f"{ctx.deployment.name} weights <= {q.max_weight_fraction:.0%} of unpruned fp32 params"] = \
                    CheckResult(weights <= q.max_weight_fraction * params,
                                f"{weights} B = {weights / params:.2%} of {params} B")
            checks[f"test accuracy drop <= {100 * q.max_accuracy_drop:g} points"] = CheckResult(
                ctx.baseline_test - ctx.quantized_test <= q.max_accuracy_drop,
                f"{100 * ctx.baseline_test:.2f}% -> {100 * ctx.quantized_test:.2f}%")


def _target_checks(ctx: RunContext) -> dict[str, CheckResult]:
    """The pruning targets (``Constraints.verdicts``, as ``prime()`` judges them, but flash on the written file
    and without the search's margin) and a baseline better than guessing."""
    p, checks = ctx.recipe.prune, {}
    constraints = Constraints(p.memory_saving if p.method == "prime" else 0.0, p.memory, None, None, 0.0,
                              flash_budget=p.flash_budget, ram_budget=p.ram_budget, deployment=ctx.deployment.name)
    written = ctx.quantized_bytes if ctx.recipe.quantize else None
    verdicts = constraints.verdicts(ctx.before, ctx.after, flash_bytes=written, margin=False)
    for verdict in verdicts:
        if verdict.measure == "saving":
            checks[f"{p.memory} memory saving"] = CheckResult(
                verdict.ok, f"{verdict.value:.2%} (wanted {verdict.wanted:.2%})")
    if ctx.prime_report is not None:
        baseline_val = ctx.prime_report.baseline.accuracy
        checks["baseline above chance level"] = CheckResult(
            baseline_val > ctx.chance + 0.01, f"validation accuracy {baseline_val:.2%}, chance {ctx.chance:.2%}")
    for verdict in sorted((v for v in verdicts if v.measure != "saving"), key=lambda v: v.measure != "ram"):
        on_file = verdict.measure == "flash" and ctx.recipe.quantize
        if on_file and written is None:
            continue  # the quantized file is written by rank 0 alone
        unpruned = (ctx.report.deployment.get("unpruned_flash_bytes") if on_file
                    else ctx.before.bytes_of(verdict.measure))
        of = f" ({verdict.value / unpruned:.1%} of the unpruned {unpruned} B)" if unpruned else ""
        checks[f"{verdict.measure} <= {verdict.wanted} B"] = CheckResult(
            verdict.ok, f"{verdict.value} B at {ctx.deployment.name}{of}, budget {verdict.wanted} B")
    return checks


class Write(Stage):
    """The plots, ``report.json`` (listing every file of the output) and ``report.md``."""

    def run(self, ctx):
        report = ctx.report
        report.finished = datetime.datetime.now().isoformat(timespec="seconds")
        report.seconds = time.perf_counter() - ctx.started
        if distributed.is_main():
            if ctx.prime_report is not None and ctx.prime_report.groups:
                plot_sensitivity(ctx.prime_report, ctx.folder / "sensitivity.png")
            if ctx.recipe.prune:
                plot_spike_rates([s.to_dict() for s in report.stages if not s.quantized],
                                 ctx.folder / "spike_rates.png")
        written = {str(p.relative_to(ctx.folder)) for p in ctx.folder.rglob("*") if p.is_file()}
        report.files = sorted(written | {"report.json", "report.md"})
        content = report.to_dict()
        (ctx.folder / "report.json").write_text(json.dumps(content, indent=2, default=str))
        write_markdown(content, ctx.folder / "report.md")


STAGES: tuple[Stage, ...] = (Train(), Calibrate(), Baseline(), QuantizedUnpruned(), Prune(), Save(), Quantize(),
                             Export(), Check(), Write())


def run_stages(ctx: RunContext, stages: tuple[Stage, ...] = STAGES) -> RunReport:
    """Run each stage ``ctx.recipe`` asks for, in order, adding its row to the report."""
    for stage in stages:
        if not stage.wanted(ctx.recipe) or (stage.main_rank_only and not distributed.is_main()):
            continue
        row = stage.run(ctx)
        if row is not None:
            ctx.report.stages.append(row)
    return ctx.report


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
