"""Attention layouts inferred from a block's structure, and proven on a copy before they are used.

Authors' SViT code builds attention from standard parts: q/k/v projections (separate
or fused ``Linear`` / ``Conv1d`` / ``Conv2d`` 1x1 layers, with or without batch norms
and neurons after them), heads formed by a reshape, some product of the heads
(``q @ k^T @ v``, SDT's ``k * v`` summed over tokens, QKFormer's token attention),
and an output projection reading the heads back. For such a block no plugin should be
needed: ``infer_layout`` traces one call of the block (the input and output the graph's
sample pass recorded) with its neurons passing their input through, follows autograd
from every layer back to the nearest convolution or linear layer (or the block's
input), and reads the ``AttentionLayout`` off that:

* *reads*: the layers fed by the block's input with no other projection between;
* *writes*: the layers the block's output comes from (and the batch norms after them);
* *inner*: the input channels of the writers, which every reader produces a whole
  number of times (``chunks``: 3 for a fused qkv layer);
* neurons: after the input or a writer they follow the residual width, after the
  readers the inner width; whether a neuron's state shrinks with the channels (a
  neuron after a sum over channels does not) is measured, not assumed.

Whether the block is *tied* (it reshapes q/k/v with its input's channel count) is not
read from code: each hypothesis (untied: inner and width pruned separately; tied:
together) is proven by pruning one channel of every head of a float64 copy and checking
that its outputs equal those of a copy with the same channels zeroed (masked), with
width attributes repaired (``widths.py``). The first hypothesis proven wins; a block
none proves, or whose structure is not the one above, is refused naming the block, what
could not be inferred, and the hook a plugin implements instead.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional

from ..errors import UnhandledLayerError, first_line
from .attention import INNER, WIDTH, AttentionLayout
from .channels import zero_channels
from .spiking import first_tensor, map_tensors, overridden_forward
from .tracing import passthrough, traceable_parameters
from .widths import repair_widths, width_trace

PROJECTIONS = (nn.modules.conv._ConvNd, nn.Linear)
NORMS = (nn.modules.batchnorm._BatchNorm,)
INPUT = "the block's input"
PROOF_SCALES = (1.0, 4.0)  # input scales tried until the block's output depends on its q/k/v
PROOF_THRESHOLD = 0.05  # neurons fire easily in the proof copies, so that spikes carry the channels


@dataclass
class BlockCall:
    """One call of a block in the graph's sample pass: what it received, and what it returned."""

    args: tuple
    kwargs: dict
    output: Any


@contextlib.contextmanager
def recorded_calls(blocks: list[nn.Module]) -> Iterator[dict[nn.Module, list[BlockCall]]]:
    """Inside: every call of ``blocks`` is recorded (arguments and output, tensors copied)."""
    calls: dict[nn.Module, list[BlockCall]] = {}

    def record(module, args, kwargs, output):
        calls.setdefault(module, []).append(BlockCall(_copied(args), _copied(kwargs), _copied(output)))

    hooks = [block.register_forward_hook(record, with_kwargs=True) for block in blocks]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def _copied(value):
    return map_tensors(lambda tensor: tensor.detach().clone(), value)


@dataclass
class Structure:
    """An attention block's layers by role, by their names inside the block."""

    heads: int
    reads: list[str]
    writes: list[str]
    inner_out: list[tuple[str, int]]
    inner_in: list[str]
    width_neurons: list[str]
    inner_neurons: list[str]
    neuron_chunks: dict[str, int] = field(default_factory=dict)  # measured: 0 = state does not shrink

    def layout(self, block: nn.Module, tied: bool) -> AttentionLayout:
        """The layout of ``block`` (or of a copy of it) under this structure."""
        layers = dict(block.named_modules())
        return AttentionLayout(
            module=block, num_heads=self.heads, tied=tied,
            reads=[layers[n] for n in self.reads], writes=[layers[n] for n in self.writes],
            inner_out=[(layers[n], chunks) for n, chunks in self.inner_out], inner_in=[layers[n] for n in self.inner_in],
            width_neurons=[layers[n] for n in self.width_neurons],
            inner_neurons=[(layers[n], self.neuron_chunks.get(n, 1)) for n in self.inner_neurons])


class InferenceFailed(Exception):
    """Why a structure could not be read or proven (turned into the refusal's words)."""


def infer_layout(block: nn.Module, call: BlockCall, name: str, spiking_types: tuple[type, ...]) -> AttentionLayout:
    """The ``AttentionLayout`` of ``block`` read from its structure and proven on copies; refused when it cannot be."""
    try:
        structure = read_structure(block, call, spiking_types)
    except InferenceFailed as why:
        raise _refusal(block, name, str(why)) from None
    failures = []
    for tied in (False, True):
        if tied and structure_inner(block, structure) != structure_width(block, structure):
            failures.append("tied: its q/k/v width differs from its residual width")
            continue
        try:
            prove(block, call, structure, tied, spiking_types)
            return structure.layout(block, tied)
        except InferenceFailed as why:
            failures.append(f"{'tied' if tied else 'untied'}: {why}")
    raise _refusal(block, name, "pruning one channel of every head of a copy did not give the outputs of the same "
                                "channels zeroed (" + "; ".join(failures) + ")")


def _refusal(block: nn.Module, name: str, why: str) -> UnhandledLayerError:
    return UnhandledLayerError(
        f"attention block {name!r} ({type(block).__module__}.{type(block).__qualname__}): its layout could not be "
        f"inferred: {why}; write a plugin implementing primesvt_attention_layout for it (docs/plugins.md)")


def structure_width(block: nn.Module, structure: Structure) -> int:
    return structure.layout(block, False).width


def structure_inner(block: nn.Module, structure: Structure) -> int:
    return structure.layout(block, False).inner


# -- reading the structure -----------------------------------------------------------


def head_count(block: nn.Module, inner: int) -> int:
    """The block's number of heads: its ``num_heads`` / ``heads`` attribute, else ``inner // head_dim``."""
    for attribute in ("num_heads", "heads"):
        if type(getattr(block, attribute, None)) is int:
            return getattr(block, attribute)
    head_dim = getattr(block, "head_dim", None)
    if type(head_dim) is int and head_dim > 0 and inner % head_dim == 0:
        return inner // head_dim
    raise InferenceFailed("it has no integer num_heads or heads, and its head_dim does not divide its q/k/v width")


def read_structure(block: nn.Module, call: BlockCall, spiking_types: tuple[type, ...]) -> Structure:
    """The roles of ``block``'s layers, from one traced call (see the module docstring)."""
    upstream, output_upstream = _dataflow(block, call, spiking_types)
    names = {m: n for n, m in block.named_modules()}
    nearest = _nearest_projections(upstream)
    projections = [m for m in upstream if isinstance(m, PROJECTIONS)]
    reads = [m for m in projections if nearest(m) == {INPUT}]
    writes = sorted({p for m in output_upstream for p in ({m} if isinstance(m, PROJECTIONS) else nearest(m))
                     if p is not INPUT}, key=lambda m: names[m])
    if not reads or not writes:
        raise InferenceFailed("no projection reads its input" if not reads else "no projection writes its output")
    both = [names[m] for m in reads if m in writes]
    if both:
        raise InferenceFailed(f"layer {both[0]} both reads its input and writes its output: no output projection "
                              "reads the heads back")
    between = [names[m] for m in projections if m not in reads and m not in writes]
    if between:
        raise InferenceFailed(f"layer {between[0]} sits between the q/k/v projections and the output projection")
    for writer in writes:
        if not nearest(writer) or not nearest(writer) <= set(reads):
            raise InferenceFailed(f"output projection {names[writer]} reads something other than the q/k/v projections")
    width, inner = _in_channels(reads[0]), _in_channels(writes[0])
    wrong = [m for m in reads if _in_channels(m) != width] + [m for m in writes if _in_channels(m) != inner
                                                               or _out_channels(m) != width]
    if wrong:
        raise InferenceFailed(f"layer {names[wrong[0]]} does not read the residual width {width} or write it back")
    chunks = {}
    for reader in reads:
        if _out_channels(reader) % inner:
            raise InferenceFailed(f"the heads are formed from a width no projection produces: {names[reader]} gives "
                                  f"{_out_channels(reader)} channels, not a whole number of the {inner} the output "
                                  f"projection reads")
        chunks[reader] = _out_channels(reader) // inner
    heads = head_count(block, inner)
    if inner % heads:
        raise InferenceFailed(f"its {heads} heads do not divide the q/k/v width {inner}")
    structure = Structure(heads, [names[m] for m in reads], [names[m] for m in writes], [], [names[m] for m in writes],
                          [], [])
    structure.inner_out = [(names[m], chunks[m]) for m in reads]
    for module in upstream:
        if isinstance(module, PROJECTIONS):
            continue
        source = nearest(module)
        if isinstance(module, NORMS):
            _place_norm(structure, module, source, reads, writes, chunks, names)
        elif source <= set(reads):
            structure.inner_neurons.append(names[module])
        elif source <= set(writes) | {INPUT}:
            structure.width_neurons.append(names[module])
        else:
            raise InferenceFailed(f"neuron {names[module]} mixes the residual and the q/k/v widths")
    return structure


def _place_norm(structure: Structure, norm, source, reads, writes, chunks, names) -> None:
    if source == {INPUT}:
        structure.reads.append(names[norm])
    elif len(source) == 1 and next(iter(source)) in reads:
        structure.inner_out.append((names[norm], chunks[next(iter(source))]))
    elif source <= set(writes):
        structure.writes.append(names[norm])
    else:
        raise InferenceFailed(f"batch norm {names[norm]} normalises channels of more than one projection")


def _in_channels(layer: nn.Module) -> int:
    return int(getattr(layer, "in_channels", None) or getattr(layer, "in_features"))


def _out_channels(layer: nn.Module) -> int:
    return int(getattr(layer, "out_channels", None) or getattr(layer, "out_features"))


def _nearest_projections(upstream: dict) -> Callable[[nn.Module], set]:
    """``nearest(m)``: the projections (or ``INPUT``) ``m`` reads from, through norms, neurons and other ops."""
    memo: dict = {}

    def nearest(module) -> set:
        if module not in memo:
            found = set()
            for source in upstream.get(module, ()):
                found |= {source} if source is INPUT or isinstance(source, PROJECTIONS) else nearest(source)
            memo[module] = found
        return memo[module]
    return nearest


def _dataflow(block: nn.Module, call: BlockCall, spiking_types: tuple[type, ...]) -> tuple[dict, set]:
    """``(upstream, output_upstream)``: for each layer of ``block`` that runs, the layers (or ``INPUT``) whose outputs
    its input is computed from, with no recorded layer between; and the same for the block's first output tensor."""
    probe = copy.deepcopy(block).eval()
    neurons = [m for m in probe.modules() if isinstance(m, spiking_types)]
    inside_neurons = {sub for n in neurons for sub in n.modules() if sub is not n}
    layers = [m for m in probe.modules() if m is not probe and m not in inside_neurons
              and (isinstance(m, PROJECTIONS + NORMS) or m in neurons or any(True for _ in m.parameters(recurse=False)))]
    unknown = [m for m in layers if not isinstance(m, PROJECTIONS + NORMS) and m not in neurons]
    x = call.args[0].detach().clone().requires_grad_(True)
    owners: dict = {}
    inputs: dict = {}

    def record(module, args, output):
        tensor = first_tensor(output)
        if isinstance(tensor, torch.Tensor) and tensor.grad_fn is not None:
            owners[tensor.grad_fn] = module
        inputs.setdefault(module, []).extend(a for a in args if isinstance(a, torch.Tensor))

    hooks = [m.register_forward_hook(record) for m in layers]
    try:
        with traceable_parameters(probe), overridden_forward({n: passthrough for n in neurons}):
            functional.reset_net(probe)
            output = first_tensor(probe(x, *_copied(call.args[1:]), **_copied(call.kwargs)))
    except Exception as error:
        raise InferenceFailed(f"tracing one call failed ({type(error).__name__}: {first_line(error)})") from None
    finally:
        for hook in hooks:
            hook.remove()
    if unknown and any(m in inputs for m in unknown):
        names = {m: n for n, m in probe.named_modules()}
        raise InferenceFailed(f"layer {names[next(m for m in unknown if m in inputs)]} has parameters but is not a "
                              "convolution, linear layer, batch norm or neuron")

    def sources(tensors) -> set:
        found, stack, seen = set(), [t.grad_fn if t.grad_fn is not None else t for t in tensors], set()
        while stack:
            fn = stack.pop()
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            if fn is x or getattr(fn, "variable", None) is x:
                found.add(INPUT)
            elif isinstance(fn, torch.Tensor):
                continue  # a constant
            elif fn in owners:
                found.add(owners[fn])
            else:
                stack.extend(f for f, _ in getattr(fn, "next_functions", ()))
        return found

    upstream = {_original(block, probe, m): {_original(block, probe, s) if s is not INPUT else INPUT
                                             for s in sources(ts)} for m, ts in inputs.items()}
    output_upstream = {_original(block, probe, s) if s is not INPUT else INPUT for s in sources([output])}
    return upstream, output_upstream


def _original(block: nn.Module, probe: nn.Module, module: nn.Module) -> nn.Module:
    """The module of ``block`` at the place ``module`` has in its copy ``probe``."""
    name = {m: n for n, m in probe.named_modules()}[module]
    return block.get_submodule(name)


# -- proving a hypothesis -------------------------------------------------------------


def _as_double(value):
    return map_tensors(lambda tensor: tensor.detach().double() if tensor.is_floating_point() else tensor, value)


def _proof_copy(block: nn.Module) -> nn.Module:
    twin = copy.deepcopy(block).double().eval()
    for module in twin.modules():
        if isinstance(getattr(module, "v_threshold", None), float):
            module.v_threshold = PROOF_THRESHOLD
    return twin


def _run(block: nn.Module, x: torch.Tensor, call: BlockCall) -> torch.Tensor:
    functional.reset_net(block)
    with torch.no_grad():
        out = first_tensor(block(x, *_as_double(call.args[1:]), **_as_double(call.kwargs)))
    return out


def _state_entries(module: nn.Module) -> int:
    return sum(v.numel() for v in getattr(module, "_memories", {}).values() if isinstance(v, torch.Tensor))


def prove(block: nn.Module, call: BlockCall, structure: Structure, tied: bool, spiking_types) -> None:
    """Prune one channel per head of a copy in each space the hypothesis prunes, and check its outputs equal a
    masked copy's; measure which neurons' state shrinks. ``InferenceFailed`` says what did not hold."""
    x = call.args[0].detach().double()
    generator = torch.Generator().manual_seed(0)
    for scale in PROOF_SCALES:
        sample = x if scale == 1.0 else torch.randn(x.shape, generator=generator, dtype=x.dtype) * scale
        if _depends_on_qkv(block, sample, call, structure):
            break
    else:
        raise InferenceFailed("its output does not depend on its q/k/v projections on the inputs tried")
    for space in ([WIDTH] if tied else [INNER, WIDTH]):
        _prove_space(block, sample, call, structure, tied, space)


def _depends_on_qkv(block, sample, call, structure: Structure) -> bool:
    whole, silenced = _proof_copy(block), _proof_copy(block)
    for name in structure.reads:
        layer = silenced.get_submodule(name)
        if isinstance(layer, PROJECTIONS):
            with torch.no_grad():
                layer.weight.zero_()
    try:
        return not torch.allclose(_run(whole, sample, call), _run(silenced, sample, call))
    except Exception as error:
        raise InferenceFailed(f"a float64 copy does not run ({type(error).__name__}: {first_line(error)})") from None


def _prove_space(block, sample, call, structure: Structure, tied: bool, space: str) -> None:
    pruned, masked = _proof_copy(block), _proof_copy(block)
    layout, mask_layout = structure.layout(pruned, tied), structure.layout(masked, tied)
    size = layout.width if space == WIDTH else layout.inner
    heads = structure.heads if (space == INNER or tied) else 1
    per_head = size // heads
    if per_head < 2:
        return  # nothing of this space can be pruned while a head keeps a channel
    idxs = [h * per_head + per_head // 2 for h in range(heads)]
    saved: dict = {}
    for op in mask_layout.channel_ops(space, idxs):
        zero_channels(op, saved)
    expected = _run(masked, sample, call)
    with width_trace(pruned) as trace:
        _run(pruned, sample, call)
    layout.prune(space, idxs)
    axes = [a for a, n in enumerate(sample.shape) if n == size] if space == WIDTH else [None]
    errors = []
    for axis in axes:  # the channel axis of the block's input: the one whose removal lets the copy run and agree
        kept = sample if axis is None else _drop(sample, axis, idxs)
        try:
            repair = repair_widths(pruned, lambda m: _run(m, kept, call), trace.calls)
            got = _run(pruned, kept, call) if repair.fixes or repair.error is not None else repair.output
        except Exception as error:
            errors.append(f"{type(error).__name__}: {first_line(error)}")
            continue
        want = expected if axis is None else _drop(expected, axis, idxs)
        if got.shape == want.shape and torch.allclose(got, want, rtol=1e-6, atol=1e-8):
            _measure_neurons(structure, pruned, masked)
            return
        errors.append("the outputs differ" if got.shape == want.shape else
                      f"output shape {list(got.shape)} instead of {list(want.shape)}")
    raise InferenceFailed(f"pruning its {'residual' if space == WIDTH else 'q/k/v'} width: "
                          + ("; ".join(dict.fromkeys(errors)) or f"no input axis has its {size} channels"))


def _drop(tensor: torch.Tensor, axis: int, idxs: list[int]) -> torch.Tensor:
    keep = [i for i in range(tensor.shape[axis]) if i not in set(idxs)]
    return tensor.index_select(axis, torch.tensor(keep))


def _measure_neurons(structure: Structure, pruned: nn.Module, masked: nn.Module) -> None:
    """A neuron whose state did not shrink with the channels (after a sum over channels) counts 0 per channel."""
    for name in structure.width_neurons + structure.inner_neurons:
        shrank = _state_entries(pruned.get_submodule(name)) < _state_entries(masked.get_submodule(name))
        if name in structure.inner_neurons:
            structure.neuron_chunks[name] = max(structure.neuron_chunks.get(name, 0), int(shrank))
