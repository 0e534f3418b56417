"""How PrimeSVT scales: full-size SpikingJelly SViTs and Spikformer at growing depth.

    python benchmarks/scale.py [--models NAME ...] [--batches 1 32] [--round-to 1] [--repeats 3]
                               [--out benchmarks/results] [--tag NAME]

For each model (random weights, seed 0; no data needed): parameters and pruning groups;
SpikingGraph build time; one-shot pruning at ratio 0.3 by our SpikingPruner next to
Torch-Pruning's MetaPruner with our kwargs (same ratio, L2), each timed from construction
to the end of its step on a fresh copy, median of ``--repeats`` runs taken in turns;
``prime()`` at the paper's 26.68% parameter saving (kept widths multiples of
``--round-to``) with ``evaluate`` = top-1 agreement with the unpruned model on 4 random
inputs (30-point budget): evaluations and search time; OpenVINO FP32 and NNCF INT8
latency (median of 10 runs, f32 precision hint) of the unpruned and the prime()-pruned
model at each batch size. Writes scale.json (scale_TAG.json with --tag) and
docs/benchmarks_scale.png (only from depth rows); the table goes into docs/benchmarks.md
by hand, with the CPU flags printed here.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402

from primesvt_plugin import SpikingGraph, SpikingPruner, build_model, prime, spiking_pruner_kwargs  # noqa: E402
from primesvt_plugin.deploy.export import compile_openvino, cpu_description, to_openvino_model  # noqa: E402
from primesvt_plugin.deploy.latency import median_ms  # noqa: E402
from primesvt_plugin.deploy.quantization import quantize_int8  # noqa: E402
from primesvt_plugin.pruning.spiking import class_scores, fresh_forward  # noqa: E402

CIFAR, IMAGENET = (3, 32, 32), (3, 224, 224)
# spikformer_cifar10's configuration (its builder fixes depths): 384 dims, 12 heads, 4x4 patches, T=4
CIFAR10_SPIKFORMER = dict(T=4, in_channels=3, img_size_h=32, img_size_w=32, patch_size=4, num_classes=10,
                          embed_dims=384, num_heads=12, mlp_ratio=4)
MODELS = {  # name: (builder, args, input shape)
    "spikformer_cifar10": ("spikformer_cifar10", {}, CIFAR),
    "maxformer_cifar": ("maxformer_cifar", {}, CIFAR),
    "spikformer_ti": ("spikformer_ti", {}, IMAGENET),
    "sdt_8_384": ("sdt_8_384", {}, IMAGENET),
    "qkformer_10_384": ("qkformer_10_384", {}, IMAGENET),
    **{f"spikformer_cifar10 depth {d}": ("spikformer", {**CIFAR10_SPIKFORMER, "depths": d}, CIFAR) for d in (2, 4, 8)},
}


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def timed(call):
    clock = time.perf_counter()
    result = call()
    return result, time.perf_counter() - clock


def step_seconds(model, prunes: dict, repeats: int) -> dict:
    """Median seconds of each ``prunes[name](copy)`` on fresh copies of ``model``, the names taking turns
    (their order reversed every other turn, so neither always runs first)."""
    times = {name: [] for name in prunes}
    for turn in range(repeats):
        for name in list(prunes) if turn % 2 == 0 else list(prunes)[::-1]:
            fresh = copy.deepcopy(model)
            times[name].append(timed(lambda: prunes[name](fresh))[1])
    return {name: statistics.median(values) for name, values in times.items()}


def pruner_step_seconds(model, x, repeats: int) -> dict:
    """``step_seconds`` of our SpikingPruner and of Torch-Pruning's MetaPruner with our kwargs, both
    at ratio 0.3 with L2: ``spikingpruner_s`` and ``metapruner_s``."""
    return step_seconds(model, {
        "spikingpruner_s": lambda ours: SpikingPruner(ours, x, pruning_ratio=0.3).step(),
        "metapruner_s": lambda theirs: tp.pruner.MetaPruner(
            theirs, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.3,
            **spiking_pruner_kwargs(theirs, x)).step(),
    }, repeats)


def prime_at_paper_saving(model, x, shape, round_to: int):
    """``prime()`` at 26.68% parameter saving, ``evaluate`` = top-1 agreement with ``model`` on 4 random
    inputs (30-point budget); returns the result and its seconds."""
    inputs = torch.rand(4, *shape)
    reference = class_scores(fresh_forward(model, inputs)).argmax(-1)
    return timed(lambda: prime(
        model, x, lambda m: float((class_scores(m(inputs)).argmax(-1) == reference).float().mean()),
        memory_saving=0.2668, max_accuracy_drop=0.3, round_to=round_to, progress=False))


def compiled(model, x, calibration) -> dict:
    """OpenVINO FP32 and NNCF INT8 builds of ``model`` for inputs shaped like ``x`` (f32 precision hint)."""
    return {"fp32": compile_openvino(to_openvino_model(model, x), "f32"),
            "int8": compile_openvino(quantize_int8(model, x, [c.numpy() for c in calibration],
                                                   subset_size=len(calibration)), "f32")}


def latency_ms(run, x) -> float:
    """Median milliseconds of a compiled build on ``x``: 10 runs after 2 warm-up runs."""
    return median_ms(lambda: run(x.numpy()), repeats=10, warmup=2)


def latencies(model, shape, batches, calibration) -> dict:
    out = {}
    for batch in batches:
        x = torch.rand(batch, *shape)
        for precision, run in compiled(model, x, calibration).items():
            out[f"{precision}_b{batch}_ms"] = round(latency_ms(run, x), 3)
    return out


def row(name: str, batches, round_to: int, repeats: int) -> dict:
    builder, args, shape = MODELS[name]
    torch.manual_seed(0)
    model = build_model(builder, args).eval()
    x = torch.rand(2, *shape)
    graph, graph_s = timed(lambda: SpikingGraph(model, x))
    result = {"model": name, "params": params(model), "groups": len(graph.groups()), "graph_s": round(graph_s, 2)}

    result.update(pruner_step_seconds(model, x, repeats), step_repeats=repeats)
    result["spikingpruner_over_metapruner"] = round(result["spikingpruner_s"] / result["metapruner_s"], 2)

    report_result, prime_s = prime_at_paper_saving(model, x, shape, round_to)
    report = report_result.report
    result.update({"prime_evaluations": report.evaluations, "prime_search_s": report.timings_s["search"],
                   "prime_s": round(prime_s, 1), "prime_saving": round(report.pruned.parameter_saving, 4),
                   "pruned_params": params(report_result.model), "round_to": round_to})
    calibration = [torch.rand(1, *shape) for _ in range(4)]
    result["unpruned"] = latencies(model, shape, batches, calibration)
    result["pruned"] = latencies(report_result.model, shape, batches, calibration)
    for key, value in result.items():
        result[key] = round(value, 4 if key == "prime_saving" else 2) if isinstance(value, float) else value
    return result


def plot(rows, path: Path) -> None:
    depth = [r for r in rows if "depth" in r["model"]]
    if not depth:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    blocks = [int(r["model"].rsplit(" ", 1)[1]) for r in depth]
    for key, label in (("graph_s", "graph build"), ("spikingpruner_s", "SpikingPruner step"),
                       ("metapruner_s", "MetaPruner step"), ("prime_s", "prime() total")):
        axes[0].plot(blocks, [r[key] for r in depth], marker="o", label=label)
    axes[0].set(xlabel="Spikformer blocks", ylabel="seconds", title="Pruning cost vs depth")
    axes[0].legend(fontsize=7)
    batch = max(int(k.split("_b")[1].split("_")[0]) for k in depth[0]["unpruned"])
    for stage in ("unpruned", "pruned"):
        for precision in ("fp32", "int8"):
            axes[1].plot(blocks, [r[stage][f"{precision}_b{batch}_ms"] for r in depth], marker="o",
                         label=f"{stage} {precision}")
    axes[1].set(xlabel="Spikformer blocks", ylabel="ms", title=f"OpenVINO latency, batch {batch}")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--round-to", type=int, default=1, help="prime()'s round_to: kept widths are multiples of it")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each pruner step (the median is reported)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", help="name of the result files (scale_TAG.json, benchmarks_scale_TAG.png)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    machine = {"cpu": cpu_description(), "processor": platform.processor(), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    print(json.dumps(machine), flush=True)
    rows = []
    for name in args.models:
        rows.append(row(name, args.batches, args.round_to, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""  # a tagged run never overwrites the depth sweep's files
    (args.out / f"scale{suffix}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    plot(rows, Path(f"docs/benchmarks_scale{suffix}.png"))


if __name__ == "__main__":
    main()
