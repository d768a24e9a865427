"""Runs survive kills and lose nothing: exact resume, atomic writes, non-finite values stop the run."""
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    CHILD_ENV,
    OFFLINE_SCRIPT,
    ROOT,
    assert_same_offline_weights,
    kill_when_written,
    metrics_rows,
    offline_run_args,
    poison_critic_at_update,
)

import algorithms.offline.cql as cql
from algorithms.common.runs import load_state_file


def test_sigkilled_run_resumes_to_the_same_weights_and_metrics(hopper_hdf5, tmp_path):
    # The reference: one uninterrupted run.
    subprocess.run([sys.executable, OFFLINE_SCRIPT, *offline_run_args(hopper_hdf5, tmp_path / "a")], env=CHILD_ENV,
                   check=True, capture_output=True, timeout=600)
    (reference,) = (tmp_path / "a").iterdir()

    # The same run, killed (SIGKILL) once its second checkpoint exists, somewhere in the next interval.
    process = subprocess.Popen([sys.executable, OFFLINE_SCRIPT, *offline_run_args(hopper_hdf5, tmp_path / "b")],
                               env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_written(process, tmp_path / "b", "checkpoint_60.pt", settle=0.3)
    (killed,) = (tmp_path / "b").iterdir()
    assert not (killed / "checkpoint_120.pt").exists(), "killed too late to test anything"

    result = subprocess.run([sys.executable, OFFLINE_SCRIPT, f"--resume={killed}"], env=CHILD_ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed at update" in result.stdout
    assert_same_offline_weights(reference, killed, 120)
    assert metrics_rows(killed) == metrics_rows(reference)  # every row once, the same values, in the same order


def test_kill_inside_an_atomic_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "checkpoint_10.pt"
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
import algorithms.common.runs as cql
target = Path({str(target)!r})
cql.write_atomic(target, lambda f: f.write(b"old, complete"))
def half_then_die(f):
    f.write(b"new, half writ")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
cql.write_atomic(target, half_then_die)
"""
    result = subprocess.run([sys.executable, "-c", code], env=CHILD_ENV, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old, complete"
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint_10.pt.") and leftovers[0].endswith(".tmp")


def test_non_finite_loss_stops_with_quantity_and_updates_and_keeps_last_good_checkpoint(
        hopper_hdf5, tmp_path, monkeypatch):
    poison_critic_at_update(cql, monkeypatch, 25)
    config = cql.parse_config(offline_run_args(hopper_hdf5, tmp_path, updates=60)[:-1] + [
        "--checkpoint_freq=20", f"--checkpoints_path={tmp_path}"])
    with pytest.raises(FloatingPointError, match=r"non-finite \w+ \(nan\) in updates 21\.\.40; "
                                                 r"last good checkpoint: .*checkpoint_20\.pt"):
        cql.train(config)
    (run_dir,) = tmp_path.iterdir()
    assert [p.name for p in cql.checkpoint_files(run_dir)] == ["checkpoint_20.pt"]
    state = load_state_file(run_dir / "checkpoint_20.pt")
    assert all(torch.isfinite(v).all() for v in state["critic"].values())


def test_keep_checkpoints_keeps_the_newest(hopper_hdf5, tmp_path):
    config = cql.parse_config(offline_run_args(hopper_hdf5, tmp_path, updates=50) + ["--checkpoint_freq=10",
                                                                              "--keep_checkpoints=2"])
    run_dir = Path(cql.train(config)["run_dir"])
    assert [p.name for p in cql.checkpoint_files(run_dir)] == ["checkpoint_40.pt", "checkpoint_50.pt"]


def test_resume_errors_name_the_field(tmp_path):
    with pytest.raises(cql.ConfigError, match="field 'resume': .* is not a run directory"):
        cql.parse_config([f"--resume={tmp_path}"])
    (tmp_path / "config.yaml").write_text("max_timesteps: 10\n")
    config = cql.parse_config([f"--resume={tmp_path}", "--env=/nonexistent.hdf5"])
    assert config.max_timesteps == 10 and config.resume == str(tmp_path)
    with pytest.raises(cql.ConfigError, match="field 'checkpoint_freq' must be > 0"):
        cql.parse_config(["--checkpoint_freq=0"])
