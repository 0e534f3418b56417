"""The PrimeSVT search: each group's robustness, then compression largest first, on masks.

For each group, from the largest to the smallest, until every target is reached (the
asked saving of the ranking's memory, and any flash or RAM budget in bytes):

1. *Robustness* (the group alone, every other group unmasked): the highest count of
   its lowest-scored channels, among the counts the ``rates`` give, whose removal keeps
   the accuracy at or above the floor: the group's *target*.
2. *Compression* (on top of the groups already chosen): the largest count up to the
   target that keeps the combined accuracy at or above the floor. With
   ``objective="target"`` the count is also capped at the smallest one that reaches
   the targets (at channel granularity: whole head blocks, ``round_to``), so the
   plan stops at what was asked instead of overshooting it; ``"max_saving"`` takes
   the whole target (the paper's behaviour).

Accuracy falls as a group loses more channels, so both steps find their highest
feasible count by bisection (``search="bisect"``, about log2(len(rates)) evaluations)
instead of trying every rate (``search="sweep"``, which stops at the first infeasible
rate). A group is measured only when the compression reaches it, and a compression
trial identical to a robustness trial (nothing chosen yet) reuses its score. Under
monotone accuracy the plan equals the full sweep's.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from tqdm.auto import tqdm

from .channels import ChannelOp
from .config import PrimeConfig
from .graph import PruningGroup
from .masking import Masks
from .memory import Footprint, LedgerState
from .records import GroupRecord, Trial



def removal_counts(group: PruningGroup, round_to: int = 1) -> list[int]:
    """Channel counts ``group`` can lose, ascending: whole head blocks, at least one channel kept
    per block, and a kept width that is a multiple of ``round_to``."""
    block = group.size // group.channel_groups
    return [k * group.channel_groups for k in range(1, block)
            if (group.size - k * group.channel_groups) % round_to == 0]


def rate_grid(group: PruningGroup, rates: Sequence[float], counts: Sequence[int]) -> list[tuple[float, int]]:
    """``(rate, count)`` for each rate that removes a new number of channels, counts ascending."""
    grid: list[tuple[float, int]] = []
    for rate in rates:
        count = max((c for c in counts if c <= group.removable(rate)), default=0)
        if count and (not grid or count > grid[-1][1]):
            grid.append((rate, count))
    return grid


def highest_feasible(candidates: Sequence, feasible: Callable[[object], bool], bisect: bool) -> int:
    """Index of the highest candidate ``feasible`` accepts, -1 if none.

    Assumes feasibility only falls along ``candidates``: bisection, or (``bisect=False``)
    a scan from the first that stops at the first infeasible one.
    """
    if not bisect:
        best = -1
        for i, candidate in enumerate(candidates):
            if not feasible(candidate):
                break
            best = i
        return best
    low, high = -1, len(candidates)  # candidates[low] feasible (or none), candidates[high] not (or none)
    while high - low > 1:
        middle = (low + high) // 2
        if feasible(candidates[middle]):
            low = middle
        else:
            high = middle
    return low


@dataclass
class PlanSearch:
    """One search over ``groups`` (largest first); ``run()`` returns the plan and its predicted footprint."""

    groups: list[PruningGroup]
    records: dict[str, GroupRecord]
    select: Callable[[PruningGroup, int], list[int]]  # the ``count`` lowest-scored channels, head-aligned
    evaluate: Callable[[], float]
    floor: float
    ledger: LedgerState
    before: Footprint
    targets: dict[str, float]  # measure ("parameters", "flash", ...) -> the most bytes it may keep
    config: PrimeConfig  # rates, objective, search (bisect or sweep), round_to, memory (what freed_bytes counts)
    progress: bool = False
    masks: Masks = field(default_factory=Masks)
    chosen_ops: list[ChannelOp] = field(default_factory=list)
    solo: dict[tuple[str, int], float] = field(default_factory=dict)

    def run(self) -> tuple[dict[str, list[int]], Footprint]:
        initial = self.ledger.copy()
        chosen: dict[str, tuple[PruningGroup, int, float]] = {}  # name -> (group, count, rate), in order
        bar = tqdm(total=len(self.groups), desc="search", disable=not self.progress, leave=False)
        try:
            for group in self.groups:
                if self._reached(self.ledger.footprint()):
                    break
                bar.update(1)
                count, rate = self._choose(group)
                if count == 0:
                    continue
                ops = group.channel_ops(self.select(group, count))
                self.masks.trial(ops)
                self.masks.commit()
                self.chosen_ops += ops
                for op in ops:  # accepted for good: the ledger only ever records accepted removals
                    self.ledger.remove(op)
                chosen[group.name] = (group, count, rate)
        finally:
            bar.close()
            self.masks.clear()
        if self.config.objective == "target" and self._reached(self.ledger.footprint()):
            chosen = self._trimmed(chosen, initial)
        return self._account(chosen, initial)

    def _trimmed(self, chosen: dict[str, tuple[PruningGroup, int, float]],
                 initial: LedgerState) -> dict[str, tuple[PruningGroup, int, float]]:
        """The plan with each group, last chosen first, cut back to the fewest channels that keep every
        target: with several targets, a group chosen for one of them may be more than the later
        groups left necessary. Fewer channels removed cannot lower the accuracy (the search's premise)."""
        counts = {name: count for name, (_, count, _) in chosen.items()}

        def reaches(name: str, count: int) -> bool:
            ledger = self._predicted({**counts, name: count}, chosen, initial)
            return self._reached(ledger.footprint())

        for name in reversed(list(chosen)):
            group = chosen[name][0]
            fewer = [c for c in [0] + removal_counts(group, self.config.round_to) if c <= counts[name]][::-1]
            counts[name] = fewer[highest_feasible(fewer, lambda c: reaches(name, c), bisect=True)]
        return {name: (group, counts[name], rate if counts[name] == count else counts[name] / group.size)
                for name, (group, count, rate) in chosen.items() if counts[name]}

    def _predicted(self, counts: dict[str, int], chosen, initial: LedgerState) -> LedgerState:
        ledger = initial.copy()
        for name, count in counts.items():
            for op in chosen[name][0].channel_ops(self.select(chosen[name][0], count)):
                ledger.remove(op)
        return ledger

    def _account(self, chosen: dict[str, tuple[PruningGroup, int, float]],
                 initial: LedgerState) -> tuple[dict[str, list[int]], Footprint]:
        """The plan, each group's record (count, rate, bytes freed in order) and the predicted footprint."""
        plan: dict[str, list[int]] = {}
        ledger, predicted = initial.copy(), self.before
        for name, (group, count, rate) in chosen.items():
            plan[name] = self.select(group, count)
            for op in group.channel_ops(plan[name]):
                ledger.remove(op)
            after = ledger.footprint()
            record = self.records[name]
            record.freed_bytes = predicted.bytes_of(self.config.memory) - after.bytes_of(self.config.memory)
            record.chosen_rate, record.removed_channels = rate, count
            predicted = after
        return plan, predicted

    def _reached(self, footprint: Footprint) -> bool:
        return all(footprint.bytes_of(measure) <= limit + 1e-9 for measure, limit in self.targets.items())

    def _choose(self, group: PruningGroup) -> tuple[int, float]:
        """The count of channels ``group`` loses (0: none) and the rate it is reported at."""
        counts = removal_counts(group, self.config.round_to)
        grid = rate_grid(group, self.config.rates, counts)
        target = self._robustness(group, grid)
        if target == 0:
            return 0, 0.0
        cap = target
        if self.config.objective == "target":
            cap = min(cap, self._count_reaching_targets(group, [c for c in counts if c <= target]) or cap)
        rate_of = {count: rate for rate, count in grid}
        candidates = [c for _, c in grid if c < cap]
        if self._combined(group, cap) >= self.floor:
            count = cap
        else:
            best = highest_feasible(candidates, lambda c: self._combined(group, c) >= self.floor, self.config.search == "bisect")
            count = candidates[best] if best >= 0 else 0
        return count, rate_of.get(count, count / group.size)

    def _robustness(self, group: PruningGroup, grid: list[tuple[float, int]]) -> int:
        """The group's target count (0 when even its smallest count falls below the floor)."""
        record = self.records[group.name]

        def feasible(entry: tuple[float, int]) -> bool:
            rate, count = entry
            accuracy = self._solo(group, count)
            record.sensitivity.append(Trial(rate, count, accuracy))
            return accuracy >= self.floor

        best = highest_feasible(grid, feasible, self.config.search == "bisect")
        record.sensitivity.sort(key=lambda trial: trial.removed)
        record.target_rate = grid[best][0] if best >= 0 else 0.0
        return grid[best][1] if best >= 0 else 0

    def _count_reaching_targets(self, group: PruningGroup, counts: list[int]) -> int | None:
        """The smallest of ``counts`` whose removal (on top of the plan so far) reaches the targets."""
        def reaches(count: int) -> bool:
            ledger = self.ledger.copy()
            for op in group.channel_ops(self.select(group, count)):
                ledger.remove(op)
            return self._reached(ledger.footprint())

        # highest_feasible on the reversed list: "reaches" only falls as the count shrinks
        reversed_counts = counts[::-1]
        best = highest_feasible(reversed_counts, reaches, bisect=True)
        return reversed_counts[best] if best >= 0 else None

    def _solo(self, group: PruningGroup, count: int) -> float:
        """Accuracy with only ``count`` channels of ``group`` masked (the chosen groups unmasked)."""
        key = (group.name, count)
        if key not in self.solo:
            with self._chosen_lifted():
                self.solo[key] = self._trial(group, count)
        return self.solo[key]

    def _combined(self, group: PruningGroup, count: int) -> float:
        """Accuracy with ``count`` channels of ``group`` masked on top of the chosen groups."""
        if not self.chosen_ops and (group.name, count) in self.solo:
            return self.solo[(group.name, count)]  # nothing chosen yet: the same trial
        return self._trial(group, count)

    def _trial(self, group: PruningGroup, count: int) -> float:
        self.masks.trial(group.channel_ops(self.select(group, count)))
        try:
            accuracy = self.evaluate()
        finally:
            self.masks.undo_trial()
        self.records[group.name].evaluations += 1
        return accuracy

    @contextlib.contextmanager
    def _chosen_lifted(self) -> Iterator[None]:
        """Inside: the chosen groups' masks are lifted (the model as it was); put back on exit."""
        if not self.chosen_ops:
            yield
            return
        self.masks.clear()
        try:
            yield
        finally:
            self.masks.trial(self.chosen_ops)
            self.masks.commit()
