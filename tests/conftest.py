"""Shared fixtures: small datasets made on the spot (the tests never download)."""
import inspect
import json
import multiprocessing.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from algorithms.common.runs import load_state_file
from tools.rollouts import random_transitions, write_d4rl_hdf5

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_SCRIPT = str(ROOT / "algorithms/offline/cql.py")
FINETUNE_SCRIPT = str(ROOT / "algorithms/finetune/cql.py")
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # a script run as a child process
BUFFER_FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals")


SYSTEM_TMP = Path(tempfile.gettempdir())  # where temporary files go outside the test session


@pytest.fixture(scope="session", autouse=True)
def session_temp_dir(tmp_path_factory) -> Path:
    """A temporary directory for the session, removed at its end, as the temp dir of this process and of the
    children it starts: Gymnasium-Robotics' maze envs write an ant_maze<time>.xml beside tempfile's directory
    each time one is made and never remove it (dozens a run)."""
    tmp_path_factory.getbasetemp()  # pytest's own tmp_path folders stay where they were (pytest keeps the last 3)
    multiprocessing.util.get_temp_dir()  # so does this process's multiprocessing folder: removed at its exit
    folder = Path(tempfile.mkdtemp(prefix="cql-tests-"))
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = CHILD_ENV["TMPDIR"] = str(folder)  # CHILD_ENV was copied from os.environ at import
    tempfile.tempdir = str(folder)
    yield folder
    tempfile.tempdir = saved_tempdir
    for env in (os.environ, CHILD_ENV):
        if saved_env is None:
            env.pop("TMPDIR", None)
        else:
            env["TMPDIR"] = saved_env
    shutil.rmtree(folder, ignore_errors=True)


HOPPER_ATTRS = {"env_id": "Hopper-v4", "ref_min_score": -20.272305, "ref_max_score": 3234.3}  # D4RL's references


@pytest.fixture(scope="session")
def hopper_hdf5(tmp_path_factory) -> Path:
    """A 3000-step random Hopper-v4 dataset in D4RL's HDF5 layout, eval env in its metadata."""
    path = tmp_path_factory.mktemp("data") / "hopper-random-tiny.hdf5"
    return write_d4rl_hdf5(path, random_transitions("Hopper-v4", 3000, seed=0), HOPPER_ATTRS)


@pytest.fixture(scope="session")
def second_hopper(tmp_path_factory) -> Path:
    """Another Hopper dataset (other transitions, another size): a second config's data in a stack."""
    return write_d4rl_hdf5(tmp_path_factory.mktemp("data") / "hopper-second.hdf5",
                           random_transitions("Hopper-v4", 2000, seed=5), HOPPER_ATTRS)


# ---------------------------------------------------------------- stacks of configs (both scripts)
def config_file_of(run_args: list, folder: Path, name: str, **fields) -> str:
    """<folder>/<name>.yaml holding a run's --key=value arguments (checkpoints_path left out), `fields` on top."""
    values = {}
    for arg in run_args:
        key, _, value = arg[2:].partition("=")
        values[key] = yaml.safe_load(value)
    values.pop("checkpoints_path")
    values.update(fields)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def by_member(folder: Path) -> dict:
    """{(dataset label, seed): run dir} of a stack's run directories."""
    return {(d.name.split("-", 1)[1].rsplit("-", 2)[0], int(d.name.split("-")[-2])): d for d in folder.iterdir()}


def assert_each_member_records_itself(root: Path, first: Path, second: Path) -> dict:
    """A stack of configs [first's data, second's with normalize_reward] x seeds 0, 1 left four run directories
    under root, each listing the stack in stack.yaml and with its own config.yaml; returns by_member(root)."""
    runs = by_member(root)
    assert sorted(runs) == [(first.stem, 0), (first.stem, 1), (second.stem, 0), (second.stem, 1)]
    names = yaml.safe_load((runs[second.stem, 1] / "stack.yaml").read_text())["runs"]
    assert sorted(names) == sorted(d.name for d in runs.values())
    for (label, seed), run_dir in runs.items():
        own = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (own["seed"], own["seeds"], own["stack_configs"]) == (seed, None, None)
        assert own["env"] == str(first if label == first.stem else second)
        assert own["normalize_reward"] is (label == second.stem)
    return runs


def assert_other_shapes_are_one_line(script: str, make_config: Callable[[str, Path], str], hopper: Path,
                                     tmp_path: Path) -> None:
    """A stack of a config on the Hopper dataset and one on a HalfCheetah dataset (make_config(name, dataset):
    its file) stops with one line naming both datasets' shapes, exit 2."""
    cheetah = write_d4rl_hdf5(tmp_path / "cheetah.hdf5", random_transitions("HalfCheetah-v4", 500, seed=0),
                              {"env_id": "HalfCheetah-v4"})
    files = [make_config("a", hopper), make_config("b", cheetah)]
    done = subprocess.run([sys.executable, script, f"--stack_configs={','.join(files)}",
                           f"--checkpoints_path={tmp_path / 'runs'}"], env=CHILD_ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: field 'stack_configs': dataset file ")
    assert "state 17, action 6" in done.stderr and "state 11, action 3" in done.stderr


def metrics_rows(run_dir) -> list:
    """The rows of a run directory's metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def kill_when_written(process: subprocess.Popen, run_root: Path, checkpoint: str, runs: int = 1,
                      settle: float = 0.1) -> None:
    """SIGKILLs process once `runs` run directories under run_root hold `checkpoint`, `settle` seconds later
    (somewhere in the interval after that checkpoint); fails if the process ends first."""
    deadline = time.time() + 300
    while len(list(run_root.glob(f"*/{checkpoint}"))) < runs and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    time.sleep(settle)
    process.send_signal(signal.SIGKILL)
    process.wait()


def refuse_temporary_files(monkeypatch, prefix: str, error_number: int) -> None:
    """Makes tempfile.mkstemp fail with error_number for files whose name starts with prefix (the scripts'
    write_atomic makes ".<name>." files), as a full or read-only file system refuses them; root's chmod cannot."""
    make_temporary = tempfile.mkstemp

    def refusing(*args, **kwargs):
        if kwargs.get("prefix", "").startswith(prefix):
            raise OSError(error_number, os.strerror(error_number))
        return make_temporary(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refusing)


def assert_same_training_state(want: dict, got: dict) -> None:
    """Two checkpoints (torch.load'ed) hold bitwise the same networks, target critics, alphas and Adam state."""
    for part in ("actor", "critic", "target_critic"):
        for name in want[part]:
            assert torch.equal(want[part][name], got[part][name]), (part, name)
    for name in ("log_alpha", "log_alpha_prime"):
        assert torch.equal(want[name], got[name]), name
    for index, state in want["optimizer"]["state"].items():
        for key in state:
            assert torch.equal(state[key].cpu(), got["optimizer"]["state"][index][key].cpu()), (index, key)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small, busy CPU two threads contend and updates get many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def poison_critic_at_update(module, monkeypatch, update: int) -> None:
    """Makes a critic weight NaN just before the given update of module's CQL trainer."""
    original = module.CQL.apply_update

    def poisoned(self, *args):
        if self.total_it == update:
            with torch.no_grad():
                self.critic.weights[1].fill_(float("nan"))
        return original(self, *args)

    monkeypatch.setattr(module.CQL, "apply_update", poisoned)


def update_inputs(gen: torch.Generator, dims: tuple, runs: tuple = (), next_per_cql_action: bool = False):
    """A CQL update's batch (obs, actions, rewards, next obs, dones) and noise, (*runs, batch, ...), from
    gen; dims = (state, action, batch, cql_n_actions). next_per_cql_action: the "next" noise of
    cql_max_target_backup, one per sampled action."""
    S, A, B, N = dims

    def randn(*shape):
        return torch.randn(*runs, *shape, generator=gen)

    def uniform(*shape):
        return torch.rand(*runs, *shape, generator=gen) * 1.8 - 0.9

    batch = (randn(B, S), uniform(B, A), randn(B), randn(B, S), (torch.rand(*runs, B, generator=gen) < 0.2).float())
    noise = {"policy": randn(B, A), "next": randn(*((B, N, A) if next_per_cql_action else (B, A))),
             "cql_current": randn(B, N, A), "cql_next": randn(B, N, A), "cql_random": uniform(B, N, A)}
    return batch, noise


def stack_runs(per_run):
    """Per-run (batch, noise) pairs as a seed stack's (n_seeds, ...) batch and noise."""
    batch = tuple(torch.stack(parts) for parts in zip(*(b for b, _ in per_run)))
    noise = {k: torch.stack([n[k] for _, n in per_run]) for k in per_run[0][1]}
    return batch, noise


def nan_rewards(batch, run=None):
    """The batch with NaN rewards (of run `run` of a stack only, else all)."""
    rewards = batch[2].clone()
    (rewards if run is None else rewards[run]).fill_(float("nan"))
    return (*batch[:2], rewards, *batch[3:])


def poison_batch_at_updates(module, monkeypatch, updates, run=None) -> None:
    """Makes the rewards of the batches of the given updates of module's CQL trainer NaN (for a stack
    of runs, of run `run` only, else of all): a bad batch, the weights stay as they are."""
    original = module.CQL.apply_update

    def poisoned(self, batch, *args):
        return original(self, nan_rewards(batch, run) if self.total_it in updates else batch, *args)

    monkeypatch.setattr(module.CQL, "apply_update", poisoned)


def offline_run_args(hopper_hdf5: Path, checkpoints: Path, updates: int = 120) -> list:
    """A short offline run on the tiny Hopper dataset, checkpointing every 30 updates."""
    return [f"--env={hopper_hdf5}", f"--max_timesteps={updates}", "--eval_freq=60", "--log_freq=20",
            "--checkpoint_freq=30", "--batch_size=32", "--cql_n_actions=4", "--n_episodes=2",
            "--max_episode_steps=30", "--wandb_mode=disabled", "--device=cpu", f"--checkpoints_path={checkpoints}"]


def offline_final_weights(run_dir: Path, step: int) -> dict:
    """An offline checkpoint's networks, Adam state and alpha."""
    state = load_state_file(run_dir / f"checkpoint_{step}.pt")
    return {"actor": state["actor"], "critic": state["critic"], "target": state["target_critic"],
            "optimizer": state["optimizer"]["state"], "log_alpha": state["log_alpha"]}


def assert_same_offline_weights(want_dir: Path, got_dir: Path, step: int) -> None:
    """Two offline runs' checkpoints of `step` hold bitwise the same networks, target critics, alpha and Adam state."""
    want, got = offline_final_weights(want_dir, step), offline_final_weights(got_dir, step)
    for part in ("actor", "critic", "target"):
        for name in want[part]:
            assert torch.equal(want[part][name], got[part][name]), (part, name)
    assert torch.equal(want["log_alpha"], got["log_alpha"])
    for index, state in want["optimizer"].items():
        for key in state:
            assert torch.equal(state[key], got["optimizer"][index][key]), (index, key)


def first_run_rows(run_root: Path) -> list:
    """The whole rows of the first run's metrics.jsonl under run_root (none before it exists)."""
    files = sorted(run_root.glob("*/metrics.jsonl"))
    return [json.loads(line) for line in files[0].read_text().split("\n")[:-1]] if files else []


def signal_when(script: str, args: list, run_root: Path, signum: int, ready, group: bool = False) -> tuple:
    """Runs script with args, sends signum (to its process group, as a terminal's Ctrl-C, with group) once
    ready(first_run_rows(run_root)); returns its exit code and stderr."""
    child = subprocess.Popen([sys.executable, script, *args], env=CHILD_ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=group)
    deadline = time.time() + 300
    while not ready(first_run_rows(run_root)):
        assert child.poll() is None and time.time() < deadline, "the run ended before the signal"
        time.sleep(0.02)
    (os.killpg if group else os.kill)(child.pid, signum)
    stderr = child.communicate(timeout=300)[1]
    return child.returncode, stderr


def uninterrupted_then_stopped(script: str, args: list, tmp_path: Path, signum: int, ready) -> tuple:
    """Runs args (their last one --checkpoints_path=<tmp_path>/a) to the end, then again into <tmp_path>/b stopped
    by signum once ready(rows) (signal_when); returns the stopped run's exit code and stderr."""
    subprocess.run([sys.executable, script, *args], env=CHILD_ENV, check=True, capture_output=True, timeout=600)
    stopped_args = args[:-1] + [f"--checkpoints_path={tmp_path / 'b'}"]
    return signal_when(script, stopped_args, tmp_path / "b", signum, ready)


def stop_line(stderr: str) -> str:
    """The one line a run stopped by a signal prints; no traceback (the bar's lines may stand before it)."""
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and stderr.splitlines()[-1] == lines[0], stderr[-3000:]
    return lines[0]


def resume_as_told(script: str, command: str) -> None:
    """Runs a stop line's `continue with:` command (with this interpreter), which must finish the run."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", os.path.relpath(script)] and argv[2] == "--resume", command
    result = subprocess.run([sys.executable, *argv[1:]], env=CHILD_ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def finetune_run_args(hopper_hdf5: Path, checkpoints: Path, offline: int = 60, online: int = 140) -> list:
    """A short finetune run on the tiny Hopper dataset, checkpointing every 20 iterations."""
    return [f"--env={hopper_hdf5}", f"--offline_iterations={offline}", f"--online_iterations={online}",
            "--eval_freq=50", "--log_freq=10", "--checkpoint_freq=20", "--batch_size=32", "--cql_n_actions=2",
            "--n_episodes=2", "--max_episode_steps=25", "--cql_alpha_online=3", "--wandb_mode=disabled",
            "--device=cpu", f"--checkpoints_path={checkpoints}"]


def assert_same_finetune_run(want_dir: Path, got_dir: Path, step: int) -> None:
    """Final weights, Adam state, alphas, counters, replay rows and every metrics row are identical."""
    want = load_state_file(want_dir / f"checkpoint_{step}.pt")
    got = load_state_file(got_dir / f"checkpoint_{step}.pt")
    assert_same_training_state(want, got)
    assert (want["total_it"], want["cql_alpha"], want["progress"]) == (got["total_it"], got["cql_alpha"],
                                                                       got["progress"])
    want_replay = load_state_file(want_dir / f"replay_{step}.pt")
    got_replay = load_state_file(got_dir / f"replay_{step}.pt")
    for key in BUFFER_FIELDS:
        assert torch.equal(want_replay[key], got_replay[key]), key
    assert metrics_rows(got_dir) == metrics_rows(want_dir)  # every row once, the same values, in the same order


def trainer_grads(trainer):
    """The gradients of the actor, critics and alphas by group (zeros where none)."""
    def g(params):
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

    return {
        "actor": g(list(trainer.actor.net.parameters())
                   + [trainer.actor.log_std_multiplier, trainer.actor.log_std_offset]),
        "critic": g(list(trainer.critic.weights) + list(trainer.critic.biases)),
        "log_alpha": g([trainer.log_alpha]),
        "log_alpha_prime": g([trainer.log_alpha_prime]),
    }


def fast_losses(trainer, batch, noise, bc=False, penalty=True):
    """The script's losses; the finetune script's take whether the penalty is computed (see CQL.phase)."""
    if "penalty" in inspect.signature(trainer.losses).parameters:
        return trainer.losses(batch, noise, bc=bc, penalty=penalty)
    assert penalty, "the offline script always computes the penalty"
    return trainer.losses(batch, noise, bc=bc)
