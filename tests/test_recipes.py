"""YAML recipes on disk, run through the real CLI: the default job, the variants, the errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from primesvt_plugin.pipeline.cli import main
from primesvt_plugin.pipeline.readers import digits_splits
from primesvt_plugin.pipeline.recipe import load_recipe
from primesvt_plugin.pipeline.run_report import RunReport
from primesvt_plugin.pipeline.runner import failed_checks
from primesvt_plugin.deploy.quantization import load_quantized
from primesvt_plugin.serialization import load_pruned
from primesvt_plugin.pruning.spiking import class_scores

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


LEARNED = ["--set", "train.epochs=4", "--set", "train.lr=0.01"]  # enough for the small models to learn digits


def run_cli(*args: str) -> int:
    return main(["run", *args, "--quiet"])


def read_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def row(report: dict, stage: str) -> dict:
    """The report's first stage row whose name starts with ``stage``."""
    return next(s for s in report["stages"] if s["stage"].startswith(stage))


def test_default_recipe_meets_its_promises(tmp_path, capsys):
    out = tmp_path / "default"
    assert run_cli(str(RECIPES / "spikformer_digits.yaml"), "--out", str(out)) == 0
    printed = capsys.readouterr()
    assert "Statistics collection" not in printed.out + printed.err  # --quiet hides NNCF's progress bar too
    report = read_report(out)
    assert all(check["ok"] for check in report["checks"].values()), report["checks"]
    assert RunReport.from_dict(report).to_dict() == report  # report.json is the typed RunReport, losslessly
    fp32, pruned, int8 = report["stages"]
    assert pruned["memory_saving"] >= 0.2668
    assert int8["weight_bytes"] <= 0.25 * fp32["weight_bytes"]
    assert fp32["test_accuracy"] - int8["test_accuracy"] <= 0.03
    assert int8["weight_bytes"] == (out / "model_int8.bin").stat().st_size
    for name in ["model.pt", "model.onnx", "model.xml", "model.bin", "model_int8.xml", "report.md",
                 "sensitivity.png", "spike_rates.png"]:
        assert (out / name).is_file(), name
    # the pruned model loads in one call, bit for bit, and the ONNX export computes the same outputs
    model = load_pruned(out / "model.pt")
    saved = torch.load(out / "state_dict.pt")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    data = digits_splits(image_size=16)
    x = torch.from_numpy(data.x_test[:1])
    with torch.no_grad():
        expected = model(x).numpy()
    onnx_out = ort.InferenceSession(str(out / "model.onnx")).run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(onnx_out, expected, atol=1e-5)
    # the quantized model loads in one call and reproduces the reported INT8 accuracy
    quantized = load_quantized(out / "model_int8.xml")
    predictions = class_scores(quantized.predict(data.x_test)).argmax(1)
    assert float((predictions == data.y_test).mean()) == int8["test_accuracy"]
    assert all(stage["latency_ms"] > 0 for stage in report["stages"])
    # every OpenVINO model ran at the stated f32, whatever this CPU's default, and the report says so
    assert int8["inference_precision"] == "f32"
    assert {c["precision"] for c in report["export_checks"].values()} == {"f32"}
    assert all(c["agreement"] >= 0.995 and c["samples"] == len(data.y_test) for c in report["export_checks"].values())
    assert "FP32" in report["environment"]["cpu"]["capabilities"]
    # energy per image (SpikingJelly's op_counter on validation images): lower after pruning, lower again at INT8 costs
    energy = [stage["energy"] for stage in report["stages"]]
    assert [e["precision"] for e in energy] == ["fp32", "fp32", "int8"]
    assert energy[1]["energy_pj"] < energy[0]["energy_pj"] and energy[1]["macs"] < energy[0]["macs"]
    assert energy[2]["energy_pj"] < energy[1]["energy_pj"] and energy[2]["macs"] == energy[1]["macs"]
    # the INT8 stage reads 1-byte weights and 1-byte membrane potentials (biases stay 4 B): about a quarter
    assert energy[2]["memory_access_bytes"] < energy[1]["memory_access_bytes"] / 3.9
    assert 0 < max(energy[0]["spike_rates"].values()) <= 1
    assert "uJ (fp32)" in (out / "report.md").read_text()


# Shortest training after which each variant's model has learned digits (measured: 77%, 62%, 75% test).
VARIANT_TRAINING = {"prune_only.yaml": LEARNED,
                    "quantize_only.yaml": ["--set", "train.epochs=6", "--set", "train.lr=0.01"],
                    "user_model_npz.yaml": ["--set", "train.epochs=15", "--allow-code"]}


@pytest.mark.parametrize("recipe", list(VARIANT_TRAINING))
def test_recipe_variants_run(recipe, tmp_path):
    out = tmp_path / "run"
    exit_code = run_cli(str(RECIPES / recipe), "--out", str(out), *VARIANT_TRAINING[recipe])
    report = read_report(out)
    assert exit_code == (3 if failed_checks(report) else 0)  # 3: written, but a check failed
    assert report["stages"][0]["test_accuracy"] > 0.5  # a model that learned: pruning decisions mean something
    loaded = load_recipe(RECIPES / recipe)
    stages = [s["stage"] for s in report["stages"]]
    assert stages[0] == "fp32"
    if loaded.prune:
        assert any(stage.startswith("pruned") for stage in stages)
        assert row(report, "pruned")["memory_bytes"] < report["stages"][0]["memory_bytes"]
    if loaded.quantize:
        assert (out / "model_int8.bin").is_file()
        assert report["stages"][-1]["weight_bytes"] < report["stages"][0]["weight_bytes"]
    exporters = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "openvino": ".xml"}
    for fmt in loaded.export.formats if loaded.export else []:
        assert f"model{exporters[fmt]}" in report["exports"] and (out / f"model{exporters[fmt]}").is_file(), fmt
    loaded_model = load_pruned(out / "model.pt", trust_code=True, search_path=RECIPES)
    saved = torch.load(out / "state_dict.pt")
    assert all(torch.equal(v, saved[k]) for k, v in loaded_model.state_dict().items())


def test_a_model_ported_from_its_authors_runs_every_stage_with_no_plugin(tmp_path):
    """docs/models.md's worked example: an SDT-shaped model (tuple outputs, residuals inside its blocks,
    an MLP reading self.c_hidden) through train, prune, fine-tune, INT8, ONNX and OpenVINO."""
    out = tmp_path / "run"
    assert run_cli("bring_your_own", "--out", str(out), "--allow-code") == 0
    report = read_report(out)
    assert report["model_output"] == "a tuple (tensor, NoneType): its first tensor is read"
    assert [s["stage"] for s in report["stages"]] == ["fp32", "pruned + finetuned", "nncf_int8"]
    assert report["stages"][0]["test_accuracy"] > 0.9 and report["prune"]["pruned"]["parameter_saving"] >= 0.25
    assert set(report["export_checks"]) == {"ONNX export", "OpenVINO export"}
    assert all(check["agreement"] >= 0.995 for check in report["export_checks"].values())
    loaded = load_pruned(out / "model.pt", trust_code=True, search_path=RECIPES)  # width attributes replayed too
    mlp = loaded.block[0].mlp
    assert mlp.c_hidden == mlp.fc1_conv.out_channels < 256
    x = torch.from_numpy(digits_splits(image_size=16).x_test[:4])
    assert loaded(x)[0].shape == (4, 10)


def trained_weights(checkpoint) -> list[str]:
    """Overrides that start a recipe of the default model from the session's trained weights, with no training."""
    return ["--set", f"model.checkpoint={checkpoint}", "--set", "train=null"]


def test_overrides_reach_the_run(tmp_path, digits_checkpoint):
    out = tmp_path / "o"
    assert run_cli(str(RECIPES / "prune_only.yaml"), "--out", str(out), *trained_weights(digits_checkpoint),
                   "--set", "prune.memory_saving=0.4", "--set", "prune.max_accuracy_drop=0.5",
                   "--set", "prune.rank_by=both") == 0
    report = read_report(out)
    assert report["recipe_data"]["prune"]["memory_saving"] == 0.4
    assert report["stages"][1]["memory_saving"] >= 0.4
    assert report["prune"]["rank_by"] == "both"  # ranked by energy on validation images too
    assert all(group["energy_pj"] > 0 for group in report["prune"]["groups"])
    markdown = (out / "report.md").read_text()
    assert "by parameters and energy per image" in markdown and "| energy |" in markdown and " uJ |" in markdown


def test_same_recipe_and_seed_give_the_same_report(tmp_path):
    reports, codes = [], []
    for run in ("a", "b"):
        codes.append(run_cli(str(RECIPES / "prune_only.yaml"), "--out", str(tmp_path / run), *LEARNED))
        reports.append(read_report(tmp_path / run))
    first, second = reports
    assert codes[0] == codes[1] and first["checks"] == second["checks"]
    assert first["prune"]["plan"] == second["prune"]["plan"]
    assert [g["chosen_rate"] for g in first["prune"]["groups"]] == [g["chosen_rate"] for g in second["prune"]["groups"]]
    for a, b in zip(first["stages"], second["stages"]):
        assert (a["test_accuracy"], a["val_accuracy"], a["memory"]) == (b["test_accuracy"], b["val_accuracy"], b["memory"])


BAD_RECIPES = {
    "unknown field": ("model: {name: spikformer}\nprune: {memory_savings: 0.3}\n", "prune.memory_savings"),
    "out of range": ("model: {name: spikformer}\nprune: {memory_saving: 1.5}\n", "prune.memory_saving"),
    "no target": ("model: {name: spikformer}\nprune: {memory_saving: null}\n", "prune: Value error, give memory_saving"),
    "no accuracy budget": ("model: {name: spikformer}\nprune: {max_accuracy_drop: null}\n",
                           "prune: Value error, give max_accuracy_drop and/or min_accuracy"),
    "wrong type": ("model: {name: spikformer}\ntrain: {epochs: many}\n", "train.epochs"),
    "missing model": ("prune: {}\n", "model"),
    "missing data file": ("model: {name: spikformer}\ndata: {name: npz, args: {path: nowhere.npz}}\nprune: {}\n",
                          "data.args.path"),
    "missing checkpoint": ("model: {name: spikformer, checkpoint: missing.pt}\nprune: {}\n", "model.checkpoint"),
    "unknown model": ("model: {name: resnet50}\nprune: {}\n", "model.name"),
    "unknown quantizer": ("model: {name: spikformer}\nquantize: {method: int3}\n", "quantize.method"),
    "not yaml": ("model: [unclosed\n", "not valid YAML"),
    "escaping path": ("model: {name: spikformer, checkpoint: ../../etc/passwd}\nprune: {}\n", "model.checkpoint"),
    "nothing to do": ("model: {name: spikformer}\n", "nothing to do"),
    "negative seed": ("seed: -1\nmodel: {name: spikformer}\nprune: {}\n", "seed"),
    "code without opt-in": ("model: {name: 'os:system', args: {command: 'touch pwned'}}\nprune: {}\n",
                            "--allow-code"),
    "unknown data argument": ("model: {name: spikformer}\ndata: {name: digits, args: {bogus: 1}}\nprune: {}\n",
                              "data.args"),
    "unknown quantizer argument": ("model: {name: spikformer}\nquantize: {args: {bogus: 1}}\n", "quantize.args"),
    "budget not bytes": ("model: {name: spikformer}\nprune: {flash_budget: 50 parsecs}\n", "prune.flash_budget"),
    "budget not positive": ("model: {name: spikformer}\nprune: {ram_budget: 0}\n", "prune.ram_budget"),
    "budget with uniform": ("model: {name: spikformer}\nprune: {method: uniform, flash_budget: 50KB}\n",
                            "use method: prime"),
    "budget true": ("model: {name: spikformer}\nprune: {flash_budget: true}\n", "not true"),
    "budget in parts of a byte": ("model: {name: spikformer}\nprune: {flash_budget: 53976.7}\n",
                                  "a byte count is a whole number of bytes"),
    "budget unit in parts of a byte": ("model: {name: spikformer}\nprune: {flash_budget: 1.0005KB}\n",
                                       "1000.5000 bytes"),
    "alias bomb": ("model: {name: spikformer}\ndata:\n  name: digits\n  args:\n    a0: &a0 [x, x, x, x, x, x, x, x, x]\n"
                   + "".join(f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)),
                   "expands to more than 100,000 values"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipe_is_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    text, expected = BAD_RECIPES[case]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(recipe.name) in err and expected in err, err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_whole_byte_counts_are_read_as_written(tmp_path):
    for written, meant in (("53976", 53976), ("53976.0", 53976), ("1.5KB", 1500), ("50 KiB", 51200)):
        (tmp_path / "r.yaml").write_text(f"model: {{name: spikformer}}\nprune: {{flash_budget: {written}}}\n")
        assert load_recipe(tmp_path / "r.yaml").prune.flash_budget == meant


def test_budgets_read_bytes_with_units_and_replace_the_default_saving(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: spikformer}\nprune: {flash_budget: 50KB, ram_budget: 64KiB}\n")
    prune = load_recipe(recipe).prune
    assert (prune.flash_budget, prune.ram_budget, prune.memory_saving) == (50_000, 65_536, 0.0)
    both = load_recipe(recipe, ["prune.memory_saving=0.3"]).prune  # asked for: both targets hold
    assert (both.flash_budget, both.memory_saving) == (50_000, 0.3)


def test_flash_recipe_meets_its_budgets_on_the_written_files(tmp_path):
    """The shipped flash-budget recipe: INT8 weights <= 12% of the unpruned FP32 parameters, 1.5 points."""
    out = tmp_path / "flash"
    assert run_cli(str(RECIPES / "spikformer_digits_flash.yaml"), "--out", str(out)) == 0
    report = read_report(out)
    recipe = load_recipe(RECIPES / "spikformer_digits_flash.yaml")
    assert all(check["ok"] for check in report["checks"].values()), report["checks"]
    written = (out / "model_int8.bin").stat().st_size
    assert written <= recipe.prune.flash_budget and written == report["stages"][-1]["weight_bytes"]
    assert row(report, "pruned")["memory"]["ram_bytes"] <= recipe.prune.ram_budget
    # the unpruned model quantized to calibrate the prediction is reported, as written and scored
    unpruned = row(report, "nncf_int8 (not pruned)")
    assert unpruned["weight_bytes"] == report["deployment"]["unpruned_flash_bytes"] > written
    assert unpruned["test_accuracy"] > 0.9 and unpruned["inference_precision"] == "f32"
    # the search worked on a prediction calibrated on the unpruned model's file: it stays close to the file,
    # and aimed below the budget by a headroom for what the prediction cannot see
    predicted = report["prune"]["pruned"]["memory"]["flash_bytes"]
    headroom = report["deployment"]["headroom_bytes"]
    assert abs(predicted - written) <= headroom and 0 < headroom <= 0.01 * report["deployment"]["unpruned_flash_bytes"]
    constraints = report["prune"]["constraints"]
    assert (constraints["flash_budget"], constraints["flash_margin"]) == (recipe.prune.flash_budget, headroom)
    assert "baseline above chance level" in report["checks"]
    assert {layer["precision"] for layer in report["layers"]} == {"int8"}
    assert any(layer["out"][0] < layer["out"][1] for layer in report["layers"])
    markdown = (out / "report.md").read_text()
    assert "## Device memory (at int8)" in markdown and "output channels kept" in markdown


def test_an_int4_recipe_searches_its_flash_budget_at_int4_and_meets_it_on_the_written_file(tmp_path):
    """quantize.method nncf_int4: the budget is counted with INT4 matmul weights (the quantizer's deployment),
    the file is model_int4.bin, and each layer's precision is in the report."""
    recipe = tmp_path / "int4.yaml"
    recipe.write_text(SMALL_DIGITS_MODEL + "train: {epochs: 4, lr: 0.01}\n"
                      "prune: {flash_budget: 16000, max_accuracy_drop: 0.3}\n"
                      "quantize: {method: nncf_int4, calibration_size: 32, max_accuracy_drop: 0.2}\n")
    out = tmp_path / "out"
    assert run_cli(str(recipe), "--out", str(out)) == 0
    report = read_report(out)
    written = (out / "model_int4.bin").stat().st_size
    assert written <= 16000 and report["checks"]["flash <= 16000 B"]["ok"]
    assert report["deployment"]["precision"] == "int4" and report["prune"]["constraints"]["deployment"] == "int4"
    assert abs(report["prune"]["pruned"]["memory"]["flash_bytes"] - written) <= report["deployment"]["headroom_bytes"]
    # the unpruned INT4 file is over the budget: pruning was needed, but less than at INT8
    assert report["deployment"]["unpruned_flash_bytes"] > 16000
    precisions = {layer["layer"]: layer["precision"] for layer in report["layers"]}
    assert precisions["blocks.0.mlp.fc1.0"] == precisions["head"] == "int4"
    assert precisions["patch_embed.stages.0.conv_bn.block.0"] == "int8"


def test_impossible_budget_writes_the_best_feasible_plan_and_exits_3(tmp_path, capsys, digits_checkpoint):
    out = tmp_path / "tight"
    assert run_cli(str(RECIPES / "prune_only.yaml"), "--out", str(out), *trained_weights(digits_checkpoint),
                   "--set", "prune.flash_budget=2000", "--set", "prune.memory_saving=0") == 3
    err = capsys.readouterr().err
    assert "flash <= 2000 B" in err and "the outputs were written" in err
    report = read_report(out)
    assert report["prune"]["reason"].startswith("best feasible: flash ")
    assert "> budget 2,000 B (fp32)" in report["prune"]["reason"]
    assert not report["checks"]["flash <= 2000 B"]["ok"] and report["prune"]["plan"]
    pruned = load_pruned(out / "model.pt")  # the best feasible plan, written and loadable
    assert sum(p.numel() * 4 for p in pruned.parameters()) < report["stages"][0]["weight_bytes"]


def test_console_script_exit_code_and_validate(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: spikformer}\nprune: {rates: [0, 2]}\n")
    result = subprocess.run([sys.executable, "-m", "primesvt_plugin.pipeline.cli", "validate", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "prune.rates" in result.stderr
    ok = subprocess.run([sys.executable, "-m", "primesvt_plugin.pipeline.cli", "validate",
                         str(RECIPES / "spikformer_digits.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


SMALL_DIGITS_MODEL = ("model: {name: spikformer, args: {T: 2, in_channels: 1, img_size_h: 16, img_size_w: 16, "
                      "patch_size: 4, num_classes: 10, embed_dims: 32, num_heads: 4, depths: 1}}\n"
                      "data: {name: digits, args: {image_size: 16}}\n")

BAD_WHEN_RUN = {  # valid YAML and schema; wrong only once the data or the model is built
    "image size zero": ("data.args.image_size=0", "data.args"),
    "heads not dividing the width": ("model.args.num_heads=5", "model.args"),
    "model not fitting the data": ("model.args.in_channels=3", "does not run on digits images"),
    "override not YAML": ("prune.memory_saving=[1", "not valid YAML"),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", list(BAD_WHEN_RUN))
def test_bad_arguments_are_caught_by_validate_and_run(case, command, tmp_path, capsys):
    override, expected = BAD_WHEN_RUN[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SMALL_DIGITS_MODEL + "train: {epochs: 1}\nprune: {}\n")
    extra = ["--out", str(tmp_path / "out")] if command == "run" else []
    assert main([command, str(recipe), "--set", override, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_non_utf8_recipe_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("model: {name: spikformer}  # caf\u00e9\nprune: {}\n".encode("latin-1"))
    assert main(["validate", str(recipe)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_code_in_a_recipe_never_runs_without_the_opt_in(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "evil.yaml"
    recipe.write_text("model: {name: 'os:system', args: {command: 'touch pwned'}}\nprune: {}\n")
    for command in (["validate", str(recipe)], ["run", str(recipe), "--out", "o"]):
        assert main(command) == 2
        assert "--allow-code" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_checks_that_fail_write_the_outputs_and_exit_3(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SMALL_DIGITS_MODEL + "train: {epochs: 2}\nprune: {memory_saving: 0.95, max_accuracy_drop: 0.0,"
                      " rates: [0.5]}\n")
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 3
    assert "check(s) failed" in capsys.readouterr().err
    report = read_report(out)
    assert not report["checks"]["parameters memory saving"]["ok"]
    assert (out / "model.pt").is_file()


@pytest.mark.parametrize("checkpoint", ["pickle_with_code", "foreign", "truncated", "other_model"])
def test_bad_model_checkpoint_in_a_recipe_is_one_line(checkpoint, tmp_path, capsys):
    import os

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "ckpt.pt"
    if checkpoint == "pickle_with_code":
        torch.save({"weight": RunsCode()}, path)
    elif checkpoint == "foreign":
        path.write_text("not a checkpoint")
    else:
        from primesvt_plugin.plugins import build_model

        model = build_model("spikformer", dict(T=2, in_channels=1, img_size_h=16, img_size_w=16, patch_size=4,
                                               num_classes=10, embed_dims=64, num_heads=4, depths=1))
        torch.save(model.state_dict(), path)
        if checkpoint == "truncated":
            path.write_bytes(path.read_bytes()[:1000])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SMALL_DIGITS_MODEL.replace("depths: 1}", "depths: 1}, checkpoint: ckpt.pt") + "prune: {}\n")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ckpt.pt" in err[0], err
    assert not (tmp_path / "pwned").exists()


def test_untrained_baseline_is_flagged_loudly(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"  # no training: the model guesses, so accuracy cannot guide pruning
    recipe.write_text(SMALL_DIGITS_MODEL + "prune: {memory_saving: 0.3, max_accuracy_drop: 0.05, rates: [0.5]}\n")
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "WARNING: baseline accuracy" in err and "chance level" in err
    report = read_report(out)
    assert not report["checks"]["baseline above chance level"]["ok"]
    assert not report["prune"]["constraints_met"] and report["warnings"]


def test_checkpoint_only_recipe_reproduces_the_trained_model(tmp_path):
    trained = tmp_path / "trained"
    first = tmp_path / "train.yaml"
    first.write_text(SMALL_DIGITS_MODEL + "train: {epochs: 4, lr: 0.01}\nexport: {formats: [torch]}\n")
    assert run_cli(str(first), "--out", str(trained)) == 0
    (tmp_path / "weights.pt").write_bytes((trained / "state_dict.pt").read_bytes())
    second = tmp_path / "from_checkpoint.yaml"  # no train section: the checkpoint is used as it is
    second.write_text(SMALL_DIGITS_MODEL.replace("depths: 1}", "depths: 1}, checkpoint: weights.pt")
                      + "export: {formats: [torch]}\n")
    assert run_cli(str(second), "--out", str(tmp_path / "reloaded")) == 0
    before, after = read_report(trained)["stages"][0], read_report(tmp_path / "reloaded")["stages"][0]
    assert after["test_accuracy"] == before["test_accuracy"] > 0.5
    assert after["val_accuracy"] == before["val_accuracy"]



def test_every_prime_option_is_a_prune_field_and_reaches_prime_config():
    """A recipe's ``prune`` section is the YAML face of ``PrimeConfig``: every option of the policy has a field of
    the same name (only what the run measures, the deployment and the chance level, comes from elsewhere), and a
    value written in YAML arrives in the config ``prime()`` reads."""
    import dataclasses
    from primesvt_plugin.pipeline.recipe import PruneSection
    from primesvt_plugin.pruning.config import PrimeConfig
    from primesvt_plugin.targets import INT8

    options = {f.name for f in dataclasses.fields(PrimeConfig)} - {"deployment", "chance_accuracy"}
    assert options <= set(PruneSection.model_fields), options - set(PruneSection.model_fields)
    written = dict(memory_saving=0.4, memory="footprint", flash_budget=9000, ram_budget=7000, max_accuracy_drop=0.03,
                   min_accuracy=0.5, rates=[0.25, 0.5], objective="max_saving", round_to=4, search="sweep",
                   rank_by="both")
    assert set(written) == options  # a new option must be added here too
    config = PruneSection(**written).to_config(deployment=INT8, chance_accuracy=0.1)
    assert {name: getattr(config, name) for name in options} == {**written, "rates": (0.25, 0.5)}
    assert config.deployment is INT8 and config.chance_accuracy == 0.1
