"""PrimeSVT under torch.distributed: torchrun with 2 CPU processes (gloo) against one process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from primesvt_plugin.pipeline.cli import main
from primesvt_plugin.pipeline.output import resume_folder
from primesvt_plugin.pipeline.checkpoints import read_checkpoint

SMALL = ("{T: 2, in_channels: 1, img_size_h: 16, img_size_w: 16, patch_size: 4, num_classes: 10, embed_dims: 64, "
         "num_heads: 4, mlp_ratio: 4, depths: 1}")  # the default recipe's model: it learns digits in a few epochs


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun_command(*args: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "primesvt_plugin", *args]


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*args, processes=processes), env=TORCHRUN_ENV, capture_output=True,
                          text=True, timeout=900)


def write_recipe(path, body: str) -> str:
    path.write_text(f"seed: 0\nmodel:\n  name: spikformer\n  args: {SMALL}\n{body}")
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(digits_checkpoint):
    """A digits Spikformer trained in one process (the search-only recipes start from it): the session's."""
    return digits_checkpoint


def search_recipe(folder, checkpoint, extra: str = "") -> str:
    return write_recipe(folder / "search.yaml", f"  checkpoint: {checkpoint}\n"
                                                "data: {name: digits, args: {image_size: 16}, batch_size: 64}\n"
                                                "prune: {method: prime, memory_saving: 0.3, max_accuracy_drop: 0.05}\n"
                                                + extra)


def test_search_under_torchrun_gives_the_plan_and_the_weights_of_one_process(checkpoint, tmp_path):
    recipe = search_recipe(tmp_path, checkpoint)
    assert main(["run", recipe, "--out", str(tmp_path / "one"), "--quiet"]) == 0
    result = torchrun("run", recipe, "--out", str(tmp_path / "two"), "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two"))
    assert two["prune"]["plan"] == one["prune"]["plan"] and one["prune"]["plan"]
    assert two["prune"]["evaluations"] == one["prune"]["evaluations"]
    assert two["prune"]["pruned"]["accuracy"] == one["prune"]["pruned"]["accuracy"]  # counts summed exactly
    assert two["distributed"] == {"world_size": 2, "backend": "gloo"} and "distributed" not in one
    weights = [torch.load(tmp_path / name / "state_dict.pt") for name in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "search.yaml", "two"]  # rank 1 wrote nothing


def interrupted_after_the_first_checkpoint(args: list[str], checkpoint: Path) -> int:
    """torchrun ``args``, stopped with SIGTERM (what a cluster's scheduler sends) once ``checkpoint`` exists."""
    process = subprocess.Popen(torchrun_command(*args), env=TORCHRUN_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=120)


def test_fine_tuning_under_torchrun_completes_and_resumes_where_a_stop_left_it(checkpoint, tmp_path):
    recipe = search_recipe(tmp_path, checkpoint, "finetune: {epochs: 3, lr: 0.001}\n")
    result = torchrun("run", recipe, "--out", str(tmp_path / "whole"), "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    losses = report["finetune_loss"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert report["stages"][-1]["stage"] == "pruned + finetuned"

    saved = resume_folder(tmp_path / "cut") / "finetune.pt"
    stopped = interrupted_after_the_first_checkpoint(["run", recipe, "--out", str(tmp_path / "cut"), "--quiet"], saved)
    assert stopped != 0 and saved.is_file() and not (tmp_path / "cut").exists()
    assert 1 <= read_checkpoint(saved)["epoch"] < 3  # stopped part-way: there is something left to resume
    result = torchrun("run", recipe, "--out", str(tmp_path / "cut"), "--quiet", "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert resumed["finetune_loss"] == losses and resumed["prune"]["plan"] == report["prune"]["plan"]
    weights = [torch.load(tmp_path / name / "state_dict.pt") for name in ("whole", "cut")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not saved.parent.exists()  # done: the output supersedes the checkpoint


FAILING_BUILDER = '''
import os
from spikingjelly.activation_based.model import spikformer


def build(**args):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("this rank's disk is full")
    return spikformer.Spikformer(**args)
'''


def test_a_failing_rank_stops_the_run_with_one_line_naming_it_and_nothing_is_written(tmp_path):
    (tmp_path / "flaky_model.py").write_text(FAILING_BUILDER)
    (tmp_path / "flaky.yaml").write_text(f"seed: 0\nmodel:\n  name: flaky_model:build\n  args: {SMALL}\n"
                                         "data: {name: digits, args: {image_size: 16}}\ntrain: {epochs: 1}\n")
    result = torchrun("run", str(tmp_path / "flaky.yaml"), "--out", str(tmp_path / "out"), "--quiet", "--allow-code")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("primesvt: error:")]
    # rank 0 either is stopped by torchrun (silent) or notices first that rank 1 is gone (one line saying so)
    own = [line for line in errors if "another process of this run stopped first" not in line]
    assert len(own) == 1 and own[0].startswith("primesvt: error: rank 1: "), result.stderr[-2000:]
    assert "this rank's disk is full" in own[0] and len(errors) <= 2
    assert not (tmp_path / "out").exists()


def test_nproc_starts_the_same_thing_as_torchrun(checkpoint, tmp_path):
    recipe = search_recipe(tmp_path, checkpoint)
    assert main(["run", recipe, "--out", str(tmp_path / "out"), "--quiet", "--nproc", "2"]) == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["distributed"]["world_size"] == 2


def test_nproc_and_the_recipe_are_checked_before_any_process_starts(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml"), "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.yaml: recipe file not found" in err[0] and "rank" not in err[0], err
    for count in ("-1", "0", "two"):
        with pytest.raises(SystemExit) as exit_:
            main(["run", "spikformer_digits", "--nproc", count])
        assert exit_.value.code == 2
        assert "--nproc: the number of processes must be a whole number >= 1" in capsys.readouterr().err


def running_ranks(marker: str) -> dict[int, int]:
    """``rank -> pid`` of the live processes whose command line holds ``marker``."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_text():
                environ = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
                if "RANK" in environ and (entry / "stat").read_text().split()[2] != "Z":
                    ranks[int(environ["RANK"])] = int(entry.name)
        except OSError:
            continue
    return ranks


def started_with_nproc(tmp_path, epochs: int = 500) -> tuple[subprocess.Popen, str]:
    """``primesvt run --nproc 2`` on a long training run, returned once both ranks train."""
    recipe = write_recipe(tmp_path / "long.yaml", "data: {name: digits, args: {image_size: 16}}\n"
                                                  f"train: {{epochs: {epochs}}}\n")
    process = subprocess.Popen([sys.executable, "-m", "primesvt_plugin", "run", recipe, "--out", str(tmp_path / "out"),
                                "--quiet", "--nproc", "2"], env=TORCHRUN_ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(".partial" in p.name for p in tmp_path.iterdir()) or len(running_ranks(recipe)) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    time.sleep(2)  # training
    return process, recipe


def test_sigterm_to_nproc_stops_every_process_and_writes_nothing(tmp_path):
    process, recipe = started_with_nproc(tmp_path)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and "stopped by SIGTERM; every process was stopped, nothing was written" in errors[0], err
    assert running_ranks(recipe) == {}  # the ranks ended with the launcher, not after it
    time.sleep(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.yaml"]


def test_a_rank_killed_from_outside_is_named_and_nothing_is_written(tmp_path):
    process, recipe = started_with_nproc(tmp_path)
    victim = running_ranks(recipe)[1]
    os.kill(victim, signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    errors = [line for line in err.splitlines() if line.strip()]
    assert all(line.startswith("primesvt: error: ") for line in errors) and len(errors) <= 2, err
    assert f"rank 1 (pid {victim}) was killed by SIGKILL, so the run stopped; nothing was written" in errors[-1], err
    assert not any("unexpected" in line or "GLHF" in line for line in errors), err  # rank 0: another process stopped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.yaml"]


SCHEDULE_SCRIPT = '''
import sys
import torch
from torch.utils.data import DataLoader, TensorDataset
from primesvt_plugin import distributed
from primesvt_plugin.pipeline.training import train

distributed.init_from_environment()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
data = TensorDataset(torch.rand(50, 4), torch.randint(0, 3, (50,)))
train(model, DataLoader(data, batch_size=8, shuffle=True), epochs=3, lr=0.01, schedule="cosine", warmup_epochs=1,
      progress=False, checkpoint=sys.argv[1])
distributed.shutdown()
'''


def test_the_learning_rate_schedule_ends_at_its_end_on_one_and_two_processes(tmp_path):
    (tmp_path / "schedule.py").write_text(SCHEDULE_SCRIPT)
    states = {}
    for processes in (1, 2):
        saved = tmp_path / f"checkpoint_{processes}.pt"
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 str(processes), str(tmp_path / "schedule.py"), str(saved)], env=TORCHRUN_ENV,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        states[processes] = read_checkpoint(saved)
    for processes, state in states.items():
        steps = state["settings"]["steps_per_epoch"]
        assert steps == 7, processes  # 50 samples in global batches of 8, one process or two
        assert state["scheduler"]["last_epoch"] == 3 * steps  # every planned step was taken...
        assert state["scheduler"]["_last_lr"] == [0.0]  # ...and cosine ended at 0, not half-way
