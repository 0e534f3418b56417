"""Human-readable run reports: report.md and the sensitivity / memory figure."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..pruning.records import PrimeReport  # noqa: E402


def _kib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f} KiB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _energy(energy: dict | None) -> str:
    if energy is None:
        return "- | -"
    return f"{energy['energy_pj'] / 1e6:.3f} uJ ({energy['precision']}) | {energy['synaptic_ops']:,.0f}"


def write_markdown(report: dict, path: Path) -> None:
    """report.md from a run's ``report.json`` content."""
    lines = [f"# primesvt run: {report['recipe']}", "", f"Finished {report['finished']} in {report['seconds']:.1f} s.", ""]
    lines += ["| stage | test accuracy | memory (FP32 params+buffers+state) | weight bytes | latency (batch 1) "
              "| energy per image | synaptic ops per image |", "|---|---|---|---|---|---|---|"]
    for stage in report["stages"]:
        latency = stage.get("latency_ms")
        lines.append(f"| {stage['stage']} | {_pct(stage.get('test_accuracy'))} | {_kib(stage.get('memory_bytes'))} "
                     f"| {_kib(stage.get('weight_bytes'))} | {'-' if latency is None else f'{latency:.2f} ms'} "
                     f"| {_energy(stage.get('energy'))} |")
    lines += ["", "## Checks", ""]
    for name, check in report["checks"].items():
        lines.append(f"- {'PASS' if check['ok'] else 'FAIL'} {name}: {check['detail']}")
    if report.get("prune") and "groups" in report["prune"]:
        lines += _groups_table(PrimeReport.from_dict(report["prune"]))
    lines += _device_memory(report)
    lines += ["", "## Files", ""] + [f"- `{f}`" for f in report["files"]]
    path.write_text("\n".join(lines) + "\n")


def _groups_table(prime: PrimeReport) -> list[str]:
    energy = prime.rank_by != "memory"  # the groups' energy was measured to rank them
    order = {"memory": prime.constraints.memory, "energy": "energy per image",
             "both": f"{prime.constraints.memory} and energy per image"}[prime.rank_by]
    lines = ["", f"## Pruning groups (in the order compressed: largest first, by {order})", "",
             "Bytes each group's channels touch; a layer shared by two groups (one's output, "
             "the other's input channels) counts in both.", "",
             "| group | channels | parameters | + neuron state |" + (" energy |" if energy else "")
             + " target rate | chosen rate | removed | freed |",
             "|---|---|---|---|" + ("---|" if energy else "") + "---|---|---|---|"]
    for g in prime.groups:
        lines.append(f"| {g.name} | {g.channels} | {_kib(g.param_bytes)} | {_kib(g.memory_bytes)} "
                     + (f"| {g.energy_pj / 1e6:.3f} uJ " if energy else "")
                     + f"| {g.target_rate:.1f} | {g.chosen_rate:.1f} | {g.removed_channels} | {_kib(g.freed_bytes)} |")
    return lines + ["", f"Policy: {prime.reason}; {prime.evaluations} evaluations; timings {prime.timings_s}."]


def _device_memory(report: dict) -> list[str]:
    """Flash and RAM at the deployed precision, and each conv/linear layer's kept channels and precision."""
    deployment = report.get("deployment", {})
    lines = ["", f"## Device memory (at {deployment.get('precision', 'fp32')})", "",
             "Flash: the weight file (measured for a quantized stage; else conv/linear weights at the deployed "
             "precision, plus per output channel its scale and bias, plus the other tensors). RAM: neuron state + "
             "buffers + the largest layer output for one sample (all time steps), activations at the deployed "
             "precision.", "", "| stage | flash | RAM |", "|---|---|---|"]
    for stage in report["stages"]:
        memory = stage.get("memory") or {}
        flash = stage.get("weight_bytes") if "memory" not in stage else memory.get("flash_bytes")
        lines.append(f"| {stage['stage']} | {_bytes(flash)} | {_bytes(memory.get('ram_bytes'))} |")
    if report.get("layers"):
        lines += ["", "| layer | output channels kept | input channels kept | precision |", "|---|---|---|---|"]
        lines += [f"| {layer['layer']} | {layer['out'][0]} / {layer['out'][1]} | {layer['in'][0]} / {layer['in'][1]} "
                  f"| {layer['precision']} |" for layer in report["layers"]]
    return lines


def _bytes(n: int | None) -> str:
    return "-" if n is None else f"{n:,} B"


def plot_sensitivity(prime: PrimeReport, path: Path) -> None:
    """Accuracy vs pruning rate per group, and memory per group (chosen part shaded)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for g in prime.groups:
        if g.sensitivity:
            left.plot([t.rate for t in g.sensitivity], [t.accuracy for t in g.sensitivity], marker="o", label=g.name)
    left.axhline(prime.constraints.accuracy_floor, color="k", linestyle="--", label="allowed floor")
    left.set(xlabel="pruning rate (group alone)", ylabel="validation accuracy", title="Sensitivity")
    left.legend(fontsize=6)
    names = [g.name.split(".")[-1] if len(g.name) > 24 else g.name for g in prime.groups]
    memory = prime.constraints.memory
    right.barh(names, [g.size_bytes(memory) / 1024 for g in prime.groups], color="#bbb", label=memory)
    right.barh(names, [g.freed_bytes / 1024 for g in prime.groups], color="#c33", label="freed")
    right.invert_yaxis()
    right.set(xlabel="KiB", title="Memory per group")
    right.tick_params(axis="y", labelsize=6)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spike_rates(stages: list[dict], path: Path) -> None:
    """Firing rate of every spiking layer in each stage that measured energy (unpruned, pruned, ...)."""
    measured = [stage for stage in stages if stage.get("energy") and stage["energy"]["spike_rates"]
                and stage["energy"]["precision"] == "fp32"]
    layers = list(dict.fromkeys(name for stage in measured for name in stage["energy"]["spike_rates"]))
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(layers) + 1.5))
    height = 0.8 / max(len(measured), 1)
    for i, stage in enumerate(measured):
        rates = stage["energy"]["spike_rates"]
        ax.barh([j + i * height for j in range(len(layers))], [rates.get(name, 0.0) for name in layers], height,
                label=stage["stage"])
    ax.set_yticks([j + height * (len(measured) - 1) / 2 for j in range(len(layers))], layers, fontsize=6)
    ax.invert_yaxis()
    ax.set(xlabel="spikes per neuron per time step (validation images)", title="Firing rate per spiking layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
