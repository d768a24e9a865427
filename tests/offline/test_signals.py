"""SIGINT and SIGTERM stop a run cleanly (algorithms/common/runs.py: StopSignals): the update in flight ends, a
checkpoint of it is written, one line on stderr names it and the --resume command, exit code 130 / 143; the
resumed run ends bitwise as the uninterrupted one. A signal during set-up is one line too; a second one stops
at once; Ctrl-C reaching the background evaluation worker (a terminal signals the whole process group) prints
nothing from it, and its pending evaluations go into the checkpoint."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    CHILD_ENV,
    OFFLINE_SCRIPT,
    assert_same_offline_weights,
    metrics_rows,
    offline_run_args,
    resume_as_told,
    signal_when,
    stop_line,
    uninterrupted_then_stopped,
)

import algorithms.offline.cql as cql
from algorithms.common import process
from algorithms.common.state_files import load_state_file

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread (the in-process runs)


@pytest.fixture(scope="module")
def reference(hopper_hdf5, tmp_path_factory) -> Path:
    """The uninterrupted run of offline_run_args (120 updates)."""
    root = tmp_path_factory.mktemp("reference")
    subprocess.run([sys.executable, OFFLINE_SCRIPT, *offline_run_args(hopper_hdf5, root)], env=CHILD_ENV,
                   check=True, capture_output=True, timeout=600)
    (run_dir,) = root.iterdir()
    return run_dir


def test_sigint_writes_a_checkpoint_of_the_update_and_its_resume_ends_as_the_uninterrupted_run(
        hopper_hdf5, tmp_path, reference):
    code, stderr = signal_when(OFFLINE_SCRIPT, offline_run_args(hopper_hdf5, tmp_path), tmp_path, signal.SIGINT,
                               lambda rows: len(rows) >= 1)  # the row of update 20
    (run_dir,) = tmp_path.iterdir()
    line = stop_line(stderr)
    match = re.fullmatch(r"stopped by SIGINT after update (\d+); checkpoint: (\S+); continue with: (.+)", line)
    assert code == 130 and match, line
    step = int(match[1])
    assert 20 <= step < 120, "stopped too late to test anything"
    assert match[2] == str(run_dir / f"checkpoint_{step}.pt")  # the update it stopped after, whatever the schedule
    assert load_state_file(match[2])["total_it"] == step

    resume_as_told(OFFLINE_SCRIPT, match[3])
    assert_same_offline_weights(reference, run_dir, 120)
    assert metrics_rows(run_dir) == metrics_rows(reference)  # every row once, the same values, in the same order


def test_sigterm_stops_a_stack_with_every_runs_checkpoint_and_it_resumes_to_the_uninterrupted_stack(
        hopper_hdf5, tmp_path):
    args = ["--seeds=0,1", *offline_run_args(hopper_hdf5, tmp_path / "a")]
    code, stderr = uninterrupted_then_stopped(OFFLINE_SCRIPT, args, tmp_path, signal.SIGTERM,
                                              lambda rows: len(rows) >= 2)
    line = stop_line(stderr)
    match = re.fullmatch(r"stopped by SIGTERM after update (\d+); checkpoint: checkpoint_(\d+)\.pt of each of its "
                         r"2 runs in (\S+); continue with: (.+)", line)
    assert code == 143 and match and match[1] == match[2] and match[3] == str(tmp_path / "b"), line
    step = int(match[1])
    assert step < 120, "stopped too late to test anything"
    stopped = sorted((tmp_path / "b").iterdir(), key=lambda d: d.name.split("-")[-2])  # by seed
    assert all((run_dir / f"checkpoint_{step}.pt").exists() for run_dir in stopped)

    resume_as_told(OFFLINE_SCRIPT, match[4])
    for want, got in zip(sorted((tmp_path / "a").iterdir(), key=lambda d: d.name.split("-")[-2]), stopped):
        assert_same_offline_weights(want, got, 120)
        assert metrics_rows(got) == metrics_rows(want)


def test_ctrl_c_to_the_process_group_leaves_the_background_worker_quiet_and_its_evaluations_in_the_checkpoint(
        hopper_hdf5, tmp_path, reference):
    args = offline_run_args(hopper_hdf5, tmp_path) + ["--background_eval=true", "--eval_freq=20"]
    code, stderr = signal_when(OFFLINE_SCRIPT, args, tmp_path, signal.SIGINT, lambda rows: len(rows) >= 1, group=True)
    (run_dir,) = tmp_path.iterdir()
    match = re.fullmatch(r"stopped by SIGINT after update (\d+); checkpoint: (\S+); continue with: (.+)",
                         stop_line(stderr))  # nothing from the worker, which got the SIGINT too
    assert code == 130 and match
    pending = load_state_file(match[2])["run"]["pending_evaluations"]
    assert 20 in pending, "the worker (still starting) had not evaluated update 20 yet: it goes into the checkpoint"

    resume_as_told(OFFLINE_SCRIPT, match[3])
    assert_same_offline_weights(reference, run_dir, 120)
    # Evaluations every 20 updates here (every 60 in the reference), arriving at their own update.
    rows = {(row["step"], tuple(sorted(row))): row for row in metrics_rows(run_dir)}
    want = {(row["step"], tuple(sorted(row))): row for row in metrics_rows(reference)}
    assert {key: row for key, row in rows.items() if key in want} == want
    assert sorted(step for step, names in rows if "eval_return_mean" in names) == [20, 40, 60, 80, 100, 120]


@pytest.mark.parametrize("resumed", [False, True])
def test_a_signal_during_set_up_is_one_line_and_exit_130_or_143(hopper_hdf5, tmp_path, monkeypatch, capsys, resumed):
    args = offline_run_args(hopper_hdf5, tmp_path, updates=10) + ["--checkpoint_freq=5"]
    if resumed:  # a run to resume, stopped during the set-up of its --resume
        cql.train(cql.parse_config(args))
        (run_dir,) = tmp_path.iterdir()
        args = [f"--resume={run_dir}", "--max_timesteps=20"]
        capsys.readouterr()
    signum = signal.SIGINT if resumed else signal.SIGTERM  # Ctrl-C, a cluster preempting the job
    load_dataset = cql.load_dataset

    def signalled_while_loading(config):
        os.kill(os.getpid(), signum)
        return load_dataset(config)

    monkeypatch.setattr(cql, "load_dataset", signalled_while_loading)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit:
        cql.main(args)
    assert exit.value.code == 128 + signum
    assert capsys.readouterr().err == (
        f"stopped by SIGINT during set-up, before training; its checkpoints are kept: continue with: python "
        f"{os.path.relpath(OFFLINE_SCRIPT)} --resume {run_dir}\n" if resumed else
        "stopped by SIGTERM during set-up, before training; no checkpoint written yet, nothing to resume\n")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
    if resumed:
        monkeypatch.setattr(cql, "load_dataset", load_dataset)
        assert cql.train(cql.parse_config(args))["updates"] == 20


def test_a_signal_after_the_loop_stops_at_once_naming_the_last_checkpoint(hopper_hdf5, tmp_path, monkeypatch):
    collect = cql.Evaluator.collect

    def interrupted_at_the_end(self, wait=False):
        if wait:  # the last evaluations, after the loop
            os.kill(os.getpid(), signal.SIGINT)
        return collect(self, wait)

    monkeypatch.setattr(cql.Evaluator, "collect", interrupted_at_the_end)
    with pytest.raises(process.Stopped, match=r"^stopped by SIGINT after the last update \(10\), while its last "
                                           r"evaluations ran; checkpoint: \S+/checkpoint_10\.pt; continue with: "):
        cql.train(cql.parse_config(offline_run_args(hopper_hdf5, tmp_path, updates=10)))


def signal_in_update(monkeypatch, update: int, times: int) -> None:
    """Sends SIGINT `times` times to this process during the given update (1-based) of the offline trainer."""
    apply_update = cql.CQL.apply_update

    def interrupted(self, *args):
        if self.total_it == update:  # counted before the update is applied
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return apply_update(self, *args)

    monkeypatch.setattr(cql.CQL, "apply_update", interrupted)


def test_without_checkpoints_path_the_line_says_there_is_no_checkpoint(hopper_hdf5, tmp_path, monkeypatch):
    signal_in_update(monkeypatch, 6, times=1)
    args = offline_run_args(hopper_hdf5, tmp_path, updates=20)[:-1] + [f"--log_dir={tmp_path}"]
    with pytest.raises(process.Stopped, match=r"^stopped by SIGINT after update 6; no checkpoint \(checkpoints_path "
                                           r"not set\)$") as stopped:
        cql.train(cql.parse_config(args))
    assert stopped.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's Ctrl-C works again


def test_a_second_signal_stops_at_once_naming_the_last_complete_checkpoint(hopper_hdf5, tmp_path, monkeypatch):
    signal_in_update(monkeypatch, 8, times=2)
    args = offline_run_args(hopper_hdf5, tmp_path, updates=20) + ["--checkpoint_freq=5"]
    with pytest.raises(process.Stopped, match=r"^stopped by SIGINT a second time, during update 8 or its checkpoint "
                                           r"\(not waiting for them\); checkpoint: \S+/checkpoint_5\.pt; continue "
                                           r"with: python \S+ --resume \S+$"):
        cql.train(cql.parse_config(args))
    (run_dir,) = tmp_path.iterdir()
    assert [p.name for p in cql.checkpoint_files(run_dir)] == ["checkpoint_5.pt"]
