"""SIGTERM and SIGINT stop algorithms/finetune/cql.py cleanly (algorithms/common/runs.py: StopSignals): the
iteration in flight ends, its checkpoint (with the replay ring and the training env mid-episode) is written,
one line names it and the --resume command, exit code 143 / 130; the resumed run ends bitwise as the
uninterrupted one (tests/offline/test_signals.py: the same for the offline script, set-up, a second signal)."""
import re
import signal
from pathlib import Path
from typing import List

import pytest
from conftest import (
    FINETUNE_SCRIPT,
    assert_same_finetune_run,
    finetune_run_args,
    resume_as_told,
    stop_line,
    uninterrupted_then_stopped,
)

from algorithms.common.state_files import load_state_file

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def by_seed(root: Path) -> List[Path]:
    return sorted(root.iterdir(), key=lambda run_dir: int(run_dir.name.split("-")[-2]))


def test_sigterm_online_writes_the_iterations_checkpoint_and_its_resume_ends_as_the_uninterrupted_run(
        hopper_hdf5, tmp_path):
    args = finetune_run_args(hopper_hdf5, tmp_path / "a")
    code, stderr = uninterrupted_then_stopped(  # once online: since iteration 60
        FINETUNE_SCRIPT, args, tmp_path, signal.SIGTERM, lambda rows: any("online_iter" in row for row in rows))
    (run_dir,) = (tmp_path / "b").iterdir()
    match = re.fullmatch(r"stopped by SIGTERM after iteration (\d+); checkpoint: (\S+); continue with: (.+)",
                         stop_line(stderr))
    assert match, stderr[-3000:]
    step = int(match[1])
    assert code == 143 and 60 < step < 200, (code, step)
    assert match[2] == str(run_dir / f"checkpoint_{step}.pt") and (run_dir / f"replay_{step}.pt").exists()
    assert load_state_file(match[2])["progress"]["iteration"] == step

    resume_as_told(FINETUNE_SCRIPT, match[3])
    (reference,) = (tmp_path / "a").iterdir()
    assert_same_finetune_run(reference, run_dir, 200)


def test_sigint_stops_a_stack_with_every_runs_checkpoint_and_it_resumes_to_the_uninterrupted_stack(
        hopper_hdf5, tmp_path):
    args = ["--seeds=0,1", *finetune_run_args(hopper_hdf5, tmp_path / "a")]
    code, stderr = uninterrupted_then_stopped(  # offline still: the resume crosses the switch
        FINETUNE_SCRIPT, args, tmp_path, signal.SIGINT, lambda rows: len(rows) >= 3)
    match = re.fullmatch(r"stopped by SIGINT after iteration (\d+); checkpoint: checkpoint_(\d+)\.pt of each "
                         r"of its 2 runs in (\S+); continue with: (.+)", stop_line(stderr))
    assert match, stderr[-3000:]
    step = int(match[1])
    assert code == 130 and match[2] == match[1] and match[3] == str(tmp_path / "b") and step < 200, (code, step)
    stopped = by_seed(tmp_path / "b")
    assert all((run_dir / f"checkpoint_{step}.pt").exists() for run_dir in stopped)

    resume_as_told(FINETUNE_SCRIPT, match[4])
    for want, got in zip(by_seed(tmp_path / "a"), stopped):
        assert_same_finetune_run(want, got, 200)
