"""On a CUDA GPU (skipped elsewhere, CI included): a run on the default cuda path (torch.compile, the update
replayed as a CUDA graph, background evaluation) killed with SIGKILL and resumed ends at bitwise the
weights, Adam state and metrics of an uninterrupted run, for both scripts, one run and a 2-seed stack.

The resumed process makes its first updates eagerly (compiled, not yet captured) where the uninterrupted
one replays its graph: the same kernels on the same random stream, so the test also shows that eager and
replayed updates agree bit for bit. Evaluations finish in a worker process and are logged when they come
back, so evaluation rows are compared by update, training rows in order.

The three processes share one compile cache of their own, which the uninterrupted run fills first:
Inductor benchmarks a few launch configurations of some kernels the first time it runs them and keeps
its choice in the cache, and a process choosing afresh (on a busy GPU, or from a cache other runs write
at the same time) may take another, whose rounding differs from the first update on. Resume then reads
the choice the run made, as a resume on the machine and cache the run started from does.
Run on a GPU machine with `python -m pytest -q tests/cuda/test_cuda_resume.py`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FINETUNE_SCRIPT, OFFLINE_SCRIPT, assert_same_training_state, kill_when_written, metrics_rows

from algorithms.common.runs import load_state_file

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
SCRIPTS = {
    "offline": (OFFLINE_SCRIPT, ["--max_timesteps=4500", "--checkpoint_freq=1500", "--eval_freq=1500",
                                 "--log_freq=250"], 1500, 4500),
    "finetune": (FINETUNE_SCRIPT, ["--offline_iterations=1000", "--online_iterations=2000", "--checkpoint_freq=750",
                                   "--eval_freq=750", "--log_freq=125", "--cql_alpha_online=3"], 1500, 3000),
}


def run_args(hopper_hdf5: Path, script: str, checkpoints: Path, seeds: str) -> list:
    args = [f"--env={hopper_hdf5}", "--batch_size=64", "--cql_n_actions=4", "--n_episodes=2",
            "--max_episode_steps=40", "--wandb_mode=disabled", "--device=cuda", f"--checkpoints_path={checkpoints}",
            *SCRIPTS[script][1]]
    return args + ([f"--seeds={seeds}"] if seeds else [])


def split_rows(run_dir: Path):
    """Training rows in order; evaluation rows (those with eval_return_mean) by update."""
    rows = metrics_rows(run_dir)
    train = [r for r in rows if "eval_return_mean" not in r]
    evals = sorted((r for r in rows if "eval_return_mean" in r), key=lambda r: r["step"])
    return train, evals


def assert_same_run(want_dir: Path, got_dir: Path, step: int) -> None:
    want = load_state_file(want_dir / f"checkpoint_{step}.pt")
    got = load_state_file(got_dir / f"checkpoint_{step}.pt")
    assert_same_training_state(want, got)
    assert split_rows(got_dir) == split_rows(want_dir)


@pytest.mark.parametrize("seeds", ["", "2"], ids=["one run", "2-seed stack"])
@pytest.mark.parametrize("script", ["offline", "finetune"])
def test_sigkilled_cuda_run_resumes_to_the_same_weights_and_metrics(script, seeds, hopper_hdf5, tmp_path):
    path, _, kill_at, last = SCRIPTS[script]
    env = {**ENV, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compile_cache")}
    runs = 2 if seeds else 1
    reference = subprocess.run([sys.executable, path, *run_args(hopper_hdf5, script, tmp_path / "a", seeds)],
                               env=env, capture_output=True, text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]
    process = subprocess.Popen([sys.executable, path, *run_args(hopper_hdf5, script, tmp_path / "b", seeds)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_written(process, tmp_path / "b", f"checkpoint_{kill_at}.pt", runs=runs, settle=0.2)
    killed = sorted((tmp_path / "b").iterdir())
    assert not any((d / f"checkpoint_{last}.pt").exists() for d in killed), "killed too late to test anything"
    resumed = subprocess.run([sys.executable, path, f"--resume={killed[0]}"], env=env, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at" in resumed.stdout
    for want, got in zip(sorted((tmp_path / "a").iterdir()), killed):
        assert_same_run(want, got, last)
