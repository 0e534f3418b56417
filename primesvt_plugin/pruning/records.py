"""What ``prime()`` reports: typed records, serialised to the JSON a run writes.

The runner, the markdown report, the sensitivity plot and the benchmarks all read
these dataclasses; ``PrimeReport.to_dict()`` gives the ``prune`` section of
``report.json`` (and ``PrimeReport.from_dict`` reads it back).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .memory import Footprint


@dataclass
class Trial:
    """One masked evaluation of a group alone: ``removed`` channels at ``rate``."""

    rate: float
    removed: int
    accuracy: float


@dataclass
class GroupRecord:
    """One pruning group: its size, its measured robustness and what the compression chose."""

    name: str
    kind: str  # "channels" | "attention-inner"
    channels: int
    channel_groups: int  # heads: every block loses the same count
    memory_bytes: int  # parameters, buffers and neuron state the group's channels touch
    param_bytes: int  # of which parameters and buffers
    bytes_per_channel: float
    sensitivity: list[Trial] = field(default_factory=list)
    target_rate: float = 0.0  # highest rate of the group alone within the accuracy budget
    chosen_rate: float = 0.0
    removed_channels: int = 0
    freed_bytes: int = 0
    evaluations: int = 0  # masked trials of this group (robustness and compression)
    energy_pj: float | None = None  # per image, of the layers the group's channels touch (rank_by energy/both)

    def size_bytes(self, memory: str) -> int:
        """The bytes the ranking orders by: ``param_bytes`` for ``"parameters"``, else ``memory_bytes``."""
        return self.param_bytes if memory == "parameters" else self.memory_bytes


@dataclass
class Constraints:
    """What the user asked: a saving of ``memory`` and/or flash and RAM budgets, within an accuracy budget."""

    memory_saving: float
    memory: str  # "parameters" | "footprint"
    max_accuracy_drop: float | None
    min_accuracy: float | None
    accuracy_floor: float  # the stricter of baseline - max_accuracy_drop and min_accuracy
    objective: str = "target"  # "target": stop at the asked saving; "max_saving": the paper's whole targets
    round_to: int = 1  # kept widths are multiples of this
    flash_budget: int | None = None  # bytes of weights at the deployment's precision
    ram_budget: int | None = None  # bytes of neuron state, buffers and the peak activation
    deployment: str = "fp32"  # the precision flash and RAM are counted at
    flash_margin: int = 0  # bytes the search keeps free below flash_budget (the deployment's margin_bytes)

    def targets(self, before: Footprint) -> dict[str, float]:
        """Measure -> the most bytes it may keep (none: nothing to prune)."""
        targets = {}
        if self.memory_saving > 0:
            targets[self.memory] = before.bytes_of(self.memory) * (1 - self.memory_saving)
        if self.flash_budget is not None:
            targets["flash"] = max(1, self.flash_budget - self.flash_margin)
        if self.ram_budget is not None:
            targets["ram"] = self.ram_budget
        return targets

    def verdicts(self, before: Footprint, after: Footprint, flash_bytes: int | None = None,
                 margin: bool = True) -> list[Verdict]:
        """Each target (the saving when asked, each budget) and whether ``after`` meets it: what ``prime()``
        judges its plan by (flash within the margin) and the run's checks judge the written files by
        (``flash_bytes``: a file's size, against the budget itself)."""
        verdicts = []
        if self.memory_saving > 0:
            saving = 1 - after.bytes_of(self.memory) / before.bytes_of(self.memory)
            verdicts.append(Verdict("saving", saving >= self.memory_saving - 1e-9, saving, self.memory_saving))
        for measure, budget in (("flash", self.flash_budget), ("ram", self.ram_budget)):
            if budget is None:
                continue
            limit = self.targets(before)[measure] if margin else budget
            value = flash_bytes if measure == "flash" and flash_bytes is not None else after.bytes_of(measure)
            verdicts.append(Verdict(measure, value <= limit, value, budget))
        return verdicts

    def outcomes(self, before: Footprint, after: Footprint) -> list[tuple[bool, str]]:
        """Each target with whether ``after`` meets it, in the words of ``prime()``'s reason."""
        outcomes = []
        for verdict in self.verdicts(before, after):
            if verdict.measure == "saving":
                outcomes.append((verdict.ok, f"memory saving {verdict.value:.2%} {'>=' if verdict.ok else '<'} "
                                             f"{verdict.wanted:.2%}"))
            else:
                margin = f", {self.flash_margin:,} B margin" if verdict.measure == "flash" and self.flash_margin else ""
                outcomes.append((verdict.ok, f"{verdict.measure} {verdict.value:,} B {'<=' if verdict.ok else '>'} "
                                             f"budget {verdict.wanted:,} B ({self.deployment}{margin})"))
        return outcomes


@dataclass(frozen=True)
class Verdict:
    """One target judged: ``value`` (a saving, or bytes kept) against ``wanted`` (the asked saving, or the budget)."""

    measure: str  # "saving" | "flash" | "ram"
    ok: bool
    value: float
    wanted: float


@dataclass
class Scored:
    accuracy: float


@dataclass
class Measured(Scored):
    memory: Footprint


@dataclass
class Pruned(Measured):
    memory_saving: float  # of the measure the constraints name
    footprint_saving: float
    parameter_saving: float
    predicted_memory: Footprint  # the ledger's prediction before pruning; equals ``memory``


@dataclass
class PrimeReport:
    """Everything ``prime()`` decided and measured."""

    constraints: Constraints
    constraints_met: bool
    reason: str
    warnings: list[str]
    baseline: Measured
    pruned: Pruned
    finetuned: Scored | None
    groups: list[GroupRecord]  # largest first
    plan: dict[str, list[int]]  # group name -> removed channels
    evaluations: int  # every call of evaluate, the baseline and the final ones included
    search_in_evaluation_passes: float
    rates: list[float]
    timings_s: dict[str, float]
    search: str = "bisect"  # "bisect" | "sweep"
    rank_by: str = "memory"  # "memory" | "energy" | "both": what ordered the groups

    @property
    def final_accuracy(self) -> float:
        return self.pruned.accuracy if self.finetuned is None else self.finetuned.accuracy

    def group(self, name: str) -> GroupRecord:
        return next(g for g in self.groups if g.name == name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: footprints with their ``total_bytes``, everything else as is."""
        return _jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrimeReport":
        """Read back ``to_dict()``'s output (e.g. ``report.json``'s ``prune`` section)."""
        def footprint(d):
            return Footprint(**{k: v for k, v in d.items() if k != "total_bytes"})

        pruned = dict(data["pruned"], memory=footprint(data["pruned"]["memory"]),
                      predicted_memory=footprint(data["pruned"]["predicted_memory"]))
        groups = [GroupRecord(**dict(g, sensitivity=[Trial(**t) for t in g["sensitivity"]])) for g in data["groups"]]
        return cls(**dict(data, constraints=Constraints(**data["constraints"]),
                          baseline=Measured(data["baseline"]["accuracy"], footprint(data["baseline"]["memory"])),
                          pruned=Pruned(**pruned), groups=groups,
                          finetuned=None if data["finetuned"] is None else Scored(**data["finetuned"])))


@dataclass
class PrimeResult:
    """The pruned model and the report of how it was pruned."""

    model: nn.Module
    report: PrimeReport


def _jsonable(value):
    if isinstance(value, Footprint):
        return value.as_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value
