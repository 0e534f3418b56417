"""``primesvt run ... --nproc N``: the same command in N processes on this machine.

The processes are started and watched by PyTorch's elastic agent (what ``torchrun
--standalone`` runs), here in this process, so that what happens to the run is ours to
say in one line:

* a stop (Ctrl-C, SIGTERM) reaches every process: the agent passes it on and waits for
  them; 130 / 143 then mean that nothing was written (a stop that came after rank 0 had
  written the output is reported as the finished run it was);
* a process that fails prints its own one line (``rank N: ...``) and the exit code is
  its own; a process killed from outside (SIGKILL, the out-of-memory killer) is named
  here, since it could not say anything itself.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from .output import REPORT

EXIT_FAILED = 1
STOP_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass(frozen=True)
class Outcome:
    """How a multi-process run ended: the exit code and the line to print (empty: the ranks said it)."""

    exit_code: int
    message: str = ""


def _report_identity(out: Path) -> tuple[int, int] | None:
    """What tells a report.json written now from the one that was there before (None: there is none)."""
    try:
        stat = (out / REPORT).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _written_outcome(out: Path) -> Outcome:
    """The run finished and wrote ``out`` before it was stopped: exit as the run itself would have."""
    try:
        checks = json.loads((out / REPORT).read_text())["checks"]
        failed = [name for name, check in checks.items() if not check["ok"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        failed = []
    code = 3 if failed else 0
    return Outcome(code, f"stopped after the run had written {out}" + (
        f"; {len(failed)} check(s) failed ({'; '.join(failed)})" if failed else ""))


def _failure_outcome(failures: dict) -> Outcome:
    """The outcome of a run whose processes failed: a process killed from outside is named; one that
    failed by itself already printed its line and gives its exit code."""
    # negative codes are signals; SIGTERM (SIGINT on Ctrl-C) is what the agent stops the others with
    agent_stops = {-signal.SIGTERM, -signal.SIGINT}
    killed = sorted(((rank, failure) for rank, failure in failures.items() if failure.exitcode < 0),
                    key=lambda item: (item[1].exitcode in agent_stops, item[0]))
    if killed:
        rank, failure = killed[0]
        return Outcome(EXIT_FAILED, f"rank {rank} (pid {failure.pid}) was killed by {failure.signal_name()}, so the "
                                    "run stopped; nothing was written, a previous output is unchanged")
    stopped = set(STOP_EXIT_CODES.values())
    codes = [failure.exitcode for _, failure in sorted(failures.items())]
    own = [code for code in codes if code not in stopped]  # the others were stopped because of it
    return Outcome((own or codes)[0])


def run_processes(command: list[str], processes: int, out: Path) -> Outcome:
    """Run ``python -m primesvt_plugin <command>`` in ``processes`` processes (one machine, as ``torchrun
    --standalone``); ``out`` is the run's output folder, to tell a finished run from a stopped one."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the agent logs every step and a multi-line summary of failures; what happened is said here instead
    # (each of its modules sets its own logger's level, so each is quietened)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N processes must not each take every core
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    before = _report_identity(out)
    try:
        elastic_launch(config, sys.executable)("-m", "primesvt_plugin", *command)
    except SignalException as stop:
        if _report_identity(out) not in (None, before):
            return _written_outcome(out)
        name = "interrupted (Ctrl-C)" if stop.sigval == signal.SIGINT else f"stopped by {stop.sigval.name}"
        return Outcome(STOP_EXIT_CODES.get(stop.sigval, EXIT_FAILED),
                       f"{name}; every process was stopped, nothing was written, a previous output is unchanged")
    except ChildFailedError as failed:
        return _failure_outcome(failed.failures)
    return Outcome(0)
