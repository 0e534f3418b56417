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

from primesvt_plugin.cli import main
from primesvt_plugin.data import digits_splits
from primesvt_plugin.recipe import load_recipe
from primesvt_plugin.quantized import load_quantized
from primesvt_plugin.serialization import load_pruned
from primesvt_plugin.training import class_scores

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def run_cli(*args: str) -> int:
    return main(["run", *args, "--quiet"])


def read_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_default_recipe_meets_its_promises(tmp_path):
    out = tmp_path / "default"
    assert run_cli(str(RECIPES / "spikformer_digits.yaml"), "--out", str(out)) == 0
    report = read_report(out)
    assert report["seconds"] < 300
    assert all(check["ok"] for check in report["checks"].values()), report["checks"]
    fp32, pruned, int8 = report["stages"]
    assert pruned["memory_saving"] >= 0.2668
    assert int8["weight_bytes"] <= 0.25 * fp32["weight_bytes"]
    assert fp32["test_accuracy"] - int8["test_accuracy"] <= 0.03
    assert int8["weight_bytes"] == (out / "model_int8.bin").stat().st_size
    for name in ["model.pt", "model.onnx", "model.xml", "model.bin", "model_int8.xml", "report.md",
                 "sensitivity.png"]:
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


@pytest.mark.parametrize("recipe", ["prune_only.yaml", "quantize_only.yaml", "user_model_npz.yaml"])
def test_recipe_variants_run(recipe, tmp_path):
    out = tmp_path / "run"
    assert run_cli(str(RECIPES / recipe), "--out", str(out), "--set", "train.epochs=3") == 0
    report = read_report(out)
    loaded = load_recipe(RECIPES / recipe)
    stages = [s["stage"] for s in report["stages"]]
    assert stages[0] == "fp32"
    if loaded.prune:
        assert stages[1].startswith("pruned")
        assert report["stages"][1]["memory_bytes"] < report["stages"][0]["memory_bytes"]
    if loaded.quantize:
        assert (out / "model_int8.bin").is_file()
        assert report["stages"][-1]["weight_bytes"] < report["stages"][0]["weight_bytes"]
    for fmt in loaded.export.formats if loaded.export else []:
        assert any(name.startswith("model") for name in report["exports"]), fmt
    load_pruned(out / "model.pt") if ":" not in loaded.model.name else None


def test_overrides_reach_the_run(tmp_path):
    out = tmp_path / "o"
    assert run_cli(str(RECIPES / "prune_only.yaml"), "--out", str(out), "--set", "train.epochs=2",
                   "--set", "prune.memory_saving=0.4", "--set", "prune.max_accuracy_drop=0.5") == 0
    report = read_report(out)
    assert report["recipe_data"]["prune"]["memory_saving"] == 0.4
    assert report["stages"][1]["memory_saving"] >= 0.4


def test_same_recipe_and_seed_give_the_same_report(tmp_path):
    reports = []
    for run in ("a", "b"):
        assert run_cli(str(RECIPES / "prune_only.yaml"), "--out", str(tmp_path / run), "--set", "train.epochs=2") == 0
        reports.append(read_report(tmp_path / run))
    first, second = reports
    assert first["prune"]["plan"] == second["prune"]["plan"]
    assert [g["chosen_rate"] for g in first["prune"]["groups"]] == [g["chosen_rate"] for g in second["prune"]["groups"]]
    for a, b in zip(first["stages"], second["stages"]):
        assert (a["test_accuracy"], a["val_accuracy"], a["memory"]) == (b["test_accuracy"], b["val_accuracy"], b["memory"])


BAD_RECIPES = {
    "unknown field": ("model: {name: spikformer}\nprune: {memory_savings: 0.3}\n", "prune.memory_savings"),
    "out of range": ("model: {name: spikformer}\nprune: {memory_saving: 1.5}\n", "prune.memory_saving"),
    "wrong type": ("model: {name: spikformer}\ntrain: {epochs: many}\n", "train.epochs"),
    "missing model": ("prune: {}\n", "model"),
    "missing data file": ("model: {name: spikformer}\ndata: {name: npz, args: {path: nowhere.npz}}\nprune: {}\n",
                          "data.args.path"),
    "missing checkpoint": ("model: {name: spikformer, checkpoint: missing.pt}\nprune: {}\n", "model.checkpoint"),
    "no accuracy budget": ("model: {name: spikformer}\nprune: {max_accuracy_drop: null}\n", "prune"),
    "unknown model": ("model: {name: resnet50}\nprune: {}\n", "model.name"),
    "unknown quantizer": ("model: {name: spikformer}\nquantize: {method: int3}\n", "quantize.method"),
    "not yaml": ("model: [unclosed\n", "not valid YAML"),
    "escaping path": ("model: {name: spikformer, checkpoint: ../../etc/passwd}\nprune: {}\n", "model.checkpoint"),
    "nothing to do": ("model: {name: spikformer}\n", "nothing to do"),
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


def test_console_script_exit_code_and_validate(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: spikformer}\nprune: {rates: [0, 2]}\n")
    result = subprocess.run([sys.executable, "-m", "primesvt_plugin.cli", "validate", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "prune.rates" in result.stderr
    ok = subprocess.run([sys.executable, "-m", "primesvt_plugin.cli", "validate",
                         str(RECIPES / "spikformer_digits.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_failed_run_leaves_previous_output_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: spikformer, args: {T: 2, in_channels: 1, img_size_h: 16, img_size_w: 16,"
                      " patch_size: 4, num_classes: 10, embed_dims: 32, num_heads: 4, depths: 1}}\n"
                      "data: {name: digits, args: {image_size: 16}}\ntrain: {epochs: 1}\n"
                      "export: {formats: [onnx]}\nquantize: {method: nncf_int8, args: {bogus: 1}}\n")
    with pytest.raises(TypeError):
        run_cli(str(recipe), "--out", str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]
