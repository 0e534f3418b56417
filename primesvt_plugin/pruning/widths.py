"""Integer attributes that hold a width the forward reads, kept true after channels are removed.

Authors' SViT code keeps widths in attributes and reshapes with them
(``x.reshape(T, B, self.c_hidden, N)``, ``reshape(..., self.num_heads, self.head_dim)``).
Torch-Pruning updates a layer's own ``out_channels``, not such attributes, so the next
forward breaks (or, with a ``-1`` in the shape, silently mixes channels).

What is rewritten is decided by tracing, never by matching values (``SPS.num_patches``
often equals the residual width and must stay): every integer attribute of every
module is handed to the forward as a ``TracedInt`` that remembers where it came from,
through arithmetic; every ``reshape`` / ``view`` is recorded with the shape of the tensor
it reshapes and the attributes each target size came from (``WidthTrace``). After a
structural change, the same input is run again (``repair_widths``): a reshape whose
input lost channels is mapped back onto the recorded call (which target sizes cover
the axes that shrank), and the one attribute those sizes came from is scaled by the
same factor. Counts that pruning never changes (``HEAD_COUNTS``: heads get narrower,
never fewer, and ``T``) are not traced: they stay plain ints and are never rewritten. A change no single attribute explains is
reported (``WidthRepairError``), naming the attributes; callers check the model again
after the repair, so nothing passes unverified.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..errors import PruningFailed

HEAD_COUNTS = ("num_heads", "heads", "T")  # attributes pruning never changes
RESHAPES = {torch.Tensor.reshape, torch.Tensor.view, torch.reshape}

Source = tuple[nn.Module, str]  # (module, attribute name)


class WidthRepairError(PruningFailed):
    """A reshape's sizes no longer fit the pruned tensor, and no single attribute explains it."""


class TracedInt(int):
    """An ``int`` remembering the module attributes it was computed from (through + - * // %)."""

    sources: frozenset

    def __new__(cls, value: int, sources=frozenset()):
        obj = super().__new__(cls, value)
        obj.sources = frozenset(sources)
        return obj


def _traced(name: str):
    plain = getattr(int, name)

    def method(self, *others):
        result = plain(self, *others)
        if type(result) is not int:  # NotImplemented, a float from /, a bool from a comparison
            return result
        sources = self.sources.union(*(getattr(o, "sources", ()) for o in others))
        return TracedInt(result, sources)
    return method


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__",
              "__rfloordiv__", "__mod__", "__rmod__", "__neg__", "__pos__", "__abs__"):
    setattr(TracedInt, _name, _traced(_name))


def _sources(value) -> frozenset:
    return getattr(value, "sources", frozenset())


@dataclass
class ReshapeCall:
    """One ``reshape`` / ``view``: the shape it was given, the sizes asked (each with its attribute sources)."""

    input_shape: tuple[int, ...]
    sizes: tuple[int, ...]
    sources: tuple[frozenset, ...]
    output_shape: tuple[int, ...]


def _target_sizes(args) -> tuple | None:
    """The sizes a reshape / view call asks for (None for ``view(dtype)``)."""
    sizes = args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = tuple(sizes[0])
    if not all(isinstance(s, int) for s in sizes):
        return None
    return tuple(sizes)


class WidthTrace(TorchFunctionMode):
    """Records every reshape of a forward pass (see the module docstring); given the calls
    ``recorded`` on the unpruned model, repairs the sizes of calls whose input shrank and
    collects the attribute values that make them fit (``fixes``)."""

    def __init__(self, recorded: list[ReshapeCall] | None = None):
        super().__init__()
        self.recorded = recorded
        self.calls: list[ReshapeCall] = []
        self.fixes: dict[Source, int] = {}
        self.unexplained: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sizes = _target_sizes(args) if func in RESHAPES and args and isinstance(args[0], torch.Tensor) else None
        if sizes is None:
            return func(*args, **kwargs)
        index = len(self.calls)
        if self.recorded is not None and index < len(self.recorded):
            sizes = self._repaired(self.recorded[index], tuple(args[0].shape), sizes)
            args = (args[0], sizes)
        out = func(*args, **kwargs)
        self.calls.append(ReshapeCall(tuple(args[0].shape), tuple(int(s) for s in sizes),
                                      tuple(_sources(s) for s in sizes), tuple(out.shape)))
        return out

    def _repaired(self, before: ReshapeCall, shape: tuple[int, ...], sizes: tuple) -> tuple:
        """``sizes`` with the attribute-derived size covering the shrunk axes scaled to fit."""
        if shape == before.input_shape or len(shape) != len(before.input_shape) or len(sizes) != len(before.sizes):
            return sizes
        shrunk = [axis for axis, (old, new) in enumerate(zip(before.input_shape, shape)) if old != new]
        covered = _covering_dims(before.input_shape, before.output_shape, shrunk)
        if any(int(sizes[d]) == -1 for d in covered):
            return sizes  # the -1 absorbs the change
        scale = math.prod(shape[a] for a in shrunk), math.prod(before.input_shape[a] for a in shrunk)
        wanted = math.prod(before.output_shape[d] for d in covered) * scale[0]
        if wanted % scale[1]:
            self.unexplained.append(_describe(set(), before, shape))
            return sizes
        wanted //= scale[1]
        asked = math.prod(int(sizes[d]) for d in covered)
        if asked == wanted:
            return sizes
        rewritable = {source for d in covered for source in _sources(sizes[d])}
        dims = [d for d in covered if _sources(sizes[d]) & rewritable]
        others = asked // int(sizes[dims[0]]) if len(dims) == 1 else 0
        if len(rewritable) != 1 or len(dims) != 1 or wanted % others:
            self.unexplained.append(_describe(rewritable, before, shape))
            return sizes
        (module, name), d = next(iter(rewritable)), dims[0]
        size, current = wanted // others, int(getattr(module, name))
        if (size * current) % int(sizes[d]):  # the size is not a whole multiple of the attribute
            self.unexplained.append(_describe(rewritable, before, shape))
            return sizes
        value = size * current // int(sizes[d])
        if self.fixes.setdefault((module, name), value) != value:
            self.unexplained.append(f"attribute {name} would need both {self.fixes[(module, name)]} and {value}")
        return tuple(size if i == d else s for i, s in enumerate(sizes))


def _describe(rewritable: set[Source], before: ReshapeCall, shape: tuple[int, ...]) -> str:
    names = ", ".join(sorted(name for _, name in rewritable))
    source = f"sizes from {names}" if names else "sizes that are constants or come from no attribute"
    return f"a reshape to {list(before.sizes)} of a tensor now {list(shape)} (was {list(before.input_shape)}), {source}"


def _covering_dims(input_shape, output_shape, axes: list[int]) -> list[int]:
    """The output dims of a reshape (row-major) whose extent overlaps input ``axes``."""
    def bounds(shape):
        edges = [1]
        for size in shape:
            edges.append(edges[-1] * size)
        return edges

    inside, outside = bounds(input_shape), bounds(output_shape)
    return [d for d in range(len(output_shape))
            if any(max(outside[d], inside[a]) < min(outside[d + 1], inside[a + 1]) for a in axes)]


@contextlib.contextmanager
def traced_attributes(model: nn.Module) -> Iterator[dict[Source, int]]:
    """Inside: every plain ``int`` attribute of every module is a ``TracedInt`` naming itself; the
    original values come back on exit (unless the forward assigned the attribute itself)."""
    traced: dict[Source, TracedInt] = {}
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if type(value) is int and name not in HEAD_COUNTS:  # those never change: they stay plain ints
                traced[(module, name)] = module.__dict__[name] = TracedInt(value, {(module, name)})
    try:
        yield {source: int(value) for source, value in traced.items()}
    finally:
        for (module, name), value in traced.items():
            if module.__dict__.get(name) is value:
                module.__dict__[name] = int(value)


@contextlib.contextmanager
def width_trace(model: nn.Module, recorded: list[ReshapeCall] | None = None) -> Iterator[WidthTrace]:
    """Inside: the reshapes of ``model``'s forward passes are recorded (and repaired, given ``recorded``)."""
    trace = WidthTrace(recorded)
    with traced_attributes(model), trace:
        yield trace


@dataclass
class Repair:
    """What ``repair_widths`` did: the attributes it set, and the output (or error) of its pass."""

    fixes: dict[str, int]
    output: object = None
    error: Exception | None = None


def repair_widths(model: nn.Module, run, recorded: list[ReshapeCall]) -> Repair:
    """After a structural change: ``run(model)`` (the same input as when ``recorded`` was traced) with the
    reshapes repaired, then the attributes set to the sizes that fit (``fixes``: ``{"module.attr": new}``).
    With no fix needed, the pass is the model's own forward: its ``output`` (or ``error``) is the check's.
    ``WidthRepairError`` when a change is not explained by a single attribute."""
    names = {m: n for n, m in model.named_modules()}
    repair = Repair({})
    with width_trace(model, recorded) as trace:
        try:
            repair.output = run(model)
        except Exception as error:  # a forward that still fails is the caller's check to report
            repair.error = error
    if trace.unexplained:
        raise WidthRepairError(f"after pruning, {trace.unexplained[0]}: the forward reshapes a pruned tensor with "
                               "sizes no single attribute explains; give the module a layout "
                               "(primesvt_attention_layout, on_resize) or compute the sizes from the tensor's shape")
    for (module, name), value in trace.fixes.items():
        setattr(module, name, value)
        repair.fixes[f"{names[module]}.{name}" if names.get(module) else name] = value
    return repair
