"""The SViTs as their authors publish them, pruned with no plugin and no layout written for them.

    git clone https://github.com/ZK-Zhou/spikformer
    git clone https://github.com/BICLab/Spike-Driven-Transformer
    python benchmarks/authors_models.py --spikformer spikformer --sdt Spike-Driven-Transformer \
        [--sizes small full] [--repeats 3] [--out benchmarks/results/authors_models.json]

The authors' files are read from those clones (``cifar10/model.py`` and ``imagenet/model.py`` of
Spikformer; ``model/`` + ``module/`` of the Spike-Driven Transformer); nothing of theirs is part of
this project. Their two old imports are answered by stand-ins defined here, exactly what the porting
guide (docs/models.md) tells a user to write: ``spikingjelly.clock_driven.neuron.MultiStepLIFNode``
becomes ``activation_based.neuron.LIFNode(step_mode="m")`` without ``backend``, and timm's
``to_2tuple`` / ``trunc_normal_`` / ``DropPath`` / ``register_model`` / ``_cfg`` are one line each.

``small`` (random weights, 32x32, ``embed_dims=64, num_heads=4, depths=2, T=2``): the three ways
to prune (MetaPruner with ``spiking_pruner_kwargs`` at ratio 0.3 and ``verified_step``,
``SpikingPruner`` at 0.3, ``prime()`` at 25% parameter saving with ``evaluate`` = top-1 agreement
with the unpruned model on 8 random inputs), each with the parameter saving and whether the
pruned model gives the same output shape. ``full`` (random weights, 224x224): Spikformer-8-384
and SDT-8-512, the graph build time and the step time of SpikingPruner against MetaPruner with our
kwargs (median of ``--repeats`` turns, from construction to the end of the step).
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp
from spikingjelly.activation_based import neuron

import primesvt_plugin as ps
from primesvt_plugin.pruning.spiking import class_scores, first_tensor, fresh_forward


# -- the stand-ins docs/models.md tells a user to write --------------------------------------------


def MultiStepLIFNode(tau=2.0, v_threshold=1.0, detach_reset=False, backend=None, **kwargs):  # noqa: N802
    return neuron.LIFNode(tau=tau, v_threshold=v_threshold, detach_reset=detach_reset, step_mode="m", **kwargs)


def MultiStepParametricLIFNode(init_tau=2.0, v_threshold=1.0, detach_reset=False, backend=None, **kwargs):  # noqa: N802
    return neuron.ParametricLIFNode(init_tau=init_tau, v_threshold=v_threshold, detach_reset=detach_reset,
                                    step_mode="m", **kwargs)


class DropPath(nn.Identity):
    def __init__(self, *args, **kwargs):
        super().__init__()


def install_stand_ins() -> None:
    """``spikingjelly.clock_driven.neuron`` and the timm helpers the authors import, as modules."""
    def module(name: str, **members) -> None:
        sys.modules[name] = types.SimpleNamespace(**members, __name__=name)  # type: ignore[assignment]

    module("spikingjelly.clock_driven", neuron=None)
    module("spikingjelly.clock_driven.neuron", MultiStepLIFNode=MultiStepLIFNode,
           MultiStepParametricLIFNode=MultiStepParametricLIFNode)
    module("timm")
    module("timm.models")
    module("timm.models.layers", to_2tuple=lambda x: x if isinstance(x, tuple) else (x, x),
           trunc_normal_=nn.init.trunc_normal_, DropPath=DropPath)
    module("timm.models.registry", register_model=lambda fn: fn)
    module("timm.models.vision_transformer", _cfg=lambda **kwargs: dict(kwargs))


def load(folder: Path, module: str, clear: tuple[str, ...] = (), edits: dict[str, str] | None = None):
    """Import ``module`` from ``folder`` (a clone), forgetting modules of the same names imported before;
    ``edits`` (old text: new text) are the porting guide's one-line edits, applied to the file's text."""
    for name in [*clear, module]:
        sys.modules.pop(name, None)
    sys.path.insert(0, str(folder))
    try:
        if not edits:
            return importlib.import_module(module)
        path = folder / (module.replace(".", "/") + ".py")
        source = path.read_text()
        for old, new in edits.items():
            assert old in source, f"{path} no longer holds {old!r}"
            source = source.replace(old, new)
        loaded = types.ModuleType(module)
        loaded.__file__ = str(path)
        sys.modules[module] = loaded
        exec(compile(source, str(path), "exec"), loaded.__dict__)
        return loaded
    finally:
        sys.path.remove(str(folder))


# -- the models ------------------------------------------------------------------------------------------


# The authors' configurations: small for the three ways to prune, full-size (224x224) for the timings
SMALL = dict(img_size_h=32, img_size_w=32, patch_size=4, embed_dims=64, num_heads=4, mlp_ratios=4, in_channels=3,
             num_classes=10, qkv_bias=False, depths=2, sr_ratios=1, T=2)
FULL = dict(img_size_h=224, img_size_w=224, patch_size=16, mlp_ratios=4, in_channels=3, num_classes=1000,
            qkv_bias=False, depths=8, sr_ratios=1)  # T = 4: the ImageNet Spikformer fixes it in its forward


def builders(spikformer: Path, sdt: Path, size: str) -> dict:
    """``name: (builder, input shape)`` of the authors' models at ``size``, their files read from the clones."""
    install_stand_ins()
    cifar = load(spikformer / "cifar10", "model")
    # the ImageNet Spikformer fixes T = 4 inside its forward: the porting guide's edit makes it self.T (tracing sets 1)
    imagenet = load(spikformer / "imagenet", "model", edits={"        T = 4\n": "        T = self.T\n"})
    sdt_model = load(sdt, "model.spikeformer", clear=("model", "module", "module.ms_conv", "module.sps"))
    models = {
        "small": {"Spikformer (cifar10/model.py)": (cifar.Spikformer, SMALL),
                  "Spike-Driven Transformer (model/ + module/)": (sdt_model.sdt, {**SMALL, "pooling_stat": "0011"})},
        "full": {"Spikformer-8-384 (imagenet/model.py)": (imagenet.Spikformer, {**FULL, "embed_dims": 384,
                                                                                "num_heads": 12}),
                 "SDT-8-512 (model/ + module/)": (sdt_model.sdt, {**FULL, "embed_dims": 512, "num_heads": 8, "T": 4,
                                                                  "pooling_stat": "1111"})},
    }[size]
    shape = (3, 32, 32) if size == "small" else (3, 224, 224)
    return {name: (functools.partial(built_with_t, build, args), shape) for name, (build, args) in models.items()}


def built_with_t(build, args: dict) -> nn.Module:
    """``build(**args)``; a model whose constructor takes no T gets it as the attribute its ported forward reads."""
    model = build(**args)
    if not hasattr(model, "T"):
        model.T = 4
    return model


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def output_shape(model: nn.Module, x: torch.Tensor) -> list[int]:
    return list(first_tensor(fresh_forward(model, x)).shape)


def three_ways(build, shape) -> dict:
    """MetaPruner + kwargs (0.3), SpikingPruner (0.3) and prime() (25%) on fresh models of ``build``."""
    torch.manual_seed(0)
    reference_model = build()
    x, inputs = torch.rand(2, *shape), torch.rand(8, *shape)
    before, shape_before = params(reference_model), output_shape(reference_model, x)
    reference = class_scores(first_tensor(fresh_forward(reference_model, inputs))).argmax(-1)

    def agreement(model) -> float:
        return float((class_scores(first_tensor(fresh_forward(model, inputs))).argmax(-1) == reference).float().mean())

    rows = {}
    for way in ("MetaPruner + spiking_pruner_kwargs (0.3)", "SpikingPruner (0.3)", "prime() (25% saving)"):
        model = copy.deepcopy(reference_model)
        clock = time.perf_counter()
        if way.startswith("MetaPruner"):
            pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                          pruning_ratio=0.3, **ps.spiking_pruner_kwargs(model, x))
            ps.verified_step(pruner, x)
        elif way.startswith("SpikingPruner"):
            ps.SpikingPruner(model, x, pruning_ratio=0.3).step()
        else:
            model = ps.prime(model, x, agreement, memory_saving=0.25, max_accuracy_drop=1.0, progress=False).model
        rows[way] = {"parameters": [before, params(model)], "parameter_saving": 1 - params(model) / before,
                     "output_shape_kept": output_shape(model, x) == shape_before, "seconds": time.perf_counter() - clock}
        print(f"  {way}: {before:,} -> {params(model):,} parameters ({rows[way]['parameter_saving']:.1%}), "
              f"output shape kept: {rows[way]['output_shape_kept']}", flush=True)
    return rows


def timings(build, shape, repeats: int) -> dict:
    """Graph build, SpikingPruner and MetaPruner (+ our kwargs) seconds, median of turns on fresh copies."""
    torch.manual_seed(0)
    model, x = build().eval(), torch.rand(1, *shape)
    ways = {
        "graph_s": lambda m: ps.SpikingGraph(m, x),
        "spikingpruner_s": lambda m: ps.SpikingPruner(m, x, pruning_ratio=0.3).step(),
        "metapruner_s": lambda m: tp.pruner.MetaPruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                                       pruning_ratio=0.3, **ps.spiking_pruner_kwargs(m, x)).step(),
    }
    times = {name: [] for name in ways}
    for turn in range(repeats):
        for name in list(ways) if turn % 2 == 0 else list(ways)[::-1]:
            fresh = copy.deepcopy(model)
            clock = time.perf_counter()
            ways[name](fresh)
            times[name].append(time.perf_counter() - clock)
    row = {name: statistics.median(values) for name, values in times.items()}
    row.update(parameters=params(model), step_ratio=row["spikingpruner_s"] / row["metapruner_s"])
    print(f"  graph {row['graph_s']:.2f} s, SpikingPruner {row['spikingpruner_s']:.2f} s, MetaPruner "
          f"{row['metapruner_s']:.2f} s ({row['step_ratio']:.2f}x), {row['parameters']:,} parameters", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spikformer", type=Path, required=True, help="a clone of ZK-Zhou/spikformer")
    parser.add_argument("--sdt", type=Path, required=True, help="a clone of BICLab/Spike-Driven-Transformer")
    parser.add_argument("--sizes", nargs="+", choices=("small", "full"), default=["small", "full"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/authors_models.json"))
    args = parser.parse_args()
    results = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for size in args.sizes:
        for name, (build, shape) in builders(args.spikformer, args.sdt, size).items():
            print(f"{name}, {size}:", flush=True)
            results[f"{name}, {size}"] = three_ways(build, shape) if size == "small" else timings(build, shape,
                                                                                                    args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
