"""A background evaluation worker killed with SIGKILL (--background_eval=true).

* algorithms/common/evaluation.py's Evaluator replaces a dead worker once, with one line, and the evaluations
  it had pending (its job possibly lost with it) run again; if the replacement dies too before they are done,
  EvaluationWorkerError; neither collect(wait=True) nor close() waits on a dead worker (checked once);
* in a run: a worker killed mid-run costs one line, the run ends normally and logs every evaluation with
  the values of an uninterrupted run (once, the offline script); killed again after its restart, the run stops
  (exit code 3) in one line naming the last good checkpoint, and --resume from it logs every evaluation once
  (each script: its wiring of the evaluator, its checkpoints' pending evaluations).
"""
import importlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import metrics_rows

import algorithms.offline.cql as offline_cql
from algorithms.common import evaluation

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread

# Runs a script's main() with its Evaluator's worker SIGKILLed right after the job of update KILL_AT is queued,
# and, with KILL_RESTARTED, every replacement worker as soon as it is started.
DRIVER = """
import importlib, os, signal, sys
cql = importlib.import_module(f"algorithms.{os.environ['SCRIPT']}.cql")
kill_at = int(os.environ["KILL_AT"])

def kill(evaluator):
    os.kill(evaluator.worker.pid, signal.SIGKILL)
    evaluator.worker.join()

submit, replace = cql.Evaluator.submit, cql.Evaluator.replace_dead_worker
def submit_then_kill(self, step, weights):
    submit(self, step, weights)
    if step == kill_at:
        kill(self)
def replace_then_kill(self):
    replace(self)
    kill(self)
cql.Evaluator.submit = submit_then_kill
if os.environ.get("KILL_RESTARTED"):
    cql.Evaluator.replace_dead_worker = replace_then_kill
cql.main(sys.argv[1:])
"""


def within(seconds: float, work):
    """work()'s result (or its exception), or a failure if it has not returned after `seconds` (a hang)."""
    out = []

    def run():
        try:
            out.append((work(), None))
        except Exception as e:
            out.append((None, e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"hung for {seconds} s"
    result, error = out[0]
    if error is not None:
        raise error
    return result


def kill(evaluator) -> None:
    os.kill(evaluator.worker.pid, signal.SIGKILL)
    evaluator.worker.join()


def hopper() -> gym.Env:
    return gym.make("Hopper-v4", max_episode_steps=20)


def test_a_killed_worker_is_replaced_once_then_the_evaluator_stops(capsys):
    """The common Evaluator, once, with the offline script's episode loop (the finetune script's, a
    functools.partial, runs in a worker in its run below)."""
    actor = offline_cql.TanhGaussianActor(11, 3, 1.0)
    args = (hopper(), hopper, 2, offline_cql.evaluate, (5, np.zeros(11), np.ones(11)), actor)
    evaluator = evaluation.Evaluator(*args, True, label="run-x",
                                     last_good_checkpoint=lambda: "; last good checkpoint: ck.pt")
    weights = evaluation.actor_weights(actor)
    evaluator.submit(10, weights)
    first_pid = evaluator.worker.pid
    kill(evaluator)  # its job is lost with it (it had not even started)
    got = within(120, lambda: evaluator.collect(wait=True))
    foreground = evaluation.Evaluator(*args, False)
    foreground.submit(10, weights)
    want = foreground.collect()
    assert [step for step, *_ in got] == [10]
    np.testing.assert_array_equal(got[0][1], want[0][1])
    err = capsys.readouterr().err.strip()
    assert err == (f"warning: the evaluation worker of run-x (pid {first_pid}) died (killed by SIGKILL); "
                   f"restarted it, evaluating update(s) 10 again"), err

    evaluator.submit(20, weights)
    kill(evaluator)
    assert within(60, evaluator.collect) == []  # replaced, 20 queued again
    assert "evaluating update(s) 20 again" in capsys.readouterr().err
    second_pid = evaluator.worker.pid
    kill(evaluator)  # the replacement dies too before 20 is done
    with pytest.raises(evaluation.EvaluationWorkerError) as stop:
        within(60, lambda: evaluator.collect(wait=True))
    assert str(stop.value) == (f"the evaluation worker of run-x (pid {second_pid}), restarted to run the "
                               f"evaluation of update 20 again, died too (killed by SIGKILL); stopping; "
                               f"last good checkpoint: ck.pt")
    within(60, evaluator.close)  # a dead worker: no wait
    foreground.close()


def run_args(script: str, data: Path, checkpoints: Path) -> list:
    """150 updates (iterations), evaluated every 50 in the background, checkpoints at the evaluations."""
    common = [f"--env={data}", "--eval_freq=50", "--log_freq=25", "--batch_size=16", "--cql_n_actions=2",
              "--n_episodes=2", "--max_episode_steps=20", "--wandb_mode=disabled", "--device=cpu",
              "--q_n_hidden_layers=1", "--background_eval=true", f"--checkpoints_path={checkpoints}"]
    if script == "offline":
        return [*common, "--max_timesteps=150"]
    return [*common, "--offline_iterations=100", "--online_iterations=50"]


def rows(root: Path) -> tuple:
    """(training rows in order, evaluation rows by step) of the one run directory under root."""
    (run_dir,) = [d for d in root.iterdir() if d.is_dir()]
    lines = metrics_rows(run_dir)
    evaluations = [r for r in lines if "eval_return_mean" in r]
    by_step = {r["step"]: r for r in evaluations}
    assert len(by_step) == len(evaluations), "an evaluation logged twice"
    return [r for r in lines if "eval_return_mean" not in r], by_step


@pytest.fixture(scope="module")
def reference(hopper_hdf5, tmp_path_factory):
    """Each script's rows of the run, uninterrupted and evaluated in the foreground."""
    def run(script: str) -> tuple:
        if script not in done:  # one torch thread, as in the driven runs (OMP_NUM_THREADS=1): the same sums
            assert torch.get_num_threads() == 1
            module = importlib.import_module(f"algorithms.{script}.cql")
            root = tmp_path_factory.mktemp(f"reference-{script}")
            module.train(module.parse_config([*run_args(script, hopper_hdf5, root), "--background_eval=false"]))
            done[script] = rows(root)
        return done[script]

    done = {}
    return run


def lines_about_the_worker(stderr: str) -> list:
    return [line for line in stderr.replace("\r", "\n").splitlines() if "evaluation worker" in line]


def drive(script: str, args: list, kill_restarted: bool = False) -> subprocess.CompletedProcess:
    env = {**ENV, "SCRIPT": script, "KILL_AT": "100", **({"KILL_RESTARTED": "1"} if kill_restarted else {})}
    return subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # a hang fails here


def test_a_run_whose_worker_is_killed_goes_on_and_logs_every_evaluation(hopper_hdf5, tmp_path, reference):
    """The Evaluator's replacement of a dead worker in a run: once, the offline script (the finetune script's
    run with its worker killed is the next test's)."""
    script = "offline"
    done = drive(script, run_args(script, hopper_hdf5, tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = lines_about_the_worker(done.stderr)
    assert line.startswith("warning: the evaluation worker of CQL-hopper-random-tiny-0-") and \
        "died (killed by SIGKILL); restarted it, evaluating update(s) " in line and line.endswith(" 100 again"), line
    train_rows, evaluations = rows(tmp_path)
    want_train, want_evaluations = reference(script)
    assert sorted(evaluations) == [50, 100, 150]
    assert evaluations == want_evaluations and train_rows == want_train


@pytest.mark.parametrize("script", ["offline", "finetune"])
def test_a_worker_killed_again_after_its_restart_stops_the_run_with_its_checkpoint(script, hopper_hdf5, tmp_path,
                                                                                   reference):
    module = importlib.import_module(f"algorithms.{script}.cql")
    done = drive(script, run_args(script, hopper_hdf5, tmp_path), kill_restarted=True)
    assert done.returncode == 3, done.stderr[-3000:]
    warning, error = lines_about_the_worker(done.stderr)
    assert warning.startswith("warning: ") and "restarted it" in warning, warning
    (run_dir,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    checkpoint = run_dir / "checkpoint_100.pt"
    assert error.startswith("error: the evaluation worker of ") and "died too (killed by SIGKILL); stopping" in error
    assert error.endswith(f"; last good checkpoint: {checkpoint}") and checkpoint.is_file(), error
    assert not (run_dir / "checkpoint_150.pt").exists()
    # Its unfinished evaluations are in the checkpoint: a resume logs each evaluation once, as uninterrupted.
    module.main([f"--resume={run_dir}", "--background_eval=false"])
    train_rows, evaluations = rows(tmp_path)
    assert sorted(evaluations) == [50, 100, 150]
    assert (train_rows, evaluations) == reference(script)
