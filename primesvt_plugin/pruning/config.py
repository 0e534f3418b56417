"""``PrimeConfig``: every option of the PrimeSVT policy, validated in one place.

``prime()`` takes one (its keyword arguments are mapped onto it), a recipe's ``prune``
section builds one (``PruneSection.to_config()``), and the search reads its options from
it: an option is added here, in the recipe schema (which documents it) and where it is used.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ..errors import ArgumentError
from ..targets import FP32, Deployment

DEFAULT_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MEMORIES = ("parameters", "footprint")  # what a memory_saving (and the ranking) may count
OBJECTIVES = ("target", "max_saving")
SEARCHES = ("bisect", "sweep")
RANKINGS = ("memory", "energy", "both")


@dataclass(frozen=True)
class PrimeConfig:
    """What ``prime()`` is asked (docs/recipes.md documents each as a ``prune.*`` field).

    Targets: ``memory_saving`` (a fraction of ``memory``) and/or ``flash_budget`` /
    ``ram_budget`` (bytes under ``deployment``). Accuracy budget: ``max_accuracy_drop``
    below the unpruned score and/or ``min_accuracy`` (the stricter wins). The search:
    ``rates`` tried per group, ``objective``, ``round_to``, ``search``, ``rank_by``;
    ``chance_accuracy`` flags a baseline no better than guessing.
    """

    memory_saving: float | None = None
    max_accuracy_drop: float | None = None
    min_accuracy: float | None = None
    flash_budget: int | None = None
    ram_budget: int | None = None
    deployment: Deployment = FP32
    rates: tuple[float, ...] = DEFAULT_RATES
    memory: str = "parameters"
    objective: str = "target"
    round_to: int = 1
    search: str = "bisect"
    rank_by: str = "memory"
    chance_accuracy: float | None = None

    def __post_init__(self):
        _check_number("memory_saving", self.memory_saving, 0.0)
        if self.memory_saving is not None and self.memory_saving >= 1.0:
            raise ArgumentError(f"memory_saving must be a fraction in [0, 1), got {self.memory_saving}")
        if self.max_accuracy_drop is None and self.min_accuracy is None:
            raise ArgumentError("give max_accuracy_drop and/or min_accuracy: the accuracy budget")
        _check_number("max_accuracy_drop", self.max_accuracy_drop, 0.0)
        _check_number("min_accuracy", self.min_accuracy)
        _check_number("chance_accuracy", self.chance_accuracy)
        if self.memory not in MEMORIES:
            raise ArgumentError(f"memory measure must be one of {MEMORIES}, got {self.memory!r}")
        rates = tuple(sorted({float(r) for r in self.rates}))
        if not rates or rates[0] <= 0 or rates[-1] >= 1:
            raise ArgumentError(f"rates must be fractions in (0, 1), got {list(rates)}")
        object.__setattr__(self, "rates", rates)
        self._check_budgets()
        for name, choices in (("objective", OBJECTIVES), ("search", SEARCHES), ("rank_by", RANKINGS)):
            if getattr(self, name) not in choices:
                raise ArgumentError(f"{name} must be one of {', '.join(map(repr, choices))}, got {getattr(self, name)!r}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ArgumentError(f"round_to must be a positive integer, got {self.round_to!r}")

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


def _check_number(name: str, value, low: float = -math.inf) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                              or not math.isfinite(value) or value < low):
        raise ArgumentError(f"{name} must be a finite number >= {low}, got {value!r}")
