"""The output folder: a run never deletes or hides what it did not write, and never leaves half a result."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from primesvt_plugin.pipeline.cli import main
from primesvt_plugin.errors import ExportError, OutputError
from primesvt_plugin.pipeline.output import RUN_FORMAT, locked, staged_output
from primesvt_plugin.plugins import get_plugin_manager, hookimpl, new_plugin_manager
from primesvt_plugin.pipeline.recipe import find_recipe, load_recipe
from primesvt_plugin.pipeline.runner import run_recipe

# The default recipe cut down to seconds: no training, pruning, fine-tuning or quantization.
QUICK_OVERRIDES = ["train.epochs=0", "prune=null", "finetune=null", "quantize=null", "export.formats=[torch]"]
QUICK = [arg for override in QUICK_OVERRIDES for arg in ("--set", override)] + ["--quiet"]


def run_quick(out, *extra: str) -> int:
    return main(["run", "spikformer_digits", "--out", str(out), *QUICK, *extra])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("primesvt: error: "), err
    return err[0]


def litter(folder: Path) -> list[str]:
    """Scratch, backup and lock files a run may leave beside its output."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and
                  any(tag in p.name for tag in (".partial", ".old-", ".lock")))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("the user's file")
    return tmp_path


@pytest.mark.parametrize("out", [".", "", "..", "src"])
def test_working_folder_and_foreign_folders_are_never_replaced(out, workdir, capsys):
    (workdir / "src").mkdir()
    (workdir / "src" / "main.py").write_text("print('mine')")
    before = sorted(p.name for p in workdir.rglob("*"))
    assert run_quick(out) == 2
    line = one_error_line(capsys)
    assert "working folder" in line or "is not only a previous run's output (main.py: no run's report.json" in line
    assert sorted(p.name for p in workdir.rglob("*")) == before
    assert (workdir / "src" / "main.py").read_text() == "print('mine')"


def test_out_empty_in_the_recipe_is_refused(workdir, capsys):
    assert main(["run", "spikformer_digits", *QUICK, "--set", "out=''"]) == 2
    assert "working folder" in one_error_line(capsys)
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]


def test_out_naming_a_file_is_refused(workdir, capsys):
    assert run_quick("notes.txt") == 2
    assert "is a file" in one_error_line(capsys)
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]
    assert (workdir / "notes.txt").read_text() == "the user's file"


def test_previous_run_is_replaced_atomically_and_files_follow_the_umask(workdir):
    old_mask = os.umask(0o027)
    try:
        assert run_quick("out") == 0
        first = json.loads((workdir / "out" / "report.json").read_text())
        assert first["format"] == RUN_FORMAT
        (workdir / "out" / "model.torchscript.pt").write_text("overwritten by the user")  # a file the run wrote
        assert run_quick("out") == 0  # a previous run's output is the one folder a run replaces
    finally:
        os.umask(old_mask)
    out = workdir / "out"
    assert (out / "model.torchscript.pt").read_bytes()[:2] == b"PK"  # a new TorchScript archive
    assert litter(workdir) == []
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o640}


def test_read_only_target_is_refused_before_running(workdir, capsys):
    target = workdir / "rodir"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only file system here: {mounted.stderr.decode().strip()}")
    try:
        started = time.perf_counter()
        assert run_quick(target / "out") == 2
        assert "not writable" in one_error_line(capsys)
        assert run_quick(target) == 2  # the mount point itself
        assert "mount point" in one_error_line(capsys)
        assert time.perf_counter() - started < 60  # refused up front: nothing was computed
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert litter(workdir) == [] and list(target.iterdir()) == []


def test_a_locked_output_is_refused_naming_the_holder(workdir, capsys):
    with locked(workdir / "out"):
        assert run_quick("out") == 2
        line = one_error_line(capsys)
    assert f"pid {os.getpid()}" in line and not (workdir / "out").exists()
    assert litter(workdir) == []


def test_concurrent_runs_into_one_folder_never_lose_a_result(workdir):
    recipe = load_recipe(find_recipe("spikformer_digits"), QUICK_OVERRIDES)
    outcomes: list[str] = []

    def one_run():
        try:
            run_recipe(recipe, workdir / "out", progress=False)
            outcomes.append("written")
        except OutputError as error:
            assert "being written by another primesvt run" in str(error)
            outcomes.append("refused")

    threads = [threading.Thread(target=one_run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 4 and "written" in outcomes
    assert json.loads((workdir / "out" / "report.json").read_text())["format"] == RUN_FORMAT
    assert litter(workdir) == []


def failing_exporter(model, example_input, path, *, verification=None, calibration=None, pm=None):
    raise ExportError("simulated exporter failure")


failing_exporter.time_major = False


class FailingExporter:
    @hookimpl
    def primesvt_register(self, registrar):
        registrar.exporters.add("failing", failing_exporter)


def test_failed_run_removes_the_folders_it_created(workdir):
    pm = new_plugin_manager()
    pm.register(FailingExporter(), name="failing")
    recipe = load_recipe(find_recipe("spikformer_digits"), QUICK_OVERRIDES + ["export.formats=[failing]"])
    with pytest.raises(ExportError, match="simulated"):
        run_recipe(recipe, workdir / "newparent" / "sub", pm=pm, progress=False)
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]


def test_failed_run_leaves_the_previous_output_untouched(workdir):
    assert run_quick("out") == 0
    before = {p.name: p.read_bytes() for p in (workdir / "out").iterdir()}
    pm = new_plugin_manager()
    pm.register(FailingExporter(), name="failing")
    recipe = load_recipe(find_recipe("spikformer_digits"), QUICK_OVERRIDES + ["export.formats=[failing]"])
    with pytest.raises(ExportError, match="simulated"):
        run_recipe(recipe, workdir / "out", pm=pm, progress=False)
    assert {p.name: p.read_bytes() for p in (workdir / "out").iterdir()} == before
    assert litter(workdir) == []


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"])
def test_interrupted_run_cleans_up_and_says_one_line(signum, code, workdir):
    process = subprocess.Popen([sys.executable, "-m", "primesvt_plugin.pipeline.cli", "run", "spikformer_digits",
                                "--out", "out", "--quiet", "--set", "train.epochs=500"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(".partial" in p.name for p in workdir.iterdir()):  # training has started
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "nothing was written" in lines[0], err
    assert ("SIGTERM" if signum == signal.SIGTERM else "interrupted (Ctrl-C)") in lines[0], err
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]


STOP_INSIDE_A_C_EXTENSION = """
import ctypes


def build(**kwargs):
    # what a C extension's nested PyRun_* call does when Ctrl-C lands in it: CPython marks the
    # KeyboardInterrupt unhandled, and the stop then reaches our code
    ctypes.pythonapi.PyRun_SimpleString(b"raise KeyboardInterrupt")
    raise KeyboardInterrupt
"""


def test_a_stop_that_passed_through_a_c_extension_still_exits_130(workdir):
    (workdir / "stopper.py").write_text(STOP_INSIDE_A_C_EXTENSION)
    recipe = workdir / "recipe.yaml"
    recipe.write_text(find_recipe("spikformer_digits").read_text())
    process = subprocess.run([sys.executable, "-m", "primesvt_plugin.pipeline.cli", "run", str(recipe), "--out", "out",
                              "--quiet", "--allow-code", "--set", "model.name=stopper:build"],
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 130, process.stderr  # not killed by SIGINT (-2)
    assert "interrupted (Ctrl-C); nothing was written" in process.stderr.splitlines()[-1], process.stderr
    assert not (workdir / "out").exists()


def test_a_failed_run_is_one_line_and_exit_1_and_debug_shows_the_traceback(workdir, capsys):
    pm = get_plugin_manager()  # the CLI's own manager: the failing exporter is an installed plugin for a moment
    pm.register(FailingExporter(), name="failing-for-test")
    try:
        assert run_quick("out", "--set", "export.formats=[failing]") == 1
        line = one_error_line(capsys)
        assert "simulated exporter failure" in line and "left as it was" in line
        with pytest.raises(ExportError, match="simulated"):
            run_quick("out", "--set", "export.formats=[failing]", "--debug")
    finally:
        pm.unregister(name="failing-for-test")
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]


def copy_of_a_run_with(workdir: Path, extra: dict[str, str]) -> Path:
    """``folder/`` holding a real run's files (report.json listing them) plus ``extra`` files of the user's."""
    assert run_quick("run") == 0
    folder = workdir / "folder"
    (workdir / "run").rename(folder)
    for name, text in extra.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("case", ["user files next to a run's files", "a file in a sub-folder",
                                  "a report without a files list", "the 0.1.0 sections only"])
def test_a_folder_is_replaced_only_when_its_report_lists_every_entry(case, workdir, capsys):
    if case == "user files next to a run's files":
        folder = copy_of_a_run_with(workdir, {"notes.txt": "mine"})
    elif case == "a file in a sub-folder":
        folder = copy_of_a_run_with(workdir, {"data/x.csv": "1,2"})
    else:
        folder = workdir / "folder"
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
        report = {"format": RUN_FORMAT, "stages": []} if case == "a report without a files list" else \
            {"stages": [], "recipe_data": {}}
        (folder / "report.json").write_text(json.dumps(report))
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert run_quick(folder) == 2
    line = one_error_line(capsys)
    assert "is not only a previous run's output" in line
    assert "(data: not one of the files its run's report.json lists)" in line if "sub-folder" in case else \
        "(notes.txt: " in line, line
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert litter(workdir) == []


@pytest.mark.parametrize("previous", [False, True], ids=["new folder", "over a previous run"])
def test_a_folder_filled_at_out_while_the_run_works_is_never_deleted(previous, workdir):
    out = copy_of_a_run_with(workdir, {}) if previous else workdir / "folder"
    with pytest.raises(OutputError, match="changed while the run worked .*notes.txt.*finished output is in") as error:
        with staged_output(out) as stage:
            (stage / "report.json").write_text("{}")
            out.mkdir(exist_ok=True)  # the user (or another tool) writes into out meanwhile
            (out / "notes.txt").write_text("mine")
    assert (out / "notes.txt").read_text() == "mine"
    assert (Path(str(error.value).rsplit(" ", 1)[-1]) / "report.json").is_file()  # the finished output is kept
    assert previous == (out / "report.json").is_file()  # a previous run's files stay with the user's
