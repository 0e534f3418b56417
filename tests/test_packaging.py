"""The wheel carries what the README's main job needs: the default recipe and the data it reads."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_runs_the_shipped_recipe_from_an_empty_folder(tmp_path):
    dist, site, empty, source = tmp_path / "dist", tmp_path / "site", tmp_path / "empty", tmp_path / "source"
    empty.mkdir()
    # Build from a clean copy: setuptools reuses a build/ folder in the tree, stale files included.
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "runs", "mutants", "__pycache__", ".pytest_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(source)], check=True, capture_output=True)
    (wheel,) = dist.glob("primesvt_plugin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ["spikformer_digits.yaml", "prune_only.yaml", "quantize_only.yaml", "user_model_npz.yaml",
                    "user_svit.py", "data/digits_600.npz"]:
        assert f"primesvt_plugin/recipes/{shipped}" in names, shipped
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    # From an empty folder, with the installed wheel first on the path: no repository in sight.
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = ("import primesvt_plugin, primesvt_plugin.pipeline.recipe as r; "
             "print(primesvt_plugin.__file__); print(r.find_recipe('spikformer_digits'))")
    where = subprocess.run([sys.executable, "-c", probe], cwd=empty, env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert all(path.startswith(str(site)) for path in where), where
    for recipe, extra in [("spikformer_digits", []), ("user_model_npz", ["--allow-code"])]:
        result = subprocess.run([sys.executable, "-m", "primesvt_plugin.pipeline.cli", "validate", recipe, *extra],
                                cwd=empty, env=env, capture_output=True, text=True)
        assert result.returncode == 0 and f"{recipe}: ok" in result.stdout, result.stderr
    assert list(empty.iterdir()) == []
