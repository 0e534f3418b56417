"""Run a recipe: its stages (``stages.STAGES``: train -> PrimeSVT prune + fine-tune -> quantize -> export ->
checks) into one output folder that appears at once, or not at all.

Everything a recipe names is checked by ``preflight.preflight`` before anything runs, and the
model is run on one sample of the data by ``preflight.probe``, so a wrong argument is one line
naming the field, never a traceback half-way through a run.
"""
from __future__ import annotations

import gc
import shutil
import tempfile
import time
from pathlib import Path

import pluggy
import torch
import torch.distributed as dist
import torch.nn as nn

from .. import distributed
from ..deploy.export import cpu_description
from ..errors import InputError
from ..plugins import get_plugin_manager
from ..pruning.spiking import model_device
from .checkpoints import check_resumable
from .output import resume_folder, staged_output
from .preflight import Probe, preflight, probe, seed_everything  # noqa: F401  (the runner's public names)
from .recipe import Recipe
from .run_report import RunReport
from .stages import RunContext, run_stages

FINETUNE_CHECKPOINT = "finetune.pt"
# What the fine-tuned weights depend on: a checkpoint resumes only a run that agrees on all of it
# (quantize, export and out may change between the interrupted run and the resumed one).
RESUME_FIELDS = {"seed", "device", "model", "data", "train", "prune", "finetune"}


def run_recipe(recipe: Recipe, out: Path | None = None, pm: pluggy.PluginManager | None = None,
               progress: bool = True, allow_code: bool = False, resume: bool = False) -> dict:
    """Run every section of ``recipe``; all files appear in ``out`` at once, or none do. Returns ``report.json``'s
    content, with ``out``.

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
    with (staged_output(out) if distributed.is_main() else tempfile.TemporaryDirectory()) as folder:
        probed = probe(recipe, pm, allow_code)
        checkpoint = {"checkpoint": resume_folder(out) / FINETUNE_CHECKPOINT, "resume": resume,
                      "meta": _resume_meta(recipe, probed.model)}
        if resume:  # a checkpoint of another recipe is refused now, not after training and pruning
            check_resumable(checkpoint["checkpoint"], checkpoint["meta"])
        context = RunContext(recipe, pm, probed.data, probed.model, probed.example, Path(folder),
                             _new_report(recipe, probed), progress, checkpoint, started=started)
        try:
            report = run_stages(context)
        except InputError as error:  # bad input found while running (a bad file deep in the data)
            error.while_running = True
            raise
        finally:
            # The run's objects (the model, OpenVINO artifacts) can sit in reference cycles through frames a
            # library keeps (torch.optim's first call): free them here, at a known point, rather than whenever
            # the cyclic collector next runs, in another run or test.
            del context, probed
            gc.collect()
        if distributed.is_main():
            shutil.rmtree(resume_folder(out), ignore_errors=True)  # done: the output supersedes any checkpoint
    report.out = str(out.resolve())
    return report.to_dict()


def _new_report(recipe: Recipe, probed: Probe) -> RunReport:
    report = RunReport(recipe=str(recipe.source), recipe_data=recipe.model_dump(mode="json"),
                       model_output=probed.output,
                       environment={"cpu": cpu_description(), "torch": torch.__version__})
    if distributed.active():
        report.distributed = {"world_size": distributed.world_size(), "backend": dist.get_backend()}
    return report


def failed_checks(report: dict) -> list[str]:
    """Names of the checks that did not pass in ``report.json``'s content."""
    return RunReport.from_dict(report).failed_checks()


def _resume_meta(recipe: Recipe, model: nn.Module) -> dict:
    """What a fine-tuning checkpoint must agree on with the run resuming it: the recipe and the device."""
    fields = recipe.model_dump(mode="json", include=RESUME_FIELDS)
    fields["device"] = str(model_device(model).type)  # 'auto' may be another device on another machine
    return {"recipe": fields}
