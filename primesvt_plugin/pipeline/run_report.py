"""What a recipe run reports: typed records, written as ``report.json`` (``RunReport.to_dict`` / ``from_dict``).

Every stage of the run adds to one ``RunReport``; ``report.md`` and the CLI's summary read it.
The JSON keeps the layout of earlier releases: a stage row holds only the measurements its
stage made, and sections a run did not have (``prune``, ``exports``, ...) are absent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

RUN_FORMAT = "primesvt-run/1"  # report.json's "format": how a run's output folder is recognised


@dataclass
class StageRecord:
    """One row of the report's stages: the model after a stage (``fp32``, ``pruned``, a quantizer's name).

    Rows of a PyTorch model carry ``val_accuracy``, ``memory_bytes`` and ``memory`` (and the savings,
    after pruning); rows of a quantized artifact carry ``inference_precision`` (what it ran at,
    read back; ``None`` for an artifact that does not say).
    """

    stage: str
    test_accuracy: float
    weight_bytes: int | None = None
    latency_ms: float | None = None
    energy: dict | None = None
    val_accuracy: float | None = None
    memory_bytes: int | None = None
    memory: dict | None = None
    memory_saving: float | None = None
    parameter_saving: float | None = None
    footprint_saving: float | None = None
    inference_precision: str | None = None
    quantized: bool = False  # an artifact's row: inference_precision is written even when None

    def to_dict(self) -> dict:
        row = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "quantized"}
        if self.quantized:  # an artifact's row says what it could not measure (null), as it always did
            row["inference_precision"] = self.inference_precision
            row.setdefault("latency_ms", None)
        return row

    @classmethod
    def from_dict(cls, row: dict) -> "StageRecord":
        return cls(**row, quantized="inference_precision" in row)


@dataclass
class Check:
    """One promise the run checked: whether it holds, and the numbers that say so."""

    ok: bool
    detail: str


OPTIONAL = ("distributed", "train_loss", "prune", "finetune_loss", "exports", "export_checks", "out")


@dataclass
class RunReport:
    """Everything a run measured and decided (``report.json``)."""

    recipe: str
    recipe_data: dict
    model_output: str
    environment: dict
    format: str = RUN_FORMAT
    finished: str | None = None
    stages: list[StageRecord] = field(default_factory=list)
    checks: dict[str, Check] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    deployment: dict = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    distributed: dict | None = None
    train_loss: list[float] | None = None
    prune: dict | None = None  # PrimeReport.to_dict(), or the uniform method's ratio and groups
    finetune_loss: list[float] | None = None
    exports: list[str] | None = None
    export_checks: dict[str, dict] | None = None
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["stages"] = [stage.to_dict() for stage in self.stages]
        data["checks"] = {name: dataclasses.asdict(check) for name, check in self.checks.items()}
        return {k: v for k, v in data.items() if not (k in OPTIONAL and v is None)}

    @classmethod
    def from_dict(cls, data: dict) -> "RunReport":
        known = {f.name for f in dataclasses.fields(cls)}
        report = cls(**{k: v for k, v in data.items() if k in known and k not in ("stages", "checks")})
        report.stages = [StageRecord.from_dict(row) for row in data.get("stages", [])]
        report.checks = {name: Check(**check) for name, check in data.get("checks", {}).items()}
        return report

    def failed_checks(self) -> list[str]:
        """Names of the checks that did not pass."""
        return [name for name, check in self.checks.items() if not check.ok]
