"""``PrimeConfig``: every option of the PrimeSVT policy, declared and validated in one place.

``prime()`` takes one (its keyword arguments are mapped onto it), a recipe's ``prune``
section builds one (``PruneSection.to_config()``), and the search reads its options from
it. Each option is declared here once: its type, default, description and range (``option``);
the recipe schema generates its ``prune.*`` fields from these declarations and states only
what a YAML file writes differently. The checks a schema cannot declare as a type or a range
(``checked_rates``) are functions here that the schema's field validators call, and the recipe
builds a ``PrimeConfig`` when it is loaded, so its cross-field checks run before any training.
An option is added here and where it is used.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Literal, get_args

from ..errors import ArgumentError
from ..targets import FP32, Deployment

DEFAULT_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
Memory = Literal["parameters", "footprint"]  # what a memory_saving (and the ranking) may count
Objective = Literal["target", "max_saving"]
Search = Literal["bisect", "sweep"]
Ranking = Literal["memory", "energy", "both"]
MEMORIES, OBJECTIVES, SEARCHES, RANKINGS = (get_args(choice) for choice in (Memory, Objective, Search, Ranking))
MEASURED_BY_THE_RUN = ("deployment", "chance_accuracy")  # options a recipe does not write: its run measures them


def option(default, description: str, **bounds):
    """A ``PrimeConfig`` field: its default, the description ``primesvt schema`` and docs/recipes.md show,
    and its range as pydantic writes one (``ge``, ``gt``, ``lt``, ``le``), which the recipe schema declares."""
    return field(default=default, metadata={"description": description, "bounds": bounds})


@dataclass(frozen=True)
class PrimeConfig:
    """What ``prime()`` is asked (docs/recipes.md documents each as a ``prune.*`` field).

    Targets: ``memory_saving`` (a fraction of ``memory``) and/or ``flash_budget`` /
    ``ram_budget`` (bytes under ``deployment``). Accuracy budget: ``max_accuracy_drop``
    below the unpruned score and/or ``min_accuracy`` (the stricter wins). The search:
    ``rates`` tried per group, ``objective``, ``round_to``, ``search``, ``rank_by``;
    ``chance_accuracy`` flags a baseline no better than guessing.
    """

    memory_saving: float | None = option(None, "wanted fraction of memory saved (0 when only budgets are given)",
                                         ge=0, lt=1)
    max_accuracy_drop: float | None = option(None, "allowed validation accuracy drop (0-1)", ge=0)
    min_accuracy: float | None = option(None, "lowest validation accuracy allowed (0-1)")
    flash_budget: int | None = option(
        None, "most bytes of weights on the device (53976, '50KB' = 50,000, '50KiB' = 51,200), at the quantizer's "
              "precision (nncf_int8: INT8, nncf_int4: INT4/INT8) or FP32 without quantize", gt=0)
    ram_budget: int | None = option(
        None, "most bytes of neuron state + buffers + the largest layer output, one sample (attention's matrix "
              "products not counted); activations at 1 B under nncf_int8, 4 B under nncf_int4 (weight-only) "
              "and FP32", gt=0)
    deployment: Deployment = option(FP32, "the precisions the budgets are counted at")
    rates: tuple[float, ...] = option(DEFAULT_RATES, "the pruning rates tried per group, fractions in (0, 1)")
    memory: Memory = option("parameters", "what memory_saving measures")
    objective: Objective = option(
        "target", "target: stop at memory_saving (the last group loses only what reaches it); max_saving: every "
                  "chosen group at its highest feasible rate (the paper)")
    round_to: int = option(1, "kept widths are multiples of this (8 or 16 for SIMD targets)", ge=1)
    search: Search = option("bisect", "bisect: each highest feasible rate by bisection; sweep: every rate in order")
    rank_by: Ranking = option(
        "memory", "the order groups are compressed in: memory (the paper), energy per image of the layers they "
                  "touch (op_counter on validation images), or both (sum of the shares)")
    chance_accuracy: float | None = option(None, "the score of guessing; a baseline no better fails the run")

    def __post_init__(self):
        _check_number("memory_saving", self.memory_saving, 0.0)
        if self.memory_saving is not None and self.memory_saving >= 1.0:
            raise ArgumentError(f"memory_saving must be a fraction in [0, 1), got {self.memory_saving}")
        _check_accuracy_budget(self.max_accuracy_drop, self.min_accuracy)
        _check_number("max_accuracy_drop", self.max_accuracy_drop, 0.0)
        _check_number("min_accuracy", self.min_accuracy)
        _check_number("chance_accuracy", self.chance_accuracy)
        if self.memory not in MEMORIES:
            raise ArgumentError(f"memory measure must be one of {MEMORIES}, got {self.memory!r}")
        object.__setattr__(self, "rates", checked_rates(self.rates))
        self._check_budgets()
        for name, choices in (("objective", OBJECTIVES), ("search", SEARCHES), ("rank_by", RANKINGS)):
            if getattr(self, name) not in choices:
                raise ArgumentError(f"{name} must be one of {', '.join(map(repr, choices))}, got {getattr(self, name)!r}")
        _check_round_to(self.round_to)

    def _check_budgets(self) -> None:
        if self.memory_saving is None and self.flash_budget is None and self.ram_budget is None:
            raise ArgumentError("give memory_saving (a fraction) and/or flash_budget / ram_budget (bytes): the target")
        for name in ("flash_budget", "ram_budget"):
            budget = getattr(self, name)
            if budget is not None and (isinstance(budget, bool) or not isinstance(budget, numbers.Integral)
                                       or budget <= 0):
                raise ArgumentError(f"{name} must be a positive whole number of bytes, got {budget!r}")
        if not isinstance(self.deployment, Deployment):
            raise ArgumentError(f"deployment must be a primesvt_plugin.Deployment (FP32, INT8, ...), "
                                f"got {self.deployment!r}")

    @property
    def saving(self) -> float:
        """The asked saving (0: only budgets are targets)."""
        return self.memory_saving or 0.0


def checked_rates(rates) -> tuple[float, ...]:
    """The pruning rates tried per group, sorted and without repeats; each a fraction in (0, 1)."""
    rates = tuple(sorted({float(r) for r in rates}))
    if not rates or rates[0] <= 0 or rates[-1] >= 1:
        raise ArgumentError(f"rates must be fractions in (0, 1), got {list(rates)}")
    return rates


def _check_accuracy_budget(max_accuracy_drop: float | None, min_accuracy: float | None) -> None:
    """The policy needs an accuracy budget: a drop allowed, a floor, or both."""
    if max_accuracy_drop is None and min_accuracy is None:
        raise ArgumentError("give max_accuracy_drop and/or min_accuracy: the accuracy budget")


def _check_round_to(round_to) -> None:
    """Kept widths are multiples of ``round_to``: a positive integer."""
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ArgumentError(f"round_to must be a positive integer, got {round_to!r}")


def _check_number(name: str, value, low: float = -math.inf) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                              or not math.isfinite(value) or value < low):
        raise ArgumentError(f"{name} must be a finite number >= {low}, got {value!r}")
