"""SIGTERM and SIGINT stop algorithms/finetune/cql.py cleanly (algorithms/common/runs.py: StopSignals): the
iteration in flight ends, its checkpoint (with the replay ring and the training env mid-episode) is written,
one line names it and the --resume command, exit code 143 / 130; the resumed run ends bitwise as the
uninterrupted one (tests/offline/test_signals.py: the same for the offline script, set-up, a second signal)."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

import pytest
import torch
from conftest import CHILD_ENV, FINETUNE_SCRIPT, assert_same_finetune_run, finetune_run_args

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def signal_when(args: list, run_root: Path, signum: int, ready: Callable[[List[dict]], bool]) -> Tuple[int, str]:
    """Runs the script with args, sends signum once ready(the whole rows of its first run's metrics.jsonl);
    returns its exit code and stderr."""
    process = subprocess.Popen([sys.executable, FINETUNE_SCRIPT, *args], env=CHILD_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ready([json.loads(line) for file in sorted(run_root.glob("*/metrics.jsonl"))[:1]
                     for line in file.read_text().split("\n")[:-1]]):
        assert process.poll() is None and time.time() < deadline, "the run ended before the signal"
        time.sleep(0.02)
    process.send_signal(signum)
    stderr = process.communicate(timeout=300)[1]
    return process.returncode, stderr


def stop_line(stderr: str, pattern: str) -> re.Match:
    """The one line a stopped run prints, matched against pattern; no traceback."""
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and stderr.splitlines()[-1] == lines[0], stderr[-3000:]
    match = re.fullmatch(pattern, lines[0])
    assert match, lines[0]
    return match


def resume_as_told(command: str) -> None:
    """Runs the line's `continue with:` command (with this interpreter), which must finish the run."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", os.path.relpath(FINETUNE_SCRIPT)] and argv[2] == "--resume", command
    result = subprocess.run([sys.executable, *argv[1:]], env=CHILD_ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def by_seed(root: Path) -> List[Path]:
    return sorted(root.iterdir(), key=lambda run_dir: int(run_dir.name.split("-")[-2]))


def test_sigterm_online_writes_the_iterations_checkpoint_and_its_resume_ends_as_the_uninterrupted_run(
        hopper_hdf5, tmp_path):
    args = finetune_run_args(hopper_hdf5, tmp_path / "a")
    subprocess.run([sys.executable, FINETUNE_SCRIPT, *args], env=CHILD_ENV, check=True, capture_output=True,
                   timeout=600)
    code, stderr = signal_when(args[:-1] + [f"--checkpoints_path={tmp_path / 'b'}"], tmp_path / "b", signal.SIGTERM,
                               lambda rows: any("online_iter" in row for row in rows))  # online since iteration 60
    (run_dir,) = (tmp_path / "b").iterdir()
    match = stop_line(stderr, r"stopped by SIGTERM after iteration (\d+); checkpoint: (\S+); continue with: (.+)")
    step = int(match[1])
    assert code == 143 and 60 < step < 200, (code, step)
    assert match[2] == str(run_dir / f"checkpoint_{step}.pt") and (run_dir / f"replay_{step}.pt").exists()
    assert torch.load(match[2], weights_only=False)["progress"]["iteration"] == step

    resume_as_told(match[3])
    (reference,) = (tmp_path / "a").iterdir()
    assert_same_finetune_run(reference, run_dir, 200)


def test_sigint_stops_a_stack_with_every_runs_checkpoint_and_it_resumes_to_the_uninterrupted_stack(
        hopper_hdf5, tmp_path):
    args = ["--seeds=0,1", *finetune_run_args(hopper_hdf5, tmp_path / "a")]
    subprocess.run([sys.executable, FINETUNE_SCRIPT, *args], env=CHILD_ENV, check=True, capture_output=True,
                   timeout=600)
    code, stderr = signal_when(args[:-1] + [f"--checkpoints_path={tmp_path / 'b'}"], tmp_path / "b", signal.SIGINT,
                               lambda rows: len(rows) >= 3)  # offline still: the resume crosses the switch
    match = stop_line(stderr, r"stopped by SIGINT after iteration (\d+); checkpoint: checkpoint_(\d+)\.pt of each "
                              r"of its 2 runs in (\S+); continue with: (.+)")
    step = int(match[1])
    assert code == 130 and match[2] == match[1] and match[3] == str(tmp_path / "b") and step < 200, (code, step)
    stopped = by_seed(tmp_path / "b")
    assert all((run_dir / f"checkpoint_{step}.pt").exists() for run_dir in stopped)

    resume_as_told(match[4])
    for want, got in zip(by_seed(tmp_path / "a"), stopped):
        assert_same_finetune_run(want, got, 200)
